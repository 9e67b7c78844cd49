// CUDA kernels of speculative_verify. Torch-free; the launcher is in speculative_verify.cu.
//
// The work is bandwidth, and what is read is set in common/speculative.h. At most two launches
// after one small memset (the "last block done" counters):
//   1. normaliser_kernel, only when some row is read whole (logits, fused targets, greedy mode):
//      block (chunk, position, row) reduces its chunk of the target row (online logsumexp in
//      base 2 of l/T or of the fused score, argmax, bad-value flags) and, for draft logits, of the
//      draft row, with 16-byte loads. The last block of a (row, position) to finish merges the
//      chunks and writes the position's normalisers.
//   2. verify_kernel: every block of a row repeats the cheap part (the drafted entries p_i(x_i),
//      q_i(x_i) gathered by parallel threads, the acceptance chain, the validity of the row), then
//      in sample mode runs an exponential race (Gumbel-max) over its chunk of the stop row: the
//      argmax of m(x) / E(x), m = max(0, p - q) and p alike, E exponential from Philox keyed by
//      the row seed. The last block of the row to finish merges the chunks' winners and writes
//      the row. Greedy rows are decided by one block from the normalisers' argmaxes.
// For fp32 probabilities with a plain target in sample mode, launch 2 is all there is: the drafted
// entries, then one pass over the stop position's target and draft rows.
// No host synchronisation; the workspace size depends on shapes only, so the launches capture.
#pragma once
#include <cub/block/block_reduce.cuh>

#include "common/fusion.h"
#include "common/speculative.h"

namespace collab_ops {
namespace cuda {

constexpr int32_t kSawNan = 1;
constexpr int32_t kPoisoned = 2;  // NaN or +inf input, or a bad probability read as given
constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A reduction over some columns of one row: online logsumexp in base 2 (value = max2 + log2(sum)),
// the first argmax and the bad-value flags.
struct RowPartial {
  float max2;
  float sum;
  float best;
  int32_t flags;
  int64_t best_col;
};

// The winners of the exponential race over some columns: for the residual m = max(0, p - q) and
// for p itself (the fallback when the residual is zero everywhere); column -1 is no winner yet.
struct RaceState {
  float residual_key;
  float target_key;
  int64_t residual_col;
  int64_t target_col;
  int32_t flags;
};

struct SpeculativeWorkspace {
  unsigned int* position_done;          // [batch][num_drafts + 1]: normaliser blocks finished
  unsigned int* row_done;               // [batch]: race blocks finished
  RowPartial* target_partials;          // [batch][num_drafts + 1][normaliser_splits]
  RowPartial* draft_partials;           // [batch][num_drafts + 1][normaliser_splits]
  TargetNormaliser* target_normalisers;  // [batch][num_drafts + 1]
  DraftNormaliser* draft_normalisers;    // [batch][num_drafts + 1]
  RaceState* race_partials;             // [batch][race_splits]
  int32_t normaliser_splits;
  int64_t normaliser_chunk;  // columns per normaliser block
  int32_t race_splits;
  int64_t race_chunk;  // columns per race block
};

// Reads what other blocks wrote before their __threadfence, past this SM's L1.
template <class T>
__device__ __forceinline__ T load_from_l2(const T* ptr) {
  static_assert(sizeof(T) % 4 == 0, "4-byte words");
  T value;
  const unsigned int* src = reinterpret_cast<const unsigned int*>(ptr);
  unsigned int* dst = reinterpret_cast<unsigned int*>(&value);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) dst[i] = __ldcg(src + i);
  return value;
}

// Publishes one block's partial result and says whether this block is the last of `expected` to
// do so for the same counter (then every partial is visible to it). Call from every thread.
__device__ __forceinline__ bool finish_block_is_last(unsigned int* counter, unsigned int expected) {
  __shared__ bool is_last;
  __syncthreads();  // the partial written by thread 0 precedes the fence
  if (threadIdx.x == 0) {
    __threadfence();
    is_last = atomicAdd(counter, 1u) == expected - 1;
    if (is_last) __threadfence();
  }
  __syncthreads();
  return is_last;
}

__device__ __forceinline__ RowPartial row_partial_init() { return RowPartial{-INFINITY, 0.f, -INFINITY, 0, 0}; }

__device__ __forceinline__ void add_log2(RowPartial& r, float x2) {
  if (x2 != x2) {
    r.flags |= kSawNan;
    return;
  }
  if (x2 == -INFINITY) return;
  if (x2 > r.max2) {
    r.sum = r.sum * exp2f(r.max2 - x2) + 1.f;
    r.max2 = x2;
  } else {
    r.sum += exp2f(x2 - r.max2);
  }
}

__device__ __forceinline__ void track_best(RowPartial& r, float value, int64_t col) {
  if (value > r.best || (value == r.best && col < r.best_col)) {
    r.best = value;
    r.best_col = col;
  }
}

// add_log2 of x2[0..count) (count <= 8) with at most one rescale: the vector's max first, then one
// exponential per value, no branch per value.
__device__ __forceinline__ void add_log2_vector(RowPartial& r, const float (&x2)[8], int count) {
  float vector_max = -INFINITY;
  bool saw_nan = false;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (e < count) {
      saw_nan |= x2[e] != x2[e];
      vector_max = fmaxf(vector_max, x2[e]);  // NaN-ignoring
    }
  }
  if (saw_nan) r.flags |= kSawNan;
  if (vector_max > r.max2) {
    r.sum = r.max2 == -INFINITY ? 0.f : r.sum * exp2f(r.max2 - vector_max);
    r.max2 = vector_max;
  }
  if (r.max2 == -INFINITY || r.max2 == INFINITY) return;  // nothing finite yet; or +inf, read from max2 alone
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (e < count && x2[e] == x2[e]) sum += exp2f(x2[e] - r.max2);
  }
  r.sum += sum;
}

