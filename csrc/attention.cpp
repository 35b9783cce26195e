// fastdiff::attention: softmax(q k^T * scale + attn_mask) v. Schema in ops.cpp; Triton kernel
// and plan in kernels/attention.py.
//
// q: (B, H, Lq, D), k/v: (B, H, Lk, D), any strides with stride(-1) == 1. attn_mask: 4-D, each
// dim 1 or full size (broadcast), dtype q's or float32. Returns a contiguous (B, H, Lq, D)
// tensor of q's dtype. A row whose keys are all -inf gives 0.
//
// The CPU kernel is flash-style: for a block of query rows, walk the keys in blocks; S = Q K^T
// (BLAS), add the bias, update the running row max / row sum (online softmax, fp32) and
// O += P V (BLAS). No (Lq, Lk) score matrix is ever materialised. fp16/bf16 inputs run through
// float copies.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

struct Attention {  // a call's arguments, in schema order
  static constexpr char name[] = "attention";
  static constexpr char schema[] =
      "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float? scale=None) -> Tensor";
  using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                     std::optional<double>);
  const Tensor& q;
  const Tensor& k;
  const Tensor& v;
  const std::optional<Tensor>& attn_mask;
  std::optional<double> scale;
};

const Tensor& subject(const Attention& a) { return a.q; }

void check(const Attention& a) {
  const char* op = Attention::name;
  const Tensor &q = a.q, &k = a.k, &v = a.v;
  const std::pair<const Tensor*, const char*> qkv[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}};
  for (auto [t, name] : qkv) {
    FD_CHECK(t->dim() == 4, op, "argument '", name, "' must be a 4-D tensor (B, H, L, D), got shape ",
             shape_str(*t));
    FD_CHECK(is_float_dtype(t->scalar_type()), op, "argument '", name,
             "' must have dtype float32, float16 or bfloat16, got ", dtype_str(t->scalar_type()));
    FD_CHECK(t->scalar_type() == q.scalar_type(), op, "argument '", name,
             "' must have the dtype of 'q' (", dtype_str(q.scalar_type()), "), got ", dtype_str(t->scalar_type()));
    check_same_device(op, q, "q", *t, name);
    FD_CHECK(t->size(3) == 1 || t->stride(3) == 1, op, "argument '", name,
             "' must have stride 1 in its last dimension (head dim), got strides ",
             strides_str(*t));
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
  if (a.attn_mask) {
    const Tensor& b = *a.attn_mask;
    check_same_device(op, q, "q", b, "attn_mask");
    FD_CHECK(b.scalar_type() == q.scalar_type() || b.scalar_type() == ScalarType::Float, op,
             "argument 'attn_mask' must be an additive mask of dtype ", dtype_str(q.scalar_type()),
             q.scalar_type() == ScalarType::Float ? " (as q)" : " (as q) or float32", ", got ",
             dtype_str(b.scalar_type()), " (fastdiff.ops.attention converts boolean masks)");
    const int64_t full[4] = {B, H, Lq, Lk};
    bool ok = b.dim() == 4;
    for (int i = 0; ok && i < 4; ++i) ok = b.size(i) == 1 || b.size(i) == full[i];
    FD_CHECK(ok, op, "argument 'attn_mask' must be 4-D and broadcastable to (B, H, Lq, Lk) = ",
             list_str(full, 4), " (each dim 1 or full), got shape ", shape_str(b));
  }
  if (a.scale) {
    // The kernels use scale * log2(e) in float32: it must stay a normal float32 number.
    const double s2 = *a.scale * config::attention::LOG2E;
    FD_CHECK(std::isfinite(*a.scale) && s2 >= std::numeric_limits<float>::min() &&
                 s2 <= std::numeric_limits<float>::max(),
             op, "argument 'scale' must be positive and, times log2(e), within float32's normal ",
             "range [1.18e-38, 3.4e38] (it is used in float32), got ", *a.scale);
  }
}

Tensor empty(const Attention& a) {
  return new_contiguous(a.q, {a.q.size(0), a.q.size(1), a.q.size(2), a.q.size(3)});
}

double scale_of(const Attention& a) {
  return a.scale ? *a.scale : 1.0 / std::sqrt(static_cast<double>(a.q.size(3)));
}

// ---- CPU kernel ----

using simd::Vec;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlockM = 64;   // query rows per task
constexpr int64_t kBlockN = 256;  // keys per inner block: S stays in L2
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace
}  // namespace fastdiff

