// fastdiff::layer_norm_linear: a LayerNorm folded into the Linear that reads it (issue 18).
// Schema below (LayerNormLinear); Triton kernel (one GEMM that also sums x's rows in its K loop)
// and plan in kernels/layer_norm_linear.py; the fold (fastdiff.ops.fold_layer_norm) in Python.
//
// x: (..., K), contiguous; weight: (N, K), contiguous, x's dtype: the Linear's weight with the
// LayerNorm's weight folded in, W' = W * gamma[None, :]; fold: (3, N) float32, contiguous: row 0
// colsum[n] = sum_k W'[n, k], row 1 d[n] = sum_k W'[n, k] shift[k] (zeros without shift), row 2
// b'[n] = b[n] + sum_k W[n, k] beta[k]; shift: (K,) float32 or None. Per row of x, with
// h = x + shift (float32), mean = sum(h) / K, var = max(sum(h^2) / K - mean^2, 0):
//   z[n] = rsqrt(var + eps) (sum_k x[k] W'[n, k] + d[n] - mean colsum[n]) + b'[n]
// which is Linear(LayerNorm(h)) (LN(h) W^T = rstd (h - mean) W'^T + W beta). geglu: N even, the
// output z[:N/2] * gelu(z[N/2:]) (exact GELU), else z. fp32 sums and epilogue, one rounding.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "geglu.h"
#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

struct LayerNormLinear {  // a call's arguments, in schema order
  static constexpr char name[] = "layer_norm_linear";
  static constexpr char schema[] =
      "(Tensor x, Tensor weight, Tensor fold, Tensor? shift=None, float eps=1e-05, "
      "bool geglu=False) -> Tensor";
  using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                     double, bool);
  const Tensor& x;
  const Tensor& weight;
  const Tensor& fold;
  const std::optional<Tensor>& shift;
  double eps;
  bool geglu;
};

const Tensor& subject(const LayerNormLinear& a) { return a.x; }

void check(const LayerNormLinear& a) {
  const char* op = LayerNormLinear::name;
  const Tensor& x = a.x;
  const Tensor& w = a.weight;
  const int64_t K = check_gemm_input(op, x);
  FD_CHECK(w.dim() == 2 && w.size(0) >= 1 && w.size(1) == K, op,
           "argument 'weight' must have shape (N, K) with N >= 1 and K = x.shape[-1] = ", K,
           ", got shape ", shape_str(w));
  FD_CHECK(w.scalar_type() == x.scalar_type(), op, "argument 'weight' must have x's dtype (",
           dtype_str(x.scalar_type()), "), got ", dtype_str(w.scalar_type()));
  FD_CHECK(w.is_contiguous(), op, "argument 'weight' must be contiguous (nn.Linear's (N, K) "
           "layout), got strides ", strides_str(w));
  check_same_device(op, x, "x", w, "weight");
  const int64_t N = w.size(0);
  FD_CHECK(!a.geglu || N % 2 == 0, op, "argument 'geglu'=True needs an even number of weight "
           "rows N (value rows, then gate rows), got N = ", N);
  const Tensor& f = a.fold;
  FD_CHECK(same_sizes(f, {3, N}), op, "argument 'fold' must have shape (3, N) = [3, ", N,
           "] (colsum, d, bias rows), got shape ", shape_str(f));
  FD_CHECK(f.scalar_type() == ScalarType::Float, op, "argument 'fold' must have dtype float32, "
           "got ", dtype_str(f.scalar_type()));
  FD_CHECK(f.is_contiguous(), op, "argument 'fold' must be contiguous, got strides ",
           strides_str(f));
  check_same_device(op, x, "x", f, "fold");
  if (a.shift) {
    const Tensor& s = *a.shift;
    FD_CHECK(same_sizes(s, {K}), op, "argument 'shift' must have shape (K,) = [", K,
             "] (the last dim of 'x'), got shape ", shape_str(s));
    FD_CHECK(s.scalar_type() == ScalarType::Float, op, "argument 'shift' must have dtype "
             "float32, got ", dtype_str(s.scalar_type()));
    FD_CHECK(s.is_contiguous(), op, "argument 'shift' must be contiguous, got strides ",
             strides_str(s));
    check_same_device(op, x, "x", s, "shift");
  }
  check_eps(op, a.eps);
}

