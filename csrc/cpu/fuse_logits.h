// CPU kernel of fuse_logits, torch-free. A row is cut into column chunks so that a small batch
// still spreads over every core; the launcher (fuse_logits.cpp) runs three phases over all
// (row, chunk) tasks, as the CUDA kernels do: per-chunk model statistics (logits output or the
// plausibility mask only), the scores with their per-chunk log-sum-exp, and the subtraction of the
// row's log-sum-exp. Inside a chunk, column tiles keep the dtype conversion and the arithmetic
// plain loops the compiler vectorises.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/fusion.h"
#include "common/vector_math.h"
#include "cpu/tiles.h"

namespace collab_ops {
namespace cpu {

constexpr int64_t kFusionTile = 1024;

inline void load_model_tile(const FusionParams& p, int k, int64_t row, int64_t col, int64_t count, float* dst) {
  load_scaled_tile(p.logits[k], p.kind[k], row * p.row_stride[k] + col, count, p.inv_temperature[k], dst);
}

// Max and log-sum-exp state of one tile, in two vectorised sweeps (`omp simd` reductions: GCC
// keeps a plain float max, sum or bool |= scalar without -ffast-math).
inline OnlineLse tile_lse(const float* x, int64_t count) {
  float tile_max = -INFINITY;
  int nans = 0;
#pragma omp simd reduction(max : tile_max) reduction(| : nans)
  for (int64_t i = 0; i < count; ++i) {
    tile_max = x[i] > tile_max ? x[i] : tile_max;
    nans |= x[i] != x[i];
  }
  OnlineLse state{tile_max, 0.f, nans != 0};
  if (tile_max == -INFINITY || tile_max == INFINITY) return state;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += vector_exp(x[i] - tile_max);
  state.sum = sum;
  return state;
}

// Max and log-sum-exp of model k's scaled logits over columns [begin, end) of a row.
inline OnlineLse model_chunk_stats(const FusionParams& p, int k, int64_t row, int64_t begin, int64_t end) {
  float tile[kFusionTile];
  OnlineLse state = online_lse_init();
  for (int64_t col = begin; col < end; col += kFusionTile) {
    const int64_t count = std::min(kFusionTile, end - col);
    load_model_tile(p, k, row, col, count, tile);
    state = online_lse_merge(state, tile_lse(tile, count));
  }
  return state;
}

// The per-row constants of the score pass.
struct FusionRowConstants {
  float weight[kMaxFusedModels];
  float offset[kMaxFusedModels];  // log-sum-exp of model k when normalising for logits output
  float plausibility_cut;
};

// Writes the fused scores of columns [begin, end) of a row and returns their log-sum-exp state,
// with has_nan set when a participating model has a NaN or +inf there (the row then becomes all
// NaN: common/fusion.h, is_undefined_value).
inline OnlineLse score_chunk(const FusionParams& p, int64_t row, int64_t begin, int64_t end,
                             const FusionRowConstants& c) {
  float model_tile[kFusionTile];
  float score[kFusionTile];
  int32_t nans = 0;  // counted, branch-free: the loops below stay vectorised
  float* out = p.out + row * p.out_row_stride;
  OnlineLse state = online_lse_init();
  for (int64_t col = begin; col < end; col += kFusionTile) {
    const int64_t count = std::min(kFusionTile, end - col);
    for (int64_t i = 0; i < count; ++i) score[i] = 0.f;
    for (int k = 0; k < p.num_models; ++k) {
      const float w = c.weight[k];
      if (w == 0.f) continue;
      load_model_tile(p, k, row, col, count, model_tile);
      const float offset = c.offset[k];
      for (int64_t i = 0; i < count; ++i) {
        const float z = model_tile[i];
        nans += is_undefined_value(z);
        // -inf excludes the token whatever the sign of w.
        const float term = score[i] + w * (z - offset);
        score[i] = ((z == -INFINITY) | (score[i] == -INFINITY)) ? -INFINITY : term;
      }
    }
    if (p.use_plausibility) {
      load_model_tile(p, p.plausibility_ref, row, col, count, model_tile);
      for (int64_t i = 0; i < count; ++i) {
        nans += is_undefined_value(model_tile[i]);
        score[i] = model_tile[i] < c.plausibility_cut ? -INFINITY : score[i];
      }
    }
    for (int64_t i = 0; i < count; ++i) out[col + i] = score[i];
    if (p.output_logprobs) state = online_lse_merge(state, tile_lse(score, count));
  }
  state.has_nan |= nans != 0;
  return state;
}

// Log-prob output subtracts the row's log-sum-exp; a poisoned row becomes all NaN. An
// all-excluded row stays all -inf instead of becoming (-inf) - (-inf) = NaN.
inline void finish_chunk(const FusionParams& p, int64_t row, int64_t begin, int64_t end, float row_lse,
                         bool poisoned) {
  float* out = p.out + row * p.out_row_stride;
  if (poisoned) {
    for (int64_t col = begin; col < end; ++col) out[col] = NAN;
  } else if (p.output_logprobs && row_lse != -INFINITY) {
    for (int64_t col = begin; col < end; ++col) out[col] -= row_lse;
  }
}

}  // namespace cpu
}  // namespace collab_ops
