// The CUDA implementations of the fastdiff ops: prebuilt cubins launched from here, or the
// Triton JIT.
//
// Each op checks its arguments (ops.cpp), plans its launches exactly as its Triton launcher in
// kernels/*.py does (the same kernel, constexprs, grid and arguments; tests/test_prebuilt.py
// compares the two plans on CPU tensors) and launches the prebuilt cubins (prebuilt.cpp). When
// they cannot run (see prebuilt.h), the op calls its private twin fastdiff::_<op>_jit, whose CUDA kernel
// is the Triton launcher registered in fastdiff/ops.py, passing the reason, which is logged once.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "prebuilt.h"
#include "fastdiff.h"

namespace fastdiff {
namespace {

using prebuilt::Arg;
using prebuilt::Launch;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_power_of_2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

std::string ptr_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "*fp32";
    case at::kHalf: return "*fp16";
    case at::kBFloat16: return "*bf16";
    case at::kLong: return "*i64";
    case at::kInt: return "*i32";
    default: TORCH_CHECK(false, "fastdiff: no kernel type for dtype ", t);
  }
}

std::string key_of(const std::string& kernel, const std::vector<Arg>& args,
                   const std::vector<std::string>& ptr_types,
                   const std::vector<std::pair<std::string, int64_t>>& constexprs) {
  // Pointer parameters take their types from ptr_types, in order; scalars from their kind.
  std::vector<std::string> types;
  size_t p = 0;
  for (const Arg& a : args) {
    switch (a.kind) {
      case prebuilt::Kind::Ptr: types.push_back(ptr_types.at(p++)); break;
      case prebuilt::Kind::I32: types.emplace_back("i32"); break;
      case prebuilt::Kind::I64: types.emplace_back("i64"); break;
      case prebuilt::Kind::F32: types.emplace_back("fp32"); break;
    }
  }
  return prebuilt::make_key(kernel, types, constexprs);
}

struct Plan {
  std::vector<Launch> launches;
  std::vector<at::Tensor> outputs;  // what the op returns
  std::vector<at::Tensor> keep;     // buffers the launches use (alive until they are enqueued)
  std::string why;                  // why no prebuilt cubin can run it (empty: one may)
};

// ---- group_norm_silu: kernels/group_norm_silu.py ----
constexpr int64_t kGnMaxSplit = 32;

// How the kernels read an optional per-channel tensor: 0 absent, 1 float32, 2 x's dtype.
int64_t gn_kind(const std::optional<at::Tensor>& t) {
  return !t ? 0 : t->scalar_type() == at::kFloat ? 1 : 2;
}