// track_best of values[0..count) at columns col, col + 1, ...: the vector's first maximum only.
__device__ __forceinline__ void track_best_vector(RowPartial& r, const float (&values)[8], int count, int64_t col) {
  float best = -INFINITY;
  int best_e = -1;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (e < count && values[e] > best) {  // NaN never wins
      best = values[e];
      best_e = e;
    }
  }
  if (best_e >= 0) track_best(r, best, col + best_e);
}

struct MergeRowPartial {
  __device__ __forceinline__ RowPartial operator()(const RowPartial& a, const RowPartial& b) const {
    RowPartial m;
    m.max2 = fmaxf(a.max2, b.max2);
    m.sum = m.max2 == -INFINITY ? 0.f
                                : (a.max2 == -INFINITY ? 0.f : a.sum * exp2f(a.max2 - m.max2)) +
                                      (b.max2 == -INFINITY ? 0.f : b.sum * exp2f(b.max2 - m.max2));
    m.flags = a.flags | b.flags;
    const bool take_b = b.best > a.best || (b.best == a.best && b.best_col < a.best_col);
    m.best = take_b ? b.best : a.best;
    m.best_col = take_b ? b.best_col : a.best_col;
    return m;
  }
};

// The natural-log normaliser of a merged partial: NaN when a NaN was seen, +-inf when nothing is
// finite.
__device__ __forceinline__ float natural_lse(const RowPartial& r) {
  if (r.flags & kSawNan) return NAN;
  if (r.max2 == -INFINITY || r.max2 == INFINITY) return r.max2;
  return (r.max2 + log2f(r.sum)) * kLn2;
}

__device__ __forceinline__ RaceState race_init() { return RaceState{-1.f, -1.f, -1, -1, 0}; }

__device__ __forceinline__ bool race_beats(float key, int64_t col, float best_key, int64_t best_col) {
  return best_col < 0 || key > best_key || (key == best_key && col < best_col);
}

struct MergeRace {
  __device__ __forceinline__ RaceState operator()(const RaceState& a, const RaceState& b) const {
    RaceState m = a;
    if (b.residual_col >= 0 && race_beats(b.residual_key, b.residual_col, a.residual_key, a.residual_col)) {
      m.residual_key = b.residual_key;
      m.residual_col = b.residual_col;
    }
    if (b.target_col >= 0 && race_beats(b.target_key, b.target_col, a.target_key, a.target_col)) {
      m.target_key = b.target_key;
      m.target_col = b.target_col;
    }
    m.flags = a.flags | b.flags;
    return m;
  }
};

