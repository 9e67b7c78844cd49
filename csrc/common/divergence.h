// Torch-free per-token math of kd_loss (DESIGN.md "Distillation losses"), shared by the CPU and
// CUDA kernels.
//
// With log p = t/T − lse(t/T) and log q = s/T − lse(s/T) (teacher and student log-probabilities),
// every divergence is a sum over tokens of a term f(p, q). Its gradient with respect to the
// student's logits is the log-softmax backward
//     dL/ds_j = (h_j − q_j · Σ_k h_k) / T,   h_j = ∂L/∂log q_j = q_j · ∂L/∂q_j,
// so a forward pass that sums both f and h leaves the backward only per-row constants to reload:
// it recomputes h_j token by token. The hard term is CE at temperature 1: lse(s) − s_label, with
// gradient softmax(s)_j − [j = label].
#pragma once
#include <cmath>
#include <cstdint>

#include "common/scalar.h"
#include "common/vector_math.h"

namespace collab_ops {

enum class Divergence : int32_t { kForwardKl, kReverseKl, kJsd, kSkewForwardKl, kSkewReverseKl, kTvd };

// The generalised JSD tends to 0 at β = 0 and β = 1; those endpoints are defined as the two KL
// directions and run their formulas, so that they are exact (as in Liger and the reference). The
// skew KLs at β = 0 are those KL directions too, run by their formulas: the mixture's probability
// would underflow where the log-probability is still finite. β is the caller's double: a β within
// float rounding of 1 (0.99999999) is a JSD, not reverse KL, as in the reference.
COLLAB_HD Divergence resolve_divergence(Divergence divergence, double beta) {
  if (divergence == Divergence::kJsd) {
    if (beta == 0.0) return Divergence::kForwardKl;
    if (beta == 1.0) return Divergence::kReverseKl;
  }
  if (divergence == Divergence::kSkewForwardKl && beta == 0.0) return Divergence::kForwardKl;
  if (divergence == Divergence::kSkewReverseKl && beta == 0.0) return Divergence::kReverseKl;
  return divergence;
}

// log Σ_j exp(x_j) of a row as the pair (max, log Σ exp(x − max)): a log-probability is then
// (x − max) − log_sum, as torch's log_softmax computes it, where one fp32 log-sum-exp near |x| = 40
// would carry its rounding (~2e-6) into every log-probability of the row.
struct LogNormaliser {
  float max;      // −inf for an all −inf row; NaN for a row holding NaN
  float log_sum;  // ≥ 0 for a finite max
  COLLAB_HD float log_probability(float x) const { return (x - max) - log_sum; }
  COLLAB_HD float value() const { return max + log_sum; }
};

// A row whose student or teacher logits are all −inf has no distribution on that side: its soft
// term is NaN (whatever the divergence's formula would make of 0·log 0 there).
COLLAB_HD bool soft_term_defined(float student_lse, float teacher_lse) {
  return student_lse != -INFINITY && teacher_lse != -INFINITY;
}

// Per-row constants the forward pass saves for the backward: [rows, kKdRowStats] fp32, each
// normaliser as its (max, log_sum) pair.
enum KdRowStat : int {
  kStudentMax, kStudentLogSum, kTeacherMax, kTeacherLogSum, kHardMax, kHardLogSum, kGradLogQSum, kKdRowStats
};

struct KdLossParams {
  const void* student;  // [rows, >= vocab], unit column stride
  ScalarKind student_kind;
  int64_t student_row_stride;
  const void* teacher;  // [rows, >= vocab], unit column stride
  ScalarKind teacher_kind;
  int64_t teacher_row_stride;
  const int64_t* labels;  // [rows] contiguous, or null: every row counts and there is no hard term
  int64_t rows;
  int64_t vocab;  // columns [0, vocab) of both sides are used
  Divergence divergence;  // already resolved
  float beta;
  float inv_temperature;
  float soft_scale;   // soft_weight, times T² when scaling; 0 skips the soft term entirely
  float hard_weight;  // 0 skips the hard term entirely
  int64_t ignore_index;
};

COLLAB_HD bool row_is_counted(const KdLossParams& p, int64_t row) {
  return p.labels == nullptr || p.labels[row] != p.ignore_index;
}

// The hard term's target, or -1 when the label lies outside [0, vocab): the loss is then NaN and,
// as in the reference, that row's hard term sends no gradient.
COLLAB_HD int64_t hard_target(const KdLossParams& p, int64_t row) {
  const int64_t label = p.labels[row];
  return label >= 0 && label < p.vocab ? label : -1;
}

struct DivergenceTerm {
  float value;       // f(p_j, q_j)
  float grad_log_q;  // h_j
};

// x·(log x − log y) with 0·log 0 = 0: a token one side rules out costs nothing on that side.
COLLAB_HD float relative_entropy_term(float x, float log_x, float log_y) { return x > 0.f ? x * (log_x - log_y) : 0.f; }

COLLAB_HD float log_or_neg_inf(float x) { return x > 0.f ? vector_log(x) : -INFINITY; }

template <Divergence kDivergence>
COLLAB_HD DivergenceTerm divergence_term(float log_p, float log_q, float beta) {
  if constexpr (kDivergence == Divergence::kForwardKl) {
    const float p = vector_exp(log_p);
    return {relative_entropy_term(p, log_p, log_q), -p};
  } else if constexpr (kDivergence == Divergence::kReverseKl) {
    const float q = vector_exp(log_q);
    const float value = relative_entropy_term(q, log_q, log_p);
    return {value, q > 0.f ? value + q : 0.f};
  } else if constexpr (kDivergence == Divergence::kJsd) {
    const float p = vector_exp(log_p), q = vector_exp(log_q);
    const float log_m = log_or_neg_inf(beta * p + (1.f - beta) * q);
    const float student_side = (1.f - beta) * relative_entropy_term(q, log_q, log_m);
    // ∂/∂q of the teacher side cancels the 1 + q/m parts of the student side's derivative.
    return {beta * relative_entropy_term(p, log_p, log_m) + student_side, student_side};
  } else if constexpr (kDivergence == Divergence::kSkewForwardKl) {
    const float p = vector_exp(log_p), q = vector_exp(log_q);
    const float m = beta * p + (1.f - beta) * q;
    const float value = relative_entropy_term(p, log_p, log_or_neg_inf(m));
    return {value, m > 0.f ? -(1.f - beta) * p * (q / m) : 0.f};
  } else if constexpr (kDivergence == Divergence::kSkewReverseKl) {
    const float p = vector_exp(log_p), q = vector_exp(log_q);
    const float m = beta * q + (1.f - beta) * p;
    const float value = relative_entropy_term(q, log_q, log_or_neg_inf(m));
    return {value, q > 0.f ? value + q * (1.f - beta * (q / m)) : 0.f};
  } else {
    const float p = vector_exp(log_p), q = vector_exp(log_q);
    const float half_q = 0.5f * q;
    return {0.5f * fabsf(p - q), p > q ? -half_q : (p < q ? half_q : 0.f)};
  }
}

}  // namespace collab_ops
