// fastdiff::group_norm_silu: GroupNorm with optional fusions, then SiLU, and
// fastdiff::group_norm_silu_residual (the same, also returning x + residual_bias: at the end of
// this file). Schemas below; Triton kernels and plan in kernels/group_norm_silu.py.
//
// x: (N, C, H, W), contiguous NCHW or channels_last; returns the same dtype, in x's memory format
// or, with channels_last_out, in channels_last whatever x's (the (N, H*W, C) token layout a
// transformer reads after the norm: diffusers' Transformer2DModel, issue 18).
// weight/bias: (C,) or absent (1 and 0). pre_bias/scale/shift: (N, C), contiguous, or absent;
// the small tensors are x's dtype or float32.
//   h = x + pre_bias[n, c]; y = (h - mean_g) * rstd_g * weight[c] + bias[c]
//   y = y * (1 + scale[n, c]) + shift[n, c]; y = silu(y) if apply_silu
//
// The CPU kernel's statistics are shifted, corrected two-pass sums over data that is in cache
// (moments() below): per channel (NCHW) or per block of rows (channels_last), then merged across
// channels/blocks with Chan's formula in double. Everything per (n, c) is then folded into y = silu((x - m) * a + b), one
// fused pass.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

struct GroupNormSilu {  // a call's arguments, in schema order
  static constexpr char name[] = "group_norm_silu";
  static constexpr char schema[] =
      "(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-5, "
      "Tensor? pre_bias=None, Tensor? scale=None, Tensor? shift=None, bool apply_silu=True, "
      "bool channels_last_out=False) -> Tensor";
  using Sig = Tensor(const Tensor&, int64_t, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, double, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, const std::optional<Tensor>&, bool, bool);
  const Tensor& x;
  int64_t num_groups;
  const std::optional<Tensor>& weight;
  const std::optional<Tensor>& bias;
  double eps;
  const std::optional<Tensor>& pre_bias;
  const std::optional<Tensor>& scale;
  const std::optional<Tensor>& shift;
  bool apply_silu;
  bool channels_last_out;
};

const Tensor& subject(const GroupNormSilu& a) { return a.x; }

// A small per-channel or per-(n, c) tensor: exact shape, dtype of x or float32, contiguous.
void check_small(const char* op, const Tensor& x, const Tensor& t, const char* name,
                 std::initializer_list<int64_t> expected) {
  check_same_device(op, x, "x", t, name);
  FD_CHECK(same_sizes(t, expected), op, "argument '", name, "' must have shape ",
           list_str(Sizes(expected)), ", got ", shape_str(t));
  FD_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == ScalarType::Float, op,
           "argument '", name, "' must have dtype ", dtype_str(x.scalar_type()),
           x.scalar_type() == ScalarType::Float ? " (as x)" : " (as x) or float32", ", got ",
           dtype_str(t.scalar_type()));
  FD_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
           strides_str(t));
}

// op: the name errors give (group_norm_silu_residual checks its arguments here too).
void check_args(const GroupNormSilu& a, const char* op) {
  const Tensor& x = a.x;
  FD_CHECK(x.dim() == 4, op, "argument 'x' must be a 4-D tensor (N, C, H, W), got shape ",
           shape_str(x));
  FD_CHECK(is_float_dtype(x.scalar_type()), op,
           "argument 'x' must have dtype float32, float16 or bfloat16, got ", dtype_str(x.scalar_type()));
  FD_CHECK(x.is_contiguous() || is_channels_last(x), op,
           "argument 'x' must be contiguous (NCHW) or channels_last, got strides ", strides_str(x),
           " for shape ", shape_str(x));
  const int64_t N = x.size(0), C = x.size(1);
  FD_CHECK(a.num_groups > 0, op, "argument 'num_groups' must be positive, got ", a.num_groups);
  FD_CHECK(C % a.num_groups == 0, op, "the channel count C=", C,
           " of argument 'x' must be divisible by argument 'num_groups'=", a.num_groups);
  // eps is added in float32 on the GPU: a value that float32 rounds to 0 or infinity is refused.
  check_eps(op, a.eps);
  if (a.weight) check_small(op, x, *a.weight, "weight", {C});
  if (a.bias) check_small(op, x, *a.bias, "bias", {C});
  if (a.pre_bias) check_small(op, x, *a.pre_bias, "pre_bias", {N, C});
  if (a.scale) check_small(op, x, *a.scale, "scale", {N, C});
  if (a.shift) check_small(op, x, *a.shift, "shift", {N, C});
}

