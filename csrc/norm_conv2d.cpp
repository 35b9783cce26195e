// fastdiff::norm_conv2d: a 3x3 or 1x1 convolution (stride 1, padding k//2) as one implicit GEMM
// whose input is normalized on the fly (a GroupNorm folded into a per-(n, channel) affine, then
// SiLU), may be two tensors read as their channel concatenation (a skip cat never made), with a
// raw 1x1 shortcut segment in the same K loop (ResnetBlock2D's conv_shortcut) and an epilogue
// adding bias, a per-sample bias (the time embedding) and a residual (issue 18). Schema below
// (NormConv2d); Triton kernel and plan in kernels/norm_conv2d.py; the weight's packing
// (fastdiff.ops.pack_conv_weight) in Python.
//
// x: (N, C1, H, W); x2: (N, C2, H, W) or None, C = C1 + C2 (C2 = 0 without); packed: (O, K),
// contiguous, K = k*k*C + S, packed[o, (kh*k + kw)*C + c] = weight[o, c, kh, kw] and
// packed[o, k*k*C + s] = shortcut_weight[o, s]; shortcut (N, S1, H, W), shortcut2 (N, S2, H, W)
// (only with shortcut), S = S1 + S2; residual (N, O, H, W); all of x's dtype, any strides (NCHW
// or channels_last). bias (O,), temb (N, O), scale and shift (N, C): float32, contiguous.
//   a = cat([x, x2], 1); with scale: a = a * scale + shift (float32); with silu: a = silu(a);
//   a rounded to x's dtype (what the unfused path materializes; skipped without scale and silu);
//   y = conv2d(a, weight, padding=k//2) (zero padding after the prologue)
//       + shortcut_weight @ cat([shortcut, shortcut2], 1) + bias[o] + temb[n, o] + residual,
// float32 accumulation, one rounding to x's dtype. y: NCHW contiguous, or channels_last memory
// with channels_last_out (then y.permute(0, 2, 3, 1) is (N, H, W, O) contiguous: tokens).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace fastdiff {
namespace {

struct NormConv2d {  // a call's arguments, in schema order
  static constexpr char name[] = "norm_conv2d";
  static constexpr char schema[] =
      "(Tensor x, Tensor packed, int kernel_size, Tensor? bias=None, Tensor? x2=None, "
      "Tensor? scale=None, Tensor? shift=None, bool silu=False, Tensor? temb=None, "
      "Tensor? residual=None, Tensor? shortcut=None, Tensor? shortcut2=None, "
      "bool channels_last_out=False) -> Tensor";
  using Sig = Tensor(const Tensor&, const Tensor&, int64_t, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, bool, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, const std::optional<Tensor>&,
                     const std::optional<Tensor>&, bool);
  const Tensor& x;
  const Tensor& packed;
  int64_t kernel_size;
  const std::optional<Tensor>& bias;
  const std::optional<Tensor>& x2;
  const std::optional<Tensor>& scale;
  const std::optional<Tensor>& shift;
  bool silu;
  const std::optional<Tensor>& temb;
  const std::optional<Tensor>& residual;
  const std::optional<Tensor>& shortcut;
  const std::optional<Tensor>& shortcut2;
  bool channels_last_out;
};

const Tensor& subject(const NormConv2d& a) { return a.x; }

int64_t channels(const std::optional<Tensor>& t) { return t ? t->size(1) : 0; }

// A 4-D input read beside x: (N, *, H, W) with x's N, H, W, x's dtype and device.
void check_image(const NormConv2d& a, const Tensor& t, const char* name, const char* what) {
  const char* op = NormConv2d::name;
  const Tensor& x = a.x;
  FD_CHECK(t.dim() == 4 && t.size(0) == x.size(0) && t.size(2) == x.size(2) &&
               t.size(3) == x.size(3),
           op, "argument '", name, "' must have shape (N, ", what, ", H, W) with x's N, H, W = ",
           x.size(0), ", ", x.size(2), ", ", x.size(3), ", got shape ", shape_str(t));
  FD_CHECK(t.scalar_type() == x.scalar_type(), op, "argument '", name, "' must have x's dtype (",
           dtype_str(x.scalar_type()), "), got ", dtype_str(t.scalar_type()));
  check_same_device(op, x, "x", t, name);
}

// A float32 table, contiguous, of these sizes (named in `shape` for the message).
void check_table(const NormConv2d& a, const Tensor& t, const char* name,
                 std::initializer_list<int64_t> sizes, const char* shape) {
  const char* op = NormConv2d::name;
  FD_CHECK(same_sizes(t, sizes), op, "argument '", name, "' must have shape ", shape, " = ",
           list_str(std::vector<int64_t>(sizes)), ", got shape ", shape_str(t));
  FD_CHECK(t.scalar_type() == ScalarType::Float, op, "argument '", name,
           "' must have dtype float32, got ", dtype_str(t.scalar_type()));
  FD_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous, got strides ",
           strides_str(t));
  check_same_device(op, a.x, "x", t, name);
}

