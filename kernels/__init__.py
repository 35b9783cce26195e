"""Triton kernels of fastdiff, installed as ``fastdiff.kernels``.

One file per op, ``kernels/<op>.py``: the ``@triton.jit`` kernels, named after what they do (the
names a profiler shows); ``plan()``, which takes the op's schema arguments, checked by the C++ op,
and returns the launches, [(configuration, grid, arguments)], and the outputs it allocated (and
does nothing else: inputs are read in their own dtype and layout, with no conversion, fill or copy
beside the launches); and ``prebuilt_configs()``, every configuration a plan can choose, compiled
ahead of time by ``prebuild.py`` into the wheel's cubins (except attention's at head dims or
strides left to the JIT). ``launch`` runs a plan through Triton's JIT: the C++ op calls it where
the prebuilt cubins cannot run (through the op ``fastdiff::_jit_<op>``, fastdiff/ops.py).
csrc/<op>.cpp plans the same launches in C++ for the cubins;
tests/test_prebuilt.py checks that both plans agree.

Launch constants (tiles, block sizes, tables) are written once, here: each public UPPER_CASE
constant of kernels/<op>.py whose value is a literal number, or tuples of them, is also the C++
constant ``fastdiff::config::<op>::NAME``, in the header setup.py generates when it builds the
extension; the C++ plans read them from there and never restate them.

A configuration is a dict: ``fn`` (the kernel), ``signature`` (parameter -> Triton type),
``constexprs``, ``num_warps``, ``num_stages`` and ``aligned``, the parameters a prebuilt cubin
assumes divisible by 16 (pointers: 16-byte aligned), as Triton's JIT specializes them. The JIT
ignores ``aligned`` (it specializes every call itself). What Triton cannot see in a runtime
argument but the planner checks, such as row strides that are multiples of 16 bytes, is a
constexpr (``VEC``) that the kernel turns into ``tl.multiple_of`` hints: both paths get the
16-byte loads it allows.
"""
import importlib


def launch(op, *args):
    """Runs op ``op`` (its schema's positional arguments, checked) through Triton's JIT."""
    launches, outputs = importlib.import_module(f"{__name__}.{op}").plan(*args)
    for cfg, grid, values in launches:
        cfg["fn"][grid](*values, **cfg["constexprs"], num_warps=cfg["num_warps"],
                        num_stages=cfg["num_stages"])
    return outputs


def pointers(cfg):
    """The pointer parameters of a configuration's signature."""
    return tuple(n for n, t in cfg["signature"].items() if t.startswith("*"))


def variant(cfg, aligned):
    """The configuration with another set of parameters assumed divisible by 16."""
    return {**cfg, "aligned": tuple(aligned)}