void check(const GroupNormSilu& a) { check_args(a, GroupNormSilu::name); }

// y is channels_last while x is NCHW: x is read as NCHW, y written at channels_last positions.
// (A tensor with C == 1 or H*W == 1 is both: its elements sit at the same places either way.)
bool mixed(const GroupNormSilu& a) {
  return a.channels_last_out && a.x.is_contiguous() && !is_channels_last(a.x);
}

Tensor empty(const GroupNormSilu& a) {
  if (!a.channels_last_out) return dense_like(a.x);
  // torch's channels_last strides (as torch.empty(..., memory_format=channels_last) makes them).
  const Tensor& x = a.x;
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  return empty_strided(x, {x.size(0), C, H, W}, {H * W * C, 1, W * C, C});
}

// ---- CPU kernel ----

using simd::Vec;
constexpr int64_t kW = Vec::size();

// Reduced-precision inputs are converted to a float buffer block by block; float is used in place.
template <typename T>
const float* as_float(const T* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf.data();
  }
}

// Statistics exact enough for any group: simd::shifted_sums (sums of x - shift, the shift a
// value of the data); then the corrected two-pass form M2 = sum((x - m)^2) - sum(x - m)^2 / n
// around the float-rounded mean m.
using simd::shifted_sums;

// Mean and M2 (sum of squared deviations) of n > 0 contiguous floats.
void moments(const float* x, int64_t n, double* mean, double* m2) {
  double s1, s2;
  shifted_sums<false>(x, n, x[0], &s1, nullptr);
  const float m = static_cast<float>(x[0] + s1 / n);
  shifted_sums<true>(x, n, m, &s1, &s2);
  *mean = m + s1 / n;
  *m2 = std::max(0.0, s2 - s1 * s1 / n);
}

inline float silu(float z) { return z / (1.f + std::exp(-z)); }

// y[i] = act((x[i] - m) * a + b) over n elements, with m, a, b per element (kPerElement:
// channels_last, one value per channel) or one value for the whole range (NCHW: one channel).
// Subtracting the mean before scaling keeps small-variance groups accurate.
template <typename T, bool kSilu, bool kPerElement>
void affine_act(const float* x, const float* m, const float* a, const float* b, T* y, int64_t n) {
  // One value for the range: read once, before the stores to y (which may alias, as far as
  // the compiler knows, and would make it read them again for every vector).
  const Vec m1(*m), a1(*a), b1(*b);
  auto vec = [](const float* p, int64_t i, Vec one) { return kPerElement ? Vec::loadu(p + i) : one; };
  auto one = [](const float* p, int64_t i) { return kPerElement ? p[i] : *p; };
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    Vec z = simd::fmadd(Vec::loadu(x + i) - vec(m, i, m1), vec(a, i, a1), vec(b, i, b1));
    if constexpr (kSilu) z = z / (Vec(1.f) + z.neg().exp());
    if constexpr (std::is_same_v<T, float>) {
      z.store(y + i);
    } else {
      float tmp[kW];
      z.store(tmp);
      for (int64_t j = 0; j < kW; ++j) y[i + j] = static_cast<T>(tmp[j]);
    }
  }
  for (; i < n; ++i) {
    const float z = (x[i] - one(m, i)) * one(a, i) + one(b, i);
    y[i] = static_cast<T>(kSilu ? silu(z) : z);
  }
}

// Per-(n, c) parameters as float, absent ones as nullptr.
struct Params {
  const float *weight, *bias, *pre, *scale, *shift;
  float eps;
};

// From the group statistics, the fold of everything per (n, c):
//   y = ((x + pre - mean) * rstd * w + b) * (1 + s) + sh  =  (x - m) * a + beta
inline void fold(const Params& p, int64_t n, int64_t c, int64_t C, double mean, double rstd,
                 float* m, float* a, float* beta) {
  const double w = p.weight ? p.weight[c] : 1.0, b = p.bias ? p.bias[c] : 0.0;
  const double pre = p.pre ? p.pre[n * C + c] : 0.0;
  const double s = p.scale ? 1.0 + p.scale[n * C + c] : 1.0;
  const double sh = p.shift ? p.shift[n * C + c] : 0.0;
  // m is the shifted mean rounded to float; what rounding dropped (lo) moves into beta, so that
  // (x - m) * a, exact for x near m, loses nothing to it (a large mean with a tiny spread).
  *m = static_cast<float>(mean - pre);
  const double lo = (mean - pre) - *m, scale = rstd * w * s;
  *a = static_cast<float>(scale);
  *beta = static_cast<float>(b * s + sh - lo * scale);
}