void check(const NormConv2d& a) {
  const char* op = NormConv2d::name;
  const Tensor& x = a.x;
  FD_CHECK(x.dim() == 4, op, "argument 'x' must be 4-D (N, C, H, W), got shape ", shape_str(x));
  FD_CHECK(is_float_dtype(x.scalar_type()), op, "argument 'x' must have dtype float32, float16 "
           "or bfloat16, got ", dtype_str(x.scalar_type()));
  FD_CHECK(x.size(1) >= 1, op, "argument 'x' must have at least one channel, got shape ",
           shape_str(x));
  FD_CHECK(a.kernel_size == 1 || a.kernel_size == 3, op, "argument 'kernel_size' must be 1 or 3, "
           "got ", a.kernel_size);
  const int64_t N = x.size(0);
  if (a.x2) check_image(a, *a.x2, "x2", "C2");
  const int64_t C = x.size(1) + channels(a.x2);
  FD_CHECK(!a.shortcut2 || a.shortcut, op, "argument 'shortcut2' needs 'shortcut' (the "
           "shortcut reads cat([shortcut, shortcut2], 1))");
  if (a.shortcut) check_image(a, *a.shortcut, "shortcut", "S1");
  if (a.shortcut2) check_image(a, *a.shortcut2, "shortcut2", "S2");
  const int64_t S = channels(a.shortcut) + channels(a.shortcut2);
  const int64_t k = a.kernel_size, K = k * k * C + S;
  const Tensor& w = a.packed;
  FD_CHECK(w.dim() == 2 && w.size(0) >= 1 && w.size(1) == K, op, "argument 'packed' must have "
           "shape (O, K) with O >= 1 and K = k*k*C + S = ", k * k, "*", C, " + ", S, " = ", K,
           " (fastdiff.ops.pack_conv_weight), got shape ", shape_str(w));
  FD_CHECK(w.scalar_type() == x.scalar_type(), op, "argument 'packed' must have x's dtype (",
           dtype_str(x.scalar_type()), "), got ", dtype_str(w.scalar_type()));
  FD_CHECK(w.is_contiguous(), op, "argument 'packed' must be contiguous, got strides ",
           strides_str(w));
  check_same_device(op, x, "x", w, "packed");
  const int64_t O = w.size(0);
  if (a.bias) check_table(a, *a.bias, "bias", {O}, "(O,)");
  FD_CHECK(a.scale.has_value() == a.shift.has_value(), op, "arguments 'scale' and 'shift' go "
           "together (the affine a * scale + shift), got only '", a.scale ? "scale" : "shift",
           "'");
  if (a.scale) check_table(a, *a.scale, "scale", {N, C}, "(N, C)");
  if (a.shift) check_table(a, *a.shift, "shift", {N, C}, "(N, C)");
  if (a.temb) check_table(a, *a.temb, "temb", {N, O}, "(N, O)");
  if (a.residual) {
    const Tensor& r = *a.residual;
    FD_CHECK(same_sizes(r, {N, O, x.size(2), x.size(3)}), op, "argument 'residual' must have "
             "shape (N, O, H, W) = ", list_str(Sizes{N, O, x.size(2), x.size(3)}), ", got shape ",
             shape_str(r));
    check_image(a, r, "residual", "O");
  }
}

Tensor empty(const NormConv2d& a) {
  const int64_t N = a.x.size(0), O = a.packed.size(0), H = a.x.size(2), W = a.x.size(3);
  const Sizes strides = a.channels_last_out ? Sizes{H * W * O, 1, W * O, O}
                                            : Sizes{O * H * W, H * W, W, 1};
  return empty_strided(a.x, {N, O, H, W}, strides);
}

