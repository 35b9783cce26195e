"""Noise schedules (float64) and the per-step coefficient tables that drive ``denoise_step``.

Columns of a table row (kept in sync with csrc/fastdiff.h, StepCoef):
    x_hat = x + H * n
    x0    = P_x * x_hat + P_m * m             (m: guided model output)
    x0c   = clip(x0) if clip_sample else x0
    out   = K_x * x_hat + K_0 * x0c + K_m * m + K_p * prev_x0 + K_n * n
"""
from __future__ import annotations

COEF_H, COEF_PX, COEF_PM, COEF_KX, COEF_K0, COEF_KM, COEF_KP, COEF_KN = range(8)
NUM_COEFS = 8
