// fastdiff::add_layer_norm: a residual add and the LayerNorm after it, one pass. Schema below
// (AddLayerNorm); Triton kernel and plan in kernels/add_layer_norm.py.
//
// x, residual: (..., C), contiguous, one float dtype; weight, bias, next_bias: (C,) in x's dtype,
// or absent (1, 0 and 0). Returns (h_out, y):
//   h = x + residual                                   (rounded to x's dtype)
//   y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias   over the last dim, float32 math
//   h_out = h + next_bias (float32 add of the rounded h, rounded again), or h without it
// (diffusers' BasicTransformerBlock: `hidden_states = attn_output + hidden_states`, then
// `norm2(hidden_states)` / `norm3(...)`). The statistics are of h as rounded: y is LayerNorm of
// exactly the tensor eager torch normalizes. next_bias is the bias of the GEMM whose output is
// added to h next (the feed-forward's last Linear): with it in h_out, the block ends with one
// in-place `h_out.addmm_(g, W.T)` instead of an addmm and a residual add.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

using Out = std::tuple<Tensor, Tensor>;

struct AddLayerNorm {  // a call's arguments, in schema order
  static constexpr char name[] = "add_layer_norm";
  static constexpr char schema[] =
      "(Tensor x, Tensor residual, Tensor? weight=None, Tensor? bias=None, float eps=1e-5, "
      "Tensor? next_bias=None) -> (Tensor, Tensor)";
  using Sig = Out(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, double, const std::optional<Tensor>&);
  const Tensor& x;
  const Tensor& residual;
  const std::optional<Tensor>& weight;
  const std::optional<Tensor>& bias;
  double eps;
  const std::optional<Tensor>& next_bias;  // last, so calls without it keep working
};

const Tensor& subject(const AddLayerNorm& a) { return a.x; }

inline int64_t last_dim(const Tensor& t) { return t.size(t.dim() - 1); }

void check_affine(const AddLayerNorm& a, const Tensor& t, const char* name) {
  const char* op = AddLayerNorm::name;
  const Tensor& x = a.x;
  check_same_device(op, x, "x", t, name);
  FD_CHECK(t.dim() == 1 && t.size(0) == last_dim(x), op, "argument '", name,
           "' must have shape [", last_dim(x), "] (the last dim of 'x'), got ", shape_str(t));
  FD_CHECK(t.scalar_type() == x.scalar_type(), op, "argument '", name, "' must have the dtype of ",
           "'x' (", dtype_str(x.scalar_type()), "), got ", dtype_str(t.scalar_type()));
  FD_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
           strides_str(t));
}

void check(const AddLayerNorm& a) {
  const char* op = AddLayerNorm::name;
  const Tensor &x = a.x, &r = a.residual;
  FD_CHECK(x.dim() >= 1, op, "argument 'x' must have a last dimension (..., C), got a 0-d tensor");
  FD_CHECK(is_float_dtype(x.scalar_type()), op,
           "argument 'x' must have dtype float32, float16 or bfloat16, got ",
           dtype_str(x.scalar_type()));
  FD_CHECK(x.is_contiguous(), op, "argument 'x' must be contiguous, got strides ",
           strides_str(x));
  check_same_device(op, x, "x", r, "residual");
  FD_CHECK(same_shape(r, x), op, "argument 'residual' must have the shape of 'x' ",
           shape_str(x), ", got ", shape_str(r));
  FD_CHECK(r.scalar_type() == x.scalar_type(), op, "argument 'residual' must have the dtype of ",
           "'x' (", dtype_str(x.scalar_type()), "), got ", dtype_str(r.scalar_type()));
  FD_CHECK(r.is_contiguous(), op, "argument 'residual' must be contiguous, got strides ",
           strides_str(r));
  check_eps(op, a.eps);
  if (a.weight) check_affine(a, *a.weight, "weight");
  if (a.bias) check_affine(a, *a.bias, "bias");
  if (a.next_bias) check_affine(a, *a.next_bias, "next_bias");
}

