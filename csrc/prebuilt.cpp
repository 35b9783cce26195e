// Prebuilt Triton kernels: the registry, the CUDA driver (opened at first use) and the launch.
// See prebuilt.h. No CUDA headers: the few driver types and enums needed are declared here, so the
// extension builds with a CPU-only torch and imports where there is no driver.
#include "prebuilt.h"

#include <dlfcn.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

// The C shim's current CUDA stream, aoti_torch_get_current_cuda_stream (stable; declared by
// torch/csrc/inductor/aoti_torch/c/shim.h for CUDA builds only, exported by libtorch_cuda, which
// the extension does not link: it is looked up where torch loaded it). torch::stable's Stream
// has no native handle before 2.13.
using CurrentStreamFn = AOTITorchError (*)(int32_t device_index, void** ret_stream);

namespace fastdiff::prebuilt {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (s.back() == sep) out.emplace_back();
  return out;
}

namespace {

template <typename... T>
std::string cat(const T&... parts) {
  std::ostringstream s;
  ((s << parts), ...);
  return s.str();
}

// ---- the CUDA driver API, declared by hand (values from cuda.h) ----
using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
constexpr int kAttrCcMajor = 75;           // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrCcMinor = 76;           // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
constexpr int kAttrSharedOptin = 97;       // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
constexpr int kFuncSharedStatic = 1;       // CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
constexpr int kFuncMaxDynamicShared = 8;   // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
constexpr int64_t kDefaultShared = 49152;  // dynamic shared memory allowed without opting in

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  std::string error;  // why the driver could not be opened; empty when it was
};

template <typename F>
bool resolve(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && error.empty()) error = std::string("libcuda.so.1 has no symbol ") + name;
  return fn != nullptr;
}

CurrentStreamFn current_stream_fn() {
  static const CurrentStreamFn fn = [] {
    const char* name = "aoti_torch_get_current_cuda_stream";
    void* f = dlsym(RTLD_DEFAULT, name);
    if (!f) {  // torch loads libtorch_cuda.so without RTLD_GLOBAL: ask it by name
      if (void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD)) f = dlsym(lib, name);
    }
    return reinterpret_cast<CurrentStreamFn>(f);
  }();
  return fn;
}

const Driver& driver() {
  static const Driver d = [] {
    Driver r{};
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      r.error = std::string("libcuda.so.1 could not be opened: ") + (e ? e : "unknown error");
      return r;
    }
    resolve(lib, "cuInit", r.cuInit, r.error);
    resolve(lib, "cuGetErrorString", r.cuGetErrorString, r.error);
    resolve(lib, "cuDeviceGet", r.cuDeviceGet, r.error);
    resolve(lib, "cuDeviceGetAttribute", r.cuDeviceGetAttribute, r.error);
    resolve(lib, "cuCtxGetCurrent", r.cuCtxGetCurrent, r.error);
    resolve(lib, "cuCtxSetCurrent", r.cuCtxSetCurrent, r.error);
    resolve(lib, "cuDevicePrimaryCtxRetain", r.cuDevicePrimaryCtxRetain, r.error);
    resolve(lib, "cuModuleLoadData", r.cuModuleLoadData, r.error);
    resolve(lib, "cuModuleGetFunction", r.cuModuleGetFunction, r.error);
    resolve(lib, "cuFuncGetAttribute", r.cuFuncGetAttribute, r.error);
    resolve(lib, "cuFuncSetAttribute", r.cuFuncSetAttribute, r.error);
    resolve(lib, "cuLaunchKernel", r.cuLaunchKernel, r.error);
    if (r.error.empty() && r.cuInit(0) != 0) r.error = "cuInit failed";
    return r;
  }();
  return d;
}

void check_cu(CUresult res, const char* what) {
  if (res == 0) return;
  const char* msg = nullptr;
  driver().cuGetErrorString(res, &msg);
  throw std::runtime_error(cat("fastdiff: ", what, " failed with CUDA error ", res, " (",
                               msg ? msg : "unknown", ")"));
}

// ---- the registry ----
// Entries are shared: a launch holds the entries it resolved while it loads and launches them
// outside the lock, so a concurrent use_directory / clear_registry drops only the registry's
// references. Alive counts Entry objects (tests/test_prebuilt.py checks the ownership with it).
std::atomic<int64_t> g_live_entries{0};