// ---- CPU kernel: the prologue once per element (float32, channels innermost), the conv on
// torch's CPU convolution and the shortcut on its matmul (float32), then the epilogue ----

struct View4 {  // a 4-D tensor's data and strides
  const void* p = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  int64_t c = 0;  // channels
};

View4 view(const std::optional<Tensor>& t) {
  View4 v;
  if (!t) return v;
  v.p = t->const_data_ptr();
  for (int i = 0; i < 4; ++i) v.s[i] = t->stride(i);
  v.c = t->size(1);
  return v;
}

// The GEMM's input once per element, prologue applied (float32, rounded to T as the unfused
// path materializes it), channels innermost: a (N*H*W, C) float32 buffer, which the
// convolution reads as a channels_last tensor.
template <typename T>
void prologue_rows(const NormConv2d& a, float* A0) {
  const int64_t H = a.x.size(2), W = a.x.size(3), HW = H * W, M = a.x.size(0) * HW;
  const View4 xs[2] = {view(a.x), view(a.x2)};
  const int64_t C = xs[0].c + xs[1].c;
  const float* scale = a.scale ? a.scale->const_data_ptr<float>() : nullptr;
  const float* shift = a.shift ? a.shift->const_data_ptr<float>() : nullptr;
  const bool pro = scale || a.silu;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(C, 1));
  torch::stable::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / HW, h = m % HW / W, w = m % W;
      float* dst = A0 + m * C;
      int64_t c0 = 0;
      for (const View4& v : xs) {
        if (!v.p) continue;
        const T* src = static_cast<const T*>(v.p) + n * v.s[0] + h * v.s[2] + w * v.s[3];
        for (int64_t c = 0; c < v.c; ++c) {
          float f = static_cast<float>(src[c * v.s[1]]);
          if (pro) {
            if (scale) f = f * scale[n * C + c0 + c] + shift[n * C + c0 + c];
            if (a.silu) f = f / (1.0f + std::exp(-f));
            f = static_cast<float>(static_cast<T>(f));  // as the unfused path materializes it
          }
          dst[c0 + c] = f;
        }
        c0 += v.c;
      }
    }
  });
}

// The raw shortcut's rows (M, S) in float32 (the 1x1 segment of the K loop).
template <typename T>
void shortcut_rows(const NormConv2d& a, float* Sh) {
  const int64_t H = a.x.size(2), W = a.x.size(3), HW = H * W, M = a.x.size(0) * HW;
  const View4 ss[2] = {view(a.shortcut), view(a.shortcut2)};
  const int64_t S = ss[0].c + ss[1].c;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(S, 1));
  torch::stable::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / HW, h = m % HW / W, w = m % W;
      float* dst = Sh + m * S;
      for (const View4& v : ss) {
        if (!v.p) continue;
        const T* src = static_cast<const T*>(v.p) + n * v.s[0] + h * v.s[2] + w * v.s[3];
        for (int64_t c = 0; c < v.c; ++c) dst[c] = static_cast<float>(src[c * v.s[1]]);
        dst += v.c;
      }
    }
  });
}

// y = p (+ p2) + bias + temb + residual, rounded once, at y's strides (p, p2: (M, O)).
template <typename T>
void epilogue(const NormConv2d& a, const float* p, const float* p2, Tensor& y) {
  const int64_t H = a.x.size(2), W = a.x.size(3), HW = H * W, O = a.packed.size(0);
  const int64_t M = a.x.size(0) * HW;
  const float* bias = a.bias ? a.bias->const_data_ptr<float>() : nullptr;
  const float* temb = a.temb ? a.temb->const_data_ptr<float>() : nullptr;
  const View4 res = view(a.residual);
  T* out = y.mutable_data_ptr<T>();
  const int64_t ys[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / O);
  torch::stable::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / HW, h = m % HW / W, w = m % W;
      const float* pr = p + m * O;
      const float* pr2 = p2 ? p2 + m * O : nullptr;
      T* yr = out + n * ys[0] + h * ys[2] + w * ys[3];
      const T* rr = res.p ? static_cast<const T*>(res.p) + n * res.s[0] + h * res.s[2] +
                                w * res.s[3]
                          : nullptr;
      for (int64_t o = 0; o < O; ++o) {
        float v = pr[o];
        if (pr2) v += pr2[o];
        if (bias) v += bias[o];
        if (temb) v += temb[n * O + o];
        if (rr) v += static_cast<float>(rr[o * res.s[1]]);
        yr[o * ys[1]] = static_cast<T>(v);
      }
    }
  });
}

