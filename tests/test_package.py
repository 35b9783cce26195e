"""The package as a user meets it: import, the ops under torch.compile, the demo command."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fastdiff  # noqa: F401  (registers the ops)
from fastdiff import ops, reference, schedules

# The quick CPU subset tests/test_wheel.py runs in a fresh install of the wheel.
pytestmark = pytest.mark.quick


def _all_three(x, w, b, sc, sh, q, k, v, mask, mo, coeffs, idx):
    h = ops.group_norm_silu(x, 4, w, b, scale=sc, shift=sh)
    tokens = h.flatten(2).transpose(1, 2).reshape(q.shape[0], 1, -1, q.shape[-1])
    a = ops.attention(tokens, k, v, mask)
    out, x0 = ops.denoise_step(mo, a.reshape(mo.shape[0] // 2, -1), coeffs, idx,
                               guidance_scale=3.0, write_x0=True)
    return out + x0


def unstable_symbols(library: str) -> list[str]:
    """The libtorch C++ symbols (demangled: in at::, c10::, torch::, caffe2::) that a shared
    library leaves undefined, i.e. imports. The stable ABI is C (aoti_torch_*, torch_*) plus
    header-only inline code, so an extension on it imports none."""
    r = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", library],
                       capture_output=True, text=True, check=True)
    names = [line.split(None, 1)[1] for line in r.stdout.splitlines() if line.split()]
    return [n for n in names if re.search(r"\b(at|c10|torch|caffe2)::", n)]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_extension_imports_no_unstable_libtorch_symbol():
    """Issue 17: the extension is on PyTorch's stable ABI, so one build loads with every torch
    from its target version on (setup.py TORCH_TARGET). Any at::/c10::/torch:: symbol it imports
    would tie it to the exact torch it was built against again."""
    from fastdiff import _C

    bad = unstable_symbols(_C.__file__)
    assert bad == [], f"{len(bad)} unstable libtorch symbols imported, e.g. {bad[:10]}"
    # The check itself sees such symbols: every libtorch C++ library defines and imports them.
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_python.so")
    if os.path.exists(torch_lib):
        assert any("at::" in n for n in unstable_symbols(torch_lib))


def test_torch_compile_fullgraph_uses_fake_kernels():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(2, 8, 4, 4)
    args = (x, r(8), r(8), r(2, 8), r(2, 8), r(2, 1, 16, 8), r(2, 1, 5, 8), r(2, 1, 5, 8),
            torch.zeros(2, 1, 1, 5), r(4, 128),
            schedules.ddim_table(schedules.alphas_cumprod(schedules.make_betas()),
                                 [900, 600, 300, 0], 1000).coeffs, torch.tensor(2))
    eager = _all_three(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_all_three, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*args), eager, rtol=1e-5, atol=1e-5)


def test_meta_kernels_keep_layout_and_shapes():
    x = torch.empty(2, 8, 3, 5, device="meta").to(memory_format=torch.channels_last)
    y = torch.ops.fastdiff.group_norm_silu(x, 2)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    q = torch.empty(2, 3, 7, 40, device="meta")
    kv = torch.empty(2, 3, 77, 40, device="meta")
    assert torch.ops.fastdiff.attention(q, kv, kv).shape == (2, 3, 7, 40)
    s = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float16)
    out, x0 = torch.ops.fastdiff.denoise_step(
        torch.empty(4, 4, 8, 8, device="meta", dtype=torch.float16), s,
        torch.empty(3, schedules.ROW_LEN, device="meta"),
        torch.empty((), dtype=torch.long, device="meta"),
        guidance_scale=2.0, write_x0=False)
    assert out.shape == s.shape and out.dtype == torch.float16 and x0.numel() == 0
    state = torch.empty(2, *s.shape, device="meta", dtype=torch.float16)  # updated in place
    out, x0 = torch.ops.fastdiff.denoise_step(
        s, s, torch.empty(3, schedules.ROW_LEN, device="meta"),
        torch.empty((), dtype=torch.long, device="meta"), None, state, write_x0=True)
    assert out.shape == x0.shape == s.shape and state.shape == (2, *s.shape)


def test_bool_and_low_rank_masks_match_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 16, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 1, 6, generator=g) > 0.3
    keep[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(ops.attention(q, k, v, keep), expected, rtol=1e-5, atol=1e-5)
    bias2d = torch.randn(6, 6, generator=g)   # (Lq, Lk): aligned right, as in SDPA
    torch.testing.assert_close(ops.attention(q, k, v, bias2d),
                               reference.attention(q, k, v, bias2d).float(), rtol=1e-5, atol=1e-5)


def test_time_embedding_shapes_are_accepted():
    x = torch.randn(2, 8, 3, 3)
    temb = torch.randn(2, 8, 1, 1)   # diffusers' temb[:, :, None, None]
    y = ops.group_norm_silu(x, 4, pre_bias=temb)
    ref = reference.group_norm_silu(x, 4, pre_bias=temb.flatten(1))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_missing_extension_says_how_to_build():
    # A fresh interpreter in which the compiled extension cannot be found.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastdiff._C':\n"
        "            raise ImportError('No module named fastdiff._C')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastdiff\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install --no-build-isolation -e ." in proc.stderr


def test_demo_command_runs():
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "demo", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agreement: OK" in proc.stdout

