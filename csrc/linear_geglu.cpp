// fastdiff::linear_geglu: diffusers' GEGLU, its projection and activation in one op. Schema below
// (LinearGeglu); Triton kernel (one GEMM with a GEGLU epilogue) and plan in
// kernels/linear_geglu.py.
//
// x: (..., K), contiguous; weight: (2F, K), contiguous (nn.Linear's layout: rows 0..F-1 the
// value half, rows F..2F-1 the gate); bias: (2F,) or None; one dtype of float32/float16/bfloat16.
// Returns (..., F) in x's dtype:
//   y = (x @ W[:F].T + b[:F]) * gelu(x @ W[F:].T + b[F:]),   gelu(g) = g / 2 (1 + erf(g / sqrt 2))
// with fp32 accumulation and epilogue math and one rounding of the result.
#include <algorithm>
#include <vector>

#include "geglu.h"
#include "ops.h"

namespace fastdiff {
namespace {

struct LinearGeglu {  // a call's arguments, in schema order
  static constexpr char name[] = "linear_geglu";
  static constexpr char schema[] = "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor";
  using Sig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&);
  const Tensor& x;
  const Tensor& weight;
  const std::optional<Tensor>& bias;
};

const Tensor& subject(const LinearGeglu& a) { return a.x; }

void check(const LinearGeglu& a) {
  const char* op = LinearGeglu::name;
  const Tensor& x = a.x;
  const Tensor& w = a.weight;
  const int64_t K = check_gemm_input(op, x);
  FD_CHECK(w.dim() == 2 && w.size(0) >= 2 && w.size(0) % 2 == 0 && w.size(1) == K, op,
           "argument 'weight' must have shape (2F, K) with F >= 1 and K = x.shape[-1] = ", K,
           " (value rows, then gate rows), got shape ", shape_str(w));
  FD_CHECK(w.scalar_type() == x.scalar_type(), op, "argument 'weight' must have x's dtype (",
           dtype_str(x.scalar_type()), "), got ", dtype_str(w.scalar_type()));
  FD_CHECK(w.is_contiguous(), op, "argument 'weight' must be contiguous (nn.Linear's (2F, K) "
           "layout), got strides ", strides_str(w));
  check_same_device(op, x, "x", w, "weight");
  if (a.bias) {
    const Tensor& b = *a.bias;
    FD_CHECK(b.dim() == 1 && b.size(0) == w.size(0), op, "argument 'bias' must have shape (",
             w.size(0), ",) (weight's rows), got shape ", shape_str(b));
    FD_CHECK(b.scalar_type() == x.scalar_type(), op, "argument 'bias' must have x's dtype (",
             dtype_str(x.scalar_type()), "), got ", dtype_str(b.scalar_type()));
    FD_CHECK(b.is_contiguous(), op, "argument 'bias' must be contiguous, got strides ",
             strides_str(b));
    check_same_device(op, x, "x", b, "bias");
  }
}

Tensor empty(const LinearGeglu& a) {
  Sizes shape(a.x.sizes().begin(), a.x.sizes().end());
  shape.back() = a.weight.size(0) / 2;
  return new_contiguous(a.x, shape);
}

// ---- CPU kernel: torch's matmul (no GEMM of our own), then the epilogue over its rows ----

constexpr int64_t kChunk = 1024;  // elements of a row's halves in float at a time (in cache)

// y = (h[:F] + b[:F]) * gelu(h[F:] + b[F:]) row by row; h: (rows, 2F) float32, b: 2F or none.
template <typename T>
void epilogue(const float* h, const float* b, T* y, int64_t rows, int64_t F) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / F);
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * kChunk);
    float *va = buf.data(), *vg = va + kChunk, *out = vg + kChunk;
    for (int64_t r = begin; r < end; ++r) {
      const float* hr = h + r * 2 * F;
      for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
        const int64_t n = std::min(kChunk, F - c0);
        const float *pa = hr + c0, *pg = hr + F + c0;
        if (b) {
          for (int64_t i = 0; i < n; ++i) va[i] = pa[i] + b[c0 + i];
          for (int64_t i = 0; i < n; ++i) vg[i] = pg[i] + b[F + c0 + i];
          pa = va;
          pg = vg;
        }
        T* yr = y + r * F + c0;
        if constexpr (std::is_same_v<T, float>) {
          geglu_floats_cpu(pa, pg, yr, n);
        } else {
          geglu_floats_cpu(pa, pg, out, n);
          for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>(out[i]);
        }
      }
    }
  });
}

Tensor cpu(const LinearGeglu& a) {
  Tensor y = empty(a);
  if (y.numel() == 0) return y;
  const int64_t F = a.weight.size(0) / 2, K = a.weight.size(1), M = y.numel() / F;
  // 16-bit inputs are multiplied in float32 (converted first): fp32 accumulation and one
  // rounding of the result, as the CUDA kernel, where torch would round the projection first.
  const bool f32 = a.x.scalar_type() == ScalarType::Float;
  Tensor x2 = torch::stable::reshape(a.x, {M, K});
  Tensor w = a.weight;
  if (!f32) {
    x2 = torch::stable::to(x2, ScalarType::Float);
    w = torch::stable::to(w, ScalarType::Float);
  }
  const Tensor h = torch::stable::contiguous(
      call_op<Tensor>("aten::mm", x2, torch::stable::transpose(w, 0, 1)));  // (M, 2F)
  const std::vector<float> b = floats(a.bias);
  dispatch_float(a.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    epilogue(h.const_data_ptr<float>(), b.empty() ? nullptr : b.data(), y.mutable_data_ptr<T>(),
             M, F);
  });
  return y;
}

// ---- CUDA plan: kernels/linear_geglu.py ----

Plan<Tensor> plan(const LinearGeglu& a) {
  namespace cfg = config::linear_geglu;
  Tensor y = empty(a);
  const int64_t F = a.weight.size(0) / 2, K = a.weight.size(1), M = y.numel() / F;
  const bool f32 = a.x.scalar_type() == ScalarType::Float;
  const int64_t bm = f32 ? cfg::BLOCK_M_FP32 : cfg::BLOCK_M;
  const int64_t bn = f32 ? cfg::BLOCK_N_FP32 : cfg::BLOCK_N;
  const int64_t bk = f32 ? cfg::BLOCK_K_FP32 : cfg::BLOCK_K;
  const int64_t programs = cdiv(M, bm) * cdiv(F, bn);
  constexpr int64_t kLimit = int64_t{1} << 31;
  FD_CHECK(M < kLimit && 2 * F < kLimit && K < kLimit && programs < kLimit, LinearGeglu::name,
           "M=", M, ", F=", F, ", K=", K, " are beyond the CUDA kernel's 32-bit sizes (M, 2F, K "
           "and the tiles below 2**31)");
  // An absent bias: x stands in (masked off: never read), so one cubin serves both.
  using prebuilt::Arg;
  prebuilt::Launch launch = prebuilt::make_launch(
      "linear_geglu", {programs, 1, 1},
      {Arg::ptr("x_ptr", a.x), Arg::ptr("w_ptr", a.weight), Arg::ptr("b_ptr", a.bias.value_or(a.x)),
       Arg::ptr("y_ptr", y), Arg::i32("M", M), Arg::i32("F", F), Arg::i32("K", K),
       Arg::i32("has_bias", a.bias.has_value())},
      {{"BLOCK_M", bm}, {"BLOCK_N", bn}, {"BLOCK_K", bk}, {"GROUP_M", cfg::GROUP_M}});
  return {{launch}, y, {}, ""};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::LinearGeglu)
