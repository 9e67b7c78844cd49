// CUDA kernels of speculative_verify. Torch-free; the launcher is in speculative_verify.cu.
//
// The work is bandwidth: full-row reads of every used target position and draft position (the
// invalid-row rules and the normalisers need them), then one pass over the stop row. Each vocabulary
// row is cut into `splits` column chunks so that even B = 1 spreads over the whole GPU, in four
// launches whose blocks exchange small partial results through a workspace:
//   1. normaliser_partials: block (chunk, position, row) reduces its chunk of every participating
//      target model (and the draft): sum and sign for probabilities, online logsumexp for logits,
//      argmax for greedy plain targets.
//   2. fused_partials: merges those partials into per-position normalisers (written by chunk 0) and,
//      for fused targets only, reduces its chunk of the fused score s_t (logsumexp and argmax).
//   3. stop_mass: every block of a row repeats the cheap part (merge the fused partials, validity,
//      the acceptance chain from gathered p_i(x_i), q_i(x_i)), then sums the stop position's mass
//      max(0, p - q) (and p, for the empty-residual case) over its chunk. Greedy rows finish here.
//   4. draw_final_token: one block per row turns the uniform into a chunk from the chunk sums and
//      into a column inside that chunk with a block-wide scan (inverse CDF, as the CPU kernel does
//      with the same Philox uniforms).
// No host synchronisation; the workspace size depends on shapes only, so the launches capture.
#pragma once
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/warp/warp_reduce.cuh>

#include "common/fusion.h"
#include "common/speculative.h"

