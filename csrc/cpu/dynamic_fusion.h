// CPU kernel of dynamic_fusion_weights: one (row, expert) task at a time, in column tiles. The
// three model states are updated per element; each grid candidate's state is updated per tile in
// vectorisable sweeps (max, then sums), which is where the time goes. Torch-free.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/dynamic_fusion.h"
#include "cpu/fuse_logits.h"

namespace collab_ops {
namespace cpu {

inline void load_rows_tile(const LogitRows& rows, int64_t row, int64_t col, int64_t count, float* dst) {
  load_scaled_tile(rows.data, rows.kind, row * rows.row_stride + col, count, 1.f, dst);
}

// State of the values x[i] (with x = -inf for excluded entries) weighted by y[i], for one tile.
inline WeightedLse tile_weighted_lse(const float* x, const float* y, int64_t count) {
  float tile_max = -INFINITY;
  for (int64_t i = 0; i < count; ++i) tile_max = std::max(tile_max, x[i]);
  if (tile_max == -INFINITY) return weighted_lse_init();
  float sum = 0.f, weighted = 0.f;
  for (int64_t i = 0; i < count; ++i) {
    const float p = std::exp(x[i] - tile_max);
    sum += p;
    weighted += p * y[i];
  }
  return WeightedLse{tile_max, sum, weighted};
}

inline float dynamic_fusion_weight(const DynamicFusionParams& p, int64_t row, int expert) {
  DynamicFusionState state;
  dynamic_fusion_state_init(state, p.grid_size);
  float a[kFusionTile], e[kFusionTile], b[kFusionTile], d[kFusionTile], fused[kFusionTile];
  bool kept[kFusionTile];
  for (int64_t col = 0; col < p.vocab; col += kFusionTile) {
    const int64_t count = std::min(kFusionTile, p.vocab - col);
    load_rows_tile(p.large, row, col, count, a);
    load_rows_tile(p.experts[expert], row, col, count, e);
    load_rows_tile(p.base, row, col, count, b);
    // The model states and flags, element by element; candidates are left to the sweeps below.
    DynamicFusionState models;
    dynamic_fusion_state_init(models, 0);
    for (int64_t i = 0; i < count; ++i) {
      dynamic_fusion_add(models, p.grid, 0, a[i], e[i], b[i]);
      kept[i] = a[i] != -INFINITY && e[i] != -INFINITY && b[i] != -INFINITY && !std::isnan(a[i] + e[i] + b[i]);
      d[i] = kept[i] ? e[i] - b[i] : 0.f;
    }
    dynamic_fusion_merge(state, models, 0);
    for (int g = 0; g < p.grid_size; ++g) {
      const float alpha = p.grid[g];
      for (int64_t i = 0; i < count; ++i) fused[i] = kept[i] ? a[i] + alpha * d[i] : -INFINITY;
      state.fused[g] = weighted_lse_merge(state.fused[g], tile_weighted_lse(fused, d, count));
    }
  }
  return dynamic_fusion_select(state, p.grid, p.grid_size);
}

}  // namespace cpu
}  // namespace collab_ops
