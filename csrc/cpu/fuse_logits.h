// CPU kernel of fuse_logits: one row at a time, in column tiles so that the dtype conversion and
// the combination are plain loops the compiler vectorises. Torch-free; the launcher in
// fuse_logits.cpp splits rows across threads.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/fusion.h"
#include "cpu/tiles.h"

namespace collab_ops {
namespace cpu {

constexpr int64_t kFusionTile = 1024;

inline void load_model_tile(const FusionParams& p, int k, int64_t row, int64_t col, int64_t count, float* dst) {
  load_scaled_tile(p.logits[k], p.kind[k], row * p.row_stride[k] + col, count, p.inv_temperature[k], dst);
}

// Max and log-sum-exp state of one tile, in two vectorisable sweeps.
inline OnlineLse tile_lse(const float* x, int64_t count) {
  float tile_max = -INFINITY;
  bool tile_nan = false;
  for (int64_t i = 0; i < count; ++i) {
    tile_max = std::max(tile_max, x[i]);
    tile_nan |= std::isnan(x[i]);
  }
  OnlineLse state{tile_max, 0.f, tile_nan};
  if (tile_max == -INFINITY || tile_max == INFINITY) return state;
  float sum = 0.f;
  for (int64_t i = 0; i < count; ++i) sum += std::exp(x[i] - tile_max);
  state.sum = sum;
  return state;
}

// Per-row max and log-sum-exp of model k's scaled logits.
inline OnlineLse model_row_stats(const FusionParams& p, int k, int64_t row, float* tile) {
  OnlineLse state = online_lse_init();
  for (int64_t col = 0; col < p.vocab; col += kFusionTile) {
    const int64_t count = std::min(kFusionTile, p.vocab - col);
    load_model_tile(p, k, row, col, count, tile);
    state = online_lse_merge(state, tile_lse(tile, count));
  }
  return state;
}

inline void fuse_logits_row(const FusionParams& p, int64_t row) {
  float weight[kMaxFusedModels];
  float offset[kMaxFusedModels];
  float model_tile[kMaxFusedModels][kFusionTile];
  float score[kFusionTile];
  float plausibility_cut = -INFINITY;
  for (int k = 0; k < p.num_models; ++k) {
    weight[k] = fusion_weight(p, row, k);
    offset[k] = 0.f;
    const bool used = weight[k] != 0.f || (p.use_plausibility && k == p.plausibility_ref);
    if (!used || !needs_row_max(p, k)) continue;
    const OnlineLse stats = model_row_stats(p, k, row, model_tile[k]);
    if (needs_row_lse(p)) offset[k] = online_lse_value(stats);
    if (p.use_plausibility && k == p.plausibility_ref) plausibility_cut = plausibility_cut_from_max(p, stats.max);
  }

  float* out = p.out + row * p.out_row_stride;
  OnlineLse out_state = online_lse_init();
  bool saw_nan = false;
  for (int64_t col = 0; col < p.vocab; col += kFusionTile) {
    const int64_t count = std::min(kFusionTile, p.vocab - col);
    for (int64_t i = 0; i < count; ++i) score[i] = 0.f;
    for (int k = 0; k < p.num_models; ++k) {
      if (weight[k] == 0.f) continue;
      load_model_tile(p, k, row, col, count, model_tile[k]);
      const float w = weight[k], c = offset[k];
      const float* z = model_tile[k];
      for (int64_t i = 0; i < count; ++i) {
        saw_nan |= std::isnan(z[i]);
        // -inf excludes the token whatever the sign of w.
        score[i] = (z[i] == -INFINITY || score[i] == -INFINITY) ? -INFINITY : score[i] + w * (z[i] - c);
      }
    }
    if (p.use_plausibility) {
      const int r = p.plausibility_ref;
      if (weight[r] == 0.f) load_model_tile(p, r, row, col, count, model_tile[r]);
      const float* z = model_tile[r];
      for (int64_t i = 0; i < count; ++i) {
        saw_nan |= std::isnan(z[i]);
        if (z[i] < plausibility_cut) score[i] = -INFINITY;
      }
    }
    for (int64_t i = 0; i < count; ++i) out[col + i] = score[i];
    if (p.output_logprobs) out_state = online_lse_merge(out_state, tile_lse(score, count));
  }
  // A NaN in any model that takes part makes the whole row NaN, as log_softmax over it would.
  if (saw_nan) {
    for (int64_t col = 0; col < p.vocab; ++col) out[col] = NAN;
    return;
  }
  if (!p.output_logprobs) return;
  const float lse = online_lse_value(out_state);
  // An all-excluded row stays all -inf instead of becoming (-inf) - (-inf) = NaN.
  if (lse == -INFINITY) return;
  for (int64_t col = 0; col < p.vocab; ++col) out[col] -= lse;
}

}  // namespace cpu
}  // namespace collab_ops