Plan plan_group_norm_silu(const at::Tensor& x, int64_t num_groups,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          const std::optional<at::Tensor>& pre_bias,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, bool apply_silu) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), G = num_groups;
  const int64_t cg = C / G;
  const bool cl = !x.is_contiguous();
  const int64_t rows = cl ? 128 : 64, cols = cl ? 8 : 16;  // TILE
  at::Tensor y = at::empty_like(x);
  const int64_t nrows = cl ? HW * cdiv(cg, cols) : cg * cdiv(HW, cols);
  TORCH_CHECK_VALUE(nrows < (int64_t{1} << 31), "fastdiff.group_norm_silu: a group of C/G * H * W",
                    " = ", cg * HW, " elements is beyond the CUDA kernels' ", int64_t{1} << 31,
                    " rows of ", cols);
  const int64_t tiles = cdiv(nrows, rows);
  int64_t split = std::min(kGnMaxSplit, tiles);
  const int64_t chunk = cdiv(tiles, split);  // tiles per program
  split = cdiv(tiles, chunk);
  at::Tensor part = at::empty({N * G, split, 3}, x.options().dtype(at::kFloat));
  const int64_t vec16 = 16 / static_cast<int64_t>(x.element_size());
  const int64_t vec = (cl ? cg : HW) % vec16 == 0 ? vec16 : 1;
  const bool has_ss = scale.has_value() || shift.has_value();
  // Absent tensors: x stands in (kind 0: never read), so the argument types stay the same.
  auto or_x = [&](const std::optional<at::Tensor>& t) { return t ? *t : x; };
  const std::string t = ptr_type(x.scalar_type());
  const std::array<int64_t, 3> grid{N * G, split, 1};
  std::vector<Arg> common{Arg::i32("HW", HW), Arg::i32("C", C), Arg::i32("G", G),
                          Arg::i32("CG", cg), Arg::i32("chunk", chunk), Arg::i32("split", split)};
  const std::vector<std::pair<std::string, int64_t>> shape{
      {"VEC", vec}, {"ROWS", rows}, {"COLS", cols}};

  std::vector<Arg> sargs{Arg::ptr("x_ptr", x), Arg::ptr("pre_ptr", or_x(pre_bias)),
                         Arg::ptr("part_ptr", part)};
  sargs.insert(sargs.end(), common.begin(), common.end());
  sargs.push_back(Arg::i32("pre_kind", gn_kind(pre_bias)));
  std::vector<std::pair<std::string, int64_t>> scx{{"CL", cl}, {"HAS_PRE", pre_bias.has_value()}};
  scx.insert(scx.end(), shape.begin(), shape.end());
  std::string skey = key_of("group_norm_silu_stats", sargs, {t, "*fp32", "*fp32"}, scx);

  std::vector<Arg> aargs{Arg::ptr("x_ptr", x), Arg::ptr("y_ptr", y),
                         Arg::ptr("w_ptr", or_x(weight)), Arg::ptr("b_ptr", or_x(bias)),
                         Arg::ptr("pre_ptr", or_x(pre_bias)), Arg::ptr("scale_ptr", or_x(scale)),
                         Arg::ptr("shift_ptr", or_x(shift)), Arg::ptr("part_ptr", part)};
  aargs.insert(aargs.end(), common.begin(), common.end());
  aargs.push_back(Arg::f32("eps", eps));
  aargs.push_back(Arg::i32("w_kind", gn_kind(weight)));
  aargs.push_back(Arg::i32("b_kind", gn_kind(bias)));
  aargs.push_back(Arg::i32("pre_kind", gn_kind(pre_bias)));
  aargs.push_back(Arg::i32("scale_kind", gn_kind(scale)));
  aargs.push_back(Arg::i32("shift_kind", gn_kind(shift)));
  std::vector<std::pair<std::string, int64_t>> acx{
      {"CL", cl}, {"HAS_PRE", pre_bias.has_value()}, {"HAS_SS", has_ss}, {"SILU", apply_silu},
      {"SPLIT_P2", kGnMaxSplit}};
  acx.insert(acx.end(), shape.begin(), shape.end());
  std::string akey = key_of("group_norm_silu_apply", aargs, {t, t, "*fp32", "*fp32", "*fp32", "*fp32", "*fp32",
                                              "*fp32"}, acx);
  return {{{skey, grid, sargs}, {akey, grid, aargs}}, {y}, {part}, {}};
}

// ---- attention: kernels/attention.py ----
constexpr double kLog2e = 1.4426950408889634;
// The head dims with prebuilt cubins (attention.py's PREBUILT_HEAD_DIMS, which says why).
constexpr std::array<int64_t, 12> kAttnHeadDims{8, 16, 32, 40, 48, 64, 72, 80, 96, 128, 160, 256};
// (BLOCK_M, BLOCK_N) for padded head dims 16, 32, 64, 128, 256 (attention.py's _TILES): 2-byte
// inputs without and with a bias, fp32.
constexpr int64_t kAttnTiles[3][5][2] = {
    {{128, 64}, {128, 64}, {128, 64}, {128, 64}, {64, 32}},
    {{128, 64}, {128, 64}, {128, 32}, {128, 32}, {64, 32}},
    {{64, 64}, {64, 64}, {64, 32}, {64, 32}, {32, 16}}};

int64_t log2_of(int64_t p) {
  int64_t l = 0;
  while ((int64_t{1} << l) < p) ++l;
  return l;
}