namespace collab_ops {
namespace cuda {

// A reduction over some columns of one row: online logsumexp (logits, fused scores) or a plain
// sum (probabilities), with the first argmax.
struct RowPartial {
  float max;  // logsumexp: running max; unused for sums
  float sum;
  float best;
  int32_t flags;
  int64_t best_col;
};

constexpr int32_t kSawNan = 1;
constexpr int32_t kSawNegative = 2;

struct RowDecision {
  TargetNormaliser stop_target;
  DraftNormaliser stop_draft;
  int64_t accepted;
  bool valid;
  bool after_rejection;  // the stop mass is max(0, p - q), not the bonus p
};

struct SpeculativeWorkspace {
  RowPartial* model_partials;            // [batch][num_drafts + 1][num_targets + 1 (draft)][splits]
  TargetNormaliser* target_normalisers;  // [batch][num_drafts + 1]
  DraftNormaliser* draft_normalisers;    // [batch][num_drafts + 1]
  RowPartial* fused_partials;            // [batch][num_drafts + 1][splits]
  float2* mass_partials;                 // [batch][splits]: (stop mass, p) sums of a chunk
  RowDecision* decisions;                // [batch]
  int32_t splits;
  int64_t chunk;  // columns per split
};

__device__ __forceinline__ RowPartial row_partial_init() { return RowPartial{-INFINITY, 0.f, -INFINITY, 0, 0}; }

__device__ __forceinline__ void track_best(RowPartial& r, float value, int64_t col) {
  if (value > r.best) {  // columns of one thread increase, so strict > keeps the first
    r.best = value;
    r.best_col = col;
  }
}

__device__ __forceinline__ void add_log_value(RowPartial& r, float x) {
  OnlineLse state{r.max, r.sum, false};
  online_lse_add(state, x);
  r.max = state.max;
  r.sum = state.sum;
  if (x != x) r.flags |= kSawNan;
}

struct MergeRowPartial {
  bool log_space;
  __device__ __forceinline__ RowPartial operator()(const RowPartial& a, const RowPartial& b) const {
    RowPartial m;
    if (log_space) {
      const OnlineLse merged = online_lse_merge(OnlineLse{a.max, a.sum, false}, OnlineLse{b.max, b.sum, false});
      m.max = merged.max;
      m.sum = merged.sum;
    } else {
      m.max = -INFINITY;
      m.sum = a.sum + b.sum;
    }
    m.flags = a.flags | b.flags;
    const bool take_b = b.best > a.best || (b.best == a.best && b.best_col < a.best_col);
    m.best = take_b ? b.best : a.best;
    m.best_col = take_b ? b.best_col : a.best_col;
    return m;
  }
};

// The log-space normaliser of a merged logsumexp partial (NaN when a NaN was seen).
__device__ __forceinline__ float log_normaliser(const RowPartial& r) {
  return online_lse_value(OnlineLse{r.max, r.sum, (r.flags & kSawNan) != 0});
}

template <int kThreads>
__device__ RowPartial block_merge_partial(RowPartial local, bool log_space) {
  using Reduce = cub::BlockReduce<RowPartial, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ RowPartial result;
  const RowPartial merged = Reduce(storage).Reduce(local, MergeRowPartial{log_space});
  if (threadIdx.x == 0) result = merged;
  __syncthreads();
  return result;
}

__device__ __forceinline__ bool position_used(const SpeculativeParams& p, int64_t row, int64_t position) {
  const int64_t n = p.num_draft_tokens[row];
  return n >= 0 && n <= p.num_drafts && position <= n;
}

__device__ __forceinline__ int64_t chunk_end(const SpeculativeParams& p, const SpeculativeWorkspace& w, int64_t split) {
  const int64_t end = (split + 1) * w.chunk;
  return end < p.vocab ? end : p.vocab;
}

__device__ __forceinline__ int64_t partial_index(const SpeculativeParams& p, const SpeculativeWorkspace& w, int64_t row,
                                                 int64_t position, int slot, int64_t split) {
  return ((row * (p.num_drafts + 1) + position) * (p.num_targets + 1) + slot) * w.splits + split;
}

// One chunk of one probability or logit row (a target model or the draft).
template <int kThreads>
__device__ RowPartial chunk_partial(const SpeculativeParams& p, const void* base, int64_t offset, int64_t begin,
                                    int64_t end, bool want_argmax) {
  RowPartial local = row_partial_init();
  for (int64_t col = begin + threadIdx.x; col < end; col += kThreads) {
    const float value = load_as_float(base, p.kind, offset + col);
    if (p.inputs_are_logits) {
      add_log_value(local, value * p.inv_temperature);
    } else {
      local.sum += value;  // NaN and +inf carry into the sum
      if (value < 0.f) local.flags |= kSawNegative;
    }
    if (want_argmax) track_best(local, value, col);
  }
  return block_merge_partial<kThreads>(local, p.inputs_are_logits);
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) normaliser_partials_kernel(SpeculativeParams p, SpeculativeWorkspace w) {
  const int64_t split = blockIdx.x, position = blockIdx.y, row = blockIdx.z;
  if (!position_used(p, row, position)) return;
  const RowTargets rt = row_targets(p, row);
  const int64_t begin = split * w.chunk, end = chunk_end(p, w, split);
  for (int j = 0; j < rt.count; ++j) {
    const int k = rt.model[j];
    const RowPartial partial = chunk_partial<kThreads>(p, p.targets[k], target_offset(p, k, row, position), begin, end,
                                                       p.greedy && rt.plain);
    if (threadIdx.x == 0) w.model_partials[partial_index(p, w, row, position, j, split)] = partial;
  }
  if (!p.greedy && p.draft != nullptr && position < p.num_draft_tokens[row]) {
    const RowPartial partial = chunk_partial<kThreads>(p, p.draft, draft_offset(p, row, position), begin, end, false);
    if (threadIdx.x == 0) w.model_partials[partial_index(p, w, row, position, p.num_targets, split)] = partial;
  }
}

// Merges the chunk partials of one slot into (log-space offset, 1/sum, argmax, undefined).
__device__ void merge_slot(const SpeculativeParams& p, const SpeculativeWorkspace& w, int64_t row, int64_t position,
                           int slot, float& offset, float& inv_sum, int64_t& argmax, bool& undefined) {
  const MergeRowPartial merge{p.inputs_are_logits};
  RowPartial merged = w.model_partials[partial_index(p, w, row, position, slot, 0)];
  for (int64_t split = 1; split < w.splits; ++split) {
    merged = merge(merged, w.model_partials[partial_index(p, w, row, position, slot, split)]);
  }
  argmax = merged.best_col;
  if (p.inputs_are_logits) {
    offset = log_normaliser(merged);
    undefined = log_normaliser_undefined(offset);
  } else {
    const float smallest = (merged.flags & kSawNegative) ? -1.f : 0.f;
    undefined = probability_sum_undefined(merged.sum, smallest);
    inv_sum = 1.f / merged.sum;
    offset = logf(merged.sum);
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) fused_partials_kernel(SpeculativeParams p, SpeculativeWorkspace w) {
  const int64_t split = blockIdx.x, position = blockIdx.y, row = blockIdx.z;
  if (!position_used(p, row, position)) return;
  const RowTargets rt = row_targets(p, row);
  __shared__ TargetNormaliser target;
  __shared__ bool slot_undefined[kMaxSpeculativeTargets];
  if (threadIdx.x < rt.count) {
    const int j = threadIdx.x;
    float inv_sum = 0.f;
    int64_t argmax = 0;
    merge_slot(p, w, row, position, j, target.offset[j], inv_sum, argmax, slot_undefined[j]);
    if (j == 0) {
      target.inv_sum = inv_sum;
      target.argmax = argmax;
    }
  }
  const bool has_draft = !p.greedy && p.draft != nullptr && position < p.num_draft_tokens[row];
  if (has_draft && threadIdx.x == kMaxSpeculativeTargets && split == 0) {
    DraftNormaliser draft{};
    int64_t unused_argmax;
    merge_slot(p, w, row, position, p.num_targets, draft.offset, draft.inv_sum, unused_argmax, draft.undefined);
    w.draft_normalisers[row * (p.num_drafts + 1) + position] = draft;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    target.fused_offset = 0.f;
    target.undefined = false;
    // A model with nothing left excludes every token: the fused target is undefined too.
    for (int j = 0; j < rt.count; ++j) target.undefined |= slot_undefined[j];
    if (split == 0) w.target_normalisers[row * (p.num_drafts + 1) + position] = target;
  }
  __syncthreads();
  if (rt.plain || target.undefined) return;

  RowPartial local = row_partial_init();
  for (int64_t col = split * w.chunk + threadIdx.x; col < chunk_end(p, w, split); col += kThreads) {
    const float score = fused_target_score(p, rt, target.offset, row, position, col);
    add_log_value(local, score);
    if (p.greedy) track_best(local, score, col);
  }
  const RowPartial merged = block_merge_partial<kThreads>(local, true);
  if (threadIdx.x == 0) w.fused_partials[(row * (p.num_drafts + 1) + position) * w.splits + split] = merged;
}

// q at the stop position after a rejection; one-hot at the rejected id without a draft distribution.
__device__ __forceinline__ float stop_draft_probability(const SpeculativeParams& p, const RowDecision& d, int64_t row,
                                                        int64_t col) {
  if (p.draft == nullptr) return col == p.draft_tokens[row * p.num_drafts + d.accepted] ? 1.f : 0.f;
  return draft_probability(p, d.stop_draft, row, d.accepted, col);
}

// The stop position's mass at one column: max(0, p - q) after a rejection, else p.
__device__ __forceinline__ float stop_mass_at(const SpeculativeParams& p, const RowTargets& rt, const RowDecision& d,
                                              int64_t row, int64_t col, bool subtract_draft) {
  const float target = target_probability(p, rt, d.stop_target, row, d.accepted, col);
  return subtract_draft ? residual_mass(target, stop_draft_probability(p, d, row, col)) : target;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) stop_mass_kernel(SpeculativeParams p, SpeculativeWorkspace w) {
  const int64_t split = blockIdx.x, row = blockIdx.y;
  extern __shared__ TargetNormaliser targets[];  // [num_drafts + 1]
  __shared__ RowDecision decision;
  __shared__ RowTargets rt;
  const bool drafts_valid = row_drafts_valid(p, row);
  if (threadIdx.x == 0) rt = row_targets(p, row);
  __syncthreads();
  const int64_t n = drafts_valid ? p.num_draft_tokens[row] : -1;

  // One warp per used position: the normaliser, with the fused logsumexp merged over the chunks.
  using WarpMerge = cub::WarpReduce<RowPartial>;
  __shared__ typename WarpMerge::TempStorage warp_storage[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = warp; t <= n; t += kThreads / 32) {
    const TargetNormaliser stored = w.target_normalisers[row * (p.num_drafts + 1) + t];
    const bool merge_fused = !rt.plain && !stored.undefined;
    RowPartial local = row_partial_init();
    if (merge_fused) {
      const MergeRowPartial merge{true};
      for (int64_t s = lane; s < w.splits; s += 32) {
        local = merge(local, w.fused_partials[(row * (p.num_drafts + 1) + t) * w.splits + s]);
      }
    }
    const RowPartial merged = WarpMerge(warp_storage[warp]).Reduce(local, MergeRowPartial{true});
    __syncwarp();  // the warp's storage is reused by its next position
    if (lane == 0) {
      targets[t] = stored;
      if (merge_fused) {
        targets[t].fused_offset = log_normaliser(merged);
        targets[t].argmax = merged.best_col;
        targets[t].undefined = log_normaliser_undefined(targets[t].fused_offset);
      }
    }
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    RowDecision d{};
    d.valid = drafts_valid;
    const bool draft_given = p.draft != nullptr;
    for (int64_t t = 0; d.valid && t <= n; ++t) d.valid = !targets[t].undefined;
    for (int64_t t = 0; d.valid && !p.greedy && draft_given && t < n; ++t) {
      d.valid = !w.draft_normalisers[row * (p.num_drafts + 1) + t].undefined;
    }
    int64_t accepted = 0;
    while (d.valid && accepted < n) {
      const int64_t id = p.draft_tokens[row * p.num_drafts + accepted];
      bool ok;
      if (p.greedy) {
        ok = id == targets[accepted].argmax;
      } else {
        const float p_of_draft = target_probability(p, rt, targets[accepted], row, accepted, id);
        const float q_of_draft =
            draft_given ? draft_probability(p, w.draft_normalisers[row * (p.num_drafts + 1) + accepted], row,
                                            accepted, id)
                        : 1.f;
        ok = accept_draft(speculative_uniform(p.seed[row], static_cast<uint32_t>(accepted), kAcceptStream),
                          p_of_draft, q_of_draft);
      }
      if (!ok) break;
      ++accepted;
    }
    d.accepted = accepted;
    d.after_rejection = accepted < n;
    if (d.valid) {
      d.stop_target = targets[accepted];
      if (d.after_rejection && draft_given) d.stop_draft = w.draft_normalisers[row * (p.num_drafts + 1) + accepted];
    }
    decision = d;
    if (split == 0) {
      w.decisions[row] = d;
      if (!d.valid) {
        write_invalid_row(p, row);
      } else if (p.greedy) {
        write_row(p, row, accepted, targets[accepted].argmax);
      }
    }
  }
  __syncthreads();
  if (!decision.valid || p.greedy) return;

  float2 local = make_float2(0.f, 0.f);
  for (int64_t col = split * w.chunk + threadIdx.x; col < chunk_end(p, w, split); col += kThreads) {
    const float target = target_probability(p, rt, decision.stop_target, row, decision.accepted, col);
    local.x += decision.after_rejection ? residual_mass(target, stop_draft_probability(p, decision, row, col)) : target;
    local.y += target;
  }
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const float mass = Reduce(storage).Sum(local.x);
  __syncthreads();
  const float target_mass = Reduce(storage).Sum(local.y);
  if (threadIdx.x == 0) w.mass_partials[row * w.splits + split] = make_float2(mass, target_mass);
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) draw_final_token_kernel(SpeculativeParams p, SpeculativeWorkspace w) {
  const int64_t row = blockIdx.x;
  __shared__ RowDecision decision;
  __shared__ RowTargets rt;
  __shared__ int64_t chunk_index;
  __shared__ float needle_in_chunk;
  __shared__ bool subtract_draft;
  __shared__ unsigned long long found;
  __shared__ long long last_with_mass;
  if (threadIdx.x == 0) {
    decision = w.decisions[row];
    rt = row_targets(p, row);
    double residual_total = 0.0, target_total = 0.0;
    for (int64_t s = 0; s < w.splits; ++s) {
      residual_total += w.mass_partials[row * w.splits + s].x;
      target_total += w.mass_partials[row * w.splits + s].y;
    }
    // max(0, p - q) is zero everywhere only when p == q up to rounding: then p itself is sampled.
    subtract_draft = decision.after_rejection && residual_total > 0.0;
    const double total = subtract_draft ? residual_total : target_total;
    const double needle = speculative_uniform(p.seed[row], 0u, kFinalDrawStream) * total;
    double before = 0.0;
    int64_t s = 0;
    for (; s + 1 < w.splits; ++s) {
      const double part = subtract_draft ? w.mass_partials[row * w.splits + s].x : w.mass_partials[row * w.splits + s].y;
      if (before + part > needle && part > 0.0) break;
      before += part;
    }
    chunk_index = s;
    needle_in_chunk = static_cast<float>(needle - before);
    found = ~0ull;
    last_with_mass = -1;
  }
  __syncthreads();
  if (!decision.valid) return;

  // Each thread owns a contiguous run of the chunk, so a block-wide exclusive scan of the run sums
  // tells each thread whether the needle falls in its run.
  const int64_t begin = chunk_index * w.chunk, end = chunk_end(p, w, chunk_index);
  const int64_t per_thread = (end - begin + kThreads - 1) / kThreads;
  const int64_t run_begin = begin + threadIdx.x * per_thread;
  const int64_t run_end = run_begin + per_thread < end ? run_begin + per_thread : end;
  float run_sum = 0.f;
  long long run_last = -1;
  for (int64_t col = run_begin; col < run_end; ++col) {
    const float mass = stop_mass_at(p, rt, decision, row, col, subtract_draft);
    run_sum += mass;
    if (mass > 0.f) run_last = col;
  }
  using Scan = cub::BlockScan<float, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  float run_before;
  Scan(scan_storage).ExclusiveSum(run_sum, run_before);
  if (run_last >= 0) atomicMax(&last_with_mass, run_last);
  if (run_sum > 0.f && run_before <= needle_in_chunk && needle_in_chunk < run_before + run_sum) {
    float running = run_before;
    for (int64_t col = run_begin; col < run_end; ++col) {
      const float mass = stop_mass_at(p, rt, decision, row, col, subtract_draft);
      if (mass <= 0.f) continue;
      running += mass;
      if (running > needle_in_chunk) {
        atomicMin(&found, static_cast<unsigned long long>(col));
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Rounding can leave the needle past the last running sum: the last column with mass then.
    const int64_t token = found != ~0ull ? static_cast<int64_t>(found) : static_cast<int64_t>(last_with_mass);
    write_row(p, row, decision.accepted, token);
  }
}

}  // namespace cuda
}  // namespace collab_ops
