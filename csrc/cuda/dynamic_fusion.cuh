// CUDA kernels of dynamic_fusion_weights. Torch-free; the launcher is in dynamic_fusion.cu.
//
// Every (row, expert) task's row is split into chunks of kDynamicChunk columns, one block each, so
// a small batch still fills the GPU; each thread keeps the whole DynamicFusionState (all grid
// candidates) in registers. partial_kernel writes one merged state per chunk; select_kernel
// merges a task's chunks slot by slot and picks the candidate.
#pragma once
#include "common/dynamic_fusion.h"

namespace collab_ops {
namespace cuda {

constexpr int kDynamicThreads = 256;
constexpr int kDynamicWarps = kDynamicThreads / 32;
constexpr int kDynamicColumnsPerThread = 8;
constexpr int64_t kDynamicChunk = static_cast<int64_t>(kDynamicThreads) * kDynamicColumnsPerThread;

__device__ __forceinline__ WeightedLse warp_merge_weighted_lse(WeightedLse s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const WeightedLse other{__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
                            __shfl_xor_sync(0xffffffffu, s.weighted, offset)};
    s = weighted_lse_merge(s, other);
  }
  return s;
}

__global__ void __launch_bounds__(kDynamicThreads)
    dynamic_fusion_partial_kernel(DynamicFusionParams p, int64_t num_chunks, DynamicFusionState* partials) {
  const int64_t chunk = blockIdx.x % num_chunks, task = blockIdx.x / num_chunks;
  const int64_t row = task / p.num_experts;
  const int expert = static_cast<int>(task % p.num_experts);
  __shared__ float grid[kMaxFusionGrid];
  if (threadIdx.x < p.grid_size) grid[threadIdx.x] = p.grid[threadIdx.x];
  __syncthreads();

  // Issue every load of the thread before the dependent state updates.
  float a[kDynamicColumnsPerThread], e[kDynamicColumnsPerThread], b[kDynamicColumnsPerThread];
  const int64_t begin = chunk * kDynamicChunk;
#pragma unroll
  for (int i = 0; i < kDynamicColumnsPerThread; ++i) {
    const int64_t col = begin + i * kDynamicThreads + threadIdx.x;
    const bool inside = col < p.vocab;
    a[i] = inside ? load_logit(p.large, row, col) : -INFINITY;
    e[i] = inside ? load_logit(p.experts[expert], row, col) : -INFINITY;
    b[i] = inside ? load_logit(p.base, row, col) : -INFINITY;
  }
  DynamicFusionState state;
  dynamic_fusion_state_init(state, kMaxFusionGrid);
#pragma unroll
  for (int i = 0; i < kDynamicColumnsPerThread; ++i) dynamic_fusion_add(state, grid, p.grid_size, a[i], e[i], b[i]);

  __shared__ WeightedLse warp_states[kDynamicWarps][kFusionStateSlots];
  __shared__ int flags[4];
  if (threadIdx.x < 4) flags[threadIdx.x] = 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int slot = 0; slot < kFusionStateSlots; ++slot) {
    if (slot < 3 + p.grid_size) {  // uniform across the block: every lane joins the shuffles
      const WeightedLse merged = warp_merge_weighted_lse(state_slot(state, slot));
      if (lane == 0) warp_states[warp][slot] = merged;
    }
  }
  __syncthreads();
  if (state.large_mass_excluded) atomicOr(&flags[0], 1);
  if (state.expert_mass_outside_base) atomicOr(&flags[1], 1);
  if (state.base_mass_outside_expert) atomicOr(&flags[2], 1);
  if (state.saw_nan) atomicOr(&flags[3], 1);
  __syncthreads();

  DynamicFusionState& out = partials[task * num_chunks + chunk];
  for (int slot = threadIdx.x; slot < 3 + p.grid_size; slot += kDynamicThreads) {
    WeightedLse merged = warp_states[0][slot];
    for (int w = 1; w < kDynamicWarps; ++w) merged = weighted_lse_merge(merged, warp_states[w][slot]);
    state_slot(out, slot) = merged;
  }
  if (threadIdx.x == 0) {
    out.large_mass_excluded = flags[0];
    out.expert_mass_outside_base = flags[1];
    out.base_mass_outside_expert = flags[2];
    out.saw_nan = flags[3];
  }
}

constexpr int kSelectThreads = 64;  // >= kFusionStateSlots: one thread per state slot

__global__ void __launch_bounds__(kSelectThreads)
    dynamic_fusion_select_kernel(DynamicFusionParams p, int64_t num_chunks, const DynamicFusionState* partials) {
  const int64_t task = blockIdx.x;
  __shared__ DynamicFusionState merged;
  __shared__ float grid[kMaxFusionGrid];
  const DynamicFusionState* chunks = partials + task * num_chunks;
  const int slot = threadIdx.x;
  if (slot < p.grid_size) grid[slot] = p.grid[slot];
  if (slot < 3 + p.grid_size) {
    WeightedLse state = weighted_lse_init();
    for (int64_t c = 0; c < num_chunks; ++c)
      state = weighted_lse_merge(state, state_slot(const_cast<DynamicFusionState&>(chunks[c]), slot));
    state_slot(merged, slot) = state;
  }
  if (slot == 0) {
    bool large_mass_excluded = false, expert_outside = false, base_outside = false, saw_nan = false;
    for (int64_t c = 0; c < num_chunks; ++c) {
      large_mass_excluded |= chunks[c].large_mass_excluded;
      expert_outside |= chunks[c].expert_mass_outside_base;
      base_outside |= chunks[c].base_mass_outside_expert;
      saw_nan |= chunks[c].saw_nan;
    }
    merged.large_mass_excluded = large_mass_excluded;
    merged.expert_mass_outside_base = expert_outside;
    merged.base_mass_outside_expert = base_outside;
    merged.saw_nan = saw_nan;
  }
  __syncthreads();
  if (slot == 0) p.out[task] = dynamic_fusion_select(merged, grid, p.grid_size);
}

}  // namespace cuda
}  // namespace collab_ops