struct Alive {
  Alive() { ++g_live_entries; }
  Alive(const Alive&) { ++g_live_entries; }
  Alive& operator=(const Alive&) = default;
  ~Alive() { --g_live_entries; }
};

struct Entry {
  int64_t arch;
  std::string path, name;
  std::vector<std::string> param_names;
  std::vector<int64_t> param_bytes, aligned;
  int64_t num_warps, shared, global_scratch, profile_scratch;
  std::unordered_map<int, CUfunction> loaded;  // per device index; read and written under the lock
  Alive alive;
};

struct DeviceInfo {
  int64_t arch = 0, shared_optin = 0;
};

struct State {
  std::mutex mu;
  // key -> entries in registration order (the manifest lists a kernel's most aligned variant
  // first).
  std::unordered_map<std::string, std::vector<std::shared_ptr<Entry>>> kernels;
  std::vector<int64_t> archs;                      // sorted, distinct
  std::unordered_map<int, DeviceInfo> devices;     // per device index
  std::optional<Mode> mode;
  std::string pending_dir;  // a cubin directory whose index.tsv is read at the first use
};

State& state() {
  static State s;
  return s;
}

// The modes by name; the first name of each is the one reported.
const std::pair<const char*, Mode> kModes[] = {
    {"off", Mode::Off}, {"on", Mode::On}, {"require", Mode::Require}, {"0", Mode::Off},
    {"1", Mode::On}, {"false", Mode::Off}, {"2", Mode::Require}};

std::optional<Mode> parse_mode(const std::string& s) {
  for (const auto& [name, m] : kModes) {
    if (s == name) return m;
  }
  return std::nullopt;
}

Mode mode_from_env() {
  const char* v = std::getenv("FASTDIFF_PREBUILT");
  if (!v) v = std::getenv("FASTDIFF_AOT");
  return (v ? parse_mode(v) : std::nullopt).value_or(Mode::On);
}

int64_t width(Kind k) { return (k == Kind::I32 || k == Kind::F32) ? 4 : 8; }

void add_entry(State& st, const std::string& key, Entry e) {
  for (int64_t i : e.aligned) {
    if (i < 0 || i >= static_cast<int64_t>(e.param_names.size())) {
      throw std::invalid_argument(cat("fastdiff: aligned parameter index ", i,
                                      " out of range for ", e.name));
    }
  }
  if (e.num_warps <= 0 || e.shared < 0) {
    throw std::invalid_argument(cat("fastdiff: bad launch metadata for ", e.name));
  }
  if (!std::binary_search(st.archs.begin(), st.archs.end(), e.arch)) {
    st.archs.insert(std::upper_bound(st.archs.begin(), st.archs.end(), e.arch), e.arch);
  }
  st.kernels[key].push_back(std::make_shared<Entry>(std::move(e)));
}

std::vector<int64_t> ints(const std::string& s) {
  std::vector<int64_t> out;
  for (const auto& x : split(s, ',')) out.push_back(std::stoll(x));
  return out;
}

// Registers every kernel of <dir>/index.tsv (written by kernels/prebuild.py; format there).
// Caller holds the lock.
int64_t load_index(State& st, const std::string& dir) {
  std::ifstream f(dir + "/index.tsv");
  if (!f.good()) return 0;
  std::string line;
  int64_t n = 0, lineno = 0;
  while (std::getline(f, line)) {
    ++lineno;
    if (line.empty()) continue;
    auto c = split(line, '\t');
    if (c.size() != 11) {
      throw std::runtime_error(cat("fastdiff: ", dir, "/index.tsv line ", lineno, " has ",
                                   c.size(), " fields, expected 11 (a damaged install? reinstall,",
                                   " or set FASTDIFF_PREBUILT=0)"));
    }
    Entry e{std::stoll(c[1]), dir + "/" + c[2], c[3], split(c[4], ','), ints(c[5]), ints(c[6]),
            std::stoll(c[7]), std::stoll(c[8]), std::stoll(c[9]), std::stoll(c[10]), {}};
    add_entry(st, c[0], std::move(e));
    ++n;
  }
  return n;
}

