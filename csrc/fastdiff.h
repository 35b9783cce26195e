// fastdiff: declarations shared by the op registration (ops.cpp) and the CPU kernels.
//
// Every op is declared once in ops.cpp (TORCH_LIBRARY(fastdiff, m)). The registration
// wrapper runs the matching check_* function first, so a kernel may assume its inputs
// are valid: devices agree, dtypes are supported, shapes and strides are as documented.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace fastdiff {

// Columns of the per-step coefficient table read by denoise_step (float32, shape (S, 8)).
// With m the guided model output, x the current sample and n the noise of this step:
//   x_hat = x + H * n                          (Euler "churn"; 0 for other solvers)
//   x0    = P_x * x_hat + P_m * m              (prediction type -> predicted x0)
//   x0c   = clip(x0, -r, r) if clip_sample else x0
//   out   = K_x * x_hat + K_0 * x0c + K_m * m + K_p * prev_x0 + K_n * n
// Kept in sync with fastdiff/schedules.py (COEF_*) and kernels/denoise_step.py.
enum StepCoef : int64_t {
  kCoefH = 0, kCoefPx, kCoefPm, kCoefKx, kCoefK0, kCoefKm, kCoefKp, kCoefKn, kNumCoefs
};

// ---- argument checks (shared by the CPU, CUDA and Meta registrations) ----
void check_group_norm_silu(const at::Tensor& x, int64_t num_groups,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           const std::optional<at::Tensor>& pre_bias,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, bool apply_silu);
void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_bias, std::optional<double> scale);
void check_denoise_step(const at::Tensor& model_output, const at::Tensor& sample,
                        const at::Tensor& coeffs, const at::Tensor& step_index,
                        const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& prev_x0, double guidance_scale,
                        bool clip_sample, double clip_sample_range, bool write_x0);

// ---- CPU kernels (inputs already checked) ----

// GroupNorm over (N, C, H, W), contiguous NCHW or channels_last; returns the same dtype and
// memory format as x. weight/bias: (C,) or absent (1 and 0). pre_bias/scale/shift: (N, C),
// contiguous, or absent. dtype of the small tensors: x's or float32.
//   h = x + pre_bias[n, c]; y = (h - mean_g) * rstd_g * weight[c] + bias[c]
//   y = y * (1 + scale[n, c]) + shift[n, c]; y = silu(y) if apply_silu
at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps,
                               const std::optional<at::Tensor>& pre_bias,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift, bool apply_silu);

// softmax(q k^T * scale + attn_bias) v. q: (B, H, Lq, D), k/v: (B, H, Lk, D), any strides with
// stride(-1) == 1. attn_bias: 4-D, each dim 1 or full size (broadcast), dtype q's or float32.
// Returns a contiguous (B, H, Lq, D) tensor of q's dtype. A row whose keys are all -inf gives 0.
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& attn_bias, std::optional<double> scale);

// One sampler step; see StepCoef. model_output has batch N (no guidance) or 2N
// ([uncond; cond], guided as u + s * (c - u)). Returns (next sample, x0c or an empty tensor).
std::tuple<at::Tensor, at::Tensor> denoise_step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
    const at::Tensor& step_index, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& prev_x0, double guidance_scale, bool clip_sample,
    double clip_sample_range, bool write_x0);

}  // namespace fastdiff
