// fastdiff::group_norm_silu_backward: the gradients of group_norm_silu (csrc/group_norm_silu.cpp)
// for its autograd formula (fastdiff/ops.py). Schema below (GroupNormSiluBackward); Triton
// kernels and plan in kernels/group_norm_silu_backward.py.
//
// Forward, per group g of sample n (L = C/G * H * W elements), h = x + pre_bias[n, c]:
//   xhat = (h - mean_g) * rstd_g,  z = xhat * w[c] + b[c],  u = z * (1 + s[n, c]) + sh[n, c]
//   y = silu(u) (or u)
// Backward, with du = dy * silu'(u) and per (n, c) A = sum_hw du, B = sum_hw du * xhat:
//   d shift = A,  d scale = w B + b A,  d weight = sum_n (1 + s) B,  d bias = sum_n (1 + s) A
//   dx = rstd * (k du - mean_g(k du) - xhat * mean_g(k du xhat)),  k = w[c] (1 + s[n, c])
//      (the two group means are sum_c k A / L and sum_c k B / L),  d pre_bias = sum_hw dx.
// The group's statistics are recomputed here, not saved by the forward: the forward's schema
// and its prebuilt kernels stay as inference needs them, and the group is in cache anyway.
//
// Returns (dx, dweight, dbias, dpre_bias, dscale, dshift); dx has x's dtype and memory format,
// each other gradient its input's dtype; an absent input's gradient is an empty (0,) tensor.
//
// Layout of this file: the argument checks and tensor glue (allocation, dtype dispatch,
// registration) are kept apart from the CPU kernel, which is plain C++ over raw pointers and
// int64_t sizes (group_backward below).
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

using Out = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

struct GroupNormSiluBackward {  // a call's arguments, in schema order
  static constexpr char name[] = "group_norm_silu_backward";
  static constexpr char schema[] =
      "(Tensor grad_y, Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? pre_bias, Tensor? scale, Tensor? shift, bool apply_silu) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";
  using Sig = Out(const Tensor&, const Tensor&, int64_t, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, double, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, const std::optional<Tensor>&, bool);
  const Tensor& grad_y;
  const Tensor& x;
  int64_t num_groups;
  const std::optional<Tensor>& weight;
  const std::optional<Tensor>& bias;
  double eps;
  const std::optional<Tensor>& pre_bias;
  const std::optional<Tensor>& scale;
  const std::optional<Tensor>& shift;
  bool apply_silu;
};

const Tensor& subject(const GroupNormSiluBackward& a) { return a.x; }

// NCHW unless x is only channels_last (a tensor that is both is read as NCHW, as the forward does).
bool is_cl(const Tensor& x) { return !x.is_contiguous(); }

void check_small(const Tensor& x, const Tensor& t, const char* name,
                 std::initializer_list<int64_t> expected) {
  const char* op = GroupNormSiluBackward::name;
  check_same_device(op, x, "x", t, name);
  FD_CHECK(same_sizes(t, expected), op, "argument '", name, "' must have shape ",
           list_str(Sizes(expected)), ", got ", shape_str(t));
  FD_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == ScalarType::Float, op,
           "argument '",
           name, "' must have dtype ", dtype_str(x.scalar_type()), " (as x) or float32, got ",
           dtype_str(t.scalar_type()));
  FD_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
           strides_str(t));
}

void check(const GroupNormSiluBackward& a) {
  const char* op = GroupNormSiluBackward::name;
  const Tensor &x = a.x, &gy = a.grad_y;
  FD_CHECK(x.dim() == 4, op, "argument 'x' must be a 4-D tensor (N, C, H, W), got shape ",
           shape_str(x));
  FD_CHECK(is_float_dtype(x.scalar_type()), op,
           "argument 'x' must have dtype float32, float16 or bfloat16, got ",
           dtype_str(x.scalar_type()));
  FD_CHECK(x.is_contiguous() || is_channels_last(x), op,
           "argument 'x' must be contiguous (NCHW) or channels_last, got strides ", strides_str(x),
           " for shape ", shape_str(x));
  check_same_device(op, x, "x", gy, "grad_y");
  FD_CHECK(same_shape(gy, x), op, "argument 'grad_y' must have the shape of 'x' ",
           shape_str(x), ", got ", shape_str(gy));
  FD_CHECK(gy.scalar_type() == x.scalar_type(), op, "argument 'grad_y' must have the dtype of 'x' (",
           dtype_str(x.scalar_type()), "), got ", dtype_str(gy.scalar_type()));
  FD_CHECK(is_cl(x) ? is_channels_last(gy) : gy.is_contiguous(), op,
           "argument 'grad_y' must have the memory format of 'x' (",
           is_cl(x) ? "channels_last" : "contiguous", "), got strides ", strides_str(gy));
  const int64_t N = x.size(0), C = x.size(1);
  FD_CHECK(a.num_groups > 0, op, "argument 'num_groups' must be positive, got ", a.num_groups);
  FD_CHECK(C % a.num_groups == 0, op, "the channel count C=", C,
           " of argument 'x' must be divisible by argument 'num_groups'=", a.num_groups);
  check_eps(op, a.eps);
  if (a.weight) check_small(x, *a.weight, "weight", {C});
  if (a.bias) check_small(x, *a.bias, "bias", {C});
  if (a.pre_bias) check_small(x, *a.pre_bias, "pre_bias", {N, C});
  if (a.scale) check_small(x, *a.scale, "scale", {N, C});
  if (a.shift) check_small(x, *a.shift, "shift", {N, C});
}

