// The fastdiff op library: the helpers the ops share, the schemas of each op's helper ops, the
// prebuilt-kernel registry's ops (fastdiff::_prebuilt_*: strings and numbers; fastdiff/prebuilt.py
// wraps them) and the empty Python module fastdiff._C, on Python's limited API, whose import
// loads this library: the extension uses no pybind11 (torch's refuses to build with the stable
// ABI's TORCH_TARGET_VERSION) and no version-specific Python, so one abi3 wheel serves every
// Python >= 3.10 and every torch >= the target. Each op's schema and implementations are in
// csrc/<op>.cpp, the prebuilt-kernel launcher in prebuilt.cpp.
#include <limits>
#include "ops.h"

#include <Python.h>

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

std::vector<float> floats(const std::optional<Tensor>& t) {
  if (!t) return {};
  std::vector<float> out;
  dispatch_float(t->scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* p = t->const_data_ptr<T>();
    out.assign(p, p + t->numel());
  });
  return out;
}

bool same_shape(const Tensor& a, const Tensor& b) {
  const auto x = a.sizes(), y = b.sizes();
  return x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin());
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

int64_t check_gemm_input(const char* op, const Tensor& x) {
  FD_CHECK(x.dim() >= 1, op, "argument 'x' must have a last dimension (..., K), got a 0-d tensor");
  FD_CHECK(is_float_dtype(x.scalar_type()), op,
           "argument 'x' must have dtype float32, float16 or bfloat16, got ",
           dtype_str(x.scalar_type()));
  const int64_t K = x.size(x.dim() - 1);
  FD_CHECK(K >= 1, op, "argument 'x' must have a last dimension K >= 1, got shape ", shape_str(x));
  FD_CHECK(x.is_contiguous(), op, "argument 'x' must be contiguous, got strides ", strides_str(x));
  return K;
}

void check_eps(const char* op, double eps) {
  FD_CHECK(eps == 0 || (eps >= std::numeric_limits<float>::min() &&
                        eps <= std::numeric_limits<float>::max()),
           op, "argument 'eps' must be 0 or within float32's normal range [1.18e-38, 3.4e38] ",
           "(it is used in float32), got ", eps);
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

namespace pb = prebuilt;

void registry_register(std::string key, int64_t arch, std::string path, std::string name,
                       std::string param_names, std::vector<int64_t> param_bytes,
                       std::vector<int64_t> aligned, int64_t num_warps, int64_t shared,
                       int64_t global_scratch_size, int64_t profile_scratch_size) {
  pb::register_kernel(key, arch, path, name, pb::split(param_names, ','), param_bytes, aligned,
                      num_warps, shared, global_scratch_size, profile_scratch_size);
}
int64_t registry_use_directory(std::string directory, bool lazy) {
  return pb::use_directory(directory, lazy);
}
void registry_clear() { pb::clear_registry(); }
int64_t registry_count() { return pb::registry_size(); }
void registry_forget_loaded() { pb::forget_loaded(); }
std::string registry_mode() { return pb::mode_name(); }
std::string registry_set_mode(std::string name) { return pb::set_mode(name); }
std::tuple<std::string, std::string> registry_select(std::string launch, int64_t arch) {
  pb::Selection s = pb::select(pb::launch_from_text(launch), arch);
  return {s.path, s.reason};
}
std::tuple<std::string, std::string, int64_t, int64_t> registry_hold_and_read(
    std::string launch, int64_t arch, int64_t reads, bool change_registry) {
  pb::HoldReport r =
      pb::hold_and_read(pb::launch_from_text(launch), arch, reads, change_registry);
  return {r.name, r.why, r.live, r.intact};
}
int64_t registry_live_entries() { return pb::live_entries(); }

}  // namespace
}  // namespace fastdiff

// The library's own definition; each op's schemas are fragments in csrc/<op>.cpp. The registry's
// ops take no tensor: CompositeExplicitAutograd serves them on any (no) device.
STABLE_TORCH_LIBRARY(fastdiff, m) {
  m.def("_prebuilt_register(str key, int arch, str path, str name, str param_names, "
        "int[] param_bytes, int[] aligned, int num_warps, int shared, int global_scratch_size, "
        "int profile_scratch_size) -> ()");
  m.def("_prebuilt_use_directory(str directory, bool lazy=False) -> int");
  m.def("_prebuilt_clear() -> ()");
  m.def("_prebuilt_count() -> int");
  m.def("_prebuilt_forget_loaded() -> ()");
  m.def("_prebuilt_mode() -> str");
  m.def("_prebuilt_set_mode(str name) -> str");
  m.def("_prebuilt_select(str launch, int arch) -> (str, str)");
  m.def("_prebuilt_hold_and_read(str launch, int arch, int reads, bool change_registry) -> "
        "(str, str, int, int)");
  m.def("_prebuilt_live_entries() -> int");
}

STABLE_TORCH_LIBRARY_IMPL(fastdiff, CompositeExplicitAutograd, m) {
  m.impl("_prebuilt_register", TORCH_BOX(&fastdiff::registry_register));
  m.impl("_prebuilt_use_directory", TORCH_BOX(&fastdiff::registry_use_directory));
  m.impl("_prebuilt_clear", TORCH_BOX(&fastdiff::registry_clear));
  m.impl("_prebuilt_count", TORCH_BOX(&fastdiff::registry_count));
  m.impl("_prebuilt_forget_loaded", TORCH_BOX(&fastdiff::registry_forget_loaded));
  m.impl("_prebuilt_mode", TORCH_BOX(&fastdiff::registry_mode));
  m.impl("_prebuilt_set_mode", TORCH_BOX(&fastdiff::registry_set_mode));
  m.impl("_prebuilt_select", TORCH_BOX(&fastdiff::registry_select));
  m.impl("_prebuilt_hold_and_read", TORCH_BOX(&fastdiff::registry_hold_and_read));
  m.impl("_prebuilt_live_entries", TORCH_BOX(&fastdiff::registry_live_entries));
}

// `import fastdiff._C` loads this library (the static registrations above run); the module
// itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "fastdiff's C++ extension: its import registers torch.ops.fastdiff.*",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