template <int kThreads, class T, class Merge>
__device__ T block_merge(T local, Merge merge) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ T result;
  const T merged = Reduce(storage).Reduce(local, merge);
  if (threadIdx.x == 0) result = merged;
  __syncthreads();
  return result;
}

// Merges partials[0..count) (count <= kThreads), one per thread.
template <int kThreads, class T, class Merge>
__device__ T merge_published(const T* partials, int count, T identity, Merge merge) {
  const T local = static_cast<int>(threadIdx.x) < count ? load_from_l2(partials + threadIdx.x) : identity;
  return block_merge<kThreads>(local, merge);
}

__device__ __forceinline__ int scalar_bytes(ScalarKind kind) { return kind == ScalarKind::kFloat32 ? 4 : 2; }

// The 4 (fp32, then 4 zeros) or 8 (bf16, fp16) values of 16 loaded bytes.
__device__ __forceinline__ void unpack_vector(const uint4& raw, ScalarKind kind, float (&values)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (kind == ScalarKind::kFloat32) {
      values[i] = __uint_as_float(words[i]);
      values[4 + i] = 0.f;
    } else if (kind == ScalarKind::kBFloat16) {
      values[2 * i] = bfloat16_to_float(static_cast<uint16_t>(words[i] & 0xffffu));
      values[2 * i + 1] = bfloat16_to_float(static_cast<uint16_t>(words[i] >> 16));
    } else {
      values[2 * i] = float16_to_float(static_cast<uint16_t>(words[i] & 0xffffu));
      values[2 * i + 1] = float16_to_float(static_cast<uint16_t>(words[i] >> 16));
    }
  }
}

// Calls visit(col, a, b) for every column of [begin, end) of one row (kRows = 1, b = 0) or of two
// rows read side by side (kRows = 2), each column by one thread of the block, except that the
// columns of one 16-byte load go to visit_vector(col, a, b, count) together (columns col .. col +
// count - 1 in a[0..count), b[0..count)). 16-byte loads when the rows share their alignment, scalar
// loads for the unaligned head and tail (or everywhere when they do not). A thread's columns come
// in no fixed order: reductions break ties by column.
// kPrefetch software-pipelines the 16-byte loads: the next vector's are issued before this one is
// visited, so a thread keeps its next 16 (or 32) bytes in flight while it computes. For sweeps
// with little arithmetic per byte (the normalisers) when few blocks per SM hold long stretches of
// rows; it costs registers that the race's sweep cannot spare without spilling.
template <int kThreads, int kRows, bool kPrefetch = false, class Visit, class VisitVector>
__device__ __forceinline__ void visit_columns(ScalarKind kind, const char* row_a, const char* row_b, int64_t begin,
                                              int64_t end, Visit& visit, VisitVector& visit_vector) {
  const int bytes = scalar_bytes(kind);
  const int per_vector = 16 / bytes;
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(row_a + begin * bytes) & 15u;
  bool vectorise = misalignment % bytes == 0;
  if (kRows == 2) vectorise &= (reinterpret_cast<uintptr_t>(row_b + begin * bytes) & 15u) == misalignment;
  int64_t head = vectorise ? static_cast<int64_t>(((16u - misalignment) & 15u) / bytes) : end - begin;
  if (head > end - begin) head = end - begin;
  const int64_t body = begin + head;
  const int64_t vectors = (end - body) / per_vector;
  const int64_t tail = body + vectors * per_vector;
  for (int64_t col = begin + threadIdx.x; col < body; col += kThreads) {
    visit(col, load_as_float(row_a, kind, col), kRows == 2 ? load_as_float(row_b, kind, col) : 0.f);
  }
  auto load = [&](const char* row, int64_t v) {
    return __ldg(reinterpret_cast<const uint4*>(row + (body + v * per_vector) * bytes));
  };
  int64_t v = threadIdx.x;
  uint4 next_a = {}, next_b = {};
  if (kPrefetch && v < vectors) {
    next_a = load(row_a, v);
    if (kRows == 2) next_b = load(row_b, v);
  }
  for (; v < vectors; v += kThreads) {
    uint4 raw_a, raw_b = {};
    if (kPrefetch) {
      raw_a = next_a, raw_b = next_b;
      if (v + kThreads < vectors) {
        next_a = load(row_a, v + kThreads);
        if (kRows == 2) next_b = load(row_b, v + kThreads);
      }
    } else {
      raw_a = load(row_a, v);
      if (kRows == 2) raw_b = load(row_b, v);
    }
    float a[8], b[8];
    unpack_vector(raw_a, kind, a);
    if (kRows == 2) {
      unpack_vector(raw_b, kind, b);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) b[e] = 0.f;
    }
    visit_vector(body + v * per_vector, a, b, per_vector);
  }
  for (int64_t col = tail + threadIdx.x; col < end; col += kThreads) {
    visit(col, load_as_float(row_a, kind, col), kRows == 2 ? load_as_float(row_b, kind, col) : 0.f);
  }
}