// kYCl: y in channels_last (x NCHW): each channel's outputs are made in a float row of a group
// buffer as for NCHW output (the same arithmetic, element for element), then written per pixel:
// the group's C/G channels of each y row, read across the buffer's rows.
// r (nullptr: none): r = x + rb[c] in x's layout, written from the group's floats in cache.
template <typename T, bool kSilu, bool kYCl>
void nchw(const T* x, T* y, T* r, const float* rb, int64_t N, int64_t C, int64_t HW, int64_t G,
          const Params& p) {
  const int64_t Cg = C / G;
  torch::stable::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    // The buffer's rows S = HW + 16 floats apart: read across rows 16 KB apart (64x64), they
    // would all fall in one cache set (4 KB aliasing).
    const int64_t S = HW + 16;
    std::vector<float> buf, tokens(kYCl ? S * Cg : 0);
    std::vector<double> mean_c(Cg), m2_c(Cg);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c0 = (ng % G) * Cg;
      const T* xg = x + (n * C + c0) * HW;
      // The whole group as float (in place for float input); it stays in cache for the passes.
      const float* xf = as_float(xg, Cg * HW, buf);
      double gmean = 0;
      for (int64_t j = 0; j < Cg; ++j) {
        moments(xf + j * HW, HW, &mean_c[j], &m2_c[j]);
        gmean += mean_c[j] + (p.pre ? p.pre[n * C + c0 + j] : 0.f);
      }
      gmean /= Cg;
      double m2 = 0;  // Chan: within-channel plus between-channel spread
      for (int64_t j = 0; j < Cg; ++j) {
        const double d = mean_c[j] + (p.pre ? p.pre[n * C + c0 + j] : 0.f) - gmean;
        m2 += m2_c[j] + HW * d * d;
      }
      const double rstd = 1.0 / std::sqrt(m2 / (Cg * HW) + p.eps);
      for (int64_t j = 0; j < Cg; ++j) {
        float m, a, b;
        fold(p, n, c0 + j, C, gmean, rstd, &m, &a, &b);
        if constexpr (kYCl) {
          affine_act<float, kSilu, false>(xf + j * HW, &m, &a, &b, tokens.data() + j * S, HW);
        } else {
          affine_act<T, kSilu, false>(xf + j * HW, &m, &a, &b, y + (n * C + c0 + j) * HW, HW);
        }
        if (r) {
          const float* xc = xf + j * HW;
          const float rbc = rb[c0 + j];
          T* rc = r + (n * C + c0 + j) * HW;
          for (int64_t i = 0; i < HW; ++i) rc[i] = static_cast<T>(xc[i] + rbc);
        }
      }
      if constexpr (kYCl) {
        for (int64_t q = 0; q < HW; ++q) {
          T* row = y + (n * HW + q) * C + c0;
          const float* t = tokens.data() + q;
          for (int64_t j = 0; j < Cg; ++j) row[j] = static_cast<T>(t[j * S]);
        }
      }
    }
  });
}

