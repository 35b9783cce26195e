// fastdiff: launching the prebuilt kernels (Triton kernels compiled ahead of time) from C++.
//
// The wheel carries cubins compiled by kernels/prebuild.py for sm_80/86/89/90 with manifest.json
// and index.tsv; fastdiff/prebuilt.py names their directory at import (use_directory) and the
// index is read here at the first CUDA call. An op's CUDA kernel (Entry in ops.h) plans its
// launches (a Launch: the kernel's key, grid and arguments in signature order) and hands them
// to launch(), which launches each cubin with cuLaunchKernel on the current torch stream.
// libcuda is opened at the first launch, so the extension imports on machines without a GPU or
// driver.
//
// launch() launches nothing and returns the reason when any planned kernel is not prebuilt for
// the device (another architecture, an argument that breaks the cubin's alignment assumption,
// a size beyond a 32-bit parameter, ...); the op then runs the Triton JIT path instead.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fastdiff::prebuilt {

// How a parameter is passed: a device pointer (8 bytes), a 32- or 64-bit int, or fp32 bits.
enum class Kind : uint8_t { Ptr, I32, I64, F32 };
inline const char* const kKindNames[] = {"ptr", "i32", "i64", "fp32"};  // by Kind

struct Arg {
  std::string name;  // the kernel's parameter name (checked against the manifest at load)
  Kind kind;
  uint64_t bits;     // pointer value, two's complement integer, or the float's bits
  std::string type;  // its Triton type in the kernel's key ("*fp16", "i32", ...)

  // A pointer's type is its tensor's dtype, unless `type` names another.
  static Arg ptr(const char* name, const torch::stable::Tensor& t, const char* type = nullptr);
  static Arg i32(const char* name, int64_t v);
  static Arg i64(const char* name, int64_t v);
  static Arg f32(const char* name, double v);
};

struct Launch {
  std::string key;                // kernel name, parameter types and constexpr values
  std::array<int64_t, 3> grid;    // programs along x, y, z
  std::vector<Arg> args;          // the non-constexpr parameters, in signature order
};

// The launch of `kernel` (its Python name) with these arguments and constexprs (both in
// signature order). Its key is kernels/prebuild.py's kernel_key():
//   "<kernel>(<type>,<type>,...)[NAME=<int>,...]".
Launch make_launch(const std::string& kernel, std::array<int64_t, 3> grid, std::vector<Arg> args,
                   const std::vector<std::pair<std::string, int64_t>>& constexprs);

// When the CUDA ops launch the prebuilt kernels: Off, never (always the Triton JIT); On, when
// they can (the default); Require, always (an op that cannot run them raises instead of falling
// back; the GPU tests use it). Named "off" ("0"), "on" ("1") and "require"; initially from
// FASTDIFF_PREBUILT, or its older name FASTDIFF_AOT.
enum class Mode { Off, On, Require };
Mode mode();
std::string mode_name();
// Sets the mode by name; returns the previous one's name.
std::string set_mode(const std::string& name);

// Registers one compiled kernel (called by fastdiff/prebuilt.py for each manifest entry).
// param_bytes: the widths of every parameter incl. the two scratch pointers (from the PTX);
// aligned: indices of parameters the cubin assumes divisible by 16 (pointers: bytes).
void register_kernel(const std::string& key, int64_t arch, const std::string& path,
                     const std::string& name, const std::vector<std::string>& param_names,
                     const std::vector<int64_t>& param_bytes, const std::vector<int64_t>& aligned,
                     int64_t num_warps, int64_t shared, int64_t global_scratch_size,
                     int64_t profile_scratch_size);
// Registers the kernels of <dir>/index.tsv (kernels/prebuild.py writes it beside the cubins),
// replacing what was registered; lazy: at the first use instead (fastdiff's import costs
// nothing). Returns how many were registered, or -1 when lazy.
int64_t use_directory(const std::string& dir, bool lazy);
void clear_registry();
// Forgets which cubins were loaded, so that the next launch of each loads it again (as in a new
// process; the old modules stay loaded). For first-call benchmarks.
void forget_loaded();
int64_t registry_size();

// The registered kernel a launch would run on a device of the given architecture (e.g. 86):
// its file, or the reason there is none.
struct Selection {
  std::string path, reason;
};
Selection select(const Launch& l, int64_t arch);

// Why prebuilt kernels cannot run on this device at all (no driver, architecture not built; an
// empty reason: mode off, the JIT asked for), or nothing when they may. Checked before an op
// allocates anything for a plan.
std::optional<std::string> unavailable(const torch::stable::Tensor& subject);

// Launches every planned kernel in order on the subject's device's current stream, or none of them and
// returns the reason (see above). Raises on a CUDA driver error. Call it only after
// unavailable(device) returned nothing (each op checks that once, before planning).
std::optional<std::string> launch(const std::vector<Launch>& launches,
                                  const torch::stable::Tensor& subject);

// The launches as text, for the tests' comparison with the Python plans (fastdiff/prebuilt.py
// reads it): per launch a line "key<TAB>gx,gy,gz<TAB>name:kind:bits;name:kind:bits;...".
std::string launches_text(const std::vector<Launch>& launches);
// One line of that text as a Launch (fastdiff/prebuilt.py's launch_line writes it); raises
// std::invalid_argument for a malformed line.
Launch launch_from_text(const std::string& line);
// `s` split at each `sep` (an empty string: no parts; a trailing separator: an empty last part).
std::vector<std::string> split(const std::string& s, char sep);

// For the tests of the registry's ownership (launch() itself needs a GPU): resolves `l` on
// `arch` as launch() does, releases the lock, clears the registry when `change_registry` (as a
// concurrent use_directory would between the resolution and the driver calls), then reads the
// resolved entry `reads` times. name: the entry's kernel (empty and why set when none);
// live: Entry objects alive after the change; intact: reads that found the entry unchanged.
struct HoldReport {
  std::string name, why;
  int64_t live = 0, intact = 0;
};
HoldReport hold_and_read(const Launch& l, int64_t arch, int64_t reads, bool change_registry);
int64_t live_entries();

}  // namespace fastdiff::prebuilt