// Reads a pending index (see use_directory). Caller holds the lock.
void ensure_index(State& st) {
  if (st.pending_dir.empty()) return;
  const std::string dir = std::move(st.pending_dir);
  st.pending_dir.clear();
  load_index(st, dir);
}

// Why `e` cannot run launch `l` (empty: it can).
std::string mismatch(const Entry& e, const Launch& l) {
  std::ostringstream why;
  if (e.param_bytes.size() != l.args.size() + 2 || e.param_names.size() != l.args.size()) {
    why << "the prebuilt " << e.name << " takes " << e.param_bytes.size()
        << " parameters, the launch packs " << l.args.size() << " + 2 scratch pointers";
    return why.str();
  }
  for (size_t i = 0; i < l.args.size(); ++i) {
    const Arg& a = l.args[i];
    if (a.name != e.param_names[i] || width(a.kind) != e.param_bytes[i]) {
      why << "parameter " << i << " of the prebuilt " << e.name << " is '" << e.param_names[i]
          << "' (" << e.param_bytes[i] << " bytes), the launch packs '" << a.name << "' ("
          << kKindNames[static_cast<int>(a.kind)] << ")";
      return why.str();
    }
    if (a.kind == Kind::I32) {
      const auto v = static_cast<int64_t>(a.bits);
      if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
        why << "argument '" << a.name << "'=" << v << " needs 64 bits";
        return why.str();
      }
    }
  }
  for (int64_t i : e.aligned) {
    if (l.args[i].bits % 16 != 0) {
      why << "argument '" << l.args[i].name << "' is not "
          << (l.args[i].kind == Kind::Ptr ? "16-byte aligned" : "a multiple of 16");
      return why.str();
    }
  }
  if (l.grid[0] > std::numeric_limits<int32_t>::max() || l.grid[1] > 65535 ||
      l.grid[2] > 65535) {
    why << "grid (" << l.grid[0] << ", " << l.grid[1] << ", " << l.grid[2]
        << ") exceeds CUDA's limits";
    return why.str();
  }
  return "";
}

std::string arch_list(const std::vector<int64_t>& archs) {
  std::ostringstream s;
  for (size_t i = 0; i < archs.size(); ++i) s << (i ? ", " : "") << "sm_" << archs[i];
  return s.str();
}

