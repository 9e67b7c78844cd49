// Torch-free description of one fuse_logits call, shared by the CPU and CUDA kernels.
//
// Score of token x in row b:  s(x) = sum_k w[b,k] * (l_k(x) / T_k - c_k)
// with c_k = logsumexp(l_k / T_k) when normalising and 0 otherwise. For log-prob output the c_k
// are a per-row constant that log_softmax removes, so they are only computed for logits output.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/scalar.h"

namespace collab_ops {

constexpr int kMaxFusedModels = 8;

struct FusionParams {
  const void* logits[kMaxFusedModels];
  ScalarKind kind[kMaxFusedModels];
  int64_t row_stride[kMaxFusedModels];  // in elements; columns are contiguous
  float inv_temperature[kMaxFusedModels];
  // Per-row weights [batch, num_models] fp32 (any strides), or nullptr: the same weight_values
  // for every row, passed by value so that no host-to-device copy precedes the launch.
  const float* weights;
  int64_t weight_row_stride;
  int64_t weight_col_stride;
  float weight_values[kMaxFusedModels];
  int32_t num_models;
  int64_t batch;
  int64_t vocab;  // columns read from every input and written to the output
  bool normalize;
  bool output_logprobs;
  bool use_plausibility;
  float log_plausibility_alpha;  // mask tokens with log p_ref(x) < log(alpha) + max log p_ref
  int32_t plausibility_ref;
  float* out;  // [batch, vocab] fp32, contiguous rows of out_row_stride
  int64_t out_row_stride;
};

// A scaled logit l_k / T_k that poisons its row when model k takes part (non-zero weight, or the
// plausibility reference): NaN, or +inf, for which the model's distribution is undefined
// whatever the sign of its weight. Branch-free, so that the CPU loops stay vectorised.
COLLAB_HD bool is_undefined_value(float z) { return (z != z) | (z == INFINITY); }

COLLAB_HD float fusion_weight(const FusionParams& p, int64_t row, int k) {
  return p.weights ? p.weights[row * p.weight_row_stride + k * p.weight_col_stride] : p.weight_values[k];
}

COLLAB_HD float scaled_logit(const FusionParams& p, int k, int64_t row, int64_t col) {
  return load_as_float(p.logits[k], p.kind[k], row * p.row_stride[k] + col) * p.inv_temperature[k];
}

// Whether model k's per-row maximum (and log-sum-exp) must be computed before the score pass.
COLLAB_HD bool needs_row_max(const FusionParams& p, int k) {
  return (p.use_plausibility && k == p.plausibility_ref) || (p.normalize && !p.output_logprobs);
}
COLLAB_HD bool needs_row_lse(const FusionParams& p) { return p.normalize && !p.output_logprobs; }

// The plausibility cut from the reference model's row maximum: tokens below it are masked. An
// all -inf reference row makes every token implausible.
COLLAB_HD float plausibility_cut_from_max(const FusionParams& p, float ref_row_max) {
  return ref_row_max == -INFINITY ? INFINITY : ref_row_max + p.log_plausibility_alpha;
}

// Online log-sum-exp state: value = max + log(sum). NaN inputs poison it so that a NaN row
// stays NaN, as torch.log_softmax does.
struct OnlineLse {
  float max;
  float sum;
  bool has_nan;
};

COLLAB_HD OnlineLse online_lse_init() { return OnlineLse{-INFINITY, 0.f, false}; }

// The state of n values at once: their max, then one sum of exponentials, with no branch or
// rescaling per value (the CUDA kernels' per-thread columns; the CPU kernels' vectorised tile_lse
// is the same over a tile).
template <int n>
COLLAB_HD OnlineLse values_lse(const float (&x)[n]) {
  OnlineLse state{-INFINITY, 0.f, false};
  for (int i = 0; i < n; ++i) {
    state.has_nan |= x[i] != x[i];
    state.max = fmaxf(state.max, x[i]);  // NaN-ignoring
  }
  if (state.max == INFINITY) {
    state.sum = 1.f;  // online_lse_value reads +inf from the max alone
  } else if (state.max != -INFINITY) {
    for (int i = 0; i < n; ++i) state.sum += expf(x[i] - state.max);  // -inf adds 0; NaN poisons anyway
  }
  return state;
}

COLLAB_HD OnlineLse online_lse_merge(OnlineLse a, OnlineLse b) {
  OnlineLse merged;
  merged.has_nan = a.has_nan || b.has_nan;
  if (a.max == -INFINITY) {
    merged.max = b.max;
    merged.sum = b.sum;
  } else if (b.max == -INFINITY) {
    merged.max = a.max;
    merged.sum = a.sum;
  } else if (a.max >= b.max) {
    merged.max = a.max;
    merged.sum = a.sum + b.sum * expf(b.max - a.max);
  } else {
    merged.max = b.max;
    merged.sum = b.sum + a.sum * expf(a.max - b.max);
  }
  return merged;
}

COLLAB_HD float online_lse_value(const OnlineLse& state) {
  if (state.has_nan) return NAN;
  if (state.max == -INFINITY || state.max == INFINITY) return state.max;
  return state.max + logf(state.sum);
}

}  // namespace collab_ops