Tensor empty(const LayerNormLinear& a) {
  Sizes shape(a.x.sizes().begin(), a.x.sizes().end());
  shape.back() = a.geglu ? a.weight.size(0) / 2 : a.weight.size(0);
  return new_contiguous(a.x, shape);
}

// ---- CPU kernel: torch's matmul (no GEMM of our own), the row statistics, the epilogue ----

constexpr int64_t kChunk = 1024;  // output columns in float at a time (in cache)

// Per row: mean and rstd of h = x + shift, from simd.h's shifted sums (float lanes, blocks
// added in double, around the row's first value: exact for a constant row, and no cancellation
// of a large mean), the "float32 or better" of the op's one-pass statistics.
template <typename T>
void row_stats(const T* x, const float* s, int64_t rows, int64_t K, double eps, float* mean,
               float* rstd) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / K);
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * K;
      const float* h;
      if (std::is_same_v<T, float> && !s) {
        h = reinterpret_cast<const float*>(xr);
      } else {
        buf.resize(K);
        for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<float>(xr[k]) + (s ? s[k] : 0.0f);
        h = buf.data();
      }
      double s1, s2;
      simd::shifted_sums<true>(h, K, h[0], &s1, &s2);
      const double m = s1 / K, var = std::max(s2 / K - m * m, 0.0);
      mean[r] = static_cast<float>(h[0] + m);
      rstd[r] = static_cast<float>(1.0 / std::sqrt(var + static_cast<float>(eps)));
    }
  });
}

// z[i] = rstd (p[i] + d[i] - mean colsum[i]) + b[i] for i < n (a loop the compiler vectorizes).
inline void correct(const float* p, const float* colsum, const float* d, const float* b,
                    float m, float rs, float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = rs * (p[i] + d[i] - m * colsum[i]) + b[i];
}

// y from p = x @ W'^T (rows, N) float32: z = rstd (p + d - mean colsum) + b', then GEGLU or not.
template <typename T>
void epilogue(const float* p, const float* fold, const float* mean, const float* rstd, T* y,
              int64_t rows, int64_t N, bool geglu) {
  const float *colsum = fold, *d = fold + N, *b = fold + 2 * N;
  const int64_t F = geglu ? N / 2 : N;  // output columns
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / N);
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * kChunk);
    float *za = buf.data(), *zg = za + kChunk, *out = zg + kChunk;
    for (int64_t r = begin; r < end; ++r) {
      const float* pr = p + r * N;
      const float m = mean[r], rs = rstd[r];
      for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
        const int64_t n = std::min(kChunk, F - c0);
        T* yr = y + r * F + c0;
        float* res = std::is_same_v<T, float> ? reinterpret_cast<float*>(yr) : out;
        if (geglu) {
          correct(pr + c0, colsum + c0, d + c0, b + c0, m, rs, za, n);
          correct(pr + F + c0, colsum + F + c0, d + F + c0, b + F + c0, m, rs, zg, n);
          geglu_floats_cpu(za, zg, res, n);
        } else {
          correct(pr + c0, colsum + c0, d + c0, b + c0, m, rs, res, n);
        }
        if constexpr (!std::is_same_v<T, float>) {
          for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>(res[i]);
        }
      }
    }
  });
}

