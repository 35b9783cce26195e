// What geglu's CPU kernel lends to other ops (linear_geglu's epilogue).
#pragma once

#include <cstdint>

namespace fastdiff {

// y[i] = a[i] * gelu(g[i]) for i < n: exact GELU (erf to 1.5e-7), simd.h lanes.
void geglu_floats_cpu(const float* a, const float* g, float* y, int64_t n);

}  // namespace fastdiff
