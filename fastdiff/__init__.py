"""fastdiff: fused kernels and samplers for conditional diffusion U-Nets.

Importing fastdiff loads the C++ extension ``fastdiff._C``, which registers the ops
``torch.ops.fastdiff.{group_norm_silu, group_norm_silu_residual, attention, denoise_step, geglu,
add_layer_norm, linear_geglu, layer_norm_linear, group_norm_scale_shift, norm_conv2d}`` with
CPU, Meta and CUDA kernels; ``fastdiff.ops`` adds the Python-facing functions (and
``fold_layer_norm``, which makes layer_norm_linear's folded weight, and ``pack_conv_weight``,
norm_conv2d's packed weight).
"""
import torch  # noqa: F401  (loads libtorch before the extension)



def _built_for() -> str:
    """The torch requirement this install was built with (its metadata), or ''."""
    try:
        from importlib.metadata import requires
        return next((r for r in requires("fastdiff") or () if r.startswith("torch")), "")
    except Exception:  # noqa: BLE001 - no metadata (a source tree on sys.path)
        return ""


try:
    from fastdiff import _C  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    built = _built_for()
    raise ImportError(
        "fastdiff's compiled extension fastdiff._C could not be loaded "
        f"({err}). It loads only with the torch it was built for"
        f"{f' ({built})' if built else ''}; this is torch {torch.__version__}. Install a "
        "fastdiff built for it, or build one against the installed torch from the source tree "
        "with\n    pip install --no-build-isolation -e .\n"
        "(torch, ninja and a C++17 compiler are needed)."
    ) from err

from fastdiff.engine import SamplingEngine  # noqa: E402
from fastdiff.ops import attention, denoise_step, group_norm_silu  # noqa: E402
from fastdiff.integrations.diffusers import (  # noqa: E402
    accelerate, explain, restore, sample_pipeline)

__version__ = "0.1.0"
__all__ = ["SamplingEngine", "accelerate", "attention", "denoise_step", "explain",
           "group_norm_silu", "restore", "sample_pipeline"]