// The gradient of an optional input: its shape and dtype, or (0,) where it is absent.
Tensor grad_like(const Tensor& x, const std::optional<Tensor>& t) {
  return t ? dense_like(*t) : new_contiguous(x, {0});
}

Out empty(const GroupNormSiluBackward& a) {
  return {dense_like(a.x), grad_like(a.x, a.weight), grad_like(a.x, a.bias),
          grad_like(a.x, a.pre_bias), grad_like(a.x, a.scale), grad_like(a.x, a.shift)};
}

// ---- CPU kernel: plain C++ over raw pointers ----

using simd::Vec;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = simd::kSumBlock;  // float lanes per block, blocks added in double

// Per-(n, c) and per-channel inputs as float (nullptr: absent).
struct Params {
  const float *weight, *bias, *pre, *scale, *shift;
  double eps;
};

// Per-(n, c) outputs as float (nullptr: not wanted); dw and db per (n, c), summed over n later.
struct Grads {
  float *dw_nc, *db_nc, *dpre, *dscale, *dshift;
};

// One NCHW channel's h = x + pre and dy into float buffers (x and dy read from memory once).
template <typename T>
void gather_channel(const T* x, const T* dy, float pre, float* h, float* d, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kW <= n; i += kW) {
      (Vec::loadu(x + i) + Vec(pre)).store(h + i);
      Vec::loadu(dy + i).store(d + i);
    }
  }
  for (; i < n; ++i) {
    h[i] = static_cast<float>(x[i]) + pre;
    d[i] = static_cast<float>(dy[i]);
  }
}

// out[i] = d[i] * f1 + ((h[i] - m) * f2 + f3), written as T.
template <typename T>
void dx_channel(const float* h, const float* d, float m, float f1, float f2, float f3, T* out,
                int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec r = simd::fmadd(Vec::loadu(d + i), Vec(f1),
                                 simd::fmadd(Vec::loadu(h + i) - Vec(m), Vec(f2), Vec(f3)));
    if constexpr (std::is_same_v<T, float>) {
      r.store(out + i);
    } else {
      float tmp[kW];
      r.store(tmp);
      for (int64_t j = 0; j < kW; ++j) out[i + j] = static_cast<T>(tmp[j]);
    }
  }
  for (; i < n; ++i) out[i] = static_cast<T>(d[i] * f1 + ((h[i] - m) * f2 + f3));
}

// One channel's du = dy * silu'(u), u = (h - m) * a + beta, written over dy (d), with
// A = sum du and Bm = sum du * (h - m).
template <bool kSilu>
void channel_du(const float* h, float* d, int64_t n, float m, float a, float beta, double* A,
                double* Bm) {
  double tA = 0, tB = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t e = std::min(n, i0 + kBlock);
    Vec aA(0.f), aB(0.f);
    int64_t i = i0;
    for (; i + kW <= e; i += kW) {
      const Vec hm = Vec::loadu(h + i) - Vec(m);
      Vec du = Vec::loadu(d + i);
      if constexpr (kSilu) {
        const Vec u = simd::fmadd(hm, Vec(a), Vec(beta));
        const Vec sig = Vec(1.f) / (Vec(1.f) + u.neg().exp());
        du = du * sig * simd::fmadd(u, Vec(1.f) - sig, Vec(1.f));
      }
      du.store(d + i);
      aA += du;
      aB = simd::fmadd(du, hm, aB);
    }
    float bA = simd::reduce_add(aA);
    float bB = simd::reduce_add(aB);
    for (; i < e; ++i) {
      const float hm = h[i] - m;
      float du = d[i];
      if constexpr (kSilu) {
        const float u = hm * a + beta, sig = 1.f / (1.f + std::exp(-u));
        du *= sig * (1.f + u * (1.f - sig));
      }
      d[i] = du;
      bA += du;
      bB += du * hm;
    }
    tA += bA;
    tB += bB;
  }
  *A = tA;
  *Bm = tB;
}