// The BLAS that libtorch_cpu links (MKL or OpenBLAS) exports the Fortran sgemm_. Declared weak:
// where a torch build does not export it, gemm() below falls back to aten::mm.
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
  // sgemm_ takes 32-bit ints: a size or leading dimension beyond them (a size-1 dim with a huge
  // stride, which torch still calls contiguous) would be truncated, so aten::mm takes the call.
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (use_blas && std::max({m, n, k, lda, ldb, ldc}) <= kMax) {
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    sgemm_(ta ? "T" : "N", tb ? "T" : "N", &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c,
           &ildc);
    return;
  }
  // Row-major views of the column-major operands: C^T = op(B)^T op(A)^T, by aten::mm through
  // the dispatcher; the result is added into C here.
  const Device cpu(torch::headeronly::DeviceType::CPU);
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    const Tensor v = torch::stable::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, cpu,
                                              ScalarType::Float);
    return t ? torch::stable::transpose(v, 0, 1) : v;
  };
  const Tensor A = view(a, ta ? m : k, ta ? k : m, lda, ta);
  const Tensor Bm = view(b, tb ? k : n, tb ? n : k, ldb, tb);
  const Tensor r = torch::stable::contiguous(call_op<Tensor>("aten::mm", Bm, A));  // (n, m)
  const float* rp = r.const_data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float& out = c[j * ldc + i];
      // C may hold garbage (NaN) when beta is 0: never scale it then.
      out = alpha * rp[j * m + i] + (beta == 0.f ? 0.f : beta * out);
    }
  }
}

struct View4 {  // a 4-D float tensor read through its strides
  const float* p;
  int64_t s0, s1, s2, s3;
  const float* at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return p + b * s0 + h * s1 + i * s2 + j * s3;
  }
};

// A float tensor's view; with `broadcast` (the mask), size-1 dims are read with stride 0, as
// expand() would make them.
View4 view(const Tensor& t, bool broadcast = false) {
  int64_t s[4];
  for (int d = 0; d < 4; ++d) s[d] = broadcast && t.size(d) == 1 ? 0 : t.stride(d);
  return {t.const_data_ptr<float>(), s[0], s[1], s[2], s[3]};
}

// out = x * s over n floats (in place allowed).
inline void scale_into(float* out, const float* x, float s, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) (Vec::loadu(x + i) * Vec(s)).store(out + i);
  for (; i < n; ++i) out[i] = x[i] * s;
}

void attention_f32(const Tensor& q, const Tensor& k, const Tensor& v,
                   const std::optional<Tensor>& bias, float scale, Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const View4 Q = view(q), K = view(k), V = view(v);
  std::optional<View4> Bias;
  if (bias) Bias = view(*bias, true);  // broadcast to (B, H, Lq, Lk): size-1 dims have stride 0
  float* O_all = out.mutable_data_ptr<float>();
  const int64_t mblocks = (Lq + kBlockM - 1) / kBlockM;

  torch::stable::parallel_for(0, B * H * mblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(kBlockM * D), S(kBlockM * kBlockN), row_max(kBlockM), row_sum(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / mblocks, b = bh / H, h = bh % H;
      const int64_t i0 = (task % mblocks) * kBlockM, m = std::min(kBlockM, Lq - i0);
      float* O = O_all + (bh * Lq + i0) * D;
      for (int64_t i = 0; i < m; ++i) {  // scaled copy of the query block
        scale_into(qs.data() + i * D, Q.at(b, h, i0 + i, 0), scale, D);
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
              int64_t j = 0;
              for (; j + kW <= n; j += kW) (Vec::loadu(s + j) + Vec::loadu(br + j)).store(s + j);
              for (; j < n; ++j) s[j] += br[j];
            } else {
              for (int64_t j = 0; j < n; ++j) s[j] += br[j * Bias->s3];
            }
          }
          float blk_max;
          {  // the tail as one vector padded with -inf
            Vec mx(kNegInf);
            int64_t j = 0;
            for (; j + kW <= n; j += kW) mx = simd::maximum(mx, Vec::loadu(s + j));
            if (j < n) mx = simd::maximum(mx, simd::load_partial(s + j, n - j, kNegInf));
            blk_max = simd::reduce_max(mx);
          }
          const float new_max = std::max(row_max[i], blk_max);
          // All keys so far at -inf: keep exponents finite; such rows end as 0.
          const float ref = new_max == kNegInf ? 0.f : new_max;
          const float correction = std::exp(row_max[i] - ref);
          float sum = 0.f;
          {
            Vec acc(0.f);
            int64_t j = 0;
            for (; j + kW <= n; j += kW) {
              const Vec e = (Vec::loadu(s + j) - Vec(ref)).exp();
              e.store(s + j);
              acc += e;
            }
            if (j < n) {  // the tail as one vector padded with -inf (exp: 0)
              const Vec e = (simd::load_partial(s + j, n - j, kNegInf) - Vec(ref)).exp();
              simd::store_partial(e, s + j, n - j);
              acc += e;
            }
            sum = simd::reduce_add(acc);
          }
          row_sum[i] = row_sum[i] * correction + sum;
          row_max[i] = new_max;
          if (correction != 1.f) scale_into(O + i * D, O + i * D, correction, D);
        }
        // O^T (D x m) += V_blk^T (D x n) * P^T (n x m): row-major O += P V.
        gemm(false, false, D, m, n, 1.f, V.at(b, h, j0, 0), V.s2, S.data(), n, 1.f, O, D);
      }
      for (int64_t i = 0; i < m; ++i) {
        const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
        scale_into(O + i * D, O + i * D, inv, D);
      }
    }
  });
}