// visit_columns with every column of a vector passed to visit one by one.
template <int kThreads, int kRows, class Visit>
__device__ __forceinline__ void visit_columns(ScalarKind kind, const char* row_a, const char* row_b, int64_t begin,
                                              int64_t end, Visit& visit) {
  auto each = [&](int64_t col, const float (&a)[8], const float (&b)[8], int count) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (e < count) visit(col + e, a[e], b[e]);
    }
  };
  visit_columns<kThreads, kRows>(kind, row_a, row_b, begin, end, visit, each);
}

__device__ __forceinline__ const char* target_row(const SpeculativeParams& p, int k, int64_t row, int64_t position) {
  return static_cast<const char*>(p.targets[k]) + target_offset(p, k, row, position) * scalar_bytes(p.kind);
}

__device__ __forceinline__ const char* draft_row(const SpeculativeParams& p, int64_t row, int64_t position) {
  return static_cast<const char*>(p.draft) + draft_offset(p, row, position) * scalar_bytes(p.kind);
}

__device__ __forceinline__ int64_t chunk_end(int64_t chunk, int64_t split, int64_t vocab) {
  const int64_t end = (split + 1) * chunk;
  return end < vocab ? end : vocab;
}

// The logsumexp (base 2), argmax and flags of columns [begin, end) of a row read as one input:
// l/T for logits, or probabilities used as given (greedy: argmax and checks only).
template <int kThreads>
__device__ RowPartial single_row_partial(const SpeculativeParams& p, const char* row, int64_t begin, int64_t end,
                                         bool want_argmax) {
  RowPartial local = row_partial_init();
  const float scale2 = p.inv_temperature * kLog2E;
  const bool logits = p.inputs_are_logits;
  auto visit = [&](int64_t col, float value, float) {
    if (logits) {
      const float a = value * p.inv_temperature;
      if (poisons_row(a)) local.flags |= kPoisoned;
      add_log2(local, value * scale2);
      if (want_argmax) track_best(local, a, col);
    } else {
      if (!probability_entry_valid(value)) local.flags |= kPoisoned;
      track_best(local, value, col);
    }
  };
  // The same per 16-byte load, with logits (the bandwidth-heavy case) batched: one rescale of the
  // log-sum-exp and one argmax candidate per load.
  auto visit_vector = [&](int64_t col, const float (&values)[8], const float (&)[8], int count) {
    if (!logits) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (e < count) visit(col + e, values[e], 0.f);
      }
      return;
    }
    float a[8], x2[8];
    bool poisoned = false;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      a[e] = values[e] * p.inv_temperature;
      x2[e] = values[e] * scale2;
      poisoned |= e < count && poisons_row(a[e]);
    }
    if (poisoned) local.flags |= kPoisoned;
    add_log2_vector(local, x2, count);
    if (want_argmax) track_best_vector(local, a, count, col);
  };
  visit_columns<kThreads, 1, true>(p.kind, row, nullptr, begin, end, visit, visit_vector);
  return block_merge<kThreads>(local, MergeRowPartial{});
}

