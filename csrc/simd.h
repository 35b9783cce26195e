// Eight float lanes for the CPU kernels, in place of ATen's Vectorized<float> (whose headers are
// not part of the stable ABI). GCC/Clang vector extensions: with -mavx2 -mfma (setup.py, x86-64)
// a Vec is one AVX register and fmadd one FMA instruction; elsewhere the compiler splits it
// into what the target has (two NEON registers on aarch64).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__FMA__)
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

  static Vec loadu(const float* p) {
    f8 x;
    std::memcpy(&x, p, sizeof x);
    return x;
  }
  void store(float* p) const { std::memcpy(p, &v, sizeof v); }

  friend Vec operator+(Vec a, Vec b) { return a.v + b.v; }
  friend Vec operator-(Vec a, Vec b) { return a.v - b.v; }
  friend Vec operator*(Vec a, Vec b) { return a.v * b.v; }
  friend Vec operator/(Vec a, Vec b) { return a.v / b.v; }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
  Vec neg() const { return -v; }

  // e^x with a relative error of about 2 ulp (Cephes' expf polynomial on x - n ln 2, then
  // 2^n in the exponent bits); -inf and anything below -87.3 give 0, above 88.37 +inf, NaN NaN.
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
  const f8 m = a.v > b.v ? a.v : b.v;
  return (a.v != a.v) ? a.v : m;  // a NaN lane of a; a NaN in b fails a > b and is taken
}

inline float reduce_add(Vec a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}

inline float reduce_max(Vec a) {
  float m = a.v[0];
  for (int i = 1; i < 8; ++i) m = (a.v[i] > m || a.v[i] != a.v[i]) ? a.v[i] : m;
  return m;
}

inline Vec Vec::exp() const {
  constexpr float kHi = 88.3762626647949f, kLo = -87.3365447505531f;
  const f8 x = v;
  f8 c = x > kHi ? f8{} + kHi : x;  // NaN stays NaN through both clamps
  c = c < kLo ? f8{} + kLo : c;
  // n = round(x / ln 2), r = x - n ln 2 in two parts (exact product with the high part).
  const f8 t = c * 1.44269504088896341f;
  const i8 n = __builtin_convertvector(t + (t >= 0 ? f8{} + 0.5f : f8{} - 0.5f), i8);
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

}  // namespace fastdiff::simd
