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
#include "simd.h"

namespace fastdiff {
namespace {

namespace cfg = config::denoise_step;
// The row layout (kernels/denoise_step.py's copy of fastdiff.schedules'): inputs v = (x, m, n,
// s_0..s_4), so slot j is input kVS + j; an O or S row has x0's coefficient at index NUM_V.
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
//
// A call uses one row for every element, and most of a row's coefficients are 0 (DDIM:
// x0 = P_x x + P_m m, out = O_x x + O_x0 x0; PNDM's slot rows mostly copy one input). So the row
// is first reduced to, per result (x0, out, each slot the row writes), the list of its non-zero
// terms, and the flattened sample is processed in tiles of kTile elements: the inputs as float32
// columns (used in place when they are float32), then each result as one or two passes of FMAs
// over contiguous floats (AVX2: 8 floats a vector), then the stores. The common shape (x0 from
// a few inputs, out from a few and x0) is one pass computing both, with the guided m in
// registers when no slot reads it; without slots, in float32, one pass over the whole range.
//
// Dropping a term 0 * v changes the result only where v is not finite: the float64 reference
// and the Triton kernel multiply every term through, so a 0 * inf or 0 * NaN makes the result
// NaN there. To give their results, a tile where a result, or an input that no result reads,
// is not finite is computed again with every term (the row's dense lists, in the row's order,
// as the kernel did before it skipped zeros), before any slot is written. (A non-finite input read by a result makes that result non-finite: c * inf with
// c != 0 is +-inf, c * NaN is NaN, and a sum with one stays one.)

using simd::Vec;
using simd::i8;
constexpr int64_t kW = Vec::size();

// Elements per tile: every column of a tile stays in L1 (2 KiB each; at most 7 inputs, x0,
// the output and 4 new slot values).
constexpr int64_t kTile = 512;
// Floats read or written per task of parallel_for (RowTerms::traffic per element times the
// elements): a second thread repays its start (a few microseconds) only past about this much
// (measured with the SD1.5 latent, BENCHMARKS.md: DDIM's 4 floats an element over 16384
// elements gain nothing from two threads, DPM-Solver++ 2M's 12 and PNDM's 13 gain 20-25%).
constexpr int64_t kTaskTraffic = int64_t{1} << 17;
// And elements per task, whatever the row: torch's own elementwise ops split no range under
// at::internal::GRAIN_SIZE (32768), so at the SD1.5 latent (16384 elements a sample) diffusers'
// step runs on one thread. A second task gains at most ~1 us there (PNDM's and Heun's rows,
// 16-18 us), and on a CPU shared with other work it waits for a time slice: calls of 4-12 ms
// (1 in 100 at batch 4 with 2 threads, BENCHMARKS.md "per-call cost"), medians of whole rounds
// at ~8 ms a step.
constexpr int64_t kTaskElements = int64_t{1} << 15;

// A tile's columns: the inputs v (kVX, kVM, kVN, kVS + j), then x0, at its index in O and S rows.
constexpr int kX0 = kNumV;
constexpr int kCols = kNumV + 1;

struct Sum {  // y = sum over t < n of c[t] * column col[t], left to right
  int n = 0;
  bool check = false;  // whether the tile checks that y is finite
  int col[kCols];
  float c[kCols];
  void add(int column, float coef) {
    col[n] = column;
    c[n++] = coef;
  }
};

// The row reduced to what a call computes. Each result has two lists: [0] its non-zero terms,
// [1] every term of the inputs the call has, in the row's order (the reference's product).
struct RowTerms {
  Sum x0[2], out[2];
  Sum slot[kSlots][2];  // slot[w]: the new value of slot written[w]
  int written[kSlots];  // the slots with W_j != 0, in order
  int num_written = 0;
  int unread[kNumV];  // inputs the call has that no non-zero term reads: checked on their own
  int num_unread = 0;
  bool need_x0;  // whether the sparse step computes x0 (written, read by a non-zero term, or
                // checked)
  bool slots_read_x0;  // whether a non-zero term of a new slot value reads x0
  // Guided, and only x0 and out read m: computed in x0_out_pass's registers, no column.
  bool virtual_m;
  bool fused;  // x0 and out in one x0_out_pass
  // Fused, no slot written, m virtual or unguided: float32 needs no buffer, so the sparse pass
  // runs over a task's whole range at once (tiles only for a dense recompute).
  bool streaming;
  int traffic;  // floats the sparse step reads or writes per element, in its L1 passes too
  int num_slots;
  bool guided, noise, write_x0, clip;
  float guidance, clip_lo, clip_hi;
};

// Whether x0_out_pass can compute the sparse x0 and out (with m virtual when vm): x0 with up
// to 3 terms besides a virtual m (and at least one term without), out with x0 last and up to 3
// other terms besides a virtual m.
bool fusable(const RowTerms& p, bool vm) {
  const Sum &a = p.x0[0], &b = p.out[0];
  if (b.n < 1 || b.col[b.n - 1] != kX0) return false;
  int n1 = 0, n2 = 0;
  for (int t = 0; t < a.n; ++t) n1 += !(vm && a.col[t] == kVM);
  for (int t = 0; t + 1 < b.n; ++t) n2 += !(vm && b.col[t] == kVM);
  return n1 <= 3 && n2 <= 3 && (vm || n1 >= 1);
}

// The row's coefficients c (NUM_V inputs, then x0's when with_x0) as the two lists of sums.
void add_terms(Sum (&s)[2], const float* c, bool with_x0, const bool* has) {
  for (int i = 0; i < kCols; ++i) {
    if (i == kX0 ? !with_x0 : !has[i]) continue;
    s[1].add(i, c[i]);
    if (c[i] != 0) s[0].add(i, c[i]);  // (a NaN coefficient is kept: NaN != 0)
  }
}

// Row idx of the table, checked against the slots the call passes: a coefficient on a slot
// beyond them would be silently read as zero (schedules.py: they must be 0).
RowTerms read_row(const DenoiseStep& a, int64_t idx, int k) {
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
  RowTerms p;
  p.num_slots = k;
  p.guided = is_guided(a);
  p.noise = a.noise.has_value();
  p.write_x0 = a.write_x0;
  p.clip = a.clip_sample;
  p.guidance = static_cast<float>(a.guidance_scale);
  p.clip_lo = static_cast<float>(-a.clip_sample_range);
  p.clip_hi = static_cast<float>(a.clip_sample_range);
  bool has[kNumV] = {true, true, p.noise};  // absent noise and slots: zeros, no term
  for (int j = 0; j < k; ++j) has[kVS + j] = true;
  add_terms(p.x0, c + cfg::ROW_P, false, has);
  add_terms(p.out, c + cfg::ROW_O, true, has);
  for (int j = 0; j < k; ++j) {
    if (c[cfg::ROW_W + j] == 0) continue;
    add_terms(p.slot[p.num_written], s_rows + j * (kNumV + 1), true, has);
    p.written[p.num_written++] = j;
  }
  // Which values the tile checks: a column that a dense list multiplies by 0 (`zero`) must be
  // finite for the sparse results to be the dense ones. A finite sum has finite columns in
  // every term (c * inf with c != 0 is not finite), so the first sum reading an unchecked such
  // column is checked; a column no sum reads is checked on its own. x0 is covered by its own
  // sum (clipping cannot make a finite x0 infinite) or, with no terms, is exactly 0.
  Sum* sums[2 + kSlots] = {p.x0, p.out};
  for (int w = 0; w < p.num_written; ++w) sums[2 + w] = p.slot[w];
  const int num_sums = 2 + p.num_written;
  bool read[kCols] = {}, zero[kCols] = {}, covered[kCols] = {};
  for (int r = 0; r < num_sums; ++r) {
    const Sum &sparse = sums[r][0], &dense = sums[r][1];
    for (int t = 0; t < sparse.n; ++t) read[sparse.col[t]] = true;
    for (int t = 0; t < dense.n; ++t) zero[dense.col[t]] |= dense.c[t] == 0;
  }
  for (int i = 0; i < kNumV; ++i) {
    if (has[i] && !read[i]) {
      p.unread[p.num_unread++] = i;
      covered[i] = true;
    }
  }
  covered[kX0] = !zero[kX0] || p.x0[0].n == 0;
  for (int r = 0; r < num_sums; ++r) {
    Sum& sparse = sums[r][0];
    for (int t = 0; t < sparse.n; ++t) sparse.check |= zero[sparse.col[t]] && !covered[sparse.col[t]];
    sparse.check |= r == 0 && !covered[kX0];
    if (!sparse.check) continue;
    for (int t = 0; t < sparse.n; ++t) covered[sparse.col[t]] = true;
    if (r == 0) covered[kX0] = true;
  }
  // (Checked too when its sum covers a column: then it is computed for the check alone.)
  p.need_x0 = p.write_x0 || read[kX0] || p.x0[0].check;
  p.slots_read_x0 = false;
  bool slots_read_m = false;
  for (int w = 0; w < p.num_written; ++w) {
    for (int t = 0; t < p.slot[w][0].n; ++t) {
      p.slots_read_x0 |= p.slot[w][0].col[t] == kX0;
      slots_read_m |= p.slot[w][0].col[t] == kVM;
    }
  }
  p.virtual_m = p.guided && read[kVM] && !slots_read_m && fusable(p, true);
  p.fused = fusable(p, p.virtual_m);
  p.streaming = p.fused && p.num_written == 0 && (!p.guided || p.virtual_m);
  // Passes: the guided m, the checks, x0 and out (fused or not), the slots and their copies.
  p.traffic = (p.guided ? (p.virtual_m ? 2 : 3) : 0) + p.num_unread + 2 * p.num_written;
  for (int r = 0; r < num_sums; ++r) p.traffic += sums[r][0].n + (sums[r][0].n + 3) / 4;
  if (p.fused) {  // x0 is not loaded, nor stored unless needed; a virtual m is not loaded
    p.traffic -= 1 + !(p.write_x0 || p.slots_read_x0);
    for (int r = 0; r < 2 && p.virtual_m; ++r) {
      for (int t = 0; t < sums[r][0].n; ++t) p.traffic -= sums[r][0].col[t] == kVM;
    }
  }
  return p;
}

// The bits of y - y: 0 in a lane where y is finite, a NaN's where it is not.
inline i8 nonfinite_bits(Vec y) { return (i8)(y.v - y.v); }

// y[i] = (kAcc ? y[i] : 0) + c[0] v[0][i] + ... + c[N-1] v[N-1][i] over n floats (one FMA a
// term, left to right). Returns nonfinite_bits of the y computed, or-ed together (kCheck),
// else 0.
template <int N, bool kAcc, bool kCheck>
i8 axpy_pass(float* y, const float* const* v, const float* c, int64_t n) {
  const float* p[N];
  Vec k[N];
  for (int t = 0; t < N; ++t) {
    p[t] = v[t];
    k[t] = Vec(c[t]);
  }
  i8 bad{};
  auto lanes = [&](int64_t i, auto load) {
    Vec s = k[0] * load(p[0] + i);
    if constexpr (kAcc) s = simd::fmadd(k[0], load(p[0] + i), load(y + i));
    for (int t = 1; t < N; ++t) s = simd::fmadd(k[t], load(p[t] + i), s);
    if constexpr (kCheck) bad |= nonfinite_bits(s);
    return s;
  };
  int64_t i = 0;
  for (; i + kW <= n; i += kW) lanes(i, [](const float* q) { return Vec::loadu(q); }).store(y + i);
  if (i < n) {
    const int64_t r = n - i;
    simd::store_partial(lanes(i, [r](const float* q) { return simd::load_partial(q, r, 0.f); }),
                        y + i, r);
  }
  return bad;
}

template <bool kAcc, bool kCheck>
i8 axpy_pass(int num_terms, float* y, const float* const* v, const float* c, int64_t n) {
  switch (num_terms) {
    case 1: return axpy_pass<1, kAcc, kCheck>(y, v, c, n);
    case 2: return axpy_pass<2, kAcc, kCheck>(y, v, c, n);
    case 3: return axpy_pass<3, kAcc, kCheck>(y, v, c, n);
    default: return axpy_pass<4, kAcc, kCheck>(y, v, c, n);
  }
}

template <bool kCheck>
i8 combine(float* y, const Sum& s, const float* const* v, int64_t n) {
  i8 bad = axpy_pass<false, kCheck>(std::min(s.n, 4), y, v, s.c, n);
  for (int t = 4; t < s.n; t += 4) {
    bad |= axpy_pass<true, kCheck>(std::min(s.n - t, 4), y, v + t, s.c + t, n);
  }
  return bad;
}

// y = the sum s of the tile's columns, in passes of up to 4 terms. Returns, when s.check,
// nonfinite_bits of the partial sums (a sum is not finite when a partial sum is not).
i8 combine(float* y, const Sum& s, const float* const* cols, int64_t n) {
  if (s.n == 0) {
    std::fill(y, y + n, 0.f);
    return i8{};
  }
  const float* v[kCols];
  for (int t = 0; t < s.n; ++t) v[t] = cols[s.col[t]];
  return s.check ? combine<true>(y, s, v, n) : combine<false>(y, s, v, n);
}

i8 nonfinite_bits(const float* v, int64_t n) {
  i8 bad{};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) bad |= nonfinite_bits(Vec::loadu(v + i));
  if (i < n) bad |= nonfinite_bits(simd::load_partial(v + i, n - i, 0.f));
  return bad;
}

bool any_bits(i8 b) {
  int32_t r = 0;
  for (int l = 0; l < 8; ++l) r |= b[l];
  return r != 0;
}

// m = u + g (c - u) over n floats (m may be u).
void guided_m(float* m, const float* u, const float* c, float g, int64_t n) {
  const Vec gv(g);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec ui = Vec::loadu(u + i);
    simd::fmadd(gv, Vec::loadu(c + i) - ui, ui).store(m + i);
  }
  for (; i < n; ++i) m[i] = std::fma(g, c[i] - u[i], u[i]);
}