Plan plan_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& attn_bias, std::optional<double> scale) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  at::Tensor out = at::empty({B, H, Lq, D}, q.options());
  const int64_t block_d = std::max<int64_t>(16, next_power_of_2(D));
  const bool ieee = q.scalar_type() == at::kFloat;
  const auto& tile = kAttnTiles[ieee ? 2 : attn_bias ? 1 : 0][log2_of(block_d) - 4];
  const int64_t bm = tile[0], bn = tile[1];
  // VEC (attention.py, vec_of): elements per 16 bytes, down to the largest power of two that
  // divides every q/k/v stride of dims 0-2 the kernel multiplies by a nonzero index.
  const int64_t vec16 = 16 / static_cast<int64_t>(q.element_size());
  int64_t vec = vec16;
  for (const at::Tensor* t : {&q, &k, &v}) {
    for (int d = 0; d < 3; ++d) {
      if (t->size(d) > 1) vec = std::gcd(vec, t->stride(d));
    }
  }
  at::Tensor bias = q;
  std::array<int64_t, 4> bstrides{0, 0, 0, 0};
  if (attn_bias) {  // a view: broadcast dims get stride 0; read in its own dtype
    bias = attn_bias->expand({B, H, Lq, Lk});
    for (int i = 0; i < 4; ++i) bstrides[i] = bias.stride(i);
  }
  const double s = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<Arg> args{Arg::ptr("q_ptr", q), Arg::ptr("k_ptr", k), Arg::ptr("v_ptr", v),
                        Arg::ptr("bias_ptr", bias), Arg::ptr("o_ptr", out),
                        Arg::i64("sqb", q.stride(0)), Arg::i64("sqh", q.stride(1)),
                        Arg::i64("sqm", q.stride(2)), Arg::i64("skb", k.stride(0)),
                        Arg::i64("skh", k.stride(1)), Arg::i64("skn", k.stride(2)),
                        Arg::i64("svb", v.stride(0)), Arg::i64("svh", v.stride(1)),
                        Arg::i64("svn", v.stride(2)), Arg::i64("sbb", bstrides[0]),
                        Arg::i64("sbh", bstrides[1]), Arg::i64("sbm", bstrides[2]),
                        Arg::i64("sbn", bstrides[3]), Arg::i32("H", H), Arg::i32("Lq", Lq),
                        Arg::i32("Lk", Lk), Arg::f32("qk_scale", s * kLog2e)};
  const std::string t = ptr_type(q.scalar_type());
  std::string key = key_of("attention_fwd", args,
                           {t, t, t, attn_bias ? ptr_type(attn_bias->scalar_type()) : t, t},
                           {{"D", D}, {"VEC", vec}, {"HAS_BIAS", attn_bias.has_value()},
                            {"IEEE", ieee}, {"BLOCK_M", bm}, {"BLOCK_N", bn},
                            {"BLOCK_D", block_d}});
  // Grid axis 0 (up to 2**31 - 1): B * H alone may exceed axis 1's 65,535.
  Plan p{{{key, {B * H * cdiv(Lq, bm), 1, 1}, args}}, {out}, {}, {}};
  if (!std::binary_search(kAttnHeadDims.begin(), kAttnHeadDims.end(), D)) {
    p.why = "no cubin for head dim " + std::to_string(D);
  } else if (vec != vec16) {
    p.why = "no cubin for q/k/v strides that are not multiples of 16 bytes";
  }
  return p;
}

// ---- denoise_step: kernels/denoise_step.py ----
constexpr int64_t kStepBlock = 2048;

Plan plan_denoise_step(const at::Tensor& model_output, const at::Tensor& sample,
                       const at::Tensor& coeffs, const at::Tensor& step_index,
                       const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& prev_x0, double guidance_scale,
                       bool clip_sample, double clip_sample_range, bool write_x0) {
  at::Tensor out = at::empty_like(sample);
  at::Tensor x0 = write_x0 ? at::empty_like(sample) : sample.new_empty({0});
  const int64_t numel = sample.numel();
  const bool guided = model_output.size(0) == 2 * sample.size(0);
  const double r = clip_sample ? clip_sample_range : INFINITY;
  std::vector<Arg> args{Arg::ptr("mo_ptr", model_output), Arg::ptr("x_ptr", sample),
                        Arg::ptr("noise_ptr", noise ? *noise : sample),
                        Arg::ptr("prev_ptr", prev_x0 ? *prev_x0 : sample),
                        Arg::ptr("coef_ptr", coeffs), Arg::ptr("idx_ptr", step_index),
                        Arg::ptr("out_ptr", out), Arg::ptr("x0_ptr", write_x0 ? x0 : out),
                        Arg::i32("numel", numel), Arg::i32("num_steps", coeffs.size(0)),
                        Arg::f32("guidance", guidance_scale), Arg::f32("clip_lo", -r),
                        Arg::f32("clip_hi", r), Arg::i32("write_x0", write_x0)};
  const std::string t = ptr_type(sample.scalar_type());
  std::string key = key_of("denoise_step", args,
                           {t, t, t, t, "*fp32", ptr_type(step_index.scalar_type()), t, t},
                           {{"GUIDED", guided}, {"HAS_NOISE", noise.has_value()},
                            {"HAS_PREV", prev_x0.has_value()}, {"BLOCK", kStepBlock}});
  return {{{key, {cdiv(numel, kStepBlock), 1, 1}, args}}, {out, x0}, {}, {}};
}

// ---- the CUDA kernels: prebuilt, else the JIT twin ----