template <typename T, bool kSilu>
void channels_last(const T* x, T* y, T* r, const float* rb, int64_t N, int64_t C, int64_t HW,
                   int64_t G, const Params& p) {
  const int64_t Cg = C / G;
  // Blocks of rows small enough to stay in cache between the two statistics passes.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(HW, (32 << 10) / C));
  const int64_t nblk = (HW + rows - 1) / rows;
  // Per block and channel, as moments() does along a channel: sums of x minus the block's first
  // row, then the corrected two-pass M2 around the float-rounded mean; in double once per block.
  std::vector<double> bmean(N * nblk * C), bm2(N * nblk * C);
  torch::stable::parallel_for(0, N * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, s1(C), s2(C), m(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nblk, r0 = (t % nblk) * rows, r = std::min(rows, HW - r0);
      const float* xf = as_float(x + (n * HW + r0) * C, r * C, buf);
      std::fill(s1.begin(), s1.end(), 0.f);
      for (int64_t i = 0; i < r; ++i) {  // s1 += row - first row
        const float* row = xf + i * C;
        int64_t c = 0;
        for (; c + kW <= C; c += kW) {
          (Vec::loadu(s1.data() + c) + (Vec::loadu(row + c) - Vec::loadu(xf + c)))
              .store(s1.data() + c);
        }
        for (; c < C; ++c) s1[c] += row[c] - xf[c];
      }
      for (int64_t c = 0; c < C; ++c) m[c] = static_cast<float>(xf[c] + double(s1[c]) / r);
      std::fill(s1.begin(), s1.end(), 0.f);
      std::fill(s2.begin(), s2.end(), 0.f);
      for (int64_t i = 0; i < r; ++i) {  // one sweep, both sums
        const float* row = xf + i * C;
        int64_t c = 0;
        for (; c + kW <= C; c += kW) {
          const Vec d = Vec::loadu(row + c) - Vec::loadu(m.data() + c);
          (Vec::loadu(s1.data() + c) + d).store(s1.data() + c);
          simd::fmadd(d, d, Vec::loadu(s2.data() + c)).store(s2.data() + c);
        }
        for (; c < C; ++c) {
          const float d = row[c] - m[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        bmean[t * C + c] = m[c] + double(s1[c]) / r;
        bm2[t * C + c] = std::max(0.0, double(s2[c]) - double(s1[c]) * s1[c] / r);
      }
    }
  });
  // Merge blocks per channel, then channels per group (Chan et al.), in double.
  std::vector<float> mc(N * C), a(N * C), beta(N * C);
  torch::stable::parallel_for(0, N * G, 8, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      double cnt = 0, gmean = 0, m2 = 0;
      for (int64_t t = 0; t < nblk; ++t) {
        const double r = std::min(rows, HW - t * rows);
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const int64_t k = (n * nblk + t) * C + c;
          const double m = bmean[k] + (p.pre ? p.pre[n * C + c] : 0.f);
          const double tot = cnt + r, d = m - gmean;
          gmean += d * r / tot;
          m2 += bm2[k] + d * d * cnt * r / tot;
          cnt = tot;
        }
      }
      const double rstd = 1.0 / std::sqrt(m2 / cnt + p.eps);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        fold(p, n, c, C, gmean, rstd, &mc[n * C + c], &a[n * C + c], &beta[n * C + c]);
      }
    }
  });
  torch::stable::parallel_for(0, N * HW, std::max<int64_t>(1, (16 << 10) / C),
                              [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / HW;
      const float* xf = as_float(x + t * C, C, buf);
      affine_act<T, kSilu, true>(xf, mc.data() + n * C, a.data() + n * C, beta.data() + n * C, y + t * C,
                           C);
      if (r) {
        T* rt = r + t * C;
        for (int64_t c = 0; c < C; ++c) rt[c] = static_cast<T>(xf[c] + rb[c]);
      }
    }
  });
}

// The CPU kernel into y, and with r (group_norm_silu_residual) r = x + rb[c] into r.
void cpu_into(const GroupNormSilu& a, const Tensor& y, const Tensor* r,
              const std::optional<Tensor>& rb) {
  const Tensor& x = a.x;
  if (x.numel() == 0) return;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  // A tensor with C == 1 or HW == 1 is both; NCHW is then the right reading.
  const bool cl = !x.is_contiguous(), ycl = mixed(a);
  const std::vector<float> w = floats(a.weight), b = floats(a.bias), pre = floats(a.pre_bias),
                           s = floats(a.scale), sh = floats(a.shift);
  auto ptr = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
  const Params p{ptr(w), ptr(b), ptr(pre), ptr(s), ptr(sh), static_cast<float>(a.eps)};
  const std::vector<float> rbf = floats(rb);
  const int64_t G = a.num_groups;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* rp = r ? r->mutable_data_ptr<scalar_t>() : nullptr;
    const float* rbp = ptr(rbf);
    if (cl) {
      a.apply_silu ? channels_last<scalar_t, true>(xp, yp, rp, rbp, N, C, HW, G, p)
                   : channels_last<scalar_t, false>(xp, yp, rp, rbp, N, C, HW, G, p);
    } else if (ycl) {
      a.apply_silu ? nchw<scalar_t, true, true>(xp, yp, rp, rbp, N, C, HW, G, p)
                   : nchw<scalar_t, false, true>(xp, yp, rp, rbp, N, C, HW, G, p);
    } else {
      a.apply_silu ? nchw<scalar_t, true, false>(xp, yp, rp, rbp, N, C, HW, G, p)
                   : nchw<scalar_t, false, false>(xp, yp, rp, rbp, N, C, HW, G, p);
    }
  });
}

Tensor cpu(const GroupNormSilu& a) {
  Tensor y = empty(a);
  cpu_into(a, y, nullptr, std::nullopt);
  return y;
}

// ---- CUDA plan: kernels/group_norm_silu.py ----

