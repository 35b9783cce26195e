// fastdiff::denoise_step: classifier-free guidance, the solver update and the noise in one pass.
// Schema in ops.cpp; Triton kernel and plan in kernels/denoise_step.py.
//
// The solver is not known here: it lives in the per-step table of version-2 rows (float32,
// (S, ROW_LEN); layout and meaning in fastdiff/schedules.py, "the step row, version 2"; float64
// definition in fastdiff/reference.py), so one loop serves every solver. With m the model output
// (guided: [uncond; cond], twice the sample's batch, combined as u + s * (c - u)), x the sample,
// n the noise of this step and s_0..s_{K-1} the K slots of `state` (K, *sample.shape), inputs
// v = (x, m, n, s_0, ..., s_{K-1}):
//   x0  = clip(sum_k P_k v_k, -r, r) if clip_sample else sum_k P_k v_k
//   out = sum_k O_k v_k + O_x0 * x0
//   s_j <- sum_k S_jk v_k + S_j,x0 * x0   in place, for each slot j < K with W_j != 0
// All slots are read before any is written (per element: each element is independent). Returns
// (out, x0 or an empty tensor). The row is read at step_index, a tensor: on the CPU an index out
// of range raises, and so does a row with a non-zero coefficient on a slot the call does not
// pass; on the GPU, where checking either would need a sync, an index out of range makes every
// output and every slot NaN, and coefficients on absent slots are ignored (read as zeros).
#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "ops.h"

