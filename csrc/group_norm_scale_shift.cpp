// fastdiff::group_norm_scale_shift: the statistics half of a GroupNorm, as a per-(n, channel)
// affine (issue 18). Schema below; Triton kernel and plan in kernels/group_norm_scale_shift.py.
//
// a = cat([x, x2], 1), (N, C, *spatial), C = C1 + C2 (x2 absent: C2 = 0), C % num_groups == 0;
// the cat is never made: a group's channels are read from x or x2 by index, and a group may
// straddle the two (C1 = 320, C2 = 640, 32 groups of 30). Per (n, g), over the group's C/G
// channels and S = prod(spatial) positions, in float32 or better: mean, biased variance,
// rstd = 1 / sqrt(var + eps); per channel c of the group
//   scale[n, c] = rstd * weight[c]   (weight None: 1)
//   shift[n, c] = bias[c] - mean * scale[n, c]   (bias None: 0)
// so that F.group_norm(a, G, weight, bias, eps) == a * scale + shift (broadcast over space): the
// op that reads a next (norm_conv2d) applies it while loading, and the normalized tensor is
// never written. Outputs: two (N, C) float32 contiguous tensors. Spatial dims must not be empty
// (S >= 1: a group of no elements has no statistics).
//
// Layouts, each of x and x2 on its own (use_strides below): "planar", each sample's
// (C_t, S) block dense (contiguous NCHW / NCDHW; the batch stride is free), or "channels-last",
// channels at stride 1 and the spatial dims one flattened stride (channels_last,
// channels_last_3d, (N, L, C) token views transposed; the batch stride is free).
//
// Statistics, exact for a mean large against the spread (mean 1e3, std 1): on CPU, chunks in
// cache each with exact two-pass moments, merged in double (Moments below); on the GPU, sums of
// a - p in float lanes, p the group's first element (a pivot), reduced once at the end.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace fastdiff {
namespace {

using Out = std::tuple<Tensor, Tensor>;

struct GroupNormScaleShift {  // a call's arguments, in schema order
  static constexpr char name[] = "group_norm_scale_shift";
  static constexpr char schema[] =
      "(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, float eps=1e-05, "
      "Tensor? x2=None) -> (Tensor, Tensor)";
  using Sig = Out(const Tensor&, int64_t, const std::optional<Tensor>&,
                  const std::optional<Tensor>&, double, const std::optional<Tensor>&);
  const Tensor& x;
  int64_t num_groups;
  const std::optional<Tensor>& weight;
  const std::optional<Tensor>& bias;
  double eps;
  const std::optional<Tensor>& x2;
};

// x decides the device and the kernel; an x without channels leaves it to x2 (a cat of nothing
// and x2 is x2's GroupNorm).
const Tensor& subject(const GroupNormScaleShift& a) {
  return a.x.numel() == 0 && a.x2 ? *a.x2 : a.x;
}

int64_t spatial(const Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// How a kernel walks one input: element (n, c, s) at n * ns + c * cs + s * ss (s the flattened
// spatial index). planar: ss == 1 and cs == S (a group's channels are one dense segment);
// else channels-last: cs == 1, rows of channels ss apart. nullopt: neither.
struct Walk {
  bool cl;
  int64_t ns, cs, ss;
};

std::optional<Walk> walk_of(const Tensor& t) {
  const int64_t C = t.size(1), S = spatial(t);
  if (t.numel() == 0) return Walk{false, 0, S, 1};  // never read
  // The flattened spatial stride: the innermost spatial dim of size > 1 sets it, the others
  // must follow densely (size-1 dims skipped, as torch's contiguity rules).
  int64_t ss = 0, expected = 0;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (ss == 0) {
      ss = expected = t.stride(d);
    } else if (t.stride(d) != expected) {
      return std::nullopt;
    }
    expected *= t.size(d);
  }
  if (S == 1) ss = 1;   // one position: any stride reads it
  const int64_t cs = C == 1 ? (ss == 1 ? S : 1) : t.stride(1);
  if (ss == 1 && cs == S) return Walk{false, t.stride(0), cs, 1};
  if (cs == 1) return Walk{true, t.stride(0), 1, ss};
  return std::nullopt;
}

void check_input(const char* op, const Tensor& t, const char* name) {
  FD_CHECK(is_float_dtype(t.scalar_type()), op, "argument '", name,
           "' must have dtype float32, float16 or bfloat16, got ", dtype_str(t.scalar_type()));
  FD_CHECK(t.numel() == 0 || walk_of(t), op, "argument '", name, "' must be contiguous (N, C, "
           "*spatial) or channels-last (channels at stride 1, the spatial dims one dense "
           "stride; the batch stride is free), got strides ", strides_str(t), " for shape ",
           shape_str(t));
}

int64_t channels(const GroupNormScaleShift& a) {
  return a.x.size(1) + (a.x2 ? a.x2->size(1) : 0);
}

void check_small(const char* op, const Tensor& x, const Tensor& t, const char* name, int64_t C) {
  check_same_device(op, x, "x", t, name);
  FD_CHECK(same_sizes(t, {C}), op, "argument '", name, "' must have shape [", C,
           "] (the channels of x, and of x2 with it), got ", shape_str(t));
  FD_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == ScalarType::Float, op,
           "argument '", name, "' must have dtype ", dtype_str(x.scalar_type()),
           x.scalar_type() == ScalarType::Float ? " (as x)" : " (as x) or float32", ", got ",
           dtype_str(t.scalar_type()));
  FD_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
           strides_str(t));
}

