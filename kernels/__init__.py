"""Triton kernels of fastdiff, installed as ``fastdiff.kernels``.

One file per op: the ``@triton.jit`` kernel; ``plan()``, which picks the configuration, grid and
arguments of each launch and allocates the outputs (and does nothing else: inputs are read in
their own dtype and layout, with no conversion, fill or copy beside the launches); the JIT
launcher, which runs the plan; and ``aot_configs()``, which lists every configuration a plan
can choose (compiled ahead of time by ``aot.py`` into the wheel's cubins), except attention's
at head dims or strides left to the JIT. csrc/cuda_ops.cpp plans the same launches in C++ for
the prebuilt cubins; tests/test_prebuilt.py checks that both plans agree. Launchers assume
checked inputs: the ops run the C++ checks first.

A configuration is a dict: ``fn`` (the kernel), ``signature`` (parameter -> Triton type),
``constexprs``, ``num_warps``, ``num_stages`` and ``aligned``, the parameters a prebuilt cubin
assumes divisible by 16 (pointers: 16-byte aligned), as Triton's JIT specializes them. The JIT
ignores ``aligned`` (it specializes every call itself). What Triton cannot see in a runtime
argument but the planner checks, such as row strides that are multiples of 16 bytes, is a
constexpr (``VEC``) that the kernel turns into ``tl.multiple_of`` hints: both paths get the
16-byte loads it allows.
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
