// fastdiff::geglu: diffusers' GEGLU after its projection, one pass. Schema below (Geglu);
// Triton kernel and plan in kernels/geglu.py.
//
// x: (..., 2F), contiguous, float32/float16/bfloat16; returns (..., F) in x's dtype:
//   y = x[..., :F] * gelu(x[..., F:]),   gelu(g) = g / 2 * (1 + erf(g / sqrt(2)))
// (diffusers.models.activations.GEGLU: the first half is the value, the second the gate; exact
// GELU), with the math in float32 and one rounding of the result.
#include <algorithm>
#include <cmath>
#include <vector>

#include "geglu.h"
#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

struct Geglu {  // a call's arguments, in schema order
  static constexpr char name[] = "geglu";
  static constexpr char schema[] = "(Tensor x) -> Tensor";
  using Sig = Tensor(const Tensor&);
  const Tensor& x;
};

const Tensor& subject(const Geglu& a) { return a.x; }

void check(const Geglu& a) {
  const char* op = Geglu::name;
  const Tensor& x = a.x;
  FD_CHECK(x.dim() >= 1, op, "argument 'x' must have a last dimension (..., 2F), got a 0-d tensor");
  FD_CHECK(is_float_dtype(x.scalar_type()), op,
           "argument 'x' must have dtype float32, float16 or bfloat16, got ",
           dtype_str(x.scalar_type()));
  FD_CHECK(x.size(x.dim() - 1) % 2 == 0, op,
           "argument 'x' must have an even last dimension (..., 2F): value and gate halves, got "
           "shape ", shape_str(x));
  FD_CHECK(x.is_contiguous(), op, "argument 'x' must be contiguous, got strides ",
           strides_str(x));
}

Tensor empty(const Geglu& a) {
  Sizes shape(a.x.sizes().begin(), a.x.sizes().end());
  shape.back() /= 2;
  return new_contiguous(a.x, shape);
}

// ---- CPU kernel: plain loops over raw pointers ----

using simd::Vec;
constexpr int64_t kW = Vec::size();
constexpr int64_t kChunk = 1024;  // elements of a row converted to float at a time (in cache)

inline float gelu(float g) { return 0.5f * g * (1.f + std::erf(g * static_cast<float>(M_SQRT1_2))); }

// erf(x) by Abramowitz & Stegun 7.1.26: 1 - (a1 t + ... + a5 t^5) exp(-x^2), t = 1 / (1 + p|x|),
// |error| <= 1.5e-7 (the formula torch's CPU GELU uses too), with simd.h's exp (as
// group_norm_silu's SiLU): the exponential is most of GELU's cost on a CPU.
inline Vec erf_as(const Vec& x) {
  const Vec one(1.f);
  const simd::f8 ax = x.v < 0.f ? -x.v : x.v;
  const Vec t = one / simd::fmadd(Vec(0.3275911f), Vec(ax), one);
  Vec poly = simd::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  poly = simd::fmadd(poly, t, Vec(1.421413741f));
  poly = simd::fmadd(poly, t, Vec(-0.284496736f));
  poly = simd::fmadd(poly, t, Vec(0.254829592f));
  const Vec y = one - poly * t * (x * x).neg().exp();
  return Vec(x.v < 0.f ? -y.v : y.v);
}

// y[i] = a[i] * gelu(g[i]) over n <= kChunk floats.
inline void geglu_floats(const float* a, const float* g, float* y, int64_t n) {
  const Vec half(0.5f), one(1.f), r2(static_cast<float>(M_SQRT1_2));
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec gv = Vec::loadu(g + i);
    (Vec::loadu(a + i) * (half * gv * (one + erf_as(gv * r2)))).store(y + i);
  }
  for (; i < n; ++i) y[i] = a[i] * gelu(g[i]);
}

// One row: x holds 2F elements (value half, then gate half), y gets F.
template <typename T>
void geglu_row(const T* x, T* y, int64_t F, float* a, float* g, float* out) {
  for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
    const int64_t n = std::min(kChunk, F - c0);
    if constexpr (std::is_same_v<T, float>) {
      geglu_floats(x + c0, x + F + c0, y + c0, n);
    } else {
      for (int64_t i = 0; i < n; ++i) a[i] = static_cast<float>(x[c0 + i]);
      for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>(x[F + c0 + i]);
      geglu_floats(a, g, out, n);
      for (int64_t i = 0; i < n; ++i) y[c0 + i] = static_cast<T>(out[i]);
    }
  }
}

template <typename T>
void geglu_rows(const T* x, T* y, int64_t rows, int64_t F) {
  // About 16K output elements per task: small rows are batched, long rows go one by one.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / F);
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : 3 * kChunk);
    float* p = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      geglu_row(x + r * 2 * F, y + r * F, F, p, p + kChunk, p + 2 * kChunk);
    }
  });
}

Tensor cpu(const Geglu& a) {
  Tensor y = empty(a);
  if (y.numel() == 0) return y;
  const int64_t F = y.size(y.dim() - 1), rows = y.numel() / F;
  dispatch_float(a.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    geglu_rows(a.x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), rows, F);
  });
  return y;
}

// ---- CUDA plan: kernels/geglu.py ----

Plan<Tensor> plan(const Geglu& a) {
  namespace cfg = config::geglu;
  Tensor y = empty(a);
  const int64_t F = y.size(y.dim() - 1), rows = y.numel() / F, nblk = cdiv(F, cfg::BLOCK);
  FD_CHECK(F < (int64_t{1} << 31) && rows * nblk < (int64_t{1} << 31), Geglu::name, rows,
           " rows of F=", F, " are beyond the CUDA kernel's ",
           "32-bit sizes (F and rows * ceil(F / ", cfg::BLOCK, ") below 2**31)");
  // VEC: elements in 16 bytes when they divide F (rows start 16 bytes apart), else 1; the
  // kernel takes F as F / VEC (so that Triton knows VEC divides it).
  const int64_t vec16 = 16 / static_cast<int64_t>(a.x.element_size());
  const int64_t vec = F % vec16 == 0 ? vec16 : 1;
  using prebuilt::Arg;
  prebuilt::Launch launch = prebuilt::make_launch(
      "geglu", {rows * nblk, 1, 1},
      {Arg::ptr("x_ptr", a.x), Arg::ptr("y_ptr", y), Arg::i32("vecs", F / vec),
       Arg::i32("nblk", nblk)},
      {{"VEC", vec}, {"BLOCK", cfg::BLOCK}});
  return {{launch}, y, {}, ""};
}

}  // namespace

void geglu_floats_cpu(const float* a, const float* g, float* y, int64_t n) {
  geglu_floats(a, g, y, n);
}

}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::Geglu)
