"""Triton kernels of fastdiff, installed as ``fastdiff.kernels``.

One file per op: the ``@triton.jit`` kernel; ``plan()``, which picks the configuration, grid and
arguments of each launch and allocates the outputs; the JIT launcher, which runs the plan; and
``aot_configs()``, which lists every configuration a plan can choose (compiled ahead of time by
``aot.py`` into the wheel's cubins). csrc/cuda_ops.cpp plans the same launches in C++ for the
prebuilt cubins; tests/test_prebuilt.py checks that both plans agree. Launchers assume checked
inputs: the ops run the C++ checks first.

A configuration is a dict: ``fn`` (the kernel), ``signature`` (parameter -> Triton type),
``constexprs``, ``num_warps``, ``num_stages`` and ``aligned``, the parameters a prebuilt cubin
assumes divisible by 16 (pointers: 16-byte aligned), as Triton's JIT specializes them. The JIT
ignores ``aligned`` (it specializes every call itself).
"""


def run(cfg, grid, args):
    """Launches one planned kernel through Triton's JIT."""
    cfg["fn"][grid](*args, **cfg["constexprs"], num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])


def pointers(cfg):
    """The pointer parameters of a configuration's signature."""
    return tuple(n for n, t in cfg["signature"].items() if t.startswith("*"))


def variant(cfg, aligned):
    """The configuration with another set of parameters assumed divisible by 16."""
    return {**cfg, "aligned": tuple(aligned)}
