// CPU kernel for fastdiff::denoise_step: guidance combine + solver update + noise in one pass.
// The solver is not known here: it lives in the per-step coefficient table (see StepCoef in
// fastdiff.h and fastdiff/schedules.py), so one loop serves DDPM, DDIM, DPM-Solver++ and Euler.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "fastdiff.h"

namespace fastdiff {
namespace {

struct StepArgs {
  float c[kNumCoefs];
  float guidance, clip_lo, clip_hi;
  bool clip;
};

// One contiguous range [begin, end) of the flattened sample. Branch-free in the inner loop so
// that the float32 case vectorizes; the optional inputs are template flags.
template <typename scalar_t, bool kGuided, bool kNoise, bool kPrev, bool kWriteX0>
void step_range(const StepArgs& a, const scalar_t* __restrict__ mo, const scalar_t* __restrict__ x,
                const scalar_t* __restrict__ noise, const scalar_t* __restrict__ prev,
                scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out, int64_t numel,
                int64_t begin, int64_t end) {
  const float H = a.c[kCoefH], Px = a.c[kCoefPx], Pm = a.c[kCoefPm], Kx = a.c[kCoefKx],
              K0 = a.c[kCoefK0], Km = a.c[kCoefKm], Kp = a.c[kCoefKp], Kn = a.c[kCoefKn];
  const float s = a.guidance;
  const float lo = a.clip ? a.clip_lo : -INFINITY, hi = a.clip ? a.clip_hi : INFINITY;
  for (int64_t i = begin; i < end; ++i) {
    float m = static_cast<float>(mo[i]);
    if constexpr (kGuided) m = m + s * (static_cast<float>(mo[i + numel]) - m);
    const float n = kNoise ? static_cast<float>(noise[i]) : 0.f;
    const float xh = static_cast<float>(x[i]) + H * n;
    const float x0 = std::min(std::max(Px * xh + Pm * m, lo), hi);
    float y = Kx * xh + K0 * x0 + Km * m + Kn * n;
    if constexpr (kPrev) y += Kp * static_cast<float>(prev[i]);
    out[i] = static_cast<scalar_t>(y);
    if constexpr (kWriteX0) x0_out[i] = static_cast<scalar_t>(x0);
  }
}

template <typename scalar_t, bool... kFlags>
void run(const StepArgs& a, const scalar_t* mo, const scalar_t* x, const scalar_t* noise,
         const scalar_t* prev, scalar_t* out, scalar_t* x0_out, int64_t numel) {
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    step_range<scalar_t, kFlags...>(a, mo, x, noise, prev, out, x0_out, numel, begin, end);
  });
}

// Expands the four runtime flags into template arguments, one at a time.
template <typename scalar_t, bool... kDone>
void dispatch_flags(const bool* flags, int remaining, const StepArgs& a, const scalar_t* mo,
                    const scalar_t* x, const scalar_t* noise, const scalar_t* prev, scalar_t* out,
                    scalar_t* x0_out, int64_t numel) {
  if constexpr (sizeof...(kDone) == 4) {
    run<scalar_t, kDone...>(a, mo, x, noise, prev, out, x0_out, numel);
  } else {
    if (flags[0]) {
      dispatch_flags<scalar_t, kDone..., true>(flags + 1, remaining - 1, a, mo, x, noise, prev, out,
                                               x0_out, numel);
    } else {
      dispatch_flags<scalar_t, kDone..., false>(flags + 1, remaining - 1, a, mo, x, noise, prev,
                                                out, x0_out, numel);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> denoise_step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
    const at::Tensor& step_index, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& prev_x0, double guidance_scale, bool clip_sample,
    double clip_sample_range, bool write_x0) {
  const int64_t idx = step_index.item<int64_t>();  // range checked by the caller
  StepArgs a;
  const float* row = coeffs.data_ptr<float>() + idx * kNumCoefs;
  std::copy(row, row + kNumCoefs, a.c);
  a.guidance = static_cast<float>(guidance_scale);
  a.clip = clip_sample;
  a.clip_lo = static_cast<float>(-clip_sample_range);
  a.clip_hi = static_cast<float>(clip_sample_range);

  at::Tensor out = at::empty_like(sample);
  at::Tensor x0 = write_x0 ? at::empty_like(sample) : sample.new_empty({0});
  const bool guided = model_output.size(0) == 2 * sample.size(0);
  const bool flags[4] = {guided, noise.has_value(), prev_x0.has_value(), write_x0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "denoise_step_cpu",
                                  [&] {
    dispatch_flags<scalar_t>(
        flags, 4, a, model_output.data_ptr<scalar_t>(), sample.data_ptr<scalar_t>(),
        noise ? noise->data_ptr<scalar_t>() : nullptr,
        prev_x0 ? prev_x0->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        write_x0 ? x0.data_ptr<scalar_t>() : nullptr, sample.numel());
  });
  return {out, x0};
}

}  // namespace fastdiff