void check(const GroupNormScaleShift& a) {
  const char* op = GroupNormScaleShift::name;
  const Tensor& x = a.x;
  FD_CHECK(x.dim() >= 2, op, "argument 'x' must have at least 2 dims (N, C, *spatial), got "
           "shape ", shape_str(x));
  check_input(op, x, "x");
  for (int64_t d = 2; d < x.dim(); ++d) {
    FD_CHECK(x.size(d) > 0, op, "argument 'x' must have no empty spatial dim (a group of no "
             "elements has no statistics), got shape ", shape_str(x));
  }
  if (a.x2) {
    const Tensor& x2 = *a.x2;
    check_same_device(op, x, "x", x2, "x2");
    FD_CHECK(x2.scalar_type() == x.scalar_type(), op, "argument 'x2' must have x's dtype (",
             dtype_str(x.scalar_type()), "), got ", dtype_str(x2.scalar_type()));
    bool same = x2.dim() == x.dim() && x2.size(0) == x.size(0);
    for (int64_t d = 2; same && d < x.dim(); ++d) same = x2.size(d) == x.size(d);
    FD_CHECK(same, op, "argument 'x2' must have x's batch and spatial sizes (it is read as "
             "cat([x, x2], 1)): shape [", x.size(0), ", C2", x.dim() > 2 ? ", ..." : "",
             "] with x of shape ", shape_str(x), ", got ", shape_str(x2));
    check_input(op, x2, "x2");
  }
  const int64_t C = channels(a);
  FD_CHECK(a.num_groups > 0, op, "argument 'num_groups' must be positive, got ", a.num_groups);
  FD_CHECK(C % a.num_groups == 0, op, "the channel count C=", C, a.x2 ? " (x and x2 together)"
           : " of argument 'x'", " must be divisible by argument 'num_groups'=", a.num_groups);
  check_eps(op, a.eps);
  if (a.weight) check_small(op, x, *a.weight, "weight", C);
  if (a.bias) check_small(op, x, *a.bias, "bias", C);
}

Out empty(const GroupNormScaleShift& a) {
  const Sizes shape{a.x.size(0), channels(a)};
  return {new_contiguous(a.x, shape, ScalarType::Float),
          new_contiguous(a.x, shape, ScalarType::Float)};
}

// ---- CPU kernel ----

constexpr int64_t kChunk = 4096;  // floats at a time (in cache)

