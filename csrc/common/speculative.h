// Torch-free description of one speculative_verify call and the per-element math that the CPU and
// CUDA kernels share, so that both compute p, q, the acceptance test and the random numbers alike.
//
// Per (row b, position t) the target is p_t = softmax(s_t) with the fused score
//     s_t(x) = sum over models k with w_bk != 0 of w_bk * (a_k(x) - c_k),
//     a_k(x) = l_k(x) / T (logits) or log P_k(x) (probabilities),  c_k = logsumexp_x a_k(x),
// where a_k(x) = -inf in any participating model excludes x (score -inf), as fuse_logits rules.
// The common case, one participating model of weight exactly 1, is a *plain* target: then
// p_t(x) = P(x) / sum P or exp(l(x)/T - c), computed without logarithms and without a second pass.
// The draft q_t is Q / sum Q or softmax(d / T), or one-hot at the draft id when absent.
//
// Random numbers: Philox-4x32-10 keyed by seed[b] alone. Acceptance uniform i uses counter
// {i, kAcceptStream, 0, 0}, the final draw counter {0, kFinalDrawStream, 0, 0}; the final token is
// drawn by inverse CDF, so both backends turn the same uniforms into the same token up to the
// rounding of the running sums.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/scalar.h"

namespace collab_ops {

constexpr int kMaxSpeculativeTargets = 8;

struct SpeculativeParams {
  const void* targets[kMaxSpeculativeTargets];  // [batch, num_drafts + 1, vocab], unit column stride
  int64_t target_batch_stride[kMaxSpeculativeTargets];
  int64_t target_position_stride[kMaxSpeculativeTargets];
  int32_t num_targets;
  // Per-row weights [batch, num_targets] (any strides), or nullptr: target_weight_values for every
  // row, passed by value so that no host-to-device copy precedes the launch.
  const float* target_weights;
  float target_weight_values[kMaxSpeculativeTargets];
  int64_t weight_row_stride;
  int64_t weight_col_stride;
  const void* draft;  // [batch, num_drafts, vocab] or nullptr: q one-hot at the draft id
  int64_t draft_batch_stride;
  int64_t draft_position_stride;
  ScalarKind kind;  // shared by the targets and the draft
  const int64_t* draft_tokens;      // [batch, num_drafts], contiguous
  const int64_t* num_draft_tokens;  // [batch]
  const int64_t* seed;              // [batch]; unread when greedy
  int64_t batch;
  int64_t num_drafts;
  int64_t vocab;
  bool inputs_are_logits;
  bool greedy;
  float inv_temperature;  // 1 for probabilities
  int64_t* tokens;        // [batch, num_drafts + 1], contiguous
  int64_t* num_emitted;   // [batch]
  int64_t* num_accepted;  // [batch]
};

constexpr uint32_t kAcceptStream = 0;
constexpr uint32_t kFinalDrawStream = 1;

// The models that take part in one batch row (non-zero weight), and whether p is a plain target.
struct RowTargets {
  int32_t count;
  int32_t model[kMaxSpeculativeTargets];
  float weight[kMaxSpeculativeTargets];
  bool plain;
};

COLLAB_HD RowTargets row_targets(const SpeculativeParams& p, int64_t row) {
  RowTargets rt;
  rt.count = 0;
  for (int k = 0; k < p.num_targets; ++k) {
    const float w = p.target_weights ? p.target_weights[row * p.weight_row_stride + k * p.weight_col_stride]
                                     : p.target_weight_values[k];
    if (w == 0.f) continue;  // a weight-0 model does not take part (its NaN and -inf are ignored)
    rt.model[rt.count] = k;
    rt.weight[rt.count] = w;
    ++rt.count;
  }
  rt.plain = rt.count == 1 && rt.weight[0] == 1.f;
  return rt;
}

// Everything one (row, position) needs to evaluate p_t(x) for any x, found by full-row passes.
struct TargetNormaliser {
  float offset[kMaxSpeculativeTargets];  // c_k per participating slot (log-space)
  float inv_sum;                         // plain probabilities: 1 / sum P
  float fused_offset;                    // logsumexp of the fused score; 0 for a plain target
  int64_t argmax;                        // greedy: argmax p_t, smallest id on ties
  bool undefined;                        // NaN, negative probability, +inf or every token excluded
};

struct DraftNormaliser {
  float offset;   // logits: logsumexp(d / T)
  float inv_sum;  // probabilities: 1 / sum Q
  bool undefined;
};

COLLAB_HD int64_t target_offset(const SpeculativeParams& p, int k, int64_t row, int64_t position) {
  return row * p.target_batch_stride[k] + position * p.target_position_stride[k];
}

COLLAB_HD int64_t draft_offset(const SpeculativeParams& p, int64_t row, int64_t position) {
  return row * p.draft_batch_stride + position * p.draft_position_stride;
}

// a_k(x): the input in log space, before its normaliser. log of a negative probability is NaN,
// which marks the position undefined like any NaN.
COLLAB_HD float log_space_input(const SpeculativeParams& p, float value) {
  return p.inputs_are_logits ? value * p.inv_temperature : logf(value);
}

// Whether a model's (or the draft's) normaliser leaves its distribution undefined: NaN or +inf in
// the row, a negative probability, or nothing left (all -inf logits, all-zero probabilities).
COLLAB_HD bool log_normaliser_undefined(float offset) { return !(offset > -INFINITY && offset < INFINITY); }

COLLAB_HD bool probability_sum_undefined(double sum, float smallest) {
  return !(smallest >= 0.f) || !(sum > 0.0 && sum < INFINITY);
}

// s_t(x) of a fused (not plain) target; -inf when a participating model excludes x.
COLLAB_HD float fused_target_score(const SpeculativeParams& p, const RowTargets& rt, const float* offset, int64_t row,
                                   int64_t position, int64_t col) {
  float score = 0.f;
  bool excluded = false;
  for (int j = 0; j < rt.count; ++j) {
    const int k = rt.model[j];
    const float a = log_space_input(p, load_as_float(p.targets[k], p.kind, target_offset(p, k, row, position) + col));
    excluded |= a == -INFINITY;
    score += rt.weight[j] * (a - offset[j]);
  }
  return excluded ? -INFINITY : score;
}

COLLAB_HD float target_probability(const SpeculativeParams& p, const RowTargets& rt, const TargetNormaliser& n,
                                   int64_t row, int64_t position, int64_t col) {
  if (!rt.plain) return expf(fused_target_score(p, rt, n.offset, row, position, col) - n.fused_offset);
  const int k = rt.model[0];
  const float value = load_as_float(p.targets[k], p.kind, target_offset(p, k, row, position) + col);
  return p.inputs_are_logits ? expf(value * p.inv_temperature - n.offset[0]) : value * n.inv_sum;
}

// q_t(x) for a draft given as a distribution.
COLLAB_HD float draft_probability(const SpeculativeParams& p, const DraftNormaliser& n, int64_t row, int64_t position,
                                  int64_t col) {
  const float value = load_as_float(p.draft, p.kind, draft_offset(p, row, position) + col);
  return p.inputs_are_logits ? expf(value * p.inv_temperature - n.offset) : value * n.inv_sum;
}

COLLAB_HD double speculative_uniform(int64_t seed, uint32_t index, uint32_t stream) {
  const Philox4 bits = philox4x32_10(Philox4{{index, stream, 0u, 0u}}, static_cast<uint64_t>(seed));
  return uniform_double01(bits.v[0], bits.v[1]);
}

// Lossless acceptance: accept with probability min(1, p/q), i.e. u * q < p.
COLLAB_HD bool accept_draft(double uniform, float p_of_draft, float q_of_draft) {
  return uniform * static_cast<double>(q_of_draft) < static_cast<double>(p_of_draft);
}

// The mass the final token is drawn from at the stop position: max(0, p - q) after a rejection
// (q one-hot at the rejected id when the draft has no distribution), p itself for the bonus.
COLLAB_HD float residual_mass(float p_of_x, float q_of_x) {
  const float r = p_of_x - q_of_x;
  return r > 0.f ? r : 0.f;
}

COLLAB_HD void write_invalid_row(const SpeculativeParams& p, int64_t row) {
  for (int64_t i = 0; i <= p.num_drafts; ++i) p.tokens[row * (p.num_drafts + 1) + i] = -1;
  p.num_emitted[row] = 0;
  p.num_accepted[row] = 0;
}

// Accepted drafts, then the final token, then -1 padding.
COLLAB_HD void write_row(const SpeculativeParams& p, int64_t row, int64_t accepted, int64_t final_token) {
  int64_t* out = p.tokens + row * (p.num_drafts + 1);
  for (int64_t i = 0; i <= p.num_drafts; ++i) {
    out[i] = i < accepted ? p.draft_tokens[row * p.num_drafts + i] : (i == accepted ? final_token : -1);
  }
  p.num_emitted[row] = accepted + 1;
  p.num_accepted[row] = accepted;
}

// The row-level checks that need no distribution: n in [0, K] and used draft ids in [0, V).
COLLAB_HD bool row_drafts_valid(const SpeculativeParams& p, int64_t row) {
  const int64_t n = p.num_draft_tokens[row];
  if (n < 0 || n > p.num_drafts) return false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = p.draft_tokens[row * p.num_drafts + i];
    if (id < 0 || id >= p.vocab) return false;
  }
  return true;
}

}  // namespace collab_ops