Tensor cpu(const LayerNormLinear& a) {
  Tensor y = empty(a);
  if (y.numel() == 0) return y;
  const int64_t N = a.weight.size(0), K = a.weight.size(1), M = a.x.numel() / K;
  // 16-bit inputs are multiplied in float32 (converted first): fp32 accumulation and one
  // rounding of the result, as the CUDA kernel.
  const bool f32 = a.x.scalar_type() == ScalarType::Float;
  Tensor x2 = torch::stable::reshape(a.x, {M, K});
  Tensor w = a.weight;
  if (!f32) {
    x2 = torch::stable::to(x2, ScalarType::Float);
    w = torch::stable::to(w, ScalarType::Float);
  }
  Tensor p = torch::stable::contiguous(
      call_op<Tensor>("aten::mm", x2, torch::stable::transpose(w, 0, 1)));  // (M, N)
  // fp32 without GEGLU: the epilogue overwrites the product in place, which is then y (no
  // second (M, N) buffer: at SD1.5's 8192 x 960, 31 MB of fresh pages a call).
  const bool in_place = f32 && !a.geglu;
  if (in_place) y = torch::stable::reshape(p, Sizes(y.sizes().begin(), y.sizes().end()));
  const std::vector<float> fold = floats(a.fold), shift = floats(a.shift);
  std::vector<float> mean(M), rstd(M);
  dispatch_float(a.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    row_stats(a.x.const_data_ptr<T>(), shift.empty() ? nullptr : shift.data(), M, K, a.eps,
              mean.data(), rstd.data());
    epilogue(p.const_data_ptr<float>(), fold.data(), mean.data(), rstd.data(),
             y.mutable_data_ptr<T>(), M, N, a.geglu);
  });
  return y;
}

// ---- CUDA plan: kernels/layer_norm_linear.py ----

Plan<Tensor> plan(const LayerNormLinear& a) {
  namespace cfg = config::layer_norm_linear;
  Tensor y = empty(a);
  const int64_t N = a.weight.size(0), K = a.weight.size(1), M = a.x.numel() / K;
  const int64_t F = a.geglu ? N / 2 : N;
  const bool f32 = a.x.scalar_type() == ScalarType::Float;
  const int64_t bm = f32 ? cfg::BLOCK_M_FP32 : cfg::BLOCK_M;
  const int64_t bn = f32 ? cfg::BLOCK_N_FP32 : (a.geglu ? cfg::BLOCK_N_GEGLU : cfg::BLOCK_N);
  const int64_t bk = f32 ? cfg::BLOCK_K_FP32 : cfg::BLOCK_K;
  const int64_t programs = cdiv(M, bm) * cdiv(F, bn);
  constexpr int64_t kLimit = int64_t{1} << 31;
  FD_CHECK(M < kLimit && N < kLimit && K < kLimit && programs < kLimit, LayerNormLinear::name,
           "M=", M, ", N=", N, ", K=", K, " are beyond the CUDA kernel's 32-bit sizes (M, N, K "
           "and the tiles below 2**31)");
  // An absent shift: fold stands in (HAS_SHIFT=0: never read).
  using prebuilt::Arg;
  prebuilt::Launch launch = prebuilt::make_launch(
      "layer_norm_linear", {programs, 1, 1},
      {Arg::ptr("x_ptr", a.x), Arg::ptr("w_ptr", a.weight), Arg::ptr("f_ptr", a.fold),
       Arg::ptr("s_ptr", a.shift.value_or(a.fold)), Arg::ptr("y_ptr", y), Arg::i32("M", M),
       Arg::i32("N", N), Arg::i32("K", K), Arg::f32("eps", a.eps)},
      {{"BLOCK_M", bm}, {"BLOCK_N", bn}, {"BLOCK_K", bk}, {"GROUP_M", cfg::GROUP_M},
       {"GEGLU", a.geglu}, {"HAS_SHIFT", a.shift.has_value()}});
  // The cubins assume K and N multiples of 16 (16-byte tile loads, SD's widths): others say so.
  const bool aligned = K % 16 == 0 && N % 16 == 0;
  return {{launch}, y, {}, aligned ? "" : "no cubin for K or N not a multiple of 16"};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::LayerNormLinear)