// Mean and M2 (sum of squared deviations) of everything added, merged chunk by chunk (Chan et
// al.) in double; each chunk's own moments exact: shifted sums around its first value for the
// mean, then the corrected two-pass M2 = sum((v - m)^2) - sum(v - m)^2 / k around the
// float-rounded mean m (group_norm_silu's moments()). A group whose mean is large against its
// spread (mean 1e3, std 1) loses nothing to cancellation.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(const float* v, int64_t k) {
    double s1, s2;
    simd::shifted_sums<false>(v, k, v[0], &s1, nullptr);
    const float m = static_cast<float>(v[0] + s1 / k);
    simd::shifted_sums<true>(v, k, m, &s1, &s2);
    const double cm = m + s1 / k, cm2 = std::max(0.0, s2 - s1 * s1 / k);
    const double tot = n + k, d = cm - mean;
    mean += d * k / tot;
    m2 += cm2 + d * d * n * k / tot;
    n = tot;
  }
};

// Adds channels [c_lo, c_hi) of sample n of one input to mo.
template <typename T>
void part_moments(const T* base, const Walk& w, int64_t n, int64_t c_lo, int64_t c_hi,
                  int64_t S, std::vector<float>& buf, Moments& mo) {
  const int64_t cn = c_hi - c_lo;
  if (cn <= 0) return;
  buf.resize(kChunk);
  if (!w.cl) {  // one dense segment of cn * S elements
    const T* seg = base + n * w.ns + c_lo * w.cs;
    const int64_t len = cn * S;
    for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
      const int64_t k = std::min(kChunk, len - i0);
      if constexpr (std::is_same_v<T, float>) {
        mo.add(seg + i0, k);
      } else {
        for (int64_t i = 0; i < k; ++i) buf[i] = static_cast<float>(seg[i0 + i]);
        mo.add(buf.data(), k);
      }
    }
    return;
  }
  // channels-last: S rows of cn channels, gathered into chunks of whole rows (a row longer than
  // a chunk goes in pieces).
  const T* first = base + n * w.ns + c_lo;
  int64_t k = 0;
  for (int64_t s = 0; s < S; ++s) {
    const T* row = first + s * w.ss;
    for (int64_t c0 = 0; c0 < cn; c0 += kChunk) {
      const int64_t m = std::min(kChunk, cn - c0);
      if (k + m > kChunk) {
        mo.add(buf.data(), k);
        k = 0;
      }
      for (int64_t c = 0; c < m; ++c) buf[k + c] = static_cast<float>(row[c0 + c]);
      k += m;
    }
  }
  if (k) mo.add(buf.data(), k);
}

Out cpu(const GroupNormScaleShift& a) {
  auto [scale, shift] = empty(a);
  if (scale.numel() == 0) return {scale, shift};
  const Tensor& x = a.x;
  const int64_t N = x.size(0), C1 = x.size(1), C = channels(a), G = a.num_groups, cg = C / G;
  const int64_t S = spatial(x);
  const Walk w1 = *walk_of(x);
  const Walk w2 = a.x2 ? *walk_of(*a.x2) : w1;
  const std::vector<float> wt = floats(a.weight), bs = floats(a.bias);
  float* sc = scale.mutable_data_ptr<float>();
  float* sh = shift.mutable_data_ptr<float>();
  const float eps = static_cast<float>(a.eps);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* p1 = x.const_data_ptr<T>();
    const T* p2 = a.x2 ? a.x2->const_data_ptr<T>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, cg * S));
    torch::stable::parallel_for(0, N * G, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, c0 = (ng % G) * cg, c1 = c0 + cg;
        Moments mo;
        part_moments(p1, w1, n, c0, std::min(c1, C1), S, buf, mo);
        if (p2) part_moments(p2, w2, n, std::max<int64_t>(c0 - C1, 0), c1 - C1, S, buf, mo);
        const double mean = mo.mean, var = mo.m2 / mo.n;
        const double rstd = 1.0 / std::sqrt(var + eps);
        for (int64_t c = c0; c < c1; ++c) {
          const double s = rstd * (wt.empty() ? 1.0 : wt[c]);
          sc[n * C + c] = static_cast<float>(s);
          sh[n * C + c] = static_cast<float>((bs.empty() ? 0.0 : bs[c]) - mean * s);
        }
      }
    });
  });
  return {scale, shift};
}