// As torch.clamp: NaN stays NaN ((y < lo) is false for a NaN y).
void clip(float* y, float lo, float hi, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = y[i] < lo ? lo : y[i];
    y[i] = hi < v ? hi : v;
  }
}

// The operands of x0_out_pass: x0 = clip(sum of c1[t] v1[t] over t < n1), then out = sum
// of c2[t] v2[t] over t < n2, plus c_x0 x0. With a virtual m (guided, and no other sum needs
// m's column), the m terms are km1 m and km2 m with m = u + g (c - u) computed in registers:
// last in each sum (a coefficient 0 where a sum has no m term: 0 * m is 0 for a finite m, and
// an m that is not finite makes the tile dense anyway).
struct X0Out {
  const float *v1[3], *v2[3];
  float c1[3], c2[3];
  int n1 = 0, n2 = 0;
  float c_x0;
  const float *u = nullptr, *cond = nullptr;  // u set: a virtual m
  float km1 = 0, km2 = 0;
};

// x0 and out in one pass over n floats, x0 kept in registers (stored when store_x0): a row's
// most common shape (DDIM, DDPM, Euler), with the guided m too when kM. Returns, with kCheck,
// nonfinite_bits of both sums (x0's before clipping), or-ed together.
template <int N1, int N2, bool kCheck, bool kM>
i8 x0_out_pass(const X0Out& f, float* x0, float* out, const RowTerms& p, bool store_x0,
               int64_t n) {
  const float* p1[N1 > 0 ? N1 : 1];
  const float* p2[N2 > 0 ? N2 : 1];
  Vec k1[N1 > 0 ? N1 : 1], k2[N2 > 0 ? N2 : 1];
  for (int t = 0; t < N1; ++t) {
    p1[t] = f.v1[t];
    k1[t] = Vec(f.c1[t]);
  }
  for (int t = 0; t < N2; ++t) {
    p2[t] = f.v2[t];
    k2[t] = Vec(f.c2[t]);
  }
  const Vec kx0(f.c_x0), km1(f.km1), km2(f.km2), g(p.guidance);
  const simd::f8 lo = simd::f8{} + p.clip_lo, hi = simd::f8{} + p.clip_hi;
  i8 bad{};
  // kClip and kStoreX0 (std::bool_constant): the loop is written once, compiled four times.
  auto lanes = [&](int64_t i, auto load, auto store, auto kClip, auto kStoreX0) {
    Vec m(0.f), a(0.f), b(0.f);
    if constexpr (kM) {
      const Vec u = load(f.u + i);
      m = simd::fmadd(g, load(f.cond + i) - u, u);  // u + g (c - u)
    }
    if constexpr (N1 > 0) {
      a = k1[0] * load(p1[0] + i);
      for (int t = 1; t < N1; ++t) a = simd::fmadd(k1[t], load(p1[t] + i), a);
      if constexpr (kM) a = simd::fmadd(km1, m, a);
    } else {
      a = km1 * m;
    }
    if constexpr (kCheck) bad |= nonfinite_bits(a);
    if constexpr (kClip()) {  // as torch.clamp: NaN stays NaN (NaN < lo is false)
      const simd::f8 v = a.v < lo ? lo : a.v;
      a = Vec(hi < v ? hi : v);
    }
    if constexpr (kStoreX0()) store(a, x0 + i);
    if constexpr (N2 > 0) {
      b = k2[0] * load(p2[0] + i);
      for (int t = 1; t < N2; ++t) b = simd::fmadd(k2[t], load(p2[t] + i), b);
      if constexpr (kM) b = simd::fmadd(km2, m, b);
      b = simd::fmadd(kx0, a, b);
    } else if constexpr (kM) {
      b = simd::fmadd(kx0, a, km2 * m);
    } else {
      b = kx0 * a;
    }
    if constexpr (kCheck) bad |= nonfinite_bits(b);
    store(b, out + i);
  };
  auto loop = [&](auto kClip, auto kStoreX0) {
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      lanes(i, [](const float* q) { return Vec::loadu(q); }, [](Vec v, float* q) { v.store(q); },
            kClip, kStoreX0);
    }
    if (i < n) {
      const int64_t r = n - i;
      lanes(i, [r](const float* q) { return simd::load_partial(q, r, 0.f); },
            [r](Vec v, float* q) { simd::store_partial(v, q, r); }, kClip, kStoreX0);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (p.clip) {
    store_x0 ? loop(yes{}, yes{}) : loop(yes{}, no{});
  } else {
    store_x0 ? loop(no{}, yes{}) : loop(no{}, no{});
  }
  return bad;
}

// Template arguments of x0_out_pass from the runtime counts.
template <int N1, bool kCheck, bool kM>
i8 x0_out_pass(const X0Out& f, float* x0, float* out, const RowTerms& p, bool store_x0,
               int64_t n) {
  switch (f.n2) {
    case 0: return x0_out_pass<N1, 0, kCheck, kM>(f, x0, out, p, store_x0, n);
    case 1: return x0_out_pass<N1, 1, kCheck, kM>(f, x0, out, p, store_x0, n);
    case 2: return x0_out_pass<N1, 2, kCheck, kM>(f, x0, out, p, store_x0, n);
    default: return x0_out_pass<N1, 3, kCheck, kM>(f, x0, out, p, store_x0, n);
  }
}

template <bool kCheck, bool kM>
i8 x0_out_pass(const X0Out& f, float* x0, float* out, const RowTerms& p, bool store_x0,
               int64_t n) {
  switch (f.n1) {
    case 0: return x0_out_pass<0, kCheck, kM>(f, x0, out, p, store_x0, n);
    case 1: return x0_out_pass<1, kCheck, kM>(f, x0, out, p, store_x0, n);
    case 2: return x0_out_pass<2, kCheck, kM>(f, x0, out, p, store_x0, n);
    default: return x0_out_pass<3, kCheck, kM>(f, x0, out, p, store_x0, n);
  }
}

// The sparse x0 and out of a tile in one x0_out_pass (p.fused). u and cond: the guided
// model_output's halves, when m is virtual (else null).
i8 x0_and_out(const RowTerms& p, const float* const* cols, const float* u, const float* cond,
              float* x0, float* out, bool store_x0, int64_t n) {
  const Sum &a = p.x0[0], &b = p.out[0];
  X0Out f;
  f.c_x0 = b.c[b.n - 1];
  f.u = u;
  f.cond = cond;
  for (int t = 0; t < a.n; ++t) {
    if (u && a.col[t] == kVM) {
      f.km1 = a.c[t];
    } else {
      f.v1[f.n1] = cols[a.col[t]];
      f.c1[f.n1++] = a.c[t];
    }
  }
  for (int t = 0; t + 1 < b.n; ++t) {
    if (u && b.col[t] == kVM) {
      f.km2 = b.c[t];
    } else {
      f.v2[f.n2] = cols[b.col[t]];
      f.c2[f.n2++] = b.c[t];
    }
  }
  const bool check = a.check || b.check;
  if (u) {
    return check ? x0_out_pass<true, true>(f, x0, out, p, store_x0, n)
                 : x0_out_pass<false, true>(f, x0, out, p, store_x0, n);
  }
  return check ? x0_out_pass<true, false>(f, x0, out, p, store_x0, n)
               : x0_out_pass<false, false>(f, x0, out, p, store_x0, n);
}

// x0, out and the new slot values of a tile from its columns (cols[kX0] is x0), with the
// sparse (which = 0) or the dense (1) lists; u and cond set: m is virtual (sparse only).
// Returns the finiteness bits of the sums.
i8 results(const RowTerms& p, int which, const float* const* cols, const float* u,
           const float* cond, float* x0, float* out, float (*fresh)[kTile], int64_t n) {
  i8 bad{};
  // x0 is stored when it is written or a slot reads it (the dense lists always read it).
  if (which == 0 && p.fused) {
    bad = x0_and_out(p, cols, u, cond, x0, out, p.write_x0 || p.slots_read_x0, n);
  } else if (which == 1 || p.need_x0) {
    bad = combine(x0, p.x0[which], cols, n);
    if (p.clip) clip(x0, p.clip_lo, p.clip_hi, n);  // the sum's bits were taken before
    bad |= combine(out, p.out[which], cols, n);
  } else {
    bad |= combine(out, p.out[which], cols, n);
  }
  for (int w = 0; w < p.num_written; ++w) bad |= combine(fresh[w], p.slot[w][which], cols, n);
  return bad;
}

template <typename scalar_t>
struct Ptrs {
  const scalar_t *mo, *x, *noise;
  scalar_t *state, *out, *x0;
  int64_t numel;
};

// The elements [begin, end) of the flattened sample, tile by tile. Slot j of the state is
// state[j * numel + i]; a tile's new slot values wait in `fresh` until its results are final.
template <typename scalar_t>
void step_range(const RowTerms& p, const Ptrs<scalar_t>& a, int64_t begin, int64_t end) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  alignas(32) float buf[kCols + 1][kTile];  // converted inputs, the guided m, x0, cond
  alignas(32) float fresh[kSlots][kTile];
  alignas(32) float out_buf[kFloat ? 1 : kTile];
  const float* cols[kCols];
  bool dense = false;  // every tile computed with the dense lists only
  if constexpr (kFloat) {
    if (p.streaming) {  // x0 is stored only when written; no x0 column is read
      const int64_t n = end - begin;
      cols[kVX] = a.x + begin;
      cols[kVM] = a.mo + begin;
      if (p.noise) cols[kVN] = a.noise + begin;
      for (int j = 0; j < p.num_slots; ++j) cols[kVS + j] = a.state + j * a.numel + begin;
      i8 bad{};
      for (int u = 0; u < p.num_unread; ++u) bad |= nonfinite_bits(cols[p.unread[u]], n);
      bad |= x0_and_out(p, cols, p.guided ? cols[kVM] : nullptr,
                        p.guided ? a.mo + a.numel + begin : nullptr,
                        p.write_x0 ? a.x0 + begin : nullptr, a.out + begin, p.write_x0, n);
      if (!any_bits(bad)) return;
      dense = true;
    }
  }
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    auto input = [&](int c, const scalar_t* src) -> const float* {
      if constexpr (kFloat) {
        return src;
      } else {
        for (int64_t i = 0; i < n; ++i) buf[c][i] = static_cast<float>(src[i]);
        return buf[c];
      }
    };
    cols[kVX] = input(kVX, a.x + t0);
    cols[kVM] = input(kVM, a.mo + t0);
    const float *u = nullptr, *cond = nullptr;  // set while m is virtual
    auto materialize_m = [&] {
      guided_m(buf[kVM], cols[kVM], cond, p.guidance, n);
      cols[kVM] = buf[kVM];
      u = nullptr;
    };
    if (p.guided) {
      u = cols[kVM];
      cond = input(kCols, a.mo + a.numel + t0);
      if (!p.virtual_m || dense) materialize_m();
    }
    if (p.noise) cols[kVN] = input(kVN, a.noise + t0);
    for (int j = 0; j < p.num_slots; ++j) cols[kVS + j] = input(kVS + j, a.state + j * a.numel + t0);
    float *x0 = buf[kX0], *out = out_buf;  // float32 results go straight to the outputs
    if constexpr (kFloat) {
      if (p.write_x0) x0 = a.x0 + t0;
      out = a.out + t0;
    }
    cols[kX0] = x0;
    i8 bad{};
    if (!dense) {
      for (int u = 0; u < p.num_unread; ++u) bad |= nonfinite_bits(cols[p.unread[u]], n);
      bad |= results(p, 0, cols, u, cond, x0, out, fresh, n);
    }
    if (dense || any_bits(bad)) {
      if (u) materialize_m();
      results(p, 1, cols, nullptr, nullptr, x0, out, fresh, n);
    }
    if constexpr (!kFloat) {
      for (int64_t i = 0; i < n; ++i) a.out[t0 + i] = static_cast<scalar_t>(out[i]);
      if (p.write_x0) {
        for (int64_t i = 0; i < n; ++i) a.x0[t0 + i] = static_cast<scalar_t>(x0[i]);
      }
    }
    for (int w = 0; w < p.num_written; ++w) {
      scalar_t* s = a.state + p.written[w] * a.numel + t0;
      for (int64_t i = 0; i < n; ++i) s[i] = static_cast<scalar_t>(fresh[w][i]);
    }
  }
}

