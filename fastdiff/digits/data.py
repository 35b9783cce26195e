"""scikit-learn's bundled digits (1797 8x8 images, 10 classes): data, classifier, quality.

The quality check anyone can rerun: an independent classifier trained on the real training
split (held-out test split for its own accuracy) scores generated samples by conditional
accuracy, and its penultimate features give a Frechet distance (FD, not FID: no Inception
weights can be downloaded), reported beside the FD between the real train and test splits.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_SIZE = 8
NUM_CLASSES = 10


def load(split: str = "train"):
    """Images (N, 1, 8, 8) float32 in [-1, 1] and labels (N,) int64; a fixed 75/25 split."""
    from fastdiff.digits import require

    require("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"'split' must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0   # 0..16 -> -1..1
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0,
                                           stratify=d.target)
    idx = idx_train if split == "train" else idx_test
    return x[idx], y[idx]


class Classifier(nn.Module):
    """A small CNN on 8x8 digits; ``features`` is the 64-d penultimate layer used for FD."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 64)
        self.out = nn.Linear(64, NUM_CLASSES)

    def features(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


@torch.enable_grad()
def train_classifier(seed: int = 0, epochs: int = 15) -> Classifier:
    """Trains on the real training split with light augmentation (seeded, a few seconds)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load("train")
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            xb = x[b] + 0.1 * torch.randn(x[b].shape, generator=g)
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussian fits of two feature sets."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    # A tiny ridge keeps sqrtm well-posed where ReLU features are constant (singular covariance).
    ridge = 1e-6 * np.eye(f1.shape[1])
    s1, s2 = np.cov(f1, rowvar=False) + ridge, np.cov(f2, rowvar=False) + ridge
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def evaluate(samples: torch.Tensor, labels: torch.Tensor, classifier: Classifier | None = None):
    """Conditional accuracy and FD of (N, 1, 8, 8) samples in [-1, 1] with their labels."""
    clf = classifier or train_classifier()
    x_train, _ = load("train")
    x_test, y_test = load("test")
    feats = lambda x: clf.features(x).double().numpy()  # noqa: E731
    return {
        "classifier_test_accuracy": float((clf(x_test).argmax(1) == y_test).float().mean()),
        "accuracy": float((clf(samples).argmax(1) == labels).float().mean()),
        "fd_samples_vs_train": frechet_distance(feats(samples), feats(x_train)),
        "fd_test_vs_train": frechet_distance(feats(x_test), feats(x_train)),
        "num_samples": int(samples.shape[0]),
    }
