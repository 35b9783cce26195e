"""What planning a launch costs on the host, C++ vs Python (runs on CPU, no GPU needed).

The CUDA op plans in C++ (csrc/<op>.cpp) what the Triton launcher plans in Python
(kernels/*.py plan()): same outputs allocated, same arguments. Timed here on CPU tensors, side by
side; the launch itself (cuLaunchKernel vs Triton's Python launcher) needs a GPU
(benchmarks/test_first_call.py::test_warm_call_overhead).
"""
import functools

import pytest
import torch

from fastdiff import prebuilt, schedules
from fastdiff.kernels import denoise_step, group_norm_silu


def _step_args():
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(50, schedules.ROW_LEN, generator=g)
    coeffs[:, schedules.absent_slot_columns(0)] = 0  # no state slots
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g),
            coeffs, torch.tensor(3), torch.randn(1, 4, 8, 8, generator=g),
            None, 7.5, False, 1.0, False)


def _gn_args():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 32, 8, 8, generator=g), 8, torch.randn(32, generator=g),
            torch.randn(32, generator=g), 1e-5, None, torch.randn(2, 32, generator=g),
            torch.randn(2, 32, generator=g), True)


CASES = {"denoise_step": (_step_args, functools.partial(prebuilt.cpp_plan, "denoise_step"),
                          denoise_step.plan),
         "group_norm_silu": (_gn_args, functools.partial(prebuilt.cpp_plan, "group_norm_silu"),
                             group_norm_silu.plan)}


@pytest.mark.parametrize("system", ["cpp", "python"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_plan(benchmark, op, system):
    make, cpp, py = CASES[op]
    args = make()
    benchmark.group = f"plan: {op}"
    benchmark(cpp if system == "cpp" else py, *args)