// How the kernels read an optional per-channel tensor: 0 absent, 1 float32, 2 x's dtype.
int64_t kind(const std::optional<Tensor>& t) {
  return !t ? 0 : t->scalar_type() == ScalarType::Float ? 1 : 2;
}

// The launches writing y, and with r (group_norm_silu_residual) r = x + rb[c] too (RES).
Plan<Tensor> plan_into(const GroupNormSilu& a, Tensor y, const Tensor* r, const Tensor* rb) {
  namespace cfg = config::group_norm_silu;
  const Tensor& x = a.x;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = a.num_groups;
  const int64_t cg = C / G;
  const bool cl = !x.is_contiguous();
  const int64_t rows = cfg::TILE[cl][0], cols = cfg::TILE[cl][1];
  const int64_t nrows = cl ? HW * cdiv(cg, cols) : cg * cdiv(HW, cols);
  FD_CHECK(nrows < (int64_t{1} << 31), GroupNormSilu::name, "a group of C/G * H * W = ",
           cg * HW, " elements is beyond the CUDA kernels' ", int64_t{1} << 31, " rows of ", cols);
  const int64_t tiles = cdiv(nrows, rows);
  int64_t split = std::min(cfg::MAX_SPLIT, tiles);
  const int64_t chunk = cdiv(tiles, split);  // tiles per program
  split = cdiv(tiles, chunk);
  Tensor part = new_contiguous(x, {N * G, split, 3}, ScalarType::Float);
  const int64_t vec16 = 16 / static_cast<int64_t>(x.element_size());
  const int64_t vec = (cl ? cg : HW) % vec16 == 0 ? vec16 : 1;
  const bool has_pre = a.pre_bias.has_value();
  using prebuilt::Arg;
  // The small tensors: any dtype the op accepts, read per their kind; the prebuilt signature
  // names one pointer type for them. Absent ones: x stands in (kind 0: never read).
  auto small = [&](const char* name, const std::optional<Tensor>& t) {
    return Arg::ptr(name, t.value_or(x), "*fp32");
  };
  const std::vector<Arg> common{Arg::i32("HW", HW), Arg::i32("C", C), Arg::i32("G", G),
                                Arg::i32("CG", cg), Arg::i32("chunk", chunk),
                                Arg::i32("split", split)};
  std::vector<Arg> stats{Arg::ptr("x_ptr", x), small("pre_ptr", a.pre_bias),
                         Arg::ptr("part_ptr", part)};
  stats.insert(stats.end(), common.begin(), common.end());
  stats.push_back(Arg::i32("pre_kind", kind(a.pre_bias)));
  // r_ptr, rb_ptr: x stands in without r (RES false: never read or written).
  std::vector<Arg> apply{Arg::ptr("x_ptr", x), Arg::ptr("y_ptr", y),
                         Arg::ptr("r_ptr", r ? *r : x), Arg::ptr("rb_ptr", rb ? *rb : x),
                         small("w_ptr", a.weight),
                         small("b_ptr", a.bias), small("pre_ptr", a.pre_bias),
                         small("scale_ptr", a.scale), small("shift_ptr", a.shift),
                         Arg::ptr("part_ptr", part)};
  apply.insert(apply.end(), common.begin(), common.end());
  apply.insert(apply.end(), {Arg::f32("eps", a.eps), Arg::i32("w_kind", kind(a.weight)),
                             Arg::i32("b_kind", kind(a.bias)),
                             Arg::i32("pre_kind", kind(a.pre_bias)),
                             Arg::i32("scale_kind", kind(a.scale)),
                             Arg::i32("shift_kind", kind(a.shift))});
  const std::array<int64_t, 3> grid{N * G, split, 1};
  const bool has_ss = a.scale.has_value() || a.shift.has_value();
  // NCHW in, channels_last out: cubins for what a transformer's norm is (prebuilt_configs()).
  std::string why;
  if (mixed(a) && (has_pre || has_ss || a.apply_silu || vec == 1)) {
    why = "no cubin for channels_last_out with an NCHW x and SiLU, pre_bias, scale/shift or "
          "H*W not a multiple of 16 bytes";
  }
  return {{prebuilt::make_launch("group_norm_silu_stats", grid, std::move(stats),
                                 {{"CL", cl}, {"HAS_PRE", has_pre}, {"VEC", vec},
                                  {"ROWS", rows}, {"COLS", cols}}),
           prebuilt::make_launch("group_norm_silu_apply", grid, std::move(apply),
                                 {{"CL", cl}, {"Y_CL", mixed(a)}, {"HAS_PRE", has_pre},
                                  {"HAS_SS", has_ss}, {"SILU", a.apply_silu},
                                  {"RES", r != nullptr}, {"SPLIT_P2", cfg::MAX_SPLIT},
                                  {"VEC", vec}, {"ROWS", rows}, {"COLS", cols}})},
          y, {part}, why};
}