namespace fastdiff {
namespace {

namespace cfg = config::denoise_step;
// The row layout (kernels/denoise_step.py's copy of fastdiff.schedules'): inputs v = (x, m, n,
// s_0..s_3), so slot j is input kVS + j; an O or S row has x0's coefficient at index NUM_V.
constexpr int kSlots = cfg::SLOTS;
constexpr int kNumV = cfg::NUM_V;
constexpr int kVX = 0, kVM = 1, kVN = 2, kVS = 3;
static_assert(kNumV == kVS + kSlots && cfg::ROW_LEN == cfg::ROW_S + kSlots * (kNumV + 1),
              "kernels/denoise_step.py's row layout is not schedules' (x, m, n, slots)");

using Out = std::tuple<Tensor, Tensor>;

// Whether a's sizes from dim `from_a` on equal b's from dim `from_b` on.
bool same_tail(const Tensor& a, int64_t from_a, const Tensor& b, int64_t from_b) {
  if (a.dim() - from_a != b.dim() - from_b) return false;
  for (int64_t d = 0; d + from_a < a.dim(); ++d) {
    if (a.size(d + from_a) != b.size(d + from_b)) return false;
  }
  return true;
}

struct DenoiseStep {  // a call's arguments, in schema order
  static constexpr char name[] = "denoise_step";
  static constexpr char schema[] =
      "(Tensor model_output, Tensor sample, Tensor coeffs, Tensor step_index, "
      "Tensor? noise=None, Tensor(a!)? state=None, float guidance_scale=1.0, "
      "bool clip_sample=False, float clip_sample_range=1.0, bool write_x0=False, "
      "bool? guided=None) -> (Tensor, Tensor)";
  using Sig = Out(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                  const std::optional<Tensor>&, const std::optional<Tensor>&, double,
                  bool, double, bool, std::optional<bool>);
  const Tensor& model_output;
  const Tensor& sample;
  const Tensor& coeffs;
  const Tensor& step_index;
  const std::optional<Tensor>& noise;
  const std::optional<Tensor>& state;  // (K, *sample.shape), updated in place
  double guidance_scale;
  bool clip_sample;
  double clip_sample_range;
  bool write_x0;
  std::optional<bool> guided;  // absent: guided when model_output has twice the batch of sample
};

const Tensor& subject(const DenoiseStep& a) { return a.sample; }

// After check(): whether model_output is [uncond; cond].
bool is_guided(const DenoiseStep& a) {
  return a.guided.value_or(a.model_output.size(0) == 2 * a.sample.size(0));
}

// After check(): the number of state slots the call passes.
int num_slots(const DenoiseStep& a) {
  return a.state ? static_cast<int>(a.state->size(0)) : 0;
}

void check_state(const DenoiseStep& a) {
  const char* op = DenoiseStep::name;
  const Tensor &sample = a.sample, &state = *a.state;
  check_same_device(op, sample, "sample", state, "state");
  std::ostringstream want;
  want << "(K";
  for (int64_t d : sample.sizes()) want << ", " << d;
  want << ")";
  FD_CHECK(same_tail(state, 1, sample, 0), op,
           "argument 'state' must have shape (K, *sample.shape) = ", want.str(), ", got ",
           shape_str(state));
  FD_CHECK(state.size(0) >= 1 && state.size(0) <= kSlots, op, "argument 'state' must hold 1 to ",
           kSlots, " slots (its dim 0; None for no state), got ", state.size(0));
  FD_CHECK(state.scalar_type() == sample.scalar_type(), op,
           "argument 'state' must have the dtype of 'sample' (", dtype_str(sample.scalar_type()),
           "), got ", dtype_str(state.scalar_type()));
  FD_CHECK(state.is_contiguous(), op, "argument 'state' must be contiguous, got strides ",
           strides_str(state));
  if (is_meta(state)) return;  // no memory to overlap
  // The state is written in place: it must not share memory with what the step reads.
  const std::pair<const Tensor*, const char*> reads[] = {
      {&a.sample, "sample"}, {&a.model_output, "model_output"},
      {a.noise ? &*a.noise : nullptr, "noise"}, {&a.coeffs, "coeffs"},
      {&a.step_index, "step_index"}};
  for (auto [t, name] : reads) {
    if (t == nullptr) continue;
    FD_CHECK(!may_overlap(state, *t), op,
             "argument 'state' must not share memory with '", name, "' (it is written in place)");
  }
}

void check(const DenoiseStep& a) {
  const char* op = DenoiseStep::name;
  const Tensor &sample = a.sample, &model_output = a.model_output;
  FD_CHECK(sample.dim() >= 1, op, "argument 'sample' must have a batch dimension, got a 0-d tensor");
  FD_CHECK(is_float_dtype(sample.scalar_type()), op,
           "argument 'sample' must have dtype float32, float16 or bfloat16, got ",
           dtype_str(sample.scalar_type()));
  FD_CHECK(sample.is_contiguous(), op, "argument 'sample' must be contiguous, got strides ",
           strides_str(sample));
  const int64_t N = sample.size(0);
  check_same_device(op, sample, "sample", model_output, "model_output");
  FD_CHECK(model_output.scalar_type() == sample.scalar_type(), op,
           "argument 'model_output' must have the dtype of 'sample' (", dtype_str(sample.scalar_type()),
           "), got ", dtype_str(model_output.scalar_type()));
  FD_CHECK(model_output.is_contiguous(), op,
           "argument 'model_output' must be contiguous, got strides ",
           strides_str(model_output));
  bool same_rest = model_output.dim() == sample.dim() && same_tail(model_output, 1, sample, 1);
  // Guided as the caller says, else when model_output has twice the batch.
  const bool guided = a.guided.value_or(same_rest && N > 0 && model_output.size(0) == 2 * N);
  FD_CHECK(same_rest && model_output.size(0) == (guided ? 2 * N : N), op,
           "argument 'model_output' must have the shape of 'sample' ", shape_str(sample),
           " or, for classifier-free guidance, twice its batch ([uncond; cond]), got ",
           shape_str(model_output), !a.guided ? "" : guided ? " with guided=True"
                                                            : " with guided=False");
  // u + g (c - u) in float32: beyond 1e6 it overflows for ordinary model outputs (all NaN).
  FD_CHECK(std::isfinite(a.guidance_scale) && std::abs(a.guidance_scale) <= 1e6, op,
           "argument 'guidance_scale' must be finite and within [-1e6, 1e6] (it is applied in "
           "float32), got ", a.guidance_scale);
  FD_CHECK(guided || a.guidance_scale == 1.0, op, "argument 'guidance_scale'=", a.guidance_scale,
           " needs 'model_output' with batch 2*N=", 2 * N, " ([uncond; cond]), got ",
           shape_str(model_output));
  if (a.noise) {
    const Tensor& e = *a.noise;
    check_same_device(op, sample, "sample", e, "noise");
    FD_CHECK(same_shape(e, sample), op, "argument 'noise' must have the shape of 'sample' ",
             shape_str(sample), ", got ", shape_str(e));
    FD_CHECK(e.scalar_type() == sample.scalar_type(), op,
             "argument 'noise' must have the dtype of 'sample' (", dtype_str(sample.scalar_type()),
             "), got ", dtype_str(e.scalar_type()));
    FD_CHECK(e.is_contiguous(), op, "argument 'noise' must be contiguous, got strides ",
             strides_str(e));
  }
  const Tensor &coeffs = a.coeffs, &step_index = a.step_index;
  check_same_device(op, sample, "sample", coeffs, "coeffs");
  FD_CHECK(coeffs.dim() == 2 && coeffs.size(1) == cfg::ROW_LEN && coeffs.size(0) >= 1, op,
           "argument 'coeffs' must have shape (num_steps, ", cfg::ROW_LEN,
           ") (fastdiff.schedules' version-2 rows), got ", shape_str(coeffs));
  FD_CHECK(coeffs.scalar_type() == ScalarType::Float, op, "argument 'coeffs' must have dtype float32, got ",
           dtype_str(coeffs.scalar_type()));
  FD_CHECK(coeffs.is_contiguous(), op, "argument 'coeffs' must be contiguous, got strides ",
           strides_str(coeffs));
  check_same_device(op, sample, "sample", step_index, "step_index");
  FD_CHECK(step_index.scalar_type() == ScalarType::Long ||
               step_index.scalar_type() == ScalarType::Int, op,
           "argument 'step_index' must be an int64 or int32 tensor, got ", dtype_str(step_index.scalar_type()));
  FD_CHECK(step_index.numel() == 1, op, "argument 'step_index' must hold one element, got shape ",
           shape_str(step_index));
  if (a.clip_sample) {
    FD_CHECK(std::isfinite(a.clip_sample_range) && a.clip_sample_range > 0 &&
                 a.clip_sample_range <= std::numeric_limits<float>::max(),
             op, "argument 'clip_sample_range' must be positive and finite in float32, got ",
             a.clip_sample_range);
  }
  if (a.state) check_state(a);  // last: its overlap check needs the other arguments valid
}

Out empty(const DenoiseStep& a) {
  return {dense_like(a.sample), a.write_x0 ? dense_like(a.sample) : new_contiguous(a.sample, {0})};
}

// ---- CPU kernel ----

// One row, as the loop reads it.
struct Row {
  float p[kNumV];                // x0 = sum_k p[k] v_k
  float o[kNumV + 1];            // out = sum_k o[k] v_k + o[kNumV] x0
  float s[kSlots][kNumV + 1];    // new s_j, likewise
  bool write[kSlots];            // W_j != 0
  float guidance, clip_lo, clip_hi;
};

// sum_k c[k] v[k] over the inputs a call has: x, m, n (when kNoise) and K slots.
template <int K, bool kNoise>
inline float affine(const float* c, const float* v) {
  float y = c[kVX] * v[kVX] + c[kVM] * v[kVM];
  if constexpr (kNoise) y += c[kVN] * v[kVN];
  for (int j = 0; j < K; ++j) y += c[kVS + j] * v[kVS + j];
  return y;
}

// Elements per tile of a call with state: each tile's new slot values wait in `fresh` until
// every element of the tile has read the old ones.
constexpr int64_t kTile = 256;

// One contiguous range [begin, end) of the flattened sample. Branch-free inner loops so that the
// float32 case vectorizes; the slot count and the optional inputs are template arguments. Slot
// j of the state is state[j * numel + i].
template <typename scalar_t, int K, bool kGuided, bool kNoise, bool kWriteX0>
void step_range(const Row& r, const scalar_t* __restrict__ mo, const scalar_t* __restrict__ x,
                const scalar_t* __restrict__ noise, scalar_t* __restrict__ state,
                scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out, int64_t numel,
                int64_t begin, int64_t end) {
  const float g = r.guidance, lo = r.clip_lo, hi = r.clip_hi;
  float fresh[K > 0 ? K : 1][kTile];
  for (int64_t t0 = begin, t1; t0 < end; t0 = t1) {
    t1 = K > 0 ? std::min(end, t0 + kTile) : end;  // no state: one pass, no tiles
    for (int64_t i = t0; i < t1; ++i) {
      float v[kNumV];
      float m = static_cast<float>(mo[i]);
      if constexpr (kGuided) m = m + g * (static_cast<float>(mo[i + numel]) - m);
      v[kVX] = static_cast<float>(x[i]);
      v[kVM] = m;
      v[kVN] = kNoise ? static_cast<float>(noise[i]) : 0.f;
      for (int j = 0; j < K; ++j) v[kVS + j] = static_cast<float>(state[j * numel + i]);
      const float x0 = std::min(std::max(affine<K, kNoise>(r.p, v), lo), hi);
      out[i] = static_cast<scalar_t>(affine<K, kNoise>(r.o, v) + r.o[kNumV] * x0);
      if constexpr (kWriteX0) x0_out[i] = static_cast<scalar_t>(x0);
      for (int j = 0; j < K; ++j) {
        fresh[j][i - t0] = affine<K, kNoise>(r.s[j], v) + r.s[j][kNumV] * x0;
      }
    }
    for (int j = 0; j < K; ++j) {
      if (!r.write[j]) continue;
      scalar_t* __restrict__ s = state + j * numel;
      for (int64_t i = t0; i < t1; ++i) s[i] = static_cast<scalar_t>(fresh[j][i - t0]);
    }
  }
}

template <typename scalar_t>
struct Ptrs {
  const scalar_t *mo, *x, *noise;
  scalar_t *state, *out, *x0;
  int64_t numel;
};

// Expands the three runtime flags (guided, noise, write_x0) into template arguments, one at a
// time, then runs the step over the whole sample.
template <typename scalar_t, int K, bool... kDone>
void dispatch_flags(const bool* flags, const Row& r, const Ptrs<scalar_t>& p) {
  if constexpr (sizeof...(kDone) == 3) {
    torch::stable::parallel_for(0, p.numel, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
      step_range<scalar_t, K, kDone...>(r, p.mo, p.x, p.noise, p.state, p.out, p.x0, p.numel,
                                        begin, end);
    });
  } else if (flags[0]) {
    dispatch_flags<scalar_t, K, kDone..., true>(flags + 1, r, p);
  } else {
    dispatch_flags<scalar_t, K, kDone..., false>(flags + 1, r, p);
  }
}

template <typename scalar_t>
void dispatch_slots(int k, const bool* flags, const Row& r, const Ptrs<scalar_t>& p) {
  static_assert(kSlots == 4, "one case per slot count");
  switch (k) {
    case 0: return dispatch_flags<scalar_t, 0>(flags, r, p);
    case 1: return dispatch_flags<scalar_t, 1>(flags, r, p);
    case 2: return dispatch_flags<scalar_t, 2>(flags, r, p);
    case 3: return dispatch_flags<scalar_t, 3>(flags, r, p);
    default: return dispatch_flags<scalar_t, 4>(flags, r, p);
  }
}

// Row idx of the table, checked against the slots the call passes: a coefficient on a slot
// beyond them would be silently read as zero (schedules.py: they must be 0).
Row read_row(const DenoiseStep& a, int64_t idx, int k) {
  const float* c = a.coeffs.const_data_ptr<float>() + idx * cfg::ROW_LEN;
  const float* s_rows = c + cfg::ROW_S;
  for (int j = k; j < kSlots; ++j) {
    bool used = c[cfg::ROW_P + kVS + j] != 0 || c[cfg::ROW_O + kVS + j] != 0 ||
                c[cfg::ROW_W + j] != 0;
    for (int i = 0; i < k; ++i) used = used || s_rows[i * (kNumV + 1) + kVS + j] != 0;
    FD_CHECK(!used, DenoiseStep::name, "argument 'coeffs' row ", idx, " reads or writes state slot ",
             j, ", but ", k == 0 ? std::string("no 'state' was passed")
                                 : "'state' holds " + std::to_string(k) + " slot(s)");
  }
  Row r;
  std::copy(c + cfg::ROW_P, c + cfg::ROW_P + kNumV, r.p);
  std::copy(c + cfg::ROW_O, c + cfg::ROW_O + kNumV + 1, r.o);
  for (int j = 0; j < kSlots; ++j) {
    std::copy(s_rows + j * (kNumV + 1), s_rows + (j + 1) * (kNumV + 1), r.s[j]);
    r.write[j] = c[cfg::ROW_W + j] != 0;
  }
  r.guidance = static_cast<float>(a.guidance_scale);
  r.clip_lo = a.clip_sample ? static_cast<float>(-a.clip_sample_range) : -INFINITY;
  r.clip_hi = a.clip_sample ? static_cast<float>(a.clip_sample_range) : INFINITY;
  return r;
}

Out cpu(const DenoiseStep& a) {
  // On the CPU the step index and its row can be read without a device sync: check them here.
  const int64_t idx = a.step_index.scalar_type() == ScalarType::Long
                          ? *a.step_index.const_data_ptr<int64_t>()
                          : *a.step_index.const_data_ptr<int32_t>();
  FD_CHECK(idx >= 0 && idx < a.coeffs.size(0), DenoiseStep::name, "argument 'step_index'=", idx,
           " is out of range for 'coeffs' with ", a.coeffs.size(0), " steps");
  const int k = num_slots(a);
  const Row row = read_row(a, idx, k);
  Out result = empty(a);
  if (a.sample.numel() == 0) return result;
  auto& [out, x0] = result;
  const bool flags[3] = {is_guided(a), a.noise.has_value(), a.write_x0};
  dispatch_float(a.sample.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Ptrs<scalar_t> p{a.model_output.const_data_ptr<scalar_t>(),
                           a.sample.const_data_ptr<scalar_t>(),
                           a.noise ? a.noise->const_data_ptr<scalar_t>() : nullptr,
                           a.state ? a.state->mutable_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(),
                           a.write_x0 ? x0.mutable_data_ptr<scalar_t>() : nullptr,
                           a.sample.numel()};
    dispatch_slots<scalar_t>(k, flags, row, p);
  });
  return result;
}

