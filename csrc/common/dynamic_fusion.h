// Torch-free math of dynamic logits fusion (Fan et al., NeurIPS 2024), shared by the CPU and CUDA
// kernels. For one row and one expert, with a = large, e = expert, b = base, d = e - b:
//
//   log P~_alpha = a + alpha*d - lse_alpha        (tokens where a, e or b is -inf excluded, alpha != 0)
//   KL(P~_alpha || P) =  alpha * E_{P~}[d] - lse_alpha + lse_a
//   KL(P || P~_alpha) = -alpha * E_P[d]    + lse_alpha - lse_a   (+inf if P has mass on an excluded token)
//   KL(Q_t || Q)      =  E_{Q_t}[d]        - lse_e     + lse_b   (+inf if Q_t has mass where Q has none)
//   KL(Q || Q_t)      = -E_Q[d]            + lse_e     - lse_b   (+inf if Q has mass where Q_t has none)
//
// so one read of the row yields every grid candidate's objective from weighted online
// log-sum-exp states: (max, sum exp(x - max), sum exp(x - max) * y) over the tokens.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/scalar.h"

namespace collab_ops {

constexpr int kMaxFusionGrid = 32;
constexpr int kMaxFusionExperts = 8;

struct DynamicFusionParams {
  LogitRows large;
  LogitRows base;
  LogitRows experts[kMaxFusionExperts];
  int32_t num_experts;
  const float* grid;  // [grid_size] candidate weights, readable by the kernel's device
  int32_t grid_size;
  int64_t batch;
  int64_t vocab;
  float* out;  // [batch, num_experts], contiguous
};

struct WeightedLse {
  float max;
  float sum;
  float weighted;  // sum of exp(x - max) * y: E[y] = weighted / sum
};

COLLAB_HD WeightedLse weighted_lse_init() { return WeightedLse{-INFINITY, 0.f, 0.f}; }

COLLAB_HD void weighted_lse_add(WeightedLse& s, float x, float y) {
  if (x == -INFINITY) return;
  if (x > s.max) {
    const float scale = expf(s.max - x);
    s.sum = s.sum * scale + 1.f;
    s.weighted = s.weighted * scale + y;
    s.max = x;
  } else {
    const float p = expf(x - s.max);
    s.sum += p;
    s.weighted += p * y;
  }
}

COLLAB_HD WeightedLse weighted_lse_merge(WeightedLse a, WeightedLse b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  if (a.max < b.max) {
    const WeightedLse t = a;
    a = b;
    b = t;
  }
  const float scale = expf(b.max - a.max);
  return WeightedLse{a.max, a.sum + b.sum * scale, a.weighted + b.weighted * scale};
}

COLLAB_HD float weighted_lse_value(const WeightedLse& s) { return s.max + logf(s.sum); }
COLLAB_HD float weighted_lse_mean(const WeightedLse& s) { return s.weighted / s.sum; }

// Everything one row and one expert accumulate; index 0..grid-1 of `fused` are the candidates
// (alpha == 0 entries stay unused: P~ = P there).
struct DynamicFusionState {
  WeightedLse large;  // over a, weight d (tokens not excluded)
  WeightedLse expert;  // over e, weight d
  WeightedLse base;    // over b, weight d
  WeightedLse fused[kMaxFusionGrid];
  bool large_mass_excluded;  // a finite where e or b is -inf: KL(P || P~) = +inf for alpha != 0
  bool expert_mass_outside_base;  // e finite, b = -inf: KL(Q_t || Q) = +inf
  bool base_mass_outside_expert;  // b finite, e = -inf: KL(Q || Q_t) = +inf
  bool saw_nan;
};

COLLAB_HD void dynamic_fusion_state_init(DynamicFusionState& s, int grid_size) {
  s.large = s.expert = s.base = weighted_lse_init();
  for (int g = 0; g < grid_size; ++g) s.fused[g] = weighted_lse_init();
  s.large_mass_excluded = s.expert_mass_outside_base = s.base_mass_outside_expert = s.saw_nan = false;
}

COLLAB_HD void dynamic_fusion_add(DynamicFusionState& s, const float* grid, int grid_size, float a, float e, float b) {
  if (a != a || e != e || b != b) {
    s.saw_nan = true;
    return;
  }
  const bool a_in = a != -INFINITY, e_in = e != -INFINITY, b_in = b != -INFINITY;
  s.large_mass_excluded |= a_in && !(e_in && b_in);
  s.expert_mass_outside_base |= e_in && !b_in;
  s.base_mass_outside_expert |= b_in && !e_in;
  // d only matters where both are finite: elsewhere an infinite KL flag above takes over.
  const float d = e_in && b_in ? e - b : 0.f;
  weighted_lse_add(s.large, a, d);
  weighted_lse_add(s.expert, e, d);
  weighted_lse_add(s.base, b, d);
  if (!(a_in && e_in && b_in)) return;
  // Unrolled to the fixed bound so that the GPU keeps every candidate's state in registers.
#pragma unroll
  for (int g = 0; g < kMaxFusionGrid; ++g)
    if (g < grid_size) weighted_lse_add(s.fused[g], a + grid[g] * d, d);
}

// The states of a DynamicFusionState by number: 0 large, 1 expert, 2 base, 3 + g candidate g.
constexpr int kFusionStateSlots = 3 + kMaxFusionGrid;
COLLAB_HD WeightedLse& state_slot(DynamicFusionState& s, int slot) {
  return slot == 0 ? s.large : slot == 1 ? s.expert : slot == 2 ? s.base : s.fused[slot - 3];
}

COLLAB_HD void dynamic_fusion_merge(DynamicFusionState& into, const DynamicFusionState& from, int grid_size) {
  into.large = weighted_lse_merge(into.large, from.large);
  into.expert = weighted_lse_merge(into.expert, from.expert);
  into.base = weighted_lse_merge(into.base, from.base);
  for (int g = 0; g < grid_size; ++g) into.fused[g] = weighted_lse_merge(into.fused[g], from.fused[g]);
  into.large_mass_excluded |= from.large_mass_excluded;
  into.expert_mass_outside_base |= from.expert_mass_outside_base;
  into.base_mass_outside_expert |= from.base_mass_outside_expert;
  into.saw_nan |= from.saw_nan;
}

// The grid value with the smallest objective (first on ties; NaN/inf objectives never win, and
// the first entry is returned when none is finite); NaN for a row with a NaN input.
COLLAB_HD float dynamic_fusion_select(const DynamicFusionState& s, const float* grid, int grid_size) {
  if (s.saw_nan) return NAN;
  const float lse_a = weighted_lse_value(s.large), lse_e = weighted_lse_value(s.expert);
  const float lse_b = weighted_lse_value(s.base);
  const float target_forward = s.expert_mass_outside_base ? INFINITY : weighted_lse_mean(s.expert) - lse_e + lse_b;
  const float target_reverse = s.base_mass_outside_expert ? INFINITY : -weighted_lse_mean(s.base) + lse_e - lse_b;
  const float mean_d_under_p = weighted_lse_mean(s.large);
  int best = 0;
  float best_objective = INFINITY;
  for (int g = 0; g < grid_size; ++g) {
    const float alpha = grid[g];
    float forward = 0.f, reverse = 0.f;
    if (alpha != 0.f) {
      const WeightedLse& f = s.fused[g];
      const float lse_f = weighted_lse_value(f);
      forward = alpha * weighted_lse_mean(f) - lse_f + lse_a;
      reverse = s.large_mass_excluded ? INFINITY : -alpha * mean_d_under_p + lse_f - lse_a;
    }
    const float df = forward - target_forward, dr = reverse - target_reverse;
    const float objective = df * df + dr * dr;
    if (objective < best_objective) {  // false for NaN and +inf
      best_objective = objective;
      best = g;
    }
  }
  return grid[best];
}

}  // namespace collab_ops
