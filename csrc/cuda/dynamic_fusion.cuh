// CUDA kernel of dynamic_fusion_weights. Torch-free; the launcher is in dynamic_fusion.cu.
//
// Each (row, expert) task's row is cut into tiles of kDynamicTile columns, and the tiles into
// `splits` contiguous runs of near-equal length, one block each (block = task * splits + split),
// with splits chosen by the launcher so that all blocks are resident at once: a small batch
// still fills the GPU, every SM gets about the same number of tiles, and a block's fixed costs
// (the merge of its threads' states, the partial it publishes) are paid once per run of tiles,
// not once per tile. A block, for each tile of its run,
//   1. reads the tile of the three rows once (8- or 16-byte loads of 4 adjacent columns) and
//      stores the prepared FusionColumns in shared memory as (value, d) pairs per source;
//   2. splits the work by slot *and* column: thread t is (slot t % S, copy t / S) with S = 3 + grid
//      slots and floor(256 / S) copies, copy c taking the tile's shared-memory positions c,
//      c + copies, ... (for 21 candidates, 240 of the 256 threads work). A thread sweeps its
//      positions twice, for its slot's exact maximum and then the sums relative to it
//      (common/dynamic_fusion.h): per column and slot one broadcast-friendly shared load, an FMA
//      and a max, then a load, an FMA, a subtraction, one ex2 and two adds, with no branch. The
//      thread's state (max, sum, weighted sum) carries over to the next tile, rescaled by one ex2
//      when that tile raises the maximum, so the state's reference stays the exact maximum over
//      every column it covers;
// then
//   3. merges the copies of each slot (one warp per slot, warp shuffles) into the run's partial;
//   4. the last block of the task to finish (an arrival counter zeroed by the launcher) merges the
//      task's partials the same way and selects the candidate.
// Every merge runs in a fixed order, so the result does not depend on which block comes last, and
// slots with identical inputs (expert == base, alpha = 0) stay bit-identical.
#pragma once
#include <cstdint>

#include "common/dynamic_fusion.h"

