// Torch-free math of dynamic logits fusion (Fan et al., NeurIPS 2024), shared by the CPU and CUDA
// kernels. For one row and one expert, with a = large, e = expert, b = base, d = e - b:
//
//   log P~_alpha = a + alpha*d - lse_alpha        (tokens where a, e or b is -inf excluded, alpha != 0)
//   KL(P~_alpha || P) =  alpha * E_{P~}[d] - lse_alpha + lse_a
//   KL(P || P~_alpha) = -alpha * E_P[d]    + lse_alpha - lse_a   (+inf if P has mass on an excluded token)
//   KL(Q_t || Q)      =  E_{Q_t}[d]        - lse_e     + lse_b   (+inf if Q_t has mass where Q has none)
//   KL(Q || Q_t)      = -E_Q[d]            + lse_e     - lse_b   (+inf if Q has mass where Q_t has none)
//
// so one read of the row yields every grid candidate's objective from weighted log-sum-exp
// states (max, sum exp(x - max), sum exp(x - max) * d), one per *slot*:
//   slot 0 large (x = a), 1 expert (x = e), 2 base (x = b), 3 + g candidate g (x = a + grid[g]*d).
// Slot 0 sums over the kept tokens only (a, e and b finite), like the candidates: where P has mass
// on a token that is not kept, KL(P || P~) is +inf for every alpha != 0 and lse_a, E_P[d] are
// then unused; elsewhere the two token sets agree. Because slot 0 is "candidate alpha = 0", an
// expert equal to the base gives bit-identical states for every candidate and P, so the objectives
// are exactly 0 and the tie goes to the first grid entry, as in the reference.
//
// Numerics (why the kernels need no online rescaling and no underflow fallback):
// * Every value is prescaled by log2(e) once per column (FusionColumn), so a slot's exponent is
//   one FMA, alpha * d' + x', and its term one exp2.
// * The reference of a state is the *exact* maximum of its slot's exponent over the columns it
//   covers (a CPU tile, a GPU lane's share of a chunk), found in a first sweep over those columns;
//   the second sweep sums exp2(x' - max). Its largest term is exactly exp2(0) = 1, so a sum is
//   never below 1 and terms flushed to zero (below 2^-126, at most 2^17 of them) change it by
//   less than 2^-109 relative: no input, however spread (a bound such as max a + alpha * max d
//   would underflow once the gap exceeds ~87 nats), loses precision. The extra sweep costs one
//   FMA and one max per column and slot and no transcendental.
// * Covered-column states are merged in natural units by weighted_lse_merge (accurate expf).
// * exp2 is the device's ex2.approx (relative error ~2^-22) on the GPU and vector_exp on the CPU:
//   the objectives differ from the float64 reference by a few 1e-7 relative, well inside the
//   near-tie tolerance the tests allow (tests/fusion_kernel_checks.py).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/scalar.h"
#include "common/vector_math.h"

namespace collab_ops {

constexpr int kMaxFusionGrid = 32;
constexpr int kMaxFusionExperts = 8;
constexpr int kFusionModelSlots = 3;  // large, expert, base; candidate g is slot 3 + g
constexpr int kFusionStateSlots = kFusionModelSlots + kMaxFusionGrid;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

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

COLLAB_HD int dynamic_fusion_slots(int grid_size) { return kFusionModelSlots + grid_size; }

struct WeightedLse {
  float max;
  float sum;
  float weighted;  // sum of exp(x - max) * d: E[d] = weighted / sum
};

COLLAB_HD WeightedLse weighted_lse_init() { return WeightedLse{-INFINITY, 0.f, 0.f}; }

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

// A state accumulated in log2 units (max and weights prescaled by log2(e)), in natural units.
COLLAB_HD WeightedLse weighted_lse_from_log2(float max2, float sum, float weighted2) {
  return WeightedLse{max2 * kLn2, sum, weighted2 * kLn2};
}

// exp2 of x <= 0 (or NaN): one MUFU instruction on the GPU.
COLLAB_HD float fusion_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return vector_exp(x * kLn2);
#endif
}

// Why a row's answer is not its states' alone; OR-ed over its columns.
enum DynamicFusionFlag : uint32_t {
  kLargeMassExcluded = 1u,     // a finite where e or b is -inf: KL(P || P~) = +inf for alpha != 0
  kExpertMassOutsideBase = 2u,  // e finite, b = -inf: KL(Q_t || Q) = +inf
  kBaseMassOutsideExpert = 4u,  // b finite, e = -inf: KL(Q || Q_t) = +inf
  kSawNan = 8u,
};