Out cpu(const DenoiseStep& a) {
  // On the CPU the step index and its row can be read without a device sync: check them here.
  const int64_t idx = a.step_index.scalar_type() == ScalarType::Long
                          ? *a.step_index.const_data_ptr<int64_t>()
                          : *a.step_index.const_data_ptr<int32_t>();
  FD_CHECK(idx >= 0 && idx < a.coeffs.size(0), DenoiseStep::name, "argument 'step_index'=", idx,
           " is out of range for 'coeffs' with ", a.coeffs.size(0), " steps");
  const RowTerms terms = read_row(a, idx, num_slots(a));
  Out result = empty(a);
  if (a.sample.numel() == 0) return result;
  auto& [out, x0] = result;
  dispatch_float(a.sample.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const Ptrs<scalar_t> p{a.model_output.const_data_ptr<scalar_t>(),
                           a.sample.const_data_ptr<scalar_t>(),
                           a.noise ? a.noise->const_data_ptr<scalar_t>() : nullptr,
                           a.state ? a.state->mutable_data_ptr<scalar_t>() : nullptr,
                           out.mutable_data_ptr<scalar_t>(),
                           a.write_x0 ? x0.mutable_data_ptr<scalar_t>() : nullptr,
                           a.sample.numel()};
    const int64_t grain = std::max<int64_t>(
        {kTile, kTaskElements, kTaskTraffic / std::max(terms.traffic, 1)});
    torch::stable::parallel_for(0, p.numel, grain, [&](int64_t begin, int64_t end) {
      step_range(terms, p, begin, end);
    });
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
