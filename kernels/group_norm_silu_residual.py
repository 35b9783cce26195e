"""Triton launches of fastdiff::group_norm_silu_residual: group_norm_silu's two kernels, the
apply kernel also writing r = x + residual_bias[c] (its ``RES``); the planner and the prebuilt
configurations live in kernels/group_norm_silu.py, beside the kernels they launch.
"""
from .group_norm_silu import plan_residual as plan

__all__ = ["plan"]
