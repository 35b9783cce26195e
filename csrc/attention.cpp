// CPU kernel for fastdiff::attention (contract in fastdiff.h).
//
// Flash-style: for a block of query rows, walk the keys in blocks; S = Q K^T (BLAS), add the
// bias, update the running row max / row sum (online softmax, fp32) and O += P V (BLAS).
// No (Lq, Lk) score matrix is ever materialised. fp16/bf16 inputs run through float copies.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "fastdiff.h"

namespace fastdiff {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlockM = 64;   // query rows per task
constexpr int64_t kBlockN = 256;  // keys per inner block: S stays in L2
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace
}  // namespace fastdiff

// The BLAS that libtorch_cpu links (MKL or OpenBLAS) exports the Fortran sgemm_. Declared weak:
// where a torch build does not export it, gemm() below falls back to at::mm.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace fastdiff {
namespace {

// Column-major C (m x n) = alpha * op(A) * op(B) + beta * C, as BLAS.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  // FASTDIFF_NO_BLAS=1 forces the fallback (tests use it to cover that path).
  static const bool use_blas = sgemm_ != nullptr && std::getenv("FASTDIFF_NO_BLAS") == nullptr;
  if (use_blas) {
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    sgemm_(ta ? "T" : "N", tb ? "T" : "N", &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c,
           &ildc);
    return;
  }
  // Row-major views of the column-major operands: C^T = op(B)^T op(A)^T.
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor A = at::from_blob(const_cast<float*>(a), {ta ? m : k, ta ? k : m}, {lda, 1}, opts);
  at::Tensor Bm = at::from_blob(const_cast<float*>(b), {tb ? k : n, tb ? n : k}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, opts);
  at::Tensor r = at::mm(tb ? Bm.t() : Bm, ta ? A.t() : A).mul_(alpha);
  if (beta == 0.f) {
    C.copy_(r);  // C may hold garbage (NaN): never scale it
  } else {
    C.mul_(beta).add_(r);
  }
}

struct View4 {  // a 4-D float tensor read through its strides
  const float* p;
  int64_t s0, s1, s2, s3;
  const float* at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return p + b * s0 + h * s1 + i * s2 + j * s3;
  }
};

View4 view(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& bias, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const View4 Q = view(q), K = view(k), V = view(v);
  std::optional<View4> Bias;
  if (bias) Bias = view(*bias);  // expanded to (B, H, Lq, Lk): broadcast dims have stride 0
  float* O_all = out.data_ptr<float>();
  const int64_t mblocks = (Lq + kBlockM - 1) / kBlockM;

  at::parallel_for(0, B * H * mblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(kBlockM * D), S(kBlockM * kBlockN), row_max(kBlockM), row_sum(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / mblocks, b = bh / H, h = bh % H;
      const int64_t i0 = (task % mblocks) * kBlockM, m = std::min(kBlockM, Lq - i0);
      float* O = O_all + (bh * Lq + i0) * D;
      for (int64_t i = 0; i < m; ++i) {  // scaled copy of the query block
        at::vec::map([scale](Vec x) { return x * Vec(scale); }, qs.data() + i * D,
                     Q.at(b, h, i0 + i, 0), D);
      }
      std::fill(O, O + m * D, 0.f);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      for (int64_t j0 = 0; j0 < Lk; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, Lk - j0);
        // S^T (n x m, column-major) = K_blk (n x D) * Qs^T: row-major S (m x n), ld n.
        gemm(true, false, n, m, D, 1.f, K.at(b, h, j0, 0), K.s2, qs.data(), D, 0.f, S.data(), n);
        for (int64_t i = 0; i < m; ++i) {
          float* s = S.data() + i * n;
          if (Bias) {
            const float* br = Bias->at(b, h, i0 + i, j0);
            if (Bias->s3 == 1) {
              at::vec::map2([](Vec x, Vec y) { return x + y; }, s, s, br, n);
            } else {
              for (int64_t j = 0; j < n; ++j) s[j] += br[j * Bias->s3];
            }
          }
          const float blk_max = at::vec::reduce_all([](Vec x, Vec y) { return at::vec::maximum(x, y); }, s, n);
          const float new_max = std::max(row_max[i], blk_max);
          // All keys so far at -inf: keep exponents finite; such rows end as 0.
          const float ref = new_max == kNegInf ? 0.f : new_max;
          const float correction = std::exp(row_max[i] - ref);
          at::vec::map([ref](Vec x) { return (x - Vec(ref)).exp_u20(); }, s, s, n);
          row_sum[i] = row_sum[i] * correction +
                       at::vec::reduce_all([](Vec x, Vec y) { return x + y; }, s, n);
          row_max[i] = new_max;
          if (correction != 1.f) {
            at::vec::map([correction](Vec x) { return x * Vec(correction); }, O + i * D, O + i * D, D);
          }
        }
        // O^T (D x m) += V_blk^T (D x n) * P^T (n x m): row-major O += P V.
        gemm(false, false, D, m, n, 1.f, V.at(b, h, j0, 0), V.s2, S.data(), n, 1.f, O, D);
      }
      for (int64_t i = 0; i < m; ++i) {
        const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        at::vec::map([inv](Vec x) { return x * Vec(inv); }, O + i * D, O + i * D, D);
      }
    }
  });
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& attn_bias, std::optional<double> scale) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const float s = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  // Float views: no copy for float32 inputs (strides kept); fp16/bf16 are converted once.
  // BLAS needs unit-stride rows at least D apart; only odd layouts (a head dim of 1 with any
  // stride, overlapping rows) fail that and are copied.
  auto f32 = [D](const at::Tensor& t) {
    at::Tensor f = t.to(at::kFloat);
    return (f.stride(3) != 1 || f.stride(2) < D) ? f.contiguous() : f;
  };
  at::Tensor qf = f32(q), kf = f32(k), vf = f32(v);
  std::optional<at::Tensor> bias;
  if (attn_bias) bias = attn_bias->to(at::kFloat).expand({B, H, Lq, Lk});
  at::Tensor out = at::empty({B, H, Lq, D}, q.options().dtype(at::kFloat));
  attention_f32(qf, kf, vf, bias, s, out);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace fastdiff