// One column of the three rows in log2 units, as every slot reads it.
struct FusionColumn {
  float large;  // a * log2(e) where the column is kept (a, e, b finite), else -inf
  float expert;  // e * log2(e) (-inf stays -inf)
  float base;
  float diff;  // (e - b) * log2(e) where e and b are finite, else 0 (an infinite KL flag takes over)
};

COLLAB_HD uint32_t dynamic_fusion_column(float a, float e, float b, FusionColumn& column) {
  const bool a_in = a != -INFINITY, e_in = e != -INFINITY, b_in = b != -INFINITY;
  uint32_t flags = (a_in && !(e_in && b_in)) ? kLargeMassExcluded : 0u;
  flags |= (e_in && !b_in) ? kExpertMassOutsideBase : 0u;
  flags |= (b_in && !e_in) ? kBaseMassOutsideExpert : 0u;
  flags |= (a != a || e != e || b != b) ? kSawNan : 0u;
  column.large = a_in && e_in && b_in ? a * kLog2e : -INFINITY;
  column.expert = e * kLog2e;
  column.base = b * kLog2e;
  column.diff = e_in && b_in ? (e - b) * kLog2e : 0.f;
  return flags;
}

// Which column value a slot reads and the weight of d in its exponent.
struct FusionSlot {
  int source;  // 0 large, 1 expert, 2 base
  float alpha;
};

COLLAB_HD FusionSlot dynamic_fusion_slot(const float* grid, int slot) {
  return slot < kFusionModelSlots ? FusionSlot{slot, 0.f} : FusionSlot{0, grid[slot - kFusionModelSlots]};
}

COLLAB_HD float fusion_source_value(const FusionColumn& column, int source) {
  return source == 0 ? column.large : (source == 1 ? column.expert : column.base);
}

// The slot's exponent in log2 units. Both sweeps call it, so the maximum's own term is exactly 1;
// alpha = 0 returns x' unchanged (0 * d' is a signed zero), which keeps P's ties exact.
COLLAB_HD float fusion_exponent(float alpha, float diff, float value) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(alpha, diff, value);
#else
  return alpha * diff + value;
#endif
}

// Everything one row and one expert accumulate, in natural units.
struct DynamicFusionState {
  WeightedLse slots[kFusionStateSlots];
  uint32_t flags;  // DynamicFusionFlag bits
};

COLLAB_HD void dynamic_fusion_state_init(DynamicFusionState& s, int grid_size) {
  for (int slot = 0; slot < dynamic_fusion_slots(grid_size); ++slot) s.slots[slot] = weighted_lse_init();
  s.flags = 0u;
}

// The grid value with the smallest objective (first on ties; NaN/inf objectives never win, and
// the first entry is returned when none is finite); NaN for a row with a NaN input.
COLLAB_HD float dynamic_fusion_select(const DynamicFusionState& s, const float* grid, int grid_size) {
  if (s.flags & kSawNan) return NAN;
  // A large row without a finite entry (slot 0 is empty and no entry was excluded): P is
  // undefined, the reference's KL terms involving P or P~ are all 0, and every candidate ties.
  if (s.slots[0].max == -INFINITY && !(s.flags & kLargeMassExcluded)) return grid[0];
  const WeightedLse& large = s.slots[0];
  const WeightedLse& expert = s.slots[1];
  const WeightedLse& base = s.slots[2];
  const float lse_a = weighted_lse_value(large), lse_e = weighted_lse_value(expert);
  const float lse_b = weighted_lse_value(base);
  const float target_forward =
      (s.flags & kExpertMassOutsideBase) ? INFINITY : weighted_lse_mean(expert) - lse_e + lse_b;
  const float target_reverse =
      (s.flags & kBaseMassOutsideExpert) ? INFINITY : -weighted_lse_mean(base) + lse_e - lse_b;
  const float mean_d_under_p = weighted_lse_mean(large);
  int best = 0;
  float best_objective = INFINITY;
  for (int g = 0; g < grid_size; ++g) {
    const float alpha = grid[g];
    float forward = 0.f, reverse = 0.f;
    if (alpha != 0.f) {
      const WeightedLse& f = s.slots[kFusionModelSlots + g];
      const float lse_f = weighted_lse_value(f);
      forward = alpha * weighted_lse_mean(f) - lse_f + lse_a;
      reverse = (s.flags & kLargeMassExcluded) ? INFINITY : -alpha * mean_d_under_p + lse_f - lse_a;
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