// ---- CUDA plan: kernels/denoise_step.py ----

Plan<Out> plan(const DenoiseStep& a) {
  Out result = empty(a);
  const auto& [out, x0] = result;
  const int64_t numel = a.sample.numel();
  const double r = a.clip_sample ? a.clip_sample_range : INFINITY;
  using prebuilt::Arg;
  // Absent inputs and x0 get a stand-in pointer that is never touched (masked off, or no slot
  // read) so that the argument types, hence the compiled kernel, stay the same.
  prebuilt::Launch launch = prebuilt::make_launch(
      "denoise_step", {cdiv(numel, cfg::BLOCK), 1, 1},
      {Arg::ptr("mo_ptr", a.model_output), Arg::ptr("x_ptr", a.sample),
       Arg::ptr("noise_ptr", a.noise.value_or(a.sample)),
       Arg::ptr("state_ptr", a.state.value_or(a.sample)), Arg::ptr("coef_ptr", a.coeffs),
       Arg::ptr("idx_ptr", a.step_index), Arg::ptr("out_ptr", out),
       Arg::ptr("x0_ptr", a.write_x0 ? x0 : out), Arg::i32("numel", numel),
       Arg::i32("num_steps", a.coeffs.size(0)), Arg::f32("guidance", a.guidance_scale),
       Arg::f32("clip_lo", -r), Arg::f32("clip_hi", r), Arg::i32("guided", is_guided(a)),
       Arg::i32("has_noise", a.noise.has_value()), Arg::i32("write_x0", a.write_x0)},
      {{"NUM_SLOTS", num_slots(a)}, {"BLOCK", cfg::BLOCK}});
  return {{launch}, result, {}, ""};
}

}  // namespace
}  // namespace fastdiff

// The schemas, and one implementation for every backend (ops.h).
FASTDIFF_REGISTER_OP(fastdiff::DenoiseStep)
