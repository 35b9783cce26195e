// The fastdiff op library: schemas, argument checks, CPU and Meta registrations.
// The CUDA implementations (prebuilt cubins, else the Triton JIT) are in cuda_ops.cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>

#include "prebuilt.h"
#include "fastdiff.h"

namespace fastdiff {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// torch's Python names, as users write them.
std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

#define FD_CHECK(cond, op, ...) TORCH_CHECK_VALUE((cond), "fastdiff.", op, ": ", __VA_ARGS__)

void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                       const at::Tensor& t, const char* name) {
  FD_CHECK(t.device() == ref.device(), op, "argument '", name, "' must be on the same device as '",
           ref_name, "' (", ref.device(), "), got ", t.device());
}

// A small per-channel or per-(n, c) tensor: exact shape, dtype of x or float32, contiguous.
void check_small(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name,
                 at::IntArrayRef expected) {
  check_same_device(op, x, "x", t, name);
  FD_CHECK(t.sizes() == expected, op, "argument '", name, "' must have shape ", expected, ", got ",
           shape_str(t));
  FD_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, "argument '",
           name, "' must have dtype ", dtype_str(x.scalar_type()), " (as x) or float32, got ", dtype_str(t.scalar_type()));
  FD_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
           t.strides());
}

}  // namespace

void check_group_norm_silu(const at::Tensor& x, int64_t num_groups,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps,
                           const std::optional<at::Tensor>& pre_bias,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift, bool /*apply_silu*/) {
  const char* op = "group_norm_silu";
  FD_CHECK(x.dim() == 4, op, "argument 'x' must be a 4-D tensor (N, C, H, W), got shape ",
           shape_str(x));
  FD_CHECK(is_float_dtype(x.scalar_type()), op,
           "argument 'x' must have dtype float32, float16 or bfloat16, got ", dtype_str(x.scalar_type()));
  FD_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
           "argument 'x' must be contiguous (NCHW) or channels_last, got strides ", x.strides(),
           " for shape ", shape_str(x));
  const int64_t N = x.size(0), C = x.size(1);
  FD_CHECK(num_groups > 0, op, "argument 'num_groups' must be positive, got ", num_groups);
  FD_CHECK(C % num_groups == 0, op, "the channel count C=", C,
           " of argument 'x' must be divisible by argument 'num_groups'=", num_groups);
  FD_CHECK(std::isfinite(eps) && eps >= 0, op, "argument 'eps' must be finite and >= 0, got ",
           eps);
  if (weight) check_small(op, x, *weight, "weight", {C});
  if (bias) check_small(op, x, *bias, "bias", {C});
  if (pre_bias) check_small(op, x, *pre_bias, "pre_bias", {N, C});
  if (scale) check_small(op, x, *scale, "scale", {N, C});
  if (shift) check_small(op, x, *shift, "shift", {N, C});
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& attn_bias, std::optional<double> scale) {
  const char* op = "attention";
  const std::pair<const at::Tensor*, const char*> qkv[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}};
  for (auto [t, name] : qkv) {
    FD_CHECK(t->dim() == 4, op, "argument '", name, "' must be a 4-D tensor (B, H, L, D), got shape ",
             shape_str(*t));
    FD_CHECK(is_float_dtype(t->scalar_type()), op, "argument '", name,
             "' must have dtype float32, float16 or bfloat16, got ", dtype_str(t->scalar_type()));
    FD_CHECK(t->scalar_type() == q.scalar_type(), op, "argument '", name,
             "' must have the dtype of 'q' (", dtype_str(q.scalar_type()), "), got ", dtype_str(t->scalar_type()));
    check_same_device(op, q, "q", *t, name);
    FD_CHECK(t->size(3) == 1 || t->stride(3) == 1, op, "argument '", name,
             "' must have stride 1 in its last dimension (head dim), got strides ", t->strides());
  }
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  FD_CHECK(k.size(0) == B && v.size(0) == B, op,
           "arguments 'q', 'k', 'v' must share the batch size (dim 0), got q ", shape_str(q),
           ", k ", shape_str(k), ", v ", shape_str(v));
  FD_CHECK(k.size(1) == H && v.size(1) == H, op,
           "arguments 'q', 'k', 'v' must share the head count (dim 1), got q ", shape_str(q),
           ", k ", shape_str(k), ", v ", shape_str(v));
  FD_CHECK(k.size(3) == D && v.size(3) == D, op,
           "arguments 'q', 'k', 'v' must share the head dim (dim 3), got q ", shape_str(q), ", k ",
           shape_str(k), ", v ", shape_str(v));
  FD_CHECK(v.size(2) == Lk, op, "arguments 'k' and 'v' must have the same length (dim 2), got k ",
           shape_str(k), ", v ", shape_str(v));
  FD_CHECK(D >= 1 && D <= 256, op, "head dim (dim 3 of 'q') must be in [1, 256], got ", D);
  FD_CHECK(Lk >= 1, op, "argument 'k' must have at least one key (dim 2), got shape ",
           shape_str(k));
  if (attn_bias) {
    const at::Tensor& b = *attn_bias;
    check_same_device(op, q, "q", b, "attn_bias");
    FD_CHECK(b.scalar_type() == q.scalar_type() || b.scalar_type() == at::kFloat, op,
             "argument 'attn_bias' must be an additive mask of dtype ", dtype_str(q.scalar_type()),
             " (as q) or float32, got ", dtype_str(b.scalar_type()),
             " (fastdiff.ops.attention converts boolean masks)");
    const int64_t full[4] = {B, H, Lq, Lk};
    bool ok = b.dim() == 4;
    for (int i = 0; ok && i < 4; ++i) ok = b.size(i) == 1 || b.size(i) == full[i];
    FD_CHECK(ok, op, "argument 'attn_bias' must be 4-D and broadcastable to (B, H, Lq, Lk) = ",
             at::IntArrayRef(full), " (each dim 1 or full), got shape ", shape_str(b));
  }
  if (scale) {
    FD_CHECK(std::isfinite(*scale) && *scale > 0, op,
             "argument 'scale' must be finite and positive, got ", *scale);
  }
}