template <int kThreads>
__device__ RowPartial fused_row_partial(const SpeculativeParams& p, const RowTargets& rt, int64_t row,
                                        int64_t position, int64_t begin, int64_t end) {
  RowPartial local = row_partial_init();
  for (int64_t col = begin + threadIdx.x; col < end; col += kThreads) {
    bool poisoned = false;
    const float score = fused_target_score(p, rt, row, position, col, poisoned);
    if (poisoned) local.flags |= kPoisoned;
    add_log2(local, score * kLog2E);
    if (p.greedy) track_best(local, score, col);
  }
  return block_merge<kThreads>(local, MergeRowPartial{});
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads, 4) normaliser_kernel(SpeculativeParams p, SpeculativeWorkspace w) {
  const int64_t split = blockIdx.x, position = blockIdx.y, row = blockIdx.z;
  const int64_t n = row_num_drafts(p, row);
  if (n < 0 || n > p.num_drafts || position > n) return;  // an invalid row, or a position past n
  __shared__ RowTargets rt;
  if (threadIdx.x == 0) rt = row_targets(p, row);
  __syncthreads();
  const bool want_target = target_rows_read_whole(p, rt);
  const bool want_draft = draft_rows_read_whole(p) && position < n;
  if (!want_target && !want_draft) return;  // the same for every block of this (row, position)

  const int64_t begin = split * w.normaliser_chunk, end = chunk_end(w.normaliser_chunk, split, p.vocab);
  const int64_t slot = row * (p.num_drafts + 1) + position;
  RowPartial target = row_partial_init(), draft = row_partial_init();
  if (want_target) {
    target = rt.plain ? single_row_partial<kThreads>(p, target_row(p, rt.model[0], row, position), begin, end, p.greedy)
                      : fused_row_partial<kThreads>(p, rt, row, position, begin, end);
  }
  if (want_draft) draft = single_row_partial<kThreads>(p, draft_row(p, row, position), begin, end, false);
  if (threadIdx.x == 0) {
    w.target_partials[slot * w.normaliser_splits + split] = target;
    w.draft_partials[slot * w.normaliser_splits + split] = draft;
  }
  if (!finish_block_is_last(w.position_done + slot, static_cast<unsigned int>(w.normaliser_splits))) return;

  const RowPartial merged_target = merge_published<kThreads>(w.target_partials + slot * w.normaliser_splits,
                                                             w.normaliser_splits, row_partial_init(), MergeRowPartial{});
  const RowPartial merged_draft = merge_published<kThreads>(w.draft_partials + slot * w.normaliser_splits,
                                                            w.normaliser_splits, row_partial_init(), MergeRowPartial{});
  if (threadIdx.x != 0) return;
  if (want_target) {
    TargetNormaliser t{};
    t.argmax = merged_target.best_col;
    if (rt.plain && !p.inputs_are_logits) {  // probabilities used as given, read whole for the argmax
      t.offset = 0.f;
      t.undefined = (merged_target.flags & kPoisoned) || !(merged_target.best > 0.f);
    } else {
      t.offset = natural_lse(merged_target);
      t.undefined = (merged_target.flags & kPoisoned) || log_normaliser_undefined(t.offset);
    }
    w.target_normalisers[slot] = t;
  }
  if (want_draft) {
    DraftNormaliser d{};
    d.offset = natural_lse(merged_draft);
    d.undefined = (merged_draft.flags & kPoisoned) || log_normaliser_undefined(d.offset);
    w.draft_normalisers[slot] = d;
  }
}

// One race entry: column col with target probability p_x and mass m_x = max(0, p_x - q_x).
// A column of mass m can only beat a race's best key b if its exponential E = -log1p(-u) is at most
// m / b, and E >= u: a uniform above (m / b)·(1 + kRaceReachMargin) in both races skips the
// logarithm and the division. The margin covers the rounding of E and of the key, so skipping
// never changes a winner. After a thread's first few columns nearly every column is skipped.
constexpr float kRaceReachMargin = 1e-3f;

struct RaceVisitor {
  RaceState state;
  int64_t seed;
  int64_t cached_group;
  Philox4 bits;
  // (1 + margin) / best key of each race; +inf before the race has a winner (or when the best key
  // is +inf, where only a tie on a lower column could still win).
  float residual_reach = INFINITY;
  float target_reach = INFINITY;