Plan<Tensor> plan(const GroupNormSilu& a) { return plan_into(a, empty(a), nullptr, nullptr); }

// ---- fastdiff::group_norm_silu_residual ----
//
// group_norm_silu's y and, from the same read of x, r = x + residual_bias[c] (float32 add,
// rounded to x's dtype) in x's memory format: the residual of diffusers' Transformer2DModel
// (`x + proj_out(tokens)`) with proj_out's bias already in it, so the transformer can end with
// one in-place GEMM into r (issue 18). A second op, since it has two outputs; no pre_bias,
// scale or shift (no caller needs them with a residual). Same kernels (the apply kernel's RES).

using ResOut = std::tuple<Tensor, Tensor>;

struct GroupNormSiluResidual {  // a call's arguments, in schema order
  static constexpr char name[] = "group_norm_silu_residual";
  static constexpr char schema[] =
      "(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor residual_bias, "
      "bool apply_silu=True, bool channels_last_out=False) -> (Tensor, Tensor)";
  using Sig = ResOut(const Tensor&, int64_t, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, double, const Tensor&, bool, bool);
  const Tensor& x;
  int64_t num_groups;
  const std::optional<Tensor>& weight;
  const std::optional<Tensor>& bias;
  double eps;
  const Tensor& residual_bias;
  bool apply_silu;
  bool channels_last_out;
};

const Tensor& subject(const GroupNormSiluResidual& a) { return a.x; }

// The group_norm_silu call whose y this op returns (no pre_bias, scale or shift).
GroupNormSilu norm_of(const GroupNormSiluResidual& a) {
  static const std::optional<Tensor> none;
  return GroupNormSilu{a.x,    a.num_groups, a.weight, a.bias,       a.eps,
                       none,   none,         none,     a.apply_silu, a.channels_last_out};
}

void check(const GroupNormSiluResidual& a) {
  const char* op = GroupNormSiluResidual::name;
  check_args(norm_of(a), op);
  const Tensor &x = a.x, &rb = a.residual_bias;
  check_same_device(op, x, "x", rb, "residual_bias");
  FD_CHECK(same_sizes(rb, {x.size(1)}), op, "argument 'residual_bias' must have shape [",
           x.size(1), "] (the channels of 'x'), got ", shape_str(rb));
  // x's dtype only: r = x + residual_bias must be what torch's add of the two gives.
  FD_CHECK(rb.scalar_type() == x.scalar_type(), op,
           "argument 'residual_bias' must have the dtype of 'x' (", dtype_str(x.scalar_type()),
           "), got ", dtype_str(rb.scalar_type()));
  FD_CHECK(rb.is_contiguous(), op, "argument 'residual_bias' must be contiguous, got strides ",
           strides_str(rb));
}

ResOut empty(const GroupNormSiluResidual& a) { return {empty(norm_of(a)), dense_like(a.x)}; }

ResOut cpu(const GroupNormSiluResidual& a) {
  const GroupNormSilu g = norm_of(a);
  Tensor y = empty(g), r = dense_like(a.x);
  cpu_into(g, y, &r, a.residual_bias);
  return {y, r};
}

Plan<ResOut> plan(const GroupNormSiluResidual& a) {
  const GroupNormSilu g = norm_of(a);
  Tensor r = dense_like(a.x);
  Plan<Tensor> p = plan_into(g, empty(g), &r, &a.residual_bias);
  // Cubins for SD1.5's transformer norm only: NCHW x, channels_last y, no SiLU, 16-byte rows.
  const int64_t vec16 = 16 / static_cast<int64_t>(a.x.element_size());
  const int64_t HW = a.x.size(2) * a.x.size(3);
  if (!(mixed(g) && !a.apply_silu && HW % vec16 == 0)) {
    p.why = "no cubin for group_norm_silu_residual but an NCHW x with channels_last_out, no "
            "SiLU and H*W a multiple of 16 bytes";
  }
  return {std::move(p.launches), {p.out, r}, std::move(p.keep), p.why};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::GroupNormSilu)
FASTDIFF_REGISTER_OP(fastdiff::GroupNormSiluResidual)