void check_denoise_step(const at::Tensor& model_output, const at::Tensor& sample,
                        const at::Tensor& coeffs, const at::Tensor& step_index,
                        const std::optional<at::Tensor>& noise,
                        const std::optional<at::Tensor>& prev_x0, double guidance_scale,
                        bool clip_sample, double clip_sample_range, bool /*write_x0*/) {
  const char* op = "denoise_step";
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
  bool guided = same_rest && N > 0 && model_output.size(0) == 2 * N;
  FD_CHECK(same_rest && (model_output.size(0) == N || guided), op,
           "argument 'model_output' must have the shape of 'sample' ", shape_str(sample),
           " or, for classifier-free guidance, twice its batch ([uncond; cond]), got ",
           shape_str(model_output));
  FD_CHECK(std::isfinite(guidance_scale), op, "argument 'guidance_scale' must be finite, got ",
           guidance_scale);
  FD_CHECK(guided || guidance_scale == 1.0, op, "argument 'guidance_scale'=", guidance_scale,
           " needs 'model_output' with batch 2*N=", 2 * N, " ([uncond; cond]), got ",
           shape_str(model_output));
  const std::pair<const std::optional<at::Tensor>*, const char*> extra[] = {
      {&noise, "noise"}, {&prev_x0, "prev_x0"}};
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
  if (clip_sample) {
    FD_CHECK(std::isfinite(clip_sample_range) && clip_sample_range > 0, op,
             "argument 'clip_sample_range' must be finite and positive, got ", clip_sample_range);
  }
}

namespace {

// ---- registrations: every backend runs the same checks first ----

at::Tensor group_norm_silu_cpu_checked(const at::Tensor& x, int64_t num_groups,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps,
                                       const std::optional<at::Tensor>& pre_bias,
                                       const std::optional<at::Tensor>& scale,
                                       const std::optional<at::Tensor>& shift, bool apply_silu) {
  check_group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu);
  if (x.numel() == 0) return at::empty_like(x);
  return group_norm_silu_cpu(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu);
}

at::Tensor group_norm_silu_meta(const at::Tensor& x, int64_t num_groups,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps,
                                const std::optional<at::Tensor>& pre_bias,
                                const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, bool apply_silu) {
  check_group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu);
  return at::empty_like(x);
}

at::Tensor attention_cpu_checked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& attn_bias,
                                 std::optional<double> scale) {
  check_attention(q, k, v, attn_bias, scale);
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  return attention_cpu(q, k, v, attn_bias, scale);
}

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& attn_bias, std::optional<double> scale) {
  check_attention(q, k, v, attn_bias, scale);
  return at::empty(q.sizes(), q.options());
}

std::tuple<at::Tensor, at::Tensor> denoise_step_empty(const at::Tensor& sample, bool write_x0) {
  return {at::empty_like(sample), write_x0 ? at::empty_like(sample) : sample.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor> denoise_step_cpu_checked(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
    const at::Tensor& step_index, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& prev_x0, double guidance_scale, bool clip_sample,
    double clip_sample_range, bool write_x0) {
  check_denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale,
                     clip_sample, clip_sample_range, write_x0);
  // On the CPU the step index can be read without a device sync: check its range here.
  const int64_t idx = step_index.item<int64_t>();
  FD_CHECK(idx >= 0 && idx < coeffs.size(0), "denoise_step", "argument 'step_index'=", idx,
           " is out of range for 'coeffs' with ", coeffs.size(0), " steps");
  if (sample.numel() == 0) return denoise_step_empty(sample, write_x0);
  return denoise_step_cpu(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale,
                          clip_sample, clip_sample_range, write_x0);
}

std::tuple<at::Tensor, at::Tensor> denoise_step_meta(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
    const at::Tensor& step_index, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& prev_x0, double guidance_scale, bool clip_sample,
    double clip_sample_range, bool write_x0) {
  check_denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale,
                     clip_sample, clip_sample_range, write_x0);
  return denoise_step_empty(sample, write_x0);
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY(fastdiff, m) {
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, "
      "float eps=1e-5, Tensor? pre_bias=None, Tensor? scale=None, Tensor? shift=None, "
      "bool apply_silu=True) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_bias=None, float? scale=None) -> Tensor");
  m.def(
      "denoise_step(Tensor model_output, Tensor sample, Tensor coeffs, Tensor step_index, "
      "Tensor? noise=None, Tensor? prev_x0=None, float guidance_scale=1.0, bool clip_sample=False, "
      "float clip_sample_range=1.0, bool write_x0=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cpu_checked);
  m.impl("attention", &fastdiff::attention_cpu_checked);
  m.impl("denoise_step", &fastdiff::denoise_step_cpu_checked);
}

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_meta);
  m.impl("attention", &fastdiff::attention_meta);
  m.impl("denoise_step", &fastdiff::denoise_step_meta);
}

// The checks are also exposed to Python, where the CUDA (Triton) implementations run them.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++ extension: registers torch.ops.fastdiff.* (CPU and Meta kernels)";
  m.def("check_group_norm_silu", &fastdiff::check_group_norm_silu);
  m.def("check_attention", &fastdiff::check_attention);
  m.def("check_denoise_step", &fastdiff::check_denoise_step);
  fastdiff::prebuilt::bind(m);
}
