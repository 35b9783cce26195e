// The fastdiff op library: the schemas, the helpers the ops share and the Python bindings.
// Each op's implementations are in csrc/<op>.cpp, the prebuilt-kernel launcher in prebuilt.cpp.
#include "ops.h"

#include <torch/library.h>

#include <algorithm>
#include <sstream>

namespace fastdiff {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kBool: return "bool";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    case at::kFloat8_e5m2: return "float8_e5m2";
    default: return c10::toString(t);
  }
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name,
                       const at::Tensor& t, const char* name) {
  FD_CHECK(t.device() == ref.device(), op, "argument '", name, "' must be on the same device as '",
           ref_name, "' (", ref.device(), "), got ", t.device());
}

std::vector<void (*)(pybind11::module&)>& op_bindings() {
  static std::vector<void (*)(pybind11::module&)> all;
  return all;
}

pybind11::list to_py(const std::vector<prebuilt::Launch>& launches) {
  pybind11::list out;
  for (const prebuilt::Launch& l : launches) {
    pybind11::list args;
    for (const prebuilt::Arg& a : l.args) {
      const char* kind = prebuilt::kKindNames[static_cast<int>(a.kind)];
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

namespace {

prebuilt::Launch launch_from_py(const pybind11::dict& d) {
  prebuilt::Launch l;
  l.key = d["key"].cast<std::string>();
  auto g = d["grid"].cast<std::vector<int64_t>>();
  TORCH_CHECK_VALUE(g.size() == 3, "fastdiff: a launch's grid has 3 dimensions");
  l.grid = {g[0], g[1], g[2]};
  for (auto item : d["args"].cast<pybind11::list>()) {
    auto [name, kind, bits] = item.cast<std::tuple<std::string, std::string, uint64_t>>();
    const auto& names = prebuilt::kKindNames;
    const auto* k = std::find(std::begin(names), std::end(names), kind);
    TORCH_CHECK_VALUE(k != std::end(names), "fastdiff: no argument kind '", kind, "'");
    l.args.push_back({name, static_cast<prebuilt::Kind>(k - std::begin(names)), bits});
  }
  return l;
}

}  // namespace
}  // namespace fastdiff

// The schemas: one line per op here; everything else about an op is in csrc/<op>.cpp.
TORCH_LIBRARY(fastdiff, m) {
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight=None, Tensor? bias=None, "
      "float eps=1e-5, Tensor? pre_bias=None, Tensor? scale=None, Tensor? shift=None, "
      "bool apply_silu=True) -> Tensor");
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, int num_groups, Tensor? weight, "
      "Tensor? bias, float eps, Tensor? pre_bias, Tensor? scale, Tensor? shift, "
      "bool apply_silu) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float? scale=None) -> Tensor");
  m.def(
      "denoise_step(Tensor model_output, Tensor sample, Tensor coeffs, Tensor step_index, "
      "Tensor? noise=None, Tensor(a!)? state=None, float guidance_scale=1.0, "
      "bool clip_sample=False, float clip_sample_range=1.0, bool write_x0=False, "
      "bool? guided=None) "
      "-> (Tensor, Tensor)");
  m.def("geglu(Tensor x) -> Tensor");
  m.def(
      "add_layer_norm(Tensor x, Tensor residual, Tensor? weight=None, Tensor? bias=None, "
      "float eps=1e-5) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace pb = fastdiff::prebuilt;
  m.doc() = "fastdiff C++ extension: registers torch.ops.fastdiff.* (CPU, Meta and CUDA kernels)";
  for (auto add : fastdiff::op_bindings()) add(m);
  m.def("_prebuilt_register", &pb::register_kernel, "Registers one prebuilt kernel.");
  m.def("_prebuilt_use_directory", &pb::use_directory, pybind11::arg("directory"),
        pybind11::arg("lazy") = false);
  m.def("_prebuilt_clear", &pb::clear_registry);
  m.def("_prebuilt_count", &pb::registry_size);
  m.def("_prebuilt_forget_loaded", &pb::forget_loaded);
  m.def("_prebuilt_mode", &pb::mode_name, "The prebuilt mode: 'off', 'on' or 'require'.");
  m.def("_prebuilt_set_mode", &pb::set_mode, "Sets the prebuilt mode; returns the previous one.");
  m.def("_prebuilt_select", [](const pybind11::dict& launch, int64_t arch) {
    pb::Selection s = pb::select(fastdiff::launch_from_py(launch), arch);
    return pybind11::make_tuple(s.path, s.reason);
  }, "The registered cubin a planned launch would run on sm_<arch>, or why none.");
  m.def("_prebuilt_hold_and_read", [](const pybind11::dict& launch, int64_t arch, int64_t reads,
                                      bool change_registry) {
    const pb::Launch l = fastdiff::launch_from_py(launch);
    pb::HoldReport r;
    {
      pybind11::gil_scoped_release nogil;  // other Python threads may change the registry
      r = pb::hold_and_read(l, arch, reads, change_registry);
    }
    return pybind11::make_tuple(r.name, r.why, r.live, r.intact);
  }, "Tests: the registry's ownership of what a launch resolved (see prebuilt.h).");
  m.def("_prebuilt_live_entries", &pb::live_entries);
}