namespace collab_ops {
namespace cuda {

constexpr int kDynamicThreads = 256;
constexpr int kDynamicWarps = kDynamicThreads / 32;
constexpr int kDynamicColumnsPerThread = 4;
constexpr int64_t kDynamicTile = static_cast<int64_t>(kDynamicThreads) * kDynamicColumnsPerThread;

struct DynamicFusionLayout {
  WeightedLse* partials;  // [tasks, splits, slots]
  uint32_t* split_flags;  // [tasks, splits] DynamicFusionFlag bits
  uint32_t* arrived;      // [tasks] splits done; zeroed by the launcher, reset by the folding block
  int64_t tiles;          // tiles of kDynamicTile columns per row
  int64_t splits;         // blocks per task, each over a contiguous run of tiles
};

// Split `split` of a row of `tiles` tiles covers tiles [tile_run_begin(split), tile_run_begin(split + 1)).
__host__ __device__ __forceinline__ int64_t tile_run_begin(int64_t split, int64_t splits, int64_t tiles) {
  return split * tiles / splits;
}

__device__ __forceinline__ WeightedLse warp_merge_weighted_lse(WeightedLse s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const WeightedLse other{__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
                            __shfl_xor_sync(0xffffffffu, s.weighted, offset)};
    s = weighted_lse_merge(s, other);
  }
  return s;
}

// Columns col .. col + 3 of one row, -inf past `count`: one 16-byte (fp32) or 8-byte (16-bit)
// load where the four are in bounds and aligned, element loads otherwise.
__device__ __forceinline__ void load_four_logits(const LogitRows& rows, int64_t row, int64_t col, int count,
                                                 float (&x)[4]) {
  const int64_t index = row * rows.row_stride + col;
  if (rows.kind == ScalarKind::kFloat32) {
    const float* data = static_cast<const float*>(rows.data) + index;
    if (count == 4 && reinterpret_cast<uintptr_t>(data) % 16 == 0) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(data));
      x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
      return;
    }
  } else {
    const uint16_t* data = static_cast<const uint16_t*>(rows.data) + index;
    if (count == 4 && reinterpret_cast<uintptr_t>(data) % 8 == 0) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(data));
      const uint16_t h[4] = {static_cast<uint16_t>(v.x), static_cast<uint16_t>(v.x >> 16), static_cast<uint16_t>(v.y),
                             static_cast<uint16_t>(v.y >> 16)};
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = rows.kind == ScalarKind::kBFloat16 ? bfloat16_to_float(h[i]) : float16_to_float(h[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = i < count ? load_as_float(rows.data, rows.kind, index + i) : -INFINITY;
}

// Reads a partial another block wrote, past this SM's L1.
__device__ __forceinline__ WeightedLse load_partial(const WeightedLse* part) {
  return WeightedLse{__ldcg(&part->max), __ldcg(&part->sum), __ldcg(&part->weighted)};
}

__global__ void __launch_bounds__(kDynamicThreads)
    dynamic_fusion_kernel(DynamicFusionParams p, DynamicFusionLayout layout) {
  const int64_t task = blockIdx.x / layout.splits, split = blockIdx.x % layout.splits;
  const int64_t row = task / p.num_experts;
  const int expert = static_cast<int>(task % p.num_experts);
  const int slots = dynamic_fusion_slots(p.grid_size);
  // (source value, d) per column and source: a thread's slot reads one 8-byte pair per column,
  // and the sources of a column are adjacent, so a warp's loads hit distinct banks or broadcast.
  __shared__ float2 pairs[kDynamicTile][kFusionModelSlots];
  __shared__ float grid[kMaxFusionGrid];
  __shared__ union {
    WeightedLse copies[kDynamicThreads];  // [copy * slots + slot]
    DynamicFusionState task_state;
  } merge;
  __shared__ uint32_t block_flags;
  __shared__ bool folds_the_task;
  if (threadIdx.x < p.grid_size) grid[threadIdx.x] = p.grid[threadIdx.x];
  if (threadIdx.x == 0) block_flags = 0u;

  // Thread = (slot, copy); its state in log2 units over every tile of the run so far.
  const int copies = kDynamicThreads / slots;
  const int slot = threadIdx.x % slots, copy = threadIdx.x / slots;
  // A trip count known before the loop lets it unroll without a bound check per position (past
  // the row the positions hold -inf, which adds nothing).
  const int visits = (static_cast<int>(kDynamicTile) - copy + copies - 1) / copies;
  const int stride = copies * kFusionModelSlots;
  float max2 = -INFINITY, sum = 0.f, weighted = 0.f;
  uint32_t flags = 0u;
  const int64_t first_tile = tile_run_begin(split, layout.splits, layout.tiles);
  const int64_t end_tile = tile_run_begin(split + 1, layout.splits, layout.tiles);
  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    // 1. Read and prepare the tile's columns. Thread t reads columns 4t .. 4t + 3 and stores
    // column 4t + i at position i * 256 + t, so that a warp's stores are conflict-free; every slot
    // visits the positions in the same order, so the permutation changes nothing but the speed.
    const int64_t begin = tile * kDynamicTile;
    const int columns = static_cast<int>(min(kDynamicTile, p.vocab - begin));
    const int first = kDynamicColumnsPerThread * threadIdx.x;
    const int count = max(0, min(kDynamicColumnsPerThread, columns - first));
    float a[4], e[4], b[4];
    load_four_logits(p.large, row, begin + first, count, a);
    load_four_logits(p.experts[expert], row, begin + first, count, e);
    load_four_logits(p.base, row, begin + first, count, b);
    if (tile != first_tile) __syncthreads();  // every sweep of the previous tile is done
#pragma unroll
    for (int i = 0; i < kDynamicColumnsPerThread; ++i) {
      FusionColumn column;
      flags |= dynamic_fusion_column(a[i], e[i], b[i], column);  // -inf past the row: no flag, no mass
      float2* position = pairs[i * kDynamicThreads + threadIdx.x];
      position[0] = make_float2(column.large, column.diff);
      position[1] = make_float2(column.expert, column.diff);
      position[2] = make_float2(column.base, column.diff);
    }
    __syncthreads();  // the columns (and, on the first tile, grid and block_flags) are in shared memory

    // 2. Two sweeps over the copy's positions: the tile's maximum, then the sums relative to the
    // maximum over the run so far.
    if (copy < copies) {
      const FusionSlot s = dynamic_fusion_slot(grid, slot);
      const float2* visited = &pairs[copy][s.source];
      float tile_max2 = -INFINITY;
#pragma unroll 4
      for (int k = 0; k < visits; ++k) {
        const float2 v = visited[k * stride];
        tile_max2 = fmaxf(tile_max2, fusion_exponent(s.alpha, v.y, v.x));
      }
      if (tile_max2 > max2) {  // the run's sums so far are relative to a smaller maximum
        const float scale = fusion_exp2(max2 - tile_max2);  // 0 when nothing was summed yet
        sum *= scale;
        weighted *= scale;
        max2 = tile_max2;
      }
      if (tile_max2 != -INFINITY) {
        float tile_sum = 0.f, tile_weighted = 0.f;
#pragma unroll 4
        for (int k = 0; k < visits; ++k) {
          const float2 v = visited[k * stride];
          const float term = fusion_exp2(fusion_exponent(s.alpha, v.y, v.x) - max2);
          tile_sum += term;
          tile_weighted = fmaf(term, v.y, tile_weighted);
        }
        sum += tile_sum;
        weighted += tile_weighted;
      }
    }
  }
  if (flags != 0u) atomicOr(&block_flags, flags);
  if (copy < copies) merge.copies[copy * slots + slot] = max2 == -INFINITY ? weighted_lse_init()
                                                                          : weighted_lse_from_log2(max2, sum, weighted);
  __syncthreads();

  // 3. The run's partial: warp w merges the copies of slots w, w + 8, ...
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  WeightedLse* run_partial = layout.partials + static_cast<int64_t>(blockIdx.x) * slots;
  for (int s = warp; s < slots; s += kDynamicWarps) {
    WeightedLse merged = weighted_lse_init();
    for (int c = lane; c < copies; c += 32) merged = weighted_lse_merge(merged, merge.copies[c * slots + s]);
    merged = warp_merge_weighted_lse(merged);
    if (lane == 0) {
      run_partial[s] = merged;
      __threadfence();  // the partial is visible before the arrival is counted
    }
  }
  if (threadIdx.x == 0) {
    layout.split_flags[blockIdx.x] = block_flags;
    __threadfence();
  }
  __syncthreads();
  if (threadIdx.x == 0) folds_the_task = atomicAdd(&layout.arrived[task], 1u) == layout.splits - 1;
  __syncthreads();
  if (!folds_the_task) return;

  // 4. The task's last block: merge every run's partial and select.
  __threadfence();
  const WeightedLse* task_partials = layout.partials + task * layout.splits * slots;
  for (int s = warp; s < slots; s += kDynamicWarps) {
    WeightedLse merged = weighted_lse_init();
    for (int64_t c = lane; c < layout.splits; c += 32) merged = weighted_lse_merge(merged, load_partial(task_partials + c * slots + s));
    merged = warp_merge_weighted_lse(merged);
    if (lane == 0) merge.task_state.slots[s] = merged;
  }
  uint32_t task_flags = 0u;
  for (int64_t c = threadIdx.x; c < layout.splits; c += kDynamicThreads)
    task_flags |= __ldcg(&layout.split_flags[task * layout.splits + c]);
  if (task_flags != 0u) atomicOr(&block_flags, task_flags);
  __syncthreads();
  if (threadIdx.x == 0) {
    merge.task_state.flags = block_flags;
    p.out[task] = dynamic_fusion_select(merge.task_state, grid, p.grid_size);
    layout.arrived[task] = 0u;  // a later launch on the same workspace counts from zero
  }
}

}  // namespace cuda
}  // namespace collab_ops