Tensor cpu(const NormConv2d& a) {
  Tensor y = empty(a);
  if (y.numel() == 0) return y;
  using Ints = std::vector<int64_t>;
  const int64_t N = a.x.size(0), H = a.x.size(2), W = a.x.size(3), M = N * H * W;
  const int64_t k = a.kernel_size, O = a.packed.size(0), K = a.packed.size(1);
  const int64_t C = a.x.size(1) + (a.x2 ? a.x2->size(1) : 0), S = K - k * k * C;
  // The weight in float32 (16-bit: converted): fp32 accumulation, one rounding, as the CUDA
  // kernel.
  Tensor wf = a.packed;
  if (wf.scalar_type() != ScalarType::Float) wf = torch::stable::to(wf, ScalarType::Float);
  Tensor A0 = new_contiguous(a.x, {N, H, W, C}, ScalarType::Float);
  Tensor Sh;
  if (S > 0) Sh = new_contiguous(a.x, {M, S}, ScalarType::Float);
  dispatch_float(a.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    prologue_rows<T>(a, A0.mutable_data_ptr<float>());
    if (S > 0) shortcut_rows<T>(a, Sh.mutable_data_ptr<float>());
  });
  // The convolution on torch's CPU kernel (oneDNN), over the prologued input as a
  // channels_last (N, C, H, W) view and the packed taps as an (O, C, k, k) view.
  Tensor in = call_op<Tensor>("aten::permute", A0, Ints{0, 3, 1, 2});
  Tensor wc = call_op<Tensor>("aten::reshape", torch::stable::narrow(wf, 1, 0, k * k * C),
                              Ints{O, k, k, C});
  wc = call_op<Tensor>("aten::permute", wc, Ints{0, 3, 1, 2});
  Tensor conv = call_op<Tensor>("aten::conv2d", in, wc, std::optional<Tensor>(), Ints{1, 1},
                                Ints{k / 2, k / 2}, Ints{1, 1}, int64_t{1});
  Tensor p = torch::stable::contiguous(call_op<Tensor>("aten::permute", conv,
                                                       Ints{0, 2, 3, 1}));   // (N, H, W, O)
  Tensor p2;
  if (S > 0) {   // the 1x1 shortcut segment: (M, S) @ (S, O)
    p2 = torch::stable::contiguous(call_op<Tensor>(
        "aten::mm", Sh, torch::stable::transpose(torch::stable::narrow(wf, 1, k * k * C, S), 0,
                                                 1)));
  }
  dispatch_float(a.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    epilogue<T>(a, p.const_data_ptr<float>(), S > 0 ? p2.const_data_ptr<float>() : nullptr, y);
  });
  return y;
}

// ---- CUDA plan: kernels/norm_conv2d.py ----