Out empty(const AddLayerNorm& a) { return {dense_like(a.x), dense_like(a.x)}; }

// ---- CPU kernel: plain loops over raw pointers ----

using simd::Vec;
constexpr int64_t kW = Vec::size();

// sum(v[i] - shift) and sum((v[i] - shift)^2) over n floats: lanes in float, the total in double.
void sums(const float* v, int64_t n, float shift, double* s1, double* s2) {
  Vec a1(0.f), a2(0.f);
  const Vec m(shift);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec d = Vec::loadu(v + i) - m;
    a1 += d;
    a2 = simd::fmadd(d, d, a2);
  }
  double t1 = simd::reduce_add(a1);
  double t2 = simd::reduce_add(a2);
  for (; i < n; ++i) {
    const double d = v[i] - shift;
    t1 += d;
    t2 += d * d;
  }
  *s1 = t1;
  *s2 = t2;
}

// One row of C elements. hf: C floats of scratch (unused for float rows, whose h is read back
// instead); w, b, nb: C floats or nullptr. h receives h + nb when nb is given.
template <typename T>
void row(const T* x, const T* r, T* h, T* y, int64_t C, const float* w, const float* b,
         const float* nb, float eps, float* hf) {
  // Statistics around the first element (a large common offset costs no precision), corrected
  // two-pass: var = (sum d^2 - (sum d)^2 / C) / C, d = h - h[0]; the sums in float lanes, their
  // total in double (rows are at most a few thousand elements).
  const float shift = static_cast<float>(static_cast<T>(static_cast<float>(x[0]) +
                                                        static_cast<float>(r[0])));
  double s1, s2;
  const float* hv;  // h as float
  if constexpr (std::is_same_v<T, float>) {
    // One sweep: the sum, stored, and both statistics sums; the row stays in L1 for the next.
    // (nb is added in the y sweep, where h is read for the last time: no scratch.)
    const Vec sv(shift);
    Vec a1(0.f), a2(0.f);
    int64_t i = 0;
    for (; i + kW <= C; i += kW) {
      const Vec v = Vec::loadu(x + i) + Vec::loadu(r + i);
      v.store(h + i);
      const Vec d = v - sv;
      a1 += d;
      a2 = simd::fmadd(d, d, a2);
    }
    s1 = simd::reduce_add(a1);
    s2 = simd::reduce_add(a2);
    for (; i < C; ++i) {
      h[i] = x[i] + r[i];
      const double d = h[i] - shift;
      s1 += d;
      s2 += d * d;
    }
    hv = h;
  } else {
    for (int64_t i = 0; i < C; ++i) {  // the sum, rounded to T as eager torch stores it
      const T hi = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(r[i]));
      hf[i] = static_cast<float>(hi);
      h[i] = nb ? static_cast<T>(hf[i] + nb[i]) : hi;  // next_bias added to the rounded sum
    }
    sums(hf, C, shift, &s1, &s2);
    hv = hf;
  }
  const double mean = shift + s1 / C;
  const double var = std::max(0.0, (s2 - s1 * s1 / C) / C);
  const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
  int64_t i = 0;
  float out[kW];
  for (; i + kW <= C; i += kW) {
    const Vec hi = Vec::loadu(hv + i);
    Vec z = (hi - Vec(m)) * Vec(rstd);
    if (w) z = z * Vec::loadu(w + i);
    if (b) z = z + Vec::loadu(b + i);
    if constexpr (std::is_same_v<T, float>) {
      if (nb) (hi + Vec::loadu(nb + i)).store(h + i);  // hv is h: its last read was above
      z.store(y + i);
    } else {
      z.store(out);
      for (int64_t j = 0; j < kW; ++j) y[i + j] = static_cast<T>(out[j]);
    }
  }
  for (; i < C; ++i) {
    const float z = (hv[i] - m) * rstd * (w ? w[i] : 1.f) + (b ? b[i] : 0.f);
    if constexpr (std::is_same_v<T, float>) {
      if (nb) h[i] = hv[i] + nb[i];
    }
    y[i] = static_cast<T>(z);
  }
}