Tensor cpu(const Attention& a) {
  if (a.q.numel() == 0) return empty(a);
  const int64_t B = a.q.size(0), H = a.q.size(1), Lq = a.q.size(2), D = a.q.size(3);
  // Float views: no copy for float32 inputs (strides kept); fp16/bf16 are converted once.
  // BLAS needs unit-stride rows at least D apart; only odd layouts (a head dim of 1 with any
  // stride, overlapping rows) fail that and are copied.
  // (A float32 tensor as it is: even a no-op aten::to costs a dispatcher call.)
  auto as_f32 = [](const Tensor& t) {
    return t.scalar_type() == ScalarType::Float ? t : torch::stable::to(t, ScalarType::Float);
  };
  auto f32 = [D, &as_f32](const Tensor& t) {
    const Tensor f = as_f32(t);
    return (f.stride(3) != 1 || f.stride(2) < D) ? torch::stable::contiguous(f) : f;
  };
  std::optional<Tensor> bias;  // read with stride 0 along its size-1 (broadcast) dims
  if (a.attn_mask) bias = as_f32(*a.attn_mask);
  Tensor out = new_contiguous(a.q, {B, H, Lq, D}, ScalarType::Float);
  attention_f32(f32(a.q), f32(a.k), f32(a.v), bias, static_cast<float>(scale_of(a)), out);
  return a.q.scalar_type() == ScalarType::Float ? out : torch::stable::to(out, a.q.scalar_type());
}

// ---- CUDA plan: kernels/attention.py ----

int64_t log2_ceil(int64_t n) {
  int64_t l = 0;
  while ((int64_t{1} << l) < n) ++l;
  return l;
}

Plan<Tensor> plan(const Attention& a) {
  namespace cfg = config::attention;
  const Tensor &q = a.q, &k = a.k, &v = a.v;
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  Tensor out = empty(a);
  const int64_t log2_d = std::max<int64_t>(4, log2_ceil(D));  // BLOCK_D: D padded, >= 16
  const bool ieee = q.scalar_type() == ScalarType::Float;
  const auto& tile = cfg::TILES[ieee ? 2 : a.attn_mask.has_value()][log2_d - 4];
  // VEC (attention.py, vec_of): elements per 16 bytes, down to the largest power of two that
  // divides every q/k/v stride of dims 0-2 the kernel multiplies by a nonzero index.
  const int64_t vec16 = 16 / static_cast<int64_t>(q.element_size());
  int64_t vec = vec16;
  for (const Tensor* t : {&q, &k, &v}) {
    for (int d = 0; d < 3; ++d) {
      if (t->size(d) > 1) vec = std::gcd(vec, t->stride(d));
    }
  }
  Tensor bias = q;
  std::array<int64_t, 4> bstrides{0, 0, 0, 0};
  if (a.attn_mask) {  // as expand() to (B, H, Lq, Lk): broadcast dims stride 0; own dtype
    bias = *a.attn_mask;
    const int64_t full[4] = {B, H, Lq, Lk};
    for (int i = 0; i < 4; ++i) {
      bstrides[i] = bias.size(i) == 1 && full[i] != 1 ? 0 : bias.stride(i);
    }
  }
  using prebuilt::Arg;
  // Grid axis 0 (up to 2**31 - 1): B * H alone may exceed axis 1's 65,535.
  Plan<Tensor> p{{prebuilt::make_launch(
      "attention_fwd", {B * H * cdiv(Lq, tile[0]), 1, 1},
      {Arg::ptr("q_ptr", q), Arg::ptr("k_ptr", k), Arg::ptr("v_ptr", v),
       Arg::ptr("bias_ptr", bias), Arg::ptr("o_ptr", out), Arg::i64("sqb", q.stride(0)),
       Arg::i64("sqh", q.stride(1)), Arg::i64("sqm", q.stride(2)), Arg::i64("skb", k.stride(0)),
       Arg::i64("skh", k.stride(1)), Arg::i64("skn", k.stride(2)), Arg::i64("svb", v.stride(0)),
       Arg::i64("svh", v.stride(1)), Arg::i64("svn", v.stride(2)), Arg::i64("sbb", bstrides[0]),
       Arg::i64("sbh", bstrides[1]), Arg::i64("sbm", bstrides[2]), Arg::i64("sbn", bstrides[3]),
       Arg::i32("H", H), Arg::i32("Lq", Lq), Arg::i32("Lk", Lk),
       Arg::f32("qk_scale", scale_of(a) * cfg::LOG2E)},
      {{"D", D}, {"VEC", vec}, {"HAS_BIAS", a.attn_mask.has_value()}, {"IEEE", ieee},
       {"BLOCK_M", tile[0]}, {"BLOCK_N", tile[1]}, {"BLOCK_D", int64_t{1} << log2_d}})},
      out, {}, ""};
  if (!std::binary_search(std::begin(cfg::PREBUILT_HEAD_DIMS), std::end(cfg::PREBUILT_HEAD_DIMS),
                          D)) {
    p.why = "no cubin for head dim " + std::to_string(D);
  } else if (vec != vec16) {
    p.why = "no cubin for q/k/v strides that are not multiples of 16 bytes";
  }
  return p;
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::Attention)
