// Eight float lanes for the CPU kernels, in place of ATen's Vectorized<float> (whose headers are
// not part of the stable ABI). GCC/Clang vector extensions: with -mavx2 -mfma (setup.py, x86-64)
// a Vec is one AVX register and fmadd one FMA instruction; elsewhere the compiler splits it
// into what the target has (two NEON registers on aarch64).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX__) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace fastdiff::simd {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

struct Vec {
  static constexpr int64_t size() { return 8; }
  f8 v;

  Vec() = default;
  Vec(f8 x) : v(x) {}
  explicit Vec(float x) : v(f8{} + x) {}

#if defined(__AVX__)
  static Vec loadu(const float* p) { return Vec(_mm256_loadu_ps(p)); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
#else
  static Vec loadu(const float* p) {
    f8 x;
    std::memcpy(&x, p, sizeof x);
    return x;
  }
  void store(float* p) const { std::memcpy(p, &v, sizeof v); }
#endif

  friend Vec operator+(Vec a, Vec b) { return a.v + b.v; }
  friend Vec operator-(Vec a, Vec b) { return a.v - b.v; }
  friend Vec operator*(Vec a, Vec b) { return a.v * b.v; }
  friend Vec operator/(Vec a, Vec b) { return a.v / b.v; }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
  Vec neg() const { return -v; }

  // e^x with a relative error of a few ulp (a polynomial on x - n ln 2, then 2^n in the
  // exponent bits); results under about 1e-38 (and e^-inf) give 0, NaN gives NaN, and x
  // above 88 (or above 88.37 without AVX2) e^88 (or inf).
  Vec exp() const;
};

inline Vec fmadd(Vec a, Vec b, Vec c) {  // a * b + c
#if defined(__FMA__)
  return Vec(_mm256_fmadd_ps(a.v, b.v, c.v));
#else
  return a.v * b.v + c.v;
#endif
}

// The larger of each lane pair; NaN if either is NaN (as torch.maximum).
inline Vec maximum(Vec a, Vec b) {
#if defined(__AVX2__)
  // max_ps gives b for a NaN pair; or-ing in the all-ones of an unordered pair makes it NaN.
  return Vec(_mm256_or_ps(_mm256_max_ps(a.v, b.v), _mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q)));
#else
  const f8 m = a.v > b.v ? a.v : b.v;
  return (a.v != a.v) ? a.v : m;  // a NaN lane of a; a NaN in b fails a > b and is taken
#endif
}

#if defined(__AVX2__)
inline float reduce_add(Vec a) {  // halves added pairwise: three shuffles
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// The first n (< 8) floats of p, the other lanes `fill`; and the first n lanes stored to p.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec load_partial(const float* p, int64_t n, float fill) {
  const __m256i m = first_lanes(n);
  return Vec(_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m),
                              _mm256_castsi256_ps(m)));
}
inline void store_partial(Vec a, float* p, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), a.v); }
#else
inline float reduce_add(Vec a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}

inline Vec load_partial(const float* p, int64_t n, float fill) {
  f8 x = f8{} + fill;
  for (int64_t i = 0; i < n; ++i) x[i] = p[i];
  return x;
}
inline void store_partial(Vec a, float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = a.v[i];
}
#endif

inline float reduce_max(Vec a) {  // halves, as reduce_add, with maximum()
#if defined(__AVX2__)
  a = maximum(a, Vec(_mm256_permute2f128_ps(a.v, a.v, 1)));
  a = maximum(a, Vec(_mm256_permute_ps(a.v, 0x4e)));  // swap pairs of lanes
  a = maximum(a, Vec(_mm256_permute_ps(a.v, 0xb1)));  // swap neighbours
  return _mm256_cvtss_f32(a.v);
#else
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = (a.v[i] > m || a.v[i] != a.v[i]) ? a.v[i] : m;
  return m;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
// x = n ln 2 + r, |r| <= ln 2 / 2; e^x = 2^n * p(r), p Taylor's to degree 6 (error under
// r^7 / 7! < 1.3e-7). Seventeen instructions: the silu of group_norm_silu is bound by them.
inline Vec Vec::exp() const {
  const __m256 x = v;
  const __m256 lo = _mm256_set1_ps(-87.3365447505531f), hi = _mm256_set1_ps(88.0f);
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // e^x under FLT_MIN, and -inf: 0
  // min/max return their second operand for a NaN: x, so NaN goes through as NaN.
  const __m256 c = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504088896341f),
                                                   _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945f), c);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);  // 2^n
  return Vec(_mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(e))));
}
#else
inline Vec Vec::exp() const {
  constexpr float kHi = 88.3762626647949f, kLo = -87.3365447505531f;
  const f8 x = v;
  f8 c = x > kHi ? f8{} + kHi : x;  // NaN stays NaN through both clamps
  c = c < kLo ? f8{} + kLo : c;
  // n = round(x / ln 2), r = x - n ln 2 in two parts (exact product with the high part).
  const f8 t = c * 1.44269504088896341f;
  const i8 n = __builtin_convertvector(t + (t >= 0.f ? f8{} + 0.5f : f8{} - 0.5f), i8);
  const f8 fn = __builtin_convertvector(n, f8);
  const f8 r = (c - fn * 0.693359375f) + fn * 2.12194440e-4f;
  f8 p = f8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i8 bits = (n + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  f8 y = p * scale;
  y = x < kLo ? f8{} : y;
  y = x > kHi ? f8{} + std::numeric_limits<float>::infinity() : y;
  return y;
}

#endif

// Statistics exact enough for any group or row (large means, tiny or zero variances, long
// runs): sums of v - shift (the shift a value of the data, so a constant run sums to exactly 0),
// in float lanes over blocks of kSumBlock elements, the blocks added in double.
constexpr int64_t kSumBlock = 2048;

// sum(v[i] - shift) and, with kSquares, sum((v[i] - shift)^2) over n floats (s2 may be null
// without kSquares).
template <bool kSquares>
inline void shifted_sums(const float* v, int64_t n, float shift, double* s1, double* s2) {
  constexpr int64_t kW = Vec::size();
  const Vec m(shift);
  double t1 = 0, t2 = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kSumBlock) {
    const int64_t e = std::min(n, i0 + kSumBlock);
    Vec a1(0.f), a2(0.f);
    int64_t i = i0;
    for (; i + kW <= e; i += kW) {
      const Vec d = Vec::loadu(v + i) - m;
      a1 += d;
      if constexpr (kSquares) a2 = fmadd(d, d, a2);
    }
    float b1 = reduce_add(a1), b2 = 0.f;
    if constexpr (kSquares) b2 = reduce_add(a2);
    for (; i < e; ++i) {
      const float d = v[i] - shift;
      b1 += d;
      b2 += d * d;
    }
    t1 += b1;
    t2 += b2;
  }
  *s1 = t1;
  if (s2) *s2 = t2;
}

}  // namespace fastdiff::simd
