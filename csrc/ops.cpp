// The fastdiff op library: the helpers the ops share, the schemas of each op's helper ops, and
// the Python module fastdiff._C (the prebuilt-kernel registry: strings and numbers only, no
// tensor, so pybind11 here needs nothing from libtorch). Each op's schema and implementations
// are in csrc/<op>.cpp, the prebuilt-kernel launcher in prebuilt.cpp.
#include "ops.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <iterator>

extern "C" const char* torch_exception_get_what_without_backtrace() __attribute__((weak));

namespace fastdiff {

std::string last_torch_error() {
  const char* what =
      torch_exception_get_what_without_backtrace ? torch_exception_get_what_without_backtrace()
                                                 : nullptr;
  return what ? what : "(torch before 2.13 does not pass the error's message on)";
}

std::string list_str(const int64_t* v, size_t n) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < n; ++i) s << (i ? ", " : "") << v[i];
  s << "]";
  return s.str();
}

std::string device_str(const Device& d) {
  using torch::headeronly::DeviceType;
  std::string name;
  switch (d.type()) {
    case DeviceType::CPU: name = "cpu"; break;
    case DeviceType::CUDA: name = "cuda"; break;
    case DeviceType::Meta: name = "meta"; break;
    default: name = "device type " + std::to_string(static_cast<int>(d.type()));
  }
  return d.has_index() ? name + ":" + std::to_string(d.index()) : name;
}

std::string dtype_str(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Bool: return "bool";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::ComplexHalf: return "complex32";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case ScalarType::Float8_e5m2: return "float8_e5m2";
    default: return torch::headeronly::toString(t);
  }
}

bool is_float_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

bool same_sizes(const Tensor& t, std::initializer_list<int64_t> sizes) {
  const auto s = t.sizes();
  return s.size() == sizes.size() && std::equal(sizes.begin(), sizes.end(), s.begin());
}

bool is_channels_last(const Tensor& t) {
  // torch's rule (channels_last contiguity): dims in the order C, W, H, N, size-1 dims skipped,
  // each stride the product of the sizes before it.
  if (t.dim() != 4) return false;
  int64_t expected = 1;
  for (int d : {1, 3, 2, 0}) {
    const int64_t size = t.size(d);
    if (size == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= size;
  }
  return true;
}

void check_same_device(const char* op, const Tensor& ref, const char* ref_name, const Tensor& t,
                       const char* name) {
  FD_CHECK(t.device() == ref.device(), op, "argument '", name, "' must be on the same device as '",
           ref_name, "' (", device_str(ref.device()), "), got ", device_str(t.device()));
}

Tensor empty_strided(const Tensor& like, const Sizes& sizes, const Sizes& strides,
                     std::optional<ScalarType> dtype) {
  using torch::stable::detail::from;
  using torch::stable::detail::to;
  const Device d = like.device();
  AtenTensorHandle h = nullptr;
  if (aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(),
                               to<int32_t>(from(dtype.value_or(like.scalar_type()))),
                               to<int32_t>(from(d.type())), d.index(), &h) != AOTI_TORCH_SUCCESS) {
    throw std::runtime_error("fastdiff: aoti_torch_empty_strided failed: " + last_torch_error());
  }
  return Tensor(h);
}

Tensor new_contiguous(const Tensor& like, const Sizes& sizes, std::optional<ScalarType> dtype) {
  Sizes strides(sizes.size());
  int64_t s = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = s;
    s *= std::max<int64_t>(sizes[i], 1);
  }
  return empty_strided(like, sizes, strides, dtype);
}

Tensor dense_like(const Tensor& like) {
  const auto sz = like.sizes(), st = like.strides();
  return empty_strided(like, Sizes(sz.begin(), sz.end()), Sizes(st.begin(), st.end()));
}

bool may_overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  auto range = [](const Tensor& t) {
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    int64_t span = 1;  // elements from the first to one past the last
    for (int64_t d = 0; d < t.dim(); ++d) span += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(lo, lo + span * static_cast<uintptr_t>(t.element_size()));
  };
  const auto [a0, a1] = range(a);
  const auto [b0, b1] = range(b);
  return a0 < b1 && b0 < a1;
}

void define_op(torch::stable::detail::StableLibrary& m, const char* name, const char* schema) {
  const std::string s = schema;
  // The arguments, without alias annotations for the helpers (they write nothing).
  std::string args = s.substr(0, s.rfind(") ->") + 1);
  for (size_t p; (p = args.find("(a!)")) != std::string::npos;) args.erase(p, 4);
  const std::string rets = s.substr(s.rfind(") ->") + 1);
  const std::string with_why = s.substr(0, s.rfind(") ->")) + ", str why=\"\")" + rets;
  m.def((name + s).c_str());
  m.def(("_check_" + std::string(name) + args + " -> ()").c_str());
  m.def(("_prebuilt_plan_" + std::string(name) + args + " -> (str, Tensor[], Tensor[], str)").c_str());
  m.def(("_cuda_kernel_" + std::string(name) + s).c_str());
  m.def(("_jit_" + std::string(name) + with_why).c_str());
}

namespace {

prebuilt::Launch launch_from_py(const pybind11::dict& d) {
  prebuilt::Launch l;
  l.key = d["key"].cast<std::string>();
  auto g = d["grid"].cast<std::vector<int64_t>>();
  if (g.size() != 3) throw std::invalid_argument("fastdiff: a launch's grid has 3 dimensions");
  l.grid = {g[0], g[1], g[2]};
  for (auto item : d["args"].cast<pybind11::list>()) {
    auto [name, kind, bits] = item.cast<std::tuple<std::string, std::string, uint64_t>>();
    const auto& names = prebuilt::kKindNames;
    const auto* k = std::find(std::begin(names), std::end(names), kind);
    if (k == std::end(names)) throw std::invalid_argument("fastdiff: no argument kind '" + kind + "'");
    l.args.push_back({name, static_cast<prebuilt::Kind>(k - std::begin(names)), bits, ""});
  }
  return l;
}

}  // namespace
}  // namespace fastdiff

// The library's own definition; each op's schemas are fragments in csrc/<op>.cpp.
STABLE_TORCH_LIBRARY(fastdiff, m) {}

PYBIND11_MODULE(_C, m) {
  namespace pb = fastdiff::prebuilt;
  m.doc() = "fastdiff C++ extension: registers torch.ops.fastdiff.* (CPU, Meta and CUDA kernels) "
            "on PyTorch's stable ABI; this module holds the prebuilt-kernel registry";
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