// The gradients of group (n, g): x and dy gathered as float in [channel][pixel] order (h = x +
// pre_bias; the only read of x and dy from memory), the statistics, the per-channel sums (du
// kept in the dy buffer), then dx in one pass over the buffers.
// x, dy, dx: (N, C, HW) or, channels_last, (N, HW, C).
template <typename T, bool kSilu>
void group_backward(const T* dy, const T* x, T* dx, int64_t n, int64_t g, int64_t C, int64_t HW,
                    int64_t G, bool cl, const Params& p, const Grads& out, std::vector<float>& h,
                    std::vector<float>& d, std::vector<double>& chan) {
  const int64_t Cg = C / G, c0 = g * Cg, L = Cg * HW;
  h.resize(L);
  d.resize(L);
  chan.resize(4 * Cg);
  double *mean_c = chan.data(), *m2_c = mean_c + Cg, *A = m2_c + Cg, *Bm = A + Cg;
  if (!cl) {
    for (int64_t j = 0; j < Cg; ++j) {
      const int64_t base = (n * C + c0 + j) * HW;
      gather_channel(x + base, dy + base, p.pre ? p.pre[n * C + c0 + j] : 0.f,
                     h.data() + j * HW, d.data() + j * HW, HW);
    }
  } else {
    for (int64_t i = 0; i < HW; ++i) {
      const int64_t base = (n * HW + i) * C + c0;
      for (int64_t j = 0; j < Cg; ++j) {
        h[j * HW + i] = static_cast<float>(x[base + j]) + (p.pre ? p.pre[n * C + c0 + j] : 0.f);
        d[j * HW + i] = static_cast<float>(dy[base + j]);
      }
    }
  }
  // Statistics: per channel, sums around its first value (on data in cache), then Chan's merge.
  double gmean = 0;
  for (int64_t j = 0; j < Cg; ++j) {
    const float* hj = h.data() + j * HW;
    double s1, s2;
    // shift: the group's first value (a constant group sums to exactly 0)
    simd::shifted_sums<true>(hj, HW, hj[0], &s1, &s2);
    mean_c[j] = hj[0] + s1 / HW;
    m2_c[j] = std::max(0.0, s2 - s1 * s1 / HW);
    gmean += mean_c[j];
  }
  gmean /= Cg;
  double m2 = 0;
  for (int64_t j = 0; j < Cg; ++j) {
    const double dm = mean_c[j] - gmean;
    m2 += m2_c[j] + HW * dm * dm;
  }
  const double rstd = 1.0 / std::sqrt(m2 / L + p.eps);
  // Everything is taken around m, the float-rounded group mean; lo is what rounding dropped.
  const float m = static_cast<float>(gmean);
  const double lo = gmean - m;
  double sum_kA = 0, sum_kB = 0;
  for (int64_t j = 0; j < Cg; ++j) {
    const int64_t c = c0 + j, nc = n * C + c;
    const double w = p.weight ? p.weight[c] : 1.0, b = p.bias ? p.bias[c] : 0.0;
    const double s1 = p.scale ? 1.0 + p.scale[nc] : 1.0, sh = p.shift ? p.shift[nc] : 0.0;
    const double a = rstd * w * s1;  // u = (h - m) * a + beta
    const float beta = static_cast<float>(b * s1 + sh - lo * a);
    channel_du<kSilu>(h.data() + j * HW, d.data() + j * HW, HW, m, static_cast<float>(a), beta,
                      &A[j], &Bm[j]);
    const double B = rstd * (Bm[j] - lo * A[j]);  // sum du * xhat
    Bm[j] = B;
    if (out.dshift) out.dshift[nc] = static_cast<float>(A[j]);
    if (out.dscale) out.dscale[nc] = static_cast<float>(w * B + b * A[j]);
    if (out.dw_nc) out.dw_nc[nc] = static_cast<float>(s1 * B);
    if (out.db_nc) out.db_nc[nc] = static_cast<float>(s1 * A[j]);
    sum_kA += w * s1 * A[j];
    sum_kB += w * s1 * B;
  }
  // dx = c1 du + c2 (h - m) + c3 per channel, from the group means of k du and k du xhat.
  const double mean1 = sum_kA / L, mean2 = sum_kB / L;
  const double c2 = -rstd * rstd * mean2, c3base = -rstd * mean1 - c2 * lo;
  for (int64_t j = 0; j < Cg; ++j) {
    const int64_t c = c0 + j, nc = n * C + c;
    const double w = p.weight ? p.weight[c] : 1.0;
    const double s1 = p.scale ? 1.0 + p.scale[nc] : 1.0;
    const double c1 = rstd * w * s1;
    if (out.dpre) out.dpre[nc] = static_cast<float>(c1 * A[j] + c2 * HW * (mean_c[j] - m) +
                                                    c3base * HW);
    const float f1 = static_cast<float>(c1), f2 = static_cast<float>(c2),
                f3 = static_cast<float>(c3base);
    float* dj = d.data() + j * HW;
    if (!cl) {  // straight to dx; channels_last is scattered below from the buffer
      dx_channel<T>(h.data() + j * HW, dj, m, f1, f2, f3, dx + (n * C + c) * HW, HW);
    } else {
      dx_channel<float>(h.data() + j * HW, dj, m, f1, f2, f3, dj, HW);
    }
  }
  if (cl) {
    for (int64_t i = 0; i < HW; ++i) {
      T* o = dx + (n * HW + i) * C + c0;
      for (int64_t j = 0; j < Cg; ++j) o[j] = static_cast<T>(d[j * HW + i]);
    }
  }
}