// ---- CUDA plan: kernels/group_norm_scale_shift.py ----

int64_t kind(const std::optional<Tensor>& t) {
  return !t ? 0 : t->scalar_type() == ScalarType::Float ? 1 : 2;
}

Plan<Out> plan(const GroupNormScaleShift& a) {
  namespace cfg = config::group_norm_scale_shift;
  auto out = empty(a);
  const Tensor& x = a.x;
  const Tensor& x2 = a.x2.value_or(x);
  const int64_t N = x.size(0), C1 = x.size(1), C = channels(a), G = a.num_groups, cg = C / G;
  const int64_t S = spatial(x);
  const Walk w1 = *walk_of(x);
  // An x2 of no elements is never read: it takes x's walk (and x's cubin).
  const Walk w2 = a.x2 && x2.numel() ? *walk_of(x2) : w1;
  constexpr int64_t kLimit = int64_t{1} << 31;
  FD_CHECK(cg * S < kLimit && N * G < kLimit && C < kLimit, GroupNormScaleShift::name,
           "a group of C/G * S = ", cg * S, " elements (or N * G = ", N * G, " groups) is "
           "beyond the CUDA kernel's 32-bit sizes");
  // VEC: elements per 16 bytes where every walk of the call starts on such a boundary (the
  // rows/segments of both inputs, the groups' channel offsets), else 1.
  const int64_t v16 = 16 / static_cast<int64_t>(x.element_size());
  auto vec_ok = [&](const Walk& w) {
    return w.ns % v16 == 0 && (w.cl ? w.ss % v16 == 0 : S % v16 == 0);
  };
  const bool aligned = vec_ok(w1) && (!a.x2 || vec_ok(w2)) &&
                       (!(w1.cl || (a.x2 && w2.cl)) || (cg % v16 == 0 && C1 % v16 == 0));
  const int64_t vec = aligned ? v16 : 1;
  using prebuilt::Arg;
  // Absent x2: x stands in (C2 = 0: never read); absent weight/bias: x stands in (kind 0).
  auto small = [&](const char* name, const std::optional<Tensor>& t) {
    return Arg::ptr(name, t.value_or(x), "*fp32");
  };
  prebuilt::Launch launch = prebuilt::make_launch(
      "group_norm_scale_shift", {N * G, 1, 1},
      {Arg::ptr("x_ptr", x), Arg::ptr("x2_ptr", x2), small("w_ptr", a.weight),
       small("b_ptr", a.bias), Arg::ptr("scale_ptr", std::get<0>(out)),
       Arg::ptr("shift_ptr", std::get<1>(out)), Arg::i32("S", S), Arg::i32("C", C),
       Arg::i32("C1", C1), Arg::i32("G", G), Arg::i32("CG", cg), Arg::i64("ns1", w1.ns),
       Arg::i64("ss1", w1.ss), Arg::i64("ns2", w2.ns), Arg::i64("ss2", w2.ss),
       Arg::f32("eps", a.eps), Arg::i32("w_kind", kind(a.weight)),
       Arg::i32("b_kind", kind(a.bias))},
      {{"CL1", w1.cl}, {"CL2", w2.cl}, {"VEC", vec}, {"BLOCK", cfg::BLOCK},
       {"COLS", cfg::COLS}});
  // An x2 laid out unlike x: no cubin (SD's skip cat has both in one layout).
  const std::string why = w1.cl != w2.cl ? "no cubin for x and x2 in different layouts" : "";
  return {{launch}, out, {}, why};
}

}  // namespace
}  // namespace fastdiff

FASTDIFF_REGISTER_OP(fastdiff::GroupNormScaleShift)