// The entry for `l` on `arch`: an exact architecture first, else the newest one of the same
// major version below it (a cubin for sm_80 runs on sm_86 and sm_89). Caller holds the lock;
// the entry returned stays alive as long as the caller keeps it, whatever the registry does.
std::shared_ptr<Entry> find(State& st, const Launch& l, int64_t arch, std::string& why) {
  ensure_index(st);
  auto it = st.kernels.find(l.key);
  if (it == st.kernels.end()) {
    why = "kernel " + l.key + " is not prebuilt";
    return nullptr;
  }
  std::vector<std::shared_ptr<Entry>> cands;
  for (auto& e : it->second) {
    if (e->arch <= arch && e->arch / 10 == arch / 10) cands.push_back(e);
  }
  std::stable_sort(cands.begin(), cands.end(),
                   [](const auto& a, const auto& b) { return a->arch > b->arch; });
  if (cands.empty()) {
    why = "kernel " + l.key + " is not prebuilt for sm_" + std::to_string(arch);
    return nullptr;
  }
  for (auto& e : cands) {
    std::string m = mismatch(*e, l);
    if (m.empty()) return e;
    if (why.empty()) why = m;
  }
  return nullptr;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f.good()) throw std::runtime_error("fastdiff: cannot read the prebuilt kernel " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// The device's info, read once. Caller holds the lock.
const DeviceInfo& device_info(State& st, int index) {
  auto it = st.devices.find(index);
  if (it != st.devices.end()) return it->second;
  const Driver& d = driver();
  CUdevice dev;
  check_cu(d.cuDeviceGet(&dev, index), "cuDeviceGet");
  int major = 0, minor = 0, optin = 0;
  check_cu(d.cuDeviceGetAttribute(&major, kAttrCcMajor, dev), "cuDeviceGetAttribute");
  check_cu(d.cuDeviceGetAttribute(&minor, kAttrCcMinor, dev), "cuDeviceGetAttribute");
  check_cu(d.cuDeviceGetAttribute(&optin, kAttrSharedOptin, dev), "cuDeviceGetAttribute");
  return st.devices[index] = DeviceInfo{major * 10 + minor, optin};
}

// Loads `e` into the device's primary context (once). Caller holds the lock and a device guard.
CUfunction load(Entry& e, int index, const DeviceInfo& info) {
  auto it = e.loaded.find(index);
  if (it != e.loaded.end()) return it->second;
  const Driver& d = driver();
  CUcontext ctx = nullptr;
  check_cu(d.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (!ctx) {
    CUdevice dev;
    check_cu(d.cuDeviceGet(&dev, index), "cuDeviceGet");
    check_cu(d.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check_cu(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
  }
  const std::vector<char> image = read_file(e.path);
  CUmodule mod;
  check_cu(d.cuModuleLoadData(&mod, image.data()), "cuModuleLoadData");
  CUfunction fn;
  check_cu(d.cuModuleGetFunction(&fn, mod, e.name.c_str()), "cuModuleGetFunction");
  if (e.shared > kDefaultShared) {  // as Triton's loader: opt in to the device's maximum
    int stat = 0;
    check_cu(d.cuFuncGetAttribute(&stat, kFuncSharedStatic, fn), "cuFuncGetAttribute");
    check_cu(d.cuFuncSetAttribute(fn, kFuncMaxDynamicShared,
                                  static_cast<int>(info.shared_optin) - stat),
             "cuFuncSetAttribute");
  }
  return e.loaded[index] = fn;
}

}  // namespace

Arg Arg::ptr(const char* name, const torch::stable::Tensor& t, const char* type) {
  using torch::headeronly::ScalarType;
  std::string dtype;
  switch (t.scalar_type()) {
    case ScalarType::Float: dtype = "*fp32"; break;
    case ScalarType::Half: dtype = "*fp16"; break;
    case ScalarType::BFloat16: dtype = "*bf16"; break;
    case ScalarType::Long: dtype = "*i64"; break;
    case ScalarType::Int: dtype = "*i32"; break;
    default:
      if (!type) {
        throw std::runtime_error(cat("fastdiff: no kernel type for dtype ",
                                     static_cast<int>(t.scalar_type())));
      }
  }
  return {name, Kind::Ptr, reinterpret_cast<uint64_t>(t.data_ptr()), type ? type : dtype};
}
Arg Arg::i32(const char* name, int64_t v) {
  return {name, Kind::I32, static_cast<uint64_t>(v), "i32"};
}
Arg Arg::i64(const char* name, int64_t v) {
  return {name, Kind::I64, static_cast<uint64_t>(v), "i64"};
}
Arg Arg::f32(const char* name, double v) {
  const float f = static_cast<float>(v);
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return {name, Kind::F32, b, "fp32"};
}

Launch make_launch(const std::string& kernel, std::array<int64_t, 3> grid, std::vector<Arg> args,
                   const std::vector<std::pair<std::string, int64_t>>& constexprs) {
  std::string k = kernel + "(";
  for (size_t i = 0; i < args.size(); ++i) k += (i ? "," : "") + args[i].type;
  k += ")[";
  for (size_t i = 0; i < constexprs.size(); ++i) {
    k += (i ? "," : "") + constexprs[i].first + "=" + std::to_string(constexprs[i].second);
  }
  return {k + "]", grid, std::move(args)};
}

Mode mode() {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  if (!st.mode) st.mode = mode_from_env();
  return *st.mode;
}

std::string mode_name() {
  const Mode m = mode();
  for (const auto& [name, each] : kModes) {
    if (each == m) return name;
  }
  return "?";
}

std::string set_mode(const std::string& name) {
  const std::optional<Mode> m = parse_mode(name);
  if (!m) {
    throw std::invalid_argument("set_prebuilt: argument 'mode' must be one of 'off', 'on', "
                                "'require', got '" + name + "'");
  }
  std::string previous = mode_name();
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  st.mode = m;
  return previous;
}

void register_kernel(const std::string& key, int64_t arch, const std::string& path,
                     const std::string& name, const std::vector<std::string>& param_names,
                     const std::vector<int64_t>& param_bytes, const std::vector<int64_t>& aligned,
                     int64_t num_warps, int64_t shared, int64_t global_scratch_size,
                     int64_t profile_scratch_size) {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  ensure_index(st);
  add_entry(st, key, Entry{arch, path, name, param_names, param_bytes, aligned, num_warps,
                           shared, global_scratch_size, profile_scratch_size, {}});
}

int64_t use_directory(const std::string& dir, bool lazy) {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  st.kernels.clear();
  st.archs.clear();
  st.pending_dir.clear();
  if (lazy) {
    st.pending_dir = dir;
    return -1;
  }
  return load_index(st, dir);
}

void clear_registry() {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  st.kernels.clear();
  st.archs.clear();
  st.pending_dir.clear();
}

void forget_loaded() {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  for (auto& kv : st.kernels) {
    for (auto& e : kv.second) e->loaded.clear();
  }
}

int64_t registry_size() {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  ensure_index(st);
  int64_t n = 0;
  for (auto& kv : st.kernels) n += static_cast<int64_t>(kv.second.size());
  return n;
}

Selection select(const Launch& l, int64_t arch) {
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  Selection s;
  if (auto e = find(st, l, arch, s.reason)) {
    s.path = e->path;
    s.reason.clear();
  }
  return s;
}

std::optional<std::string> unavailable(const torch::stable::Tensor& subject) {
  if (mode() == Mode::Off) return std::string();  // asked for: the JIT runs without a log line
  State& st = state();
  std::lock_guard<std::mutex> g(st.mu);
  ensure_index(st);
  if (st.kernels.empty()) {
    return std::string("no prebuilt kernels are installed (a source or editable install; "
                       "`pip wheel .` builds them into the wheel, `make prebuilt` into the tree)");
  }
  const Driver& d = driver();
  if (!d.error.empty()) return d.error;
  if (!subject.is_cuda()) return std::string("not a CUDA tensor");
  if (!current_stream_fn()) {
    return std::string("torch's aoti_torch_get_current_cuda_stream was not found (libtorch_cuda)");
  }
  const DeviceInfo& info = device_info(st, subject.get_device_index());
  for (int64_t a : st.archs) {
    if (a <= info.arch && a / 10 == info.arch / 10) return std::nullopt;
  }
  return "no prebuilt kernels for this GPU's sm_" + std::to_string(info.arch) + " (built: " +
         arch_list(st.archs) + ")";
}

std::optional<std::string> launch(const std::vector<Launch>& launches,
                                  const torch::stable::Tensor& subject) {
  if (!driver().error.empty() || !subject.is_cuda() || !current_stream_fn()) {
    throw std::runtime_error("fastdiff: prebuilt::launch called although prebuilt kernels are "
                             "unavailable: " + driver().error);
  }
  const int index = subject.get_device_index();
  const torch::stable::Device device(torch::headeronly::DeviceType::CUDA, index);
  torch::stable::accelerator::DeviceGuard guard(index);
  State& st = state();
  // The entries are held (shared) until the launches are done: the lock is released before
  // the driver calls, and a registry change meanwhile must not free what is being launched.
  std::vector<std::pair<std::shared_ptr<const Entry>, CUfunction>> fns;
  {
    std::lock_guard<std::mutex> g(st.mu);
    const DeviceInfo& info = device_info(st, index);
    for (const Launch& l : launches) {
      std::string why;
      std::shared_ptr<Entry> e = find(st, l, info.arch, why);
      if (!e) return why;
      if (e->shared > info.shared_optin) {
        return "kernel " + l.key + " needs " + std::to_string(e->shared) +
               " bytes of shared memory, this GPU allows " + std::to_string(info.shared_optin);
      }
      fns.emplace_back(e, load(*e, index, info));
    }
  }
  void* raw_stream = nullptr;
  if (current_stream_fn()(index, &raw_stream) != AOTI_TORCH_SUCCESS) {
    throw std::runtime_error("fastdiff: aoti_torch_get_current_cuda_stream failed");
  }
  auto stream = static_cast<CUstream>(raw_stream);
  for (size_t i = 0; i < launches.size(); ++i) {
    const Launch& l = launches[i];
    const Entry& e = *fns[i].first;
    const int64_t programs = l.grid[0] * l.grid[1] * l.grid[2];
    if (programs == 0) continue;
    // Scratch buffers: per program, as Triton's launcher allocates them (none of fastdiff's
    // kernels needs one today; kept so that a future kernel that does is launched correctly).
    torch::stable::Tensor scratch[2];
    const int64_t sizes[2] = {e.global_scratch, e.profile_scratch};
    uint64_t scratch_ptr[2] = {0, 0};
    for (int s = 0; s < 2; ++s) {
      if (sizes[s] > 0) {
        scratch[s] = torch::stable::empty({sizes[s] * programs},
                                          torch::headeronly::ScalarType::Byte, std::nullopt,
                                          device);
        scratch_ptr[s] = reinterpret_cast<uint64_t>(scratch[s].data_ptr());
      }
    }
    union Value {
      uint64_t u64;
      uint32_t u32;
    };
    std::vector<Value> values(l.args.size() + 2);
    std::vector<void*> params(l.args.size() + 2);
    for (size_t a = 0; a < l.args.size(); ++a) {
      if (width(l.args[a].kind) == 4) {
        values[a].u32 = static_cast<uint32_t>(l.args[a].bits);
      } else {
        values[a].u64 = l.args[a].bits;
      }
      params[a] = &values[a];
    }
    for (int s = 0; s < 2; ++s) {
      values[l.args.size() + s].u64 = scratch_ptr[s];
      params[l.args.size() + s] = &values[l.args.size() + s];
    }
    check_cu(driver().cuLaunchKernel(fns[i].second, static_cast<unsigned>(l.grid[0]),
                                     static_cast<unsigned>(l.grid[1]),
                                     static_cast<unsigned>(l.grid[2]),
                                     static_cast<unsigned>(32 * e.num_warps), 1, 1,
                                     static_cast<unsigned>(e.shared), stream, params.data(),
                                     nullptr),
             "cuLaunchKernel");
  }
  return std::nullopt;
}

std::string launches_text(const std::vector<Launch>& launches) {
  std::ostringstream s;
  for (const Launch& l : launches) {
    s << l.key << '\t' << l.grid[0] << ',' << l.grid[1] << ',' << l.grid[2] << '\t';
    for (size_t i = 0; i < l.args.size(); ++i) {
      const Arg& a = l.args[i];
      s << (i ? ";" : "") << a.name << ':' << kKindNames[static_cast<int>(a.kind)] << ':'
        << a.bits;
    }
    s << '\n';
  }
  return s.str();
}

Launch launch_from_text(const std::string& line) {
  const auto fields = split(line, '\t');
  if (fields.size() != 3) {
    throw std::invalid_argument("fastdiff: a launch line has 3 tab-separated fields, got " +
                                std::to_string(fields.size()));
  }
  Launch l;
  l.key = fields[0];
  const auto g = split(fields[1], ',');
  if (g.size() != 3) throw std::invalid_argument("fastdiff: a launch's grid has 3 dimensions");
  l.grid = {std::stoll(g[0]), std::stoll(g[1]), std::stoll(g[2])};
  for (const std::string& a : split(fields[2], ';')) {
    const auto p = split(a, ':');
    if (p.size() != 3) {
      throw std::invalid_argument("fastdiff: a launch argument is name:kind:bits, got '" + a + "'");
    }
    const auto* k = std::find(std::begin(kKindNames), std::end(kKindNames), p[1]);
    if (k == std::end(kKindNames)) {
      throw std::invalid_argument("fastdiff: no argument kind '" + p[1] + "'");
    }
    l.args.push_back({p[0], static_cast<Kind>(k - std::begin(kKindNames)), std::stoull(p[2]), ""});
  }
  return l;
}

int64_t live_entries() { return g_live_entries.load(); }

HoldReport hold_and_read(const Launch& l, int64_t arch, int64_t reads, bool change_registry) {
  State& st = state();
  HoldReport r;
  std::shared_ptr<const Entry> e;
  {
    std::lock_guard<std::mutex> g(st.mu);
    e = find(st, l, arch, r.why);
    if (!e) return r;
    r.name = e->name;
  }
  if (change_registry) clear_registry();
  r.live = live_entries();
  for (int64_t i = 0; i < reads; ++i) {
    r.intact += e->name == r.name && e->param_names.size() == l.args.size() &&
                e->param_bytes.size() == l.args.size() + 2;
  }
  return r;
}

}  // namespace fastdiff::prebuilt