// Every group, in parallel; then d weight and d bias summed over n (fixed order: deterministic).
template <typename T, bool kSilu>
void backward_cpu(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t HW, int64_t G,
                  bool cl, const Params& p, const Grads& out, float* dw, float* db) {
  torch::stable::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h, d;
    std::vector<double> chan;
    for (int64_t ng = begin; ng < end; ++ng) {
      group_backward<T, kSilu>(dy, x, dx, ng / G, ng % G, C, HW, G, cl, p, out, h, d, chan);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) {
      if (dw) sw += out.dw_nc[n * C + c];
      if (db) sb += out.db_nc[n * C + c];
    }
    if (dw) dw[c] = static_cast<float>(sw);
    if (db) db[c] = static_cast<float>(sb);
  }
}

// ---- tensor glue ----

const float* ptr_or_null(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

Out cpu(const GroupNormSiluBackward& a) {
  const Tensor& x = a.x;
  Out out = empty(a);
  Tensor& dx = std::get<0>(out);
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = a.num_groups;
  const std::vector<float> w = floats(a.weight), b = floats(a.bias), pre = floats(a.pre_bias),
                           s = floats(a.scale), sh = floats(a.shift);
  const Params p{ptr_or_null(w), ptr_or_null(b), ptr_or_null(pre), ptr_or_null(s),
                 ptr_or_null(sh), a.eps};
  // float32 sums; absent inputs get none (empty vectors).
  auto buf = [](bool wanted, int64_t n) { return std::vector<float>(wanted ? n : 0, 0.f); };
  std::vector<float> dw_nc = buf(a.weight.has_value(), N * C), db_nc = buf(a.bias.has_value(), N * C),
                     dw = buf(a.weight.has_value(), C), db = buf(a.bias.has_value(), C),
                     dpre = buf(a.pre_bias.has_value(), N * C),
                     dscale = buf(a.scale.has_value(), N * C),
                     dshift = buf(a.shift.has_value(), N * C);
  auto mut = [](std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
  const Grads g{mut(dw_nc), mut(db_nc), mut(dpre), mut(dscale), mut(dshift)};
  if (x.numel() > 0) {
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto* dyp = a.grad_y.const_data_ptr<scalar_t>();
      const auto* xp = x.const_data_ptr<scalar_t>();
      auto* dxp = dx.mutable_data_ptr<scalar_t>();
      a.apply_silu ? backward_cpu<scalar_t, true>(dyp, xp, dxp, N, C, HW, G, is_cl(x), p, g,
                                                  mut(dw), mut(db))
                   : backward_cpu<scalar_t, false>(dyp, xp, dxp, N, C, HW, G, is_cl(x), p, g,
                                                   mut(dw), mut(db));
    });
  }  // no elements: the sums stay 0
  // Each gradient in its input's dtype.
  const std::vector<float>* grads[] = {&dw, &db, &dpre, &dscale, &dshift};
  Tensor* outs[] = {&std::get<1>(out), &std::get<2>(out), &std::get<3>(out), &std::get<4>(out),
                    &std::get<5>(out)};
  for (int i = 0; i < 5; ++i) {
    if (grads[i]->empty()) continue;
    dispatch_float(outs[i]->scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      T* o = outs[i]->mutable_data_ptr<T>();
      for (size_t k = 0; k < grads[i]->size(); ++k) o[k] = static_cast<T>((*grads[i])[k]);
    });
  }
  return out;
}

// ---- CUDA: no prebuilt cubins for the backward; the Triton JIT runs
// kernels/group_norm_silu_backward.py's plan (Entry logs the reason once). ----

Plan<Out> plan(const GroupNormSiluBackward& a) {
  return {{}, empty(a), {}, "the backward has no prebuilt kernels"};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::GroupNormSiluBackward)
