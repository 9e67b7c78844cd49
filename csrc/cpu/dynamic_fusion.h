// CPU kernel of dynamic_fusion_weights: one (row, expert) task at a time, in column tiles. Each
// tile's columns are prepared once (common/dynamic_fusion.h, FusionColumn), then every slot (the
// three models' and each grid candidate's) takes two vectorisable sweeps over the tile: its exact
// maximum, then the sums relative to it. Torch-free.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/dynamic_fusion.h"
#include "common/vector_math.h"
#include "cpu/fuse_logits.h"

namespace collab_ops {
namespace cpu {

inline void load_rows_tile(const LogitRows& rows, int64_t row, int64_t col, int64_t count, float* dst) {
  load_scaled_tile(rows.data, rows.kind, row * rows.row_stride + col, count, 1.f, dst);
}

// One slot's state over a tile: values[i] the slot's source column value, diff[i] the weight d'.
inline WeightedLse tile_slot_state(const float* values, const float* diff, float alpha, int64_t count) {
  float max2 = -INFINITY;
  for (int64_t i = 0; i < count; ++i) max2 = std::max(max2, fusion_exponent(alpha, diff[i], values[i]));
  if (max2 == -INFINITY) return weighted_lse_init();
  float sum = 0.f, weighted = 0.f;
  for (int64_t i = 0; i < count; ++i) {
    const float p = fusion_exp2(fusion_exponent(alpha, diff[i], values[i]) - max2);
    sum += p;
    weighted += p * diff[i];
  }
  return weighted_lse_from_log2(max2, sum, weighted);
}

inline float dynamic_fusion_weight(const DynamicFusionParams& p, int64_t row, int expert) {
  DynamicFusionState state;
  dynamic_fusion_state_init(state, p.grid_size);
  float a[kFusionTile], e[kFusionTile], b[kFusionTile];
  // Structure of arrays of the tile's FusionColumns, so that the slot sweeps vectorise.
  float sources[kFusionModelSlots][kFusionTile], diff[kFusionTile];
  for (int64_t col = 0; col < p.vocab; col += kFusionTile) {
    const int64_t count = std::min(kFusionTile, p.vocab - col);
    load_rows_tile(p.large, row, col, count, a);
    load_rows_tile(p.experts[expert], row, col, count, e);
    load_rows_tile(p.base, row, col, count, b);
    uint32_t flags = 0u;
    for (int64_t i = 0; i < count; ++i) {
      FusionColumn column;
      flags |= dynamic_fusion_column(a[i], e[i], b[i], column);
      sources[0][i] = column.large;
      sources[1][i] = column.expert;
      sources[2][i] = column.base;
      diff[i] = column.diff;
    }
    state.flags |= flags;
    for (int slot = 0; slot < dynamic_fusion_slots(p.grid_size); ++slot) {
      const FusionSlot s = dynamic_fusion_slot(p.grid, slot);
      state.slots[slot] = weighted_lse_merge(state.slots[slot], tile_slot_state(sources[s.source], diff, s.alpha, count));
    }
  }
  return dynamic_fusion_select(state, p.grid, p.grid_size);
}

}  // namespace cpu
}  // namespace collab_ops