Plan<Tensor> plan(const NormConv2d& a) {
  namespace cfg = config::norm_conv2d;
  Tensor y = empty(a);
  const int64_t N = a.x.size(0), C1 = a.x.size(1), H = a.x.size(2), W = a.x.size(3);
  const int64_t C2 = channels(a.x2), S1 = channels(a.shortcut), S2 = channels(a.shortcut2);
  const int64_t O = a.packed.size(0), K = a.packed.size(1), M = N * H * W;
  const bool f32 = a.x.scalar_type() == ScalarType::Float;
  const int64_t bm = f32 ? cfg::BLOCK_M_FP32 : cfg::BLOCK_M;
  const int64_t bn = f32 ? cfg::BLOCK_N_FP32 : cfg::BLOCK_N;
  const int64_t bk = f32 ? cfg::BLOCK_K_FP32 : cfg::BLOCK_K;
  const int64_t programs = cdiv(M, bm) * cdiv(O, bn);
  constexpr int64_t kLimit = int64_t{1} << 31;
  FD_CHECK(M < kLimit && O < kLimit && K < kLimit && programs < kLimit &&
               N * (C1 + C2) < kLimit && N * O < kLimit,
           NormConv2d::name, "M=", M, ", O=", O, ", K=", K, " are beyond the CUDA kernel's "
           "32-bit sizes (M = N*H*W, O, K, N*C, N*O and the tiles below 2**31)");
  const int64_t flags[9] = {a.kernel_size, a.x2.has_value(), a.scale.has_value(), a.silu,
                            a.bias.has_value(), a.temb.has_value(), a.residual.has_value(),
                            a.shortcut.has_value(), a.shortcut2.has_value()};
  static constexpr const char* kFlags[9] = {"KS", "HAS_X2", "PROLOGUE", "SILU", "HAS_BIAS",
                                            "HAS_TEMB", "HAS_RES", "HAS_SC", "HAS_SC2"};
  // Absent tensors: x stands in (their flag is 0: never read); the float32 tables' pointer
  // type stays *fp32 in the key (one signature).
  using prebuilt::Arg;
  const Tensor& x = a.x;
  std::vector<Arg> args = {
      Arg::ptr("x_ptr", x), Arg::ptr("x2_ptr", a.x2.value_or(x)),
      Arg::ptr("w_ptr", a.packed), Arg::ptr("b_ptr", a.bias.value_or(x), "*fp32"),
      Arg::ptr("sc_ptr", a.scale.value_or(x), "*fp32"),
      Arg::ptr("sh_ptr", a.shift.value_or(x), "*fp32"),
      Arg::ptr("t_ptr", a.temb.value_or(x), "*fp32"), Arg::ptr("r_ptr", a.residual.value_or(x)),
      Arg::ptr("s_ptr", a.shortcut.value_or(x)), Arg::ptr("s2_ptr", a.shortcut2.value_or(x)),
      Arg::ptr("y_ptr", y)};
  const std::pair<const char*, int64_t> sizes[9] = {{"N", N},   {"H", H},   {"W", W},
                                                    {"C1", C1}, {"C2", C2}, {"S1", S1},
                                                    {"S2", S2}, {"O", O},   {"K", K}};
  for (const auto& [name, v] : sizes) args.push_back(Arg::i32(name, v));
  const std::pair<const char*, const std::optional<Tensor>*> strided[5] = {
      {"x", nullptr}, {"x2", &a.x2}, {"r", &a.residual}, {"s", &a.shortcut},
      {"s2", &a.shortcut2}};
  static const char* kDims = "nchw";
  for (const auto& [t, opt] : strided) {
    const Tensor* ten = opt ? (opt->has_value() ? &**opt : nullptr) : &x;
    for (int d = 0; d < 4; ++d) {
      args.push_back(Arg::i64(str("s", t, kDims[d]).c_str(), ten ? ten->stride(d) : 0));
    }
  }
  for (int d = 0; d < 4; ++d) args.push_back(Arg::i64(str("sy", kDims[d]).c_str(), y.stride(d)));
  std::vector<std::pair<std::string, int64_t>> cx = {
      {"BLOCK_M", bm}, {"BLOCK_N", bn}, {"BLOCK_K", bk}, {"GROUP_M", cfg::GROUP_M}};
  for (int i = 0; i < 9; ++i) cx.emplace_back(kFlags[i], flags[i]);
  prebuilt::Launch launch = prebuilt::make_launch("norm_conv2d", {programs, 1, 1},
                                                  std::move(args), cx);
  // Cubins: fp16/bf16, the flag combinations of PREBUILT_FLAGS (diffusers' blocks).
  bool listed = false;
  for (const auto& row : cfg::PREBUILT_FLAGS) listed |= std::equal(row, row + 9, flags);
  // The cubins assume C1, C2, S1, S2, K multiples of 16 and 16-byte aligned tensors (SD's
  // widths; 16-byte weight tile copies): others say so rather than fail the launch's check.
  bool aligned = C1 % 16 == 0 && C2 % 16 == 0 && S1 % 16 == 0 && S2 % 16 == 0 && K % 16 == 0;
  for (const std::optional<Tensor>& t :
       {std::optional<Tensor>(x), a.x2, std::optional<Tensor>(a.packed), a.bias, a.scale, a.shift,
        a.temb, a.residual, a.shortcut, a.shortcut2}) {
    if (t) aligned = aligned && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0;
  }
  std::string why;
  if (f32) {
    why = "no cubin for float32 (fp16 and bf16 only)";
  } else if (!listed) {
    why = "no cubin for this combination of kernel_size and inputs";
  } else if (!aligned) {
    why = "no cubin for channels (C1, C2, S1, S2) or K not multiples of 16, or a tensor not "
          "16-byte aligned";
  }
  return {{launch}, y, {}, why};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::NormConv2d)
