// fastdiff::denoise_step: classifier-free guidance, the solver update and the noise in one pass.
// Schema in ops.cpp; Triton kernel and plan in kernels/denoise_step.py.
//
// The solver is not known here: it lives in the per-step coefficient table (float32, (S, 8);
// columns as fastdiff/schedules.py's COEF_*), so one loop serves DDPM, DDIM, DPM-Solver++ and
// Euler. With m the model output (guided: [uncond; cond], twice the sample's batch, combined as
// u + s * (c - u)), x the sample and n the noise of this step:
//   x_hat = x + H * n                          (Euler "churn"; 0 for other solvers)
//   x0    = P_x * x_hat + P_m * m              (prediction type -> predicted x0)
//   x0c   = clip(x0, -r, r) if clip_sample else x0
//   out   = K_x * x_hat + K_0 * x0c + K_m * m + K_p * prev_x0 + K_n * n
// Returns (out, x0c or an empty tensor). The row is read at step_index, a tensor: on the CPU an
// index out of range raises; on the GPU, where checking it would need a sync, the kernel writes
// NaN.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ops.h"

namespace fastdiff {
namespace {

enum StepCoef : int64_t {
  kCoefH = 0, kCoefPx, kCoefPm, kCoefKx, kCoefK0, kCoefKm, kCoefKp, kCoefKn, kNumCoefs
};

using Out = std::tuple<at::Tensor, at::Tensor>;

struct DenoiseStep {  // a call's arguments, in schema order
  static constexpr char name[] = "denoise_step";
  using Sig = Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                  bool, double, bool, std::optional<bool>);
  const at::Tensor& model_output;
  const at::Tensor& sample;
  const at::Tensor& coeffs;
  const at::Tensor& step_index;
  const std::optional<at::Tensor>& noise;
  const std::optional<at::Tensor>& prev_x0;
  double guidance_scale;
  bool clip_sample;
  double clip_sample_range;
  bool write_x0;
  std::optional<bool> guided;  // absent: guided when model_output has twice the batch of sample
};

const at::Tensor& subject(const DenoiseStep& a) { return a.sample; }

// After check(): whether model_output is [uncond; cond].
bool is_guided(const DenoiseStep& a) {
  return a.guided.value_or(a.model_output.size(0) == 2 * a.sample.size(0));
}

void check(const DenoiseStep& a) {
  const char* op = DenoiseStep::name;
  const at::Tensor &sample = a.sample, &model_output = a.model_output;
  FD_CHECK(sample.dim() >= 1, op, "argument 'sample' must have a batch dimension, got a 0-d tensor");
  FD_CHECK(is_float_dtype(sample.scalar_type()), op,
           "argument 'sample' must have dtype float32, float16 or bfloat16, got ",
           dtype_str(sample.scalar_type()));
  FD_CHECK(sample.is_contiguous(), op, "argument 'sample' must be contiguous, got strides ",
           sample.strides());
  const int64_t N = sample.size(0);
  check_same_device(op, sample, "sample", model_output, "model_output");
  FD_CHECK(model_output.scalar_type() == sample.scalar_type(), op,
           "argument 'model_output' must have the dtype of 'sample' (", dtype_str(sample.scalar_type()),
           "), got ", dtype_str(model_output.scalar_type()));
  FD_CHECK(model_output.is_contiguous(), op,
           "argument 'model_output' must be contiguous, got strides ", model_output.strides());
  bool same_rest = model_output.dim() == sample.dim() &&
                   model_output.sizes().slice(1) == sample.sizes().slice(1);
  // Guided as the caller says, else when model_output has twice the batch.
  const bool guided = a.guided.value_or(same_rest && N > 0 && model_output.size(0) == 2 * N);
  FD_CHECK(same_rest && model_output.size(0) == (guided ? 2 * N : N), op,
           "argument 'model_output' must have the shape of 'sample' ", shape_str(sample),
           " or, for classifier-free guidance, twice its batch ([uncond; cond]), got ",
           shape_str(model_output), !a.guided ? "" : guided ? " with guided=True"
                                                            : " with guided=False");
  FD_CHECK(std::isfinite(a.guidance_scale), op, "argument 'guidance_scale' must be finite, got ",
           a.guidance_scale);
  FD_CHECK(guided || a.guidance_scale == 1.0, op, "argument 'guidance_scale'=", a.guidance_scale,
           " needs 'model_output' with batch 2*N=", 2 * N, " ([uncond; cond]), got ",
           shape_str(model_output));
  const std::pair<const std::optional<at::Tensor>*, const char*> extra[] = {
      {&a.noise, "noise"}, {&a.prev_x0, "prev_x0"}};
  for (auto [t, name] : extra) {
    if (!t->has_value()) continue;
    const at::Tensor& e = t->value();
    check_same_device(op, sample, "sample", e, name);
    FD_CHECK(e.sizes() == sample.sizes(), op, "argument '", name, "' must have the shape of 'sample' ",
             shape_str(sample), ", got ", shape_str(e));
    FD_CHECK(e.scalar_type() == sample.scalar_type(), op, "argument '", name,
             "' must have the dtype of 'sample' (", dtype_str(sample.scalar_type()), "), got ", dtype_str(e.scalar_type()));
    FD_CHECK(e.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
             e.strides());
  }
  const at::Tensor &coeffs = a.coeffs, &step_index = a.step_index;
  check_same_device(op, sample, "sample", coeffs, "coeffs");
  FD_CHECK(coeffs.dim() == 2 && coeffs.size(1) == kNumCoefs && coeffs.size(0) >= 1, op,
           "argument 'coeffs' must have shape (num_steps, ", static_cast<int64_t>(kNumCoefs),
           "), got ", shape_str(coeffs));
  FD_CHECK(coeffs.scalar_type() == at::kFloat, op, "argument 'coeffs' must have dtype float32, got ",
           dtype_str(coeffs.scalar_type()));
  FD_CHECK(coeffs.is_contiguous(), op, "argument 'coeffs' must be contiguous, got strides ",
           coeffs.strides());
  check_same_device(op, sample, "sample", step_index, "step_index");
  FD_CHECK(step_index.scalar_type() == at::kLong || step_index.scalar_type() == at::kInt, op,
           "argument 'step_index' must be an int64 or int32 tensor, got ", dtype_str(step_index.scalar_type()));
  FD_CHECK(step_index.numel() == 1, op, "argument 'step_index' must hold one element, got shape ",
           shape_str(step_index));
  if (a.clip_sample) {
    FD_CHECK(std::isfinite(a.clip_sample_range) && a.clip_sample_range > 0, op,
             "argument 'clip_sample_range' must be finite and positive, got ", a.clip_sample_range);
  }
}

Out empty(const DenoiseStep& a) {
  return {at::empty_like(a.sample),
          a.write_x0 ? at::empty_like(a.sample) : a.sample.new_empty({0})};
}

// ---- CPU kernel ----

struct Row {
  float c[kNumCoefs];
  float guidance, clip_lo, clip_hi;
};

// One contiguous range [begin, end) of the flattened sample. Branch-free in the inner loop so
// that the float32 case vectorizes; the optional inputs are template flags.
template <typename scalar_t, bool kGuided, bool kNoise, bool kPrev, bool kWriteX0>
void step_range(const Row& a, const scalar_t* __restrict__ mo, const scalar_t* __restrict__ x,
                const scalar_t* __restrict__ noise, const scalar_t* __restrict__ prev,
                scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out, int64_t numel,
                int64_t begin, int64_t end) {
  const float H = a.c[kCoefH], Px = a.c[kCoefPx], Pm = a.c[kCoefPm], Kx = a.c[kCoefKx],
              K0 = a.c[kCoefK0], Km = a.c[kCoefKm], Kp = a.c[kCoefKp], Kn = a.c[kCoefKn];
  const float s = a.guidance, lo = a.clip_lo, hi = a.clip_hi;
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

// Expands the four runtime flags into template arguments, one at a time, then runs the step.
template <typename scalar_t, bool... kDone>
void dispatch_flags(const bool* flags, const Row& a, const scalar_t* mo, const scalar_t* x,
                    const scalar_t* noise, const scalar_t* prev, scalar_t* out, scalar_t* x0_out,
                    int64_t numel) {
  if constexpr (sizeof...(kDone) == 4) {
    at::parallel_for(0, numel, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
      step_range<scalar_t, kDone...>(a, mo, x, noise, prev, out, x0_out, numel, begin, end);
    });
  } else if (flags[0]) {
    dispatch_flags<scalar_t, kDone..., true>(flags + 1, a, mo, x, noise, prev, out, x0_out,
                                             numel);
  } else {
    dispatch_flags<scalar_t, kDone..., false>(flags + 1, a, mo, x, noise, prev, out, x0_out,
                                              numel);
  }
}

Out cpu(const DenoiseStep& a) {
  // On the CPU the step index can be read without a device sync: check its range here.
  const int64_t idx = a.step_index.item<int64_t>();
  FD_CHECK(idx >= 0 && idx < a.coeffs.size(0), DenoiseStep::name, "argument 'step_index'=", idx,
           " is out of range for 'coeffs' with ", a.coeffs.size(0), " steps");
  Out result = empty(a);
  if (a.sample.numel() == 0) return result;
  Row row;
  const float* c = a.coeffs.data_ptr<float>() + idx * kNumCoefs;
  std::copy(c, c + kNumCoefs, row.c);
  row.guidance = static_cast<float>(a.guidance_scale);
  row.clip_lo = a.clip_sample ? static_cast<float>(-a.clip_sample_range) : -INFINITY;
  row.clip_hi = a.clip_sample ? static_cast<float>(a.clip_sample_range) : INFINITY;
  auto& [out, x0] = result;
  const bool flags[4] = {is_guided(a), a.noise.has_value(), a.prev_x0.has_value(), a.write_x0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.sample.scalar_type(),
                                  "denoise_step_cpu", [&] {
    dispatch_flags<scalar_t>(
        flags, row, a.model_output.data_ptr<scalar_t>(), a.sample.data_ptr<scalar_t>(),
        a.noise ? a.noise->data_ptr<scalar_t>() : nullptr,
        a.prev_x0 ? a.prev_x0->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        a.write_x0 ? x0.data_ptr<scalar_t>() : nullptr, a.sample.numel());
  });
  return result;
}

// ---- CUDA plan: kernels/denoise_step.py ----

Plan<Out> plan(const DenoiseStep& a) {
  namespace cfg = config::denoise_step;
  Out result = empty(a);
  const auto& [out, x0] = result;
  const int64_t numel = a.sample.numel();
  const double r = a.clip_sample ? a.clip_sample_range : INFINITY;
  using prebuilt::Arg;
  // Absent inputs and x0 get a stand-in pointer that is never touched (constexpr flags, a
  // masked-off store), so that the argument types, hence the compiled kernel, stay the same.
  prebuilt::Launch launch = prebuilt::make_launch(
      "denoise_step", {cdiv(numel, cfg::BLOCK), 1, 1},
      {Arg::ptr("mo_ptr", a.model_output), Arg::ptr("x_ptr", a.sample),
       Arg::ptr("noise_ptr", a.noise.value_or(a.sample)),
       Arg::ptr("prev_ptr", a.prev_x0.value_or(a.sample)), Arg::ptr("coef_ptr", a.coeffs),
       Arg::ptr("idx_ptr", a.step_index), Arg::ptr("out_ptr", out),
       Arg::ptr("x0_ptr", a.write_x0 ? x0 : out), Arg::i32("numel", numel),
       Arg::i32("num_steps", a.coeffs.size(0)), Arg::f32("guidance", a.guidance_scale),
       Arg::f32("clip_lo", -r), Arg::f32("clip_hi", r), Arg::i32("write_x0", a.write_x0)},
      {{"GUIDED", is_guided(a)}, {"HAS_NOISE", a.noise.has_value()},
       {"HAS_PREV", a.prev_x0.has_value()}, {"BLOCK", cfg::BLOCK}});
  return {{launch}, result, {}, ""};
}

// One implementation for every backend (ops.h), and the Python bindings.
const auto impl = &Entry<DenoiseStep>::run;
[[maybe_unused]] const bool bound = add_bindings<DenoiseStep>();

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("denoise_step", fastdiff::impl); }
TORCH_LIBRARY_IMPL(fastdiff, Meta, m) { m.impl("denoise_step", fastdiff::impl); }
TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("denoise_step", fastdiff::impl); }
