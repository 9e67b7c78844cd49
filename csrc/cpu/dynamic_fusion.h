// CPU kernel of dynamic_fusion_weights: one (row, expert) task at a time, in column tiles. Every
// state (the three models' and each grid candidate's) is updated per tile in vectorisable sweeps
// (max, then sums). Torch-free.
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

// State of the values x[i] (with x = -inf for excluded entries) weighted by y[i], for one tile.
inline WeightedLse tile_weighted_lse(const float* x, const float* y, int64_t count) {
  float tile_max = -INFINITY;
  for (int64_t i = 0; i < count; ++i) tile_max = std::max(tile_max, x[i]);
  if (tile_max == -INFINITY) return weighted_lse_init();
  float sum = 0.f, weighted = 0.f;
  for (int64_t i = 0; i < count; ++i) {
    const float p = vector_exp(x[i] - tile_max);
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
    for (int64_t i = 0; i < count; ++i) {
      const bool a_in = a[i] != -INFINITY, e_in = e[i] != -INFINITY, b_in = b[i] != -INFINITY;
      state.saw_nan |= std::isnan(a[i]) || std::isnan(e[i]) || std::isnan(b[i]);
      state.large_mass_excluded |= a_in && !(e_in && b_in);
      state.expert_mass_outside_base |= e_in && !b_in;
      state.base_mass_outside_expert |= b_in && !e_in;
      kept[i] = a_in && e_in && b_in;
      d[i] = e_in && b_in ? e[i] - b[i] : 0.f;
    }
    // The same sweep for the models and the candidates, so that alpha * d == 0 gives exactly P's
    // state (the exact ties of an expert equal to the base then resolve like the reference's).
    state.large = weighted_lse_merge(state.large, tile_weighted_lse(a, d, count));
    state.expert = weighted_lse_merge(state.expert, tile_weighted_lse(e, d, count));
    state.base = weighted_lse_merge(state.base, tile_weighted_lse(b, d, count));
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