  __device__ __forceinline__ void enter(int64_t col, float p_x, float residual) {
    const int64_t group = col >> 2;
    if (group != cached_group) {  // consecutive columns share one Philox call
      bits = final_race_bits(seed, group);
      cached_group = group;
    }
    // Selects, not an indexed load: a runtime index would put the four words in local memory.
    const int word = static_cast<int>(col & 3);
    const uint32_t random = word == 0 ? bits.v[0] : (word == 1 ? bits.v[1] : (word == 2 ? bits.v[2] : bits.v[3]));
    const bool residual_races = residual > 0.f, target_races = p_x > 0.f;
    const float reach = fmaxf(residual_races ? residual * residual_reach : 0.f, target_races ? p_x * target_reach : 0.f);
    if (!(uniform_open01(random) <= reach)) return;
    const float inv_exponential = 1.f / race_exponential(random);
    if (residual_races) {
      const float key = residual * inv_exponential;
      if (race_beats(key, col, state.residual_key, state.residual_col)) {
        state.residual_key = key;
        state.residual_col = col;
        residual_reach = key < INFINITY ? (1.f + kRaceReachMargin) / key : INFINITY;
      }
    }
    if (target_races) {
      const float key = p_x * inv_exponential;
      if (race_beats(key, col, state.target_key, state.target_col)) {
        state.target_key = key;
        state.target_col = col;
        target_reach = key < INFINITY ? (1.f + kRaceReachMargin) / key : INFINITY;
      }
    }
  }
};

// What every block of a row decides alike, before its share of the race.
struct RowDecision {
  TargetNormaliser stop_target;
  DraftNormaliser stop_draft;
  int64_t accepted;
  int64_t rejected_id;  // the draft id at the stop position after a rejection, else -1
  bool valid;
  bool after_rejection;
};

__device__ __forceinline__ TargetNormaliser given_target() { return TargetNormaliser{0.f, 0, false}; }