// Plans the op (make_plan runs only where prebuilt kernels may run) and launches it on the
// prebuilt cubins: its outputs, or the reason they cannot run (raised in mode 'require').
template <typename MakePlan>
std::optional<std::string> try_prebuilt(const char* op, const at::Device& device,
                                        MakePlan make_plan, std::vector<at::Tensor>& outputs) {
  auto why = prebuilt::unavailable(device);
  if (!why) {
    Plan p = make_plan();
    why = p.why.empty() ? prebuilt::launch(p.launches, device) : std::optional<std::string>(p.why);
    if (!why) {
      outputs = std::move(p.outputs);
      return std::nullopt;
    }
  }
  TORCH_CHECK(prebuilt::mode() != prebuilt::Mode::Require, "fastdiff.", op,
              ": FASTDIFF_PREBUILT=require, but the prebuilt kernels cannot run: ", *why);
  return why;
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, int64_t num_groups,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps,
                                const std::optional<at::Tensor>& pre_bias,
                                const std::optional<at::Tensor>& scale,
                                const std::optional<at::Tensor>& shift, bool apply_silu) {
  check_group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu);
  if (x.numel() == 0) return at::empty_like(x);
  c10::DeviceGuard guard(x.device());
  std::vector<at::Tensor> out;
  auto why = try_prebuilt("group_norm_silu", x.device(), [&] {
    return plan_group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift,
                                apply_silu);
  }, out);
  if (!why) return out[0];
  static auto jit = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fastdiff::_group_norm_silu_jit", "")
                        .typed<at::Tensor(const at::Tensor&, int64_t,
                                          const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, double,
                                          const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, bool,
                                          c10::string_view)>();
  return jit.call(x, num_groups, weight, bias, eps, pre_bias, scale, shift, apply_silu, *why);
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& attn_bias,
                          std::optional<double> scale) {
  check_attention(q, k, v, attn_bias, scale);
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  c10::DeviceGuard guard(q.device());
  std::vector<at::Tensor> out;
  auto why = try_prebuilt("attention", q.device(),
                          [&] { return plan_attention(q, k, v, attn_bias, scale); }, out);
  if (!why) return out[0];
  static auto jit = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fastdiff::_attention_jit", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&,
                                          std::optional<double>, c10::string_view)>();
  return jit.call(q, k, v, attn_bias, scale, *why);
}

std::tuple<at::Tensor, at::Tensor> denoise_step_cuda(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
    const at::Tensor& step_index, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& prev_x0, double guidance_scale, bool clip_sample,
    double clip_sample_range, bool write_x0) {
  check_denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale,
                     clip_sample, clip_sample_range, write_x0);
  if (sample.numel() == 0) {
    return {at::empty_like(sample), write_x0 ? at::empty_like(sample) : sample.new_empty({0})};
  }
  c10::DeviceGuard guard(sample.device());
  std::vector<at::Tensor> out;
  auto why = try_prebuilt("denoise_step", sample.device(), [&] {
    return plan_denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0,
                             guidance_scale, clip_sample, clip_sample_range, write_x0);
  }, out);
  if (!why) return {out[0], out[1]};
  static auto jit =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastdiff::_denoise_step_jit", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool,
              double, bool, c10::string_view)>();
  return jit.call(model_output, sample, coeffs, step_index, noise, prev_x0, guidance_scale,
                  clip_sample, clip_sample_range, write_x0, *why);
}

// ---- Python views of the plans (tests/test_prebuilt.py runs them on CPU tensors) ----

pybind11::list plan_to_py(const Plan& p) {
  pybind11::list out;
  for (const Launch& l : p.launches) {
    pybind11::list args;
    for (const Arg& a : l.args) {
      const char* kind = a.kind == prebuilt::Kind::Ptr ? "ptr"
                         : a.kind == prebuilt::Kind::I32 ? "i32"
                         : a.kind == prebuilt::Kind::I64 ? "i64" : "fp32";
      args.append(pybind11::make_tuple(a.name, kind, a.bits));
    }
    pybind11::dict d;
    d["key"] = l.key;
    d["grid"] = pybind11::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
    d["args"] = args;
    out.append(d);
  }
  return out;
}

Launch launch_from_py(const pybind11::dict& d) {
  Launch l;
  l.key = d["key"].cast<std::string>();
  auto g = d["grid"].cast<std::vector<int64_t>>();
  TORCH_CHECK_VALUE(g.size() == 3, "fastdiff: a launch's grid has 3 dimensions");
  l.grid = {g[0], g[1], g[2]};
  for (auto item : d["args"].cast<pybind11::list>()) {
    auto t = item.cast<std::tuple<std::string, std::string, uint64_t>>();
    const std::string& k = std::get<1>(t);
    prebuilt::Kind kind = k == "ptr" ? prebuilt::Kind::Ptr : k == "i32" ? prebuilt::Kind::I32
                     : k == "i64" ? prebuilt::Kind::I64 : prebuilt::Kind::F32;
    l.args.push_back({std::get<0>(t), kind, std::get<2>(t)});
  }
  return l;
}

}  // namespace