template <typename T>
void rows(const T* x, const T* r, T* h, T* y, int64_t R, int64_t C, const float* w,
          const float* b, const float* nb, float eps) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / C);
  torch::stable::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> hf(std::is_same_v<T, float> ? 0 : C);
    for (int64_t i = begin; i < end; ++i) {
      row(x + i * C, r + i * C, h + i * C, y + i * C, C, w, b, nb, eps, hf.data());
    }
  });
}

template <typename T>
void run_cpu(const AddLayerNorm& a, Tensor& h, Tensor& y, const float* w, const float* b,
             const float* nb) {
  const int64_t C = last_dim(a.x), R = a.x.numel() / C;
  rows(a.x.const_data_ptr<T>(), a.residual.const_data_ptr<T>(), h.mutable_data_ptr<T>(),
       y.mutable_data_ptr<T>(), R, C, w, b, nb, static_cast<float>(a.eps));
}

Out cpu(const AddLayerNorm& a) {
  Out result = empty(a);
  auto& [h, y] = result;
  if (a.x.numel() == 0) return result;
  const std::vector<float> w = floats(a.weight), b = floats(a.bias), nb = floats(a.next_bias);
  const float* wp = w.empty() ? nullptr : w.data();
  const float* bp = b.empty() ? nullptr : b.data();
  const float* nbp = nb.empty() ? nullptr : nb.data();
  dispatch_float(a.x.scalar_type(),
                 [&](auto tag) { run_cpu<decltype(tag)>(a, h, y, wp, bp, nbp); });
  return result;
}

// ---- CUDA plan: kernels/add_layer_norm.py ----

Plan<Out> plan(const AddLayerNorm& a) {
  namespace cfg = config::add_layer_norm;
  Out result = empty(a);
  const auto& [h, y] = result;
  const int64_t C = last_dim(a.x), R = a.x.numel() / C;
  FD_CHECK(R < (int64_t{1} << 31) && C < (int64_t{1} << 31), AddLayerNorm::name, R, " rows of C=",
           C, " are beyond the CUDA kernel's 32-bit sizes");
  int64_t block = 16;  // the next power of two of C, at least 16 (block_c in the Python plan)
  while (block < C) block *= 2;
  const int64_t vec16 = 16 / static_cast<int64_t>(a.x.element_size());
  const int64_t vec = C % vec16 == 0 ? vec16 : 1;
  std::string why;
  const auto* end = std::end(cfg::PREBUILT_BLOCKS);
  if (vec == 1) {
    why = "no cubin for rows that are not multiples of 16 bytes";
  } else if (std::find(std::begin(cfg::PREBUILT_BLOCKS), end, block) == end) {
    why = "no cubin for rows of " + std::to_string(C) + " elements";
  }
  // An absent weight, bias or next_bias: x stands in (masked off: never read), so the types
  // stay and one cubin serves every combination.
  using prebuilt::Arg;
  prebuilt::Launch launch = prebuilt::make_launch(
      "add_layer_norm", {R, 1, 1},
      {Arg::ptr("x_ptr", a.x), Arg::ptr("r_ptr", a.residual),
       Arg::ptr("w_ptr", a.weight.value_or(a.x)), Arg::ptr("b_ptr", a.bias.value_or(a.x)),
       Arg::ptr("nb_ptr", a.next_bias.value_or(a.x)), Arg::ptr("h_ptr", h),
       Arg::ptr("y_ptr", y), Arg::i32("cvecs", C / vec), Arg::f32("eps", a.eps),
       Arg::i32("has_w", a.weight.has_value()), Arg::i32("has_b", a.bias.has_value()),
       Arg::i32("has_nb", a.next_bias.has_value())},
      {{"VEC", vec}, {"BLOCK_C", block}});
  return {{launch}, result, {}, why};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::AddLayerNorm)