template <int kThreads>
__device__ void decide_row(const SpeculativeParams& p, const SpeculativeWorkspace& w, const RowTargets& rt,
                           int64_t row, RowDecision& decision) {
  __shared__ int invalid;
  __shared__ int first_rejection;
  const int64_t n = row_num_drafts(p, row);
  const bool n_valid = n >= 0 && n <= p.num_drafts;
  if (threadIdx.x == 0) {
    invalid = n_valid ? 0 : 1;
    first_rejection = n_valid ? static_cast<int>(n) : 0;
  }
  __syncthreads();
  const bool targets_whole = target_rows_read_whole(p, rt), drafts_whole = draft_rows_read_whole(p);
  const bool draft_given = p.draft != nullptr;
  const int64_t seed = p.greedy ? 0 : row_seed(p, row);
  const int64_t slots = row * (p.num_drafts + 1);
  // Position i < n: its drafted entries and acceptance; position n: the bonus row's normaliser.
  for (int64_t i = threadIdx.x; n_valid && i <= n; i += kThreads) {
    const TargetNormaliser target = targets_whole ? w.target_normalisers[slots + i] : given_target();
    bool bad = target.undefined;
    if (i < n) {
      const int64_t id = p.draft_tokens[row * p.num_drafts + i];
      bool ok = false;
      if (id < 0 || id >= p.vocab) {
        bad = true;
      } else if (p.greedy) {
        ok = id == target.argmax;
      } else {
        const DraftNormaliser draft = drafts_whole ? w.draft_normalisers[slots + i] : DraftNormaliser{0.f, false};
        bad |= draft.undefined;
        const float p_of_draft = target_probability(p, rt, target, row, i, id);
        const float q_of_draft = draft_given ? draft_probability(p, draft, row, i, id) : 1.f;
        bad |= !probability_entry_valid(p_of_draft) || !probability_entry_valid(q_of_draft);
        ok = accept_draft(speculative_uniform(seed, static_cast<uint32_t>(i), kAcceptStream), p_of_draft, q_of_draft);
      }
      if (!ok) atomicMin(&first_rejection, static_cast<int>(i));
    }
    if (bad) invalid = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    RowDecision d{};
    d.valid = invalid == 0;
    d.accepted = first_rejection;
    // An invalid row reads nothing more: its n may exceed the drafts there are (K = 0 has none).
    d.after_rejection = d.valid && d.accepted < n;
    d.rejected_id = d.after_rejection ? p.draft_tokens[row * p.num_drafts + d.accepted] : -1;
    if (d.valid) {
      d.stop_target = targets_whole ? w.target_normalisers[slots + d.accepted] : given_target();
      d.stop_draft = d.after_rejection && drafts_whole ? w.draft_normalisers[slots + d.accepted] : DraftNormaliser{0.f, false};
    }
    decision = d;
  }
  __syncthreads();
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) verify_kernel(SpeculativeParams p, SpeculativeWorkspace w) {
  const int64_t split = blockIdx.x, row = blockIdx.y;
  __shared__ RowTargets rt;
  __shared__ RowDecision decision;
  if (threadIdx.x == 0) rt = row_targets(p, row);
  __syncthreads();
  decide_row<kThreads>(p, w, rt, row, decision);
  if (!decision.valid || p.greedy) {
    if (split == 0 && threadIdx.x == 0) {
      if (!decision.valid) {
        write_invalid_row(p, row);
      } else {
        write_row(p, row, decision.accepted, decision.stop_target.argmax);
      }
    }
    return;
  }

  // The race over this block's chunk of the stop row.
  const int64_t stop = decision.accepted;
  const bool subtract = decision.after_rejection;
  const bool draft_given = p.draft != nullptr;
  const bool check_target = !target_rows_read_whole(p, rt);
  const bool check_draft = subtract && draft_given && !draft_rows_read_whole(p);
  const int64_t begin = split * w.race_chunk, end = chunk_end(w.race_chunk, split, p.vocab);
  RaceVisitor race{race_init(), row_seed(p, row), -1, Philox4{}};
  if (rt.plain) {
    const TargetNormaliser& t = decision.stop_target;
    const DraftNormaliser& d = decision.stop_draft;
    auto visit = [&](int64_t col, float target_value, float draft_value) {
      const float p_x = p.inputs_are_logits ? expf(target_value * p.inv_temperature - t.offset) : target_value;
      float q_x = 0.f;
      if (subtract) {
        q_x = !draft_given ? (col == decision.rejected_id ? 1.f : 0.f)
                           : (p.inputs_are_logits ? expf(draft_value * p.inv_temperature - d.offset) : draft_value);
      }
      if (check_target && !probability_entry_valid(p_x)) race.state.flags |= kPoisoned;
      if (check_draft && !probability_entry_valid(q_x)) race.state.flags |= kPoisoned;
      race.enter(col, p_x, residual_mass(p_x, q_x));
    };
    const char* target_values = target_row(p, rt.model[0], row, stop);
    if (subtract && draft_given) {
      visit_columns<kThreads, 2>(p.kind, target_values, draft_row(p, row, stop), begin, end, visit);
    } else {
      visit_columns<kThreads, 1>(p.kind, target_values, nullptr, begin, end, visit);
    }
  } else {
    for (int64_t col = begin + threadIdx.x; col < end; col += kThreads) {
      const float p_x = target_probability(p, rt, decision.stop_target, row, stop, col);
      float q_x = 0.f;
      if (subtract) {
        q_x = draft_given ? draft_probability(p, decision.stop_draft, row, stop, col)
                          : (col == decision.rejected_id ? 1.f : 0.f);
      }
      if (check_draft && !probability_entry_valid(q_x)) race.state.flags |= kPoisoned;
      race.enter(col, p_x, residual_mass(p_x, q_x));
    }
  }
  const RaceState block = block_merge<kThreads>(race.state, MergeRace{});
  if (threadIdx.x == 0) w.race_partials[row * w.race_splits + split] = block;
  if (!finish_block_is_last(w.row_done + row, static_cast<unsigned int>(w.race_splits))) return;

  const RaceState merged = merge_published<kThreads>(w.race_partials + row * w.race_splits, w.race_splits,
                                                     race_init(), MergeRace{});
  if (threadIdx.x != 0) return;
  // max(0, p - q) is zero everywhere only when p <= q everywhere: then p itself is drawn. A stop
  // row with no mass at all, or a bad value read as given, makes the row invalid.
  const int64_t token = merged.residual_col >= 0 ? merged.residual_col : merged.target_col;
  if ((merged.flags & kPoisoned) || token < 0) {
    write_invalid_row(p, row);
  } else {
    write_row(p, row, stop, token);
  }
}

}  // namespace cuda
}  // namespace collab_ops