namespace prebuilt {

void bind(pybind11::module& m) {
  m.def("_prebuilt_register", &register_kernel, "Registers one prebuilt kernel (fastdiff.prebuilt).");
  m.def("_prebuilt_use_directory", &use_directory, pybind11::arg("directory"),
        pybind11::arg("lazy") = false);
  m.def("_prebuilt_clear", &clear_registry);
  m.def("_prebuilt_count", &registry_size);
  m.def("_prebuilt_forget_loaded", &forget_loaded);
  m.def("_prebuilt_mode", &mode_name, "The prebuilt mode: 'off', 'on' or 'require'.");
  m.def("_prebuilt_set_mode", &set_mode, "Sets the prebuilt mode; returns the previous one.");
  m.def("_prebuilt_select", [](const pybind11::dict& launch, int64_t arch) {
    Selection s = select(launch_from_py(launch), arch);
    return pybind11::make_tuple(s.path, s.reason);
  }, "The registered cubin a planned launch would run on sm_<arch>, or why none.");
  m.def("_prebuilt_hold_and_read", [](const pybind11::dict& launch, int64_t arch, int64_t reads,
                                 bool change_registry) {
    const Launch l = launch_from_py(launch);
    HoldReport r;
    {
      pybind11::gil_scoped_release nogil;  // other Python threads may change the registry
      r = hold_and_read(l, arch, reads, change_registry);
    }
    return pybind11::make_tuple(r.name, r.why, r.live, r.intact);
  }, "Tests: the registry's ownership of what a launch resolved (see prebuilt.h).");
  m.def("_prebuilt_live_entries", &live_entries);
  m.def("_prebuilt_plan_group_norm_silu",
        [](const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
           const std::optional<at::Tensor>& bias, double eps,
           const std::optional<at::Tensor>& pre_bias, const std::optional<at::Tensor>& scale,
           const std::optional<at::Tensor>& shift, bool apply_silu) {
          check_group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift,
                                apply_silu);
          Plan p = plan_group_norm_silu(x, num_groups, weight, bias, eps, pre_bias, scale, shift,
                                        apply_silu);
          return pybind11::make_tuple(plan_to_py(p), p.outputs, p.keep, p.why);
        });
  m.def("_prebuilt_plan_attention",
        [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const std::optional<at::Tensor>& attn_bias, std::optional<double> scale) {
          check_attention(q, k, v, attn_bias, scale);
          Plan p = plan_attention(q, k, v, attn_bias, scale);
          return pybind11::make_tuple(plan_to_py(p), p.outputs, p.keep, p.why);
        });
  m.def("_prebuilt_plan_denoise_step",
        [](const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
           const at::Tensor& step_index, const std::optional<at::Tensor>& noise,
           const std::optional<at::Tensor>& prev_x0, double guidance_scale, bool clip_sample,
           double clip_sample_range, bool write_x0) {
          check_denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0,
                             guidance_scale, clip_sample, clip_sample_range, write_x0);
          Plan p = plan_denoise_step(model_output, sample, coeffs, step_index, noise, prev_x0,
                                     guidance_scale, clip_sample, clip_sample_range, write_x0);
          return pybind11::make_tuple(plan_to_py(p), p.outputs, p.keep, p.why);
        });
}

}  // namespace prebuilt
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // The Triton JIT twins of the ops: CUDA kernels registered in fastdiff/ops.py; `why` is the
  // reason the prebuilt kernels did not run (logged once), empty when the JIT was asked for.
  m.def(
      "_group_norm_silu_jit(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? pre_bias, Tensor? scale, Tensor? shift, bool apply_silu, str why) -> Tensor");
  m.def("_attention_jit(Tensor q, Tensor k, Tensor v, Tensor? attn_bias, float? scale, str why) "
        "-> Tensor");
  m.def(
      "_denoise_step_jit(Tensor model_output, Tensor sample, Tensor coeffs, Tensor step_index, "
      "Tensor? noise, Tensor? prev_x0, float guidance_scale, bool clip_sample, "
      "float clip_sample_range, bool write_x0, str why) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("group_norm_silu", &fastdiff::group_norm_silu_cuda);
  m.impl("attention", &fastdiff::attention_cuda);
  m.impl("denoise_step", &fastdiff::denoise_step_cuda);
}
