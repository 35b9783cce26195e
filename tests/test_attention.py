"""attention on every backend against the float64 reference (and SDPA as the yardstick)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close_to_ref, run_op

from fastdiff import reference

DTYPES = [
    # (dtype, atol)
    (torch.float32, 1e-5),
    (torch.float16, 1e-3),
    (torch.bfloat16, 1e-2),
]

SHAPES = [
    # (B, H, Lq, Lk, D)
    (2, 2, 37, 77, 40),    # cross-attention to a 77-token context, SD1.5 head dim 40
    (1, 2, 33, 33, 80),    # self-attention, SD1.5 head dim 80, Lq not a block multiple
    (1, 1, 20, 77, 160),   # SD1.5 head dim 160
    (1, 1, 17, 9, 256),    # DDPM-CIFAR10's single 256-wide head
    (1, 3, 1, 5, 59),      # one query, odd head dim
    (2, 1, 6, 1, 24),      # one key
    (1, 2, 97, 97, 64),    # SDXL head dim; 97 rows span two query blocks on the CPU kernel
]


def _qkv(B, H, Lq, Lk, D, dtype, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # diffusers' (B, L, H, D) projections viewed as (B, H, L, D)
        return [torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2) for L in (Lq, Lk, Lk)]
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def _sdpa(q, k, v, bias, scale):
    """torch's own attention in q's dtype (CPU SDPA supports fp16 and bf16)."""
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _skip_bf16_interpreter(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly (numpy has no bf16); "
                    "bf16 attention is covered by the C++ kernel here and by 'cuda' on a GPU")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, atol, shape):
    _skip_bf16_interpreter(backend, dtype)
    q, k, v = _qkv(*shape, dtype)
    out = run_op(backend, "attention", q, k, v, None, None)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_to_ref(out, reference.attention(q, k, v), _sdpa(q, k, v, None, None), atol,
                        what=f"{backend} {dtype}")


MASKS = ["key_padding", "full", "head_broadcast", "fully_masked_row"]


def _mask(kind, B, H, Lq, Lk, dtype):
    g = torch.Generator().manual_seed(5)
    if kind == "key_padding":      # (B, 1, 1, Lk): padded context tokens at -inf
        m = torch.zeros(B, 1, 1, Lk)
        m[0, ..., Lk // 2:] = float("-inf")
        m[-1, ..., Lk - 3:] = float("-inf")
    elif kind == "full":           # (B, H, Lq, Lk) additive bias
        m = torch.randn(B, H, Lq, Lk, generator=g)
    elif kind == "head_broadcast":  # (1, H, Lq, Lk): a per-head bias shared by the batch
        m = torch.randn(1, H, Lq, Lk, generator=g)
    else:                          # one query row sees no key: its output is 0
        m = torch.zeros(B, 1, Lq, Lk)
        m[:, :, 1, :] = float("-inf")
    return m.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", DTYPES[:2], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", MASKS)
def test_masks(backend, dtype, atol, kind):
    B, H, Lq, Lk, D = 2, 2, 19, 77, 40
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, seed=1)
    bias = _mask(kind, B, H, Lq, Lk, dtype)
    out = run_op(backend, "attention", q, k, v, bias, None)
    ref = reference.attention(q, k, v, bias)
    if kind == "fully_masked_row":
        assert (out[:, :, 1] == 0).all()
        torch_out = None
        atol = 4e-3 if dtype == torch.float16 else atol
    else:
        torch_out = _sdpa(q, k, v, bias, None)
    assert_close_to_ref(out, ref, torch_out, atol, what=f"{backend} {kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_bias_with_half_inputs_and_custom_scale(backend):
    q, k, v = _qkv(1, 2, 11, 13, 40, torch.float16, seed=2)
    bias = torch.randn(1, 1, 11, 13)
    out = run_op(backend, "attention", q, k, v, bias, 0.3)
    assert_close_to_ref(out, reference.attention(q, k, v, bias, 0.3), _sdpa(q, k, v, bias, 0.3),
                        1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_without_copies(backend):
    """(B, L, H, D).transpose(1, 2) views, as diffusers' attention processors produce."""
    q, k, v = _qkv(2, 3, 21, 77, 40, torch.float32, transposed=True, seed=3)
    assert not q.is_contiguous()
    out = run_op(backend, "attention", q, k, v, None, None)
    assert_close_to_ref(out, reference.attention(q, k, v), _sdpa(q, k, v, None, None), 1e-5)


def test_cpu_fallback_without_blas():
    """FASTDIFF_NO_BLAS=1 takes the at::mm path used where torch exports no sgemm_."""
    code = ("import torch, fastdiff\n"
            "from fastdiff import reference\n"
            "g = torch.Generator().manual_seed(0)\n"
            "q, k, v = (torch.randn(2, 2, 70, 40, generator=g) for _ in range(3))\n"
            "b = torch.randn(2, 1, 1, 70, generator=g)\n"
            "e = (fastdiff.attention(q, k, v, b).double() - reference.attention(q, k, v, b)).abs().max()\n"
            "assert e < 1e-5, e\n")
    env = {**os.environ, "FASTDIFF_NO_BLAS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
