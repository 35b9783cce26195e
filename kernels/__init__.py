"""Triton kernels of fastdiff, installed as ``fastdiff.kernels``.

One file per op: the ``@triton.jit`` kernel, then the launcher that picks block sizes and
allocates the output, then ``aot_configs()``, which lists every configuration the launcher can
choose (used by the ahead-of-time compile tests). Launchers assume checked inputs: the op
registration in ``fastdiff/ops.py`` runs the C++ checks first.
"""
