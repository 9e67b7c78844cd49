// Torch-free description of one speculative_verify call and the per-element math that the CPU and
// CUDA kernels share, so that both compute p, q, the acceptance test and the validity rules alike.
//
// Target p_t per (row b, position t):
//   * plain target (one participating model, of weight exactly 1):
//       probabilities: p_t(x) = P(x) as given. Each row is expected to sum to 1 and is never
//                      renormalised (as in FlashInfer and vLLM), so the decision reads only P at
//                      the drafted ids, then the one row where the chain stops;
//       logits:        p_t(x) = exp(l(x)/T - c),  c = logsumexp_x l(x)/T.
//   * fused target (several models, or one of weight != 1): p_t = softmax(u_t) with
//       u_t(x) = sum over models k with w_bk != 0 of w_bk * a_k(x),  a_k = l_k/T or log P_k,
//     where -inf in any participating a_k excludes x, and NaN or +inf in one poisons the row. This
//     is fuse_logits(normalize=True) followed by a softmax: fuse_logits' per-model normalisers
//     shift u_t by a constant per row, which the softmax removes, so no kernel computes them.
// The draft q_t is Q as given (probabilities), softmax(d/T) (logits), or one-hot at the draft id.
//
// What the decision reads, and so what is checked (NaN, negative probability, +inf, no mass):
//   * rows whose normaliser or argmax is needed are read and checked whole: every used target row
//     0..n for logits, fused targets and greedy mode; every used draft row 0..n-1 for draft
//     logits in sample mode;
//   * probabilities used as given are read at the drafted entries p_i(x_i), q_i(x_i) for every
//     used i < n, and in full only at the stop position (the target row, and the draft row after
//     a rejection); the row is invalid when the stop row has no mass left to draw from.
//   A bad value elsewhere in a probability row that is not the stop row is never read.
//
// Random numbers: Philox-4x32-10 keyed by the row seed (row_seed). Acceptance uniform i uses
// counter {i, kAcceptStream, 0, 0} on every backend, so acceptance agrees up to rounding. The
// final token is an exact draw from m / sum m (m = max(0, p - q) after a rejection, p when that is
// zero everywhere or for the bonus), done the way each backend does it fastest:
//   * CPU: inverse CDF over a row buffer that stays in cache, uniform {0, kFinalDrawStream, 0, 0};
//   * CUDA: one pass spread over many blocks, an exponential race (Gumbel-max): the argmax over x
//     of m(x) / E(x), E(x) = -log(1 - u(x)) exponential, u(x) word x % 4 of counter
//     {x / 4, kFinalRaceStream, (x / 4) >> 32, 0}; ties go to the smallest id.
//   So the same seed gives the same tokens on the same backend, not across backends.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/sampling.h"
#include "common/scalar.h"

namespace collab_ops {

constexpr int kMaxSpeculativeTargets = 8;

// Row b's seed from one base seed: base + b * 2^64/phi (mod 2^64), so that rows get distinct
// streams and consecutive call seeds do not reuse each other's rows. Must agree with
// ROW_SEED_STRIDE in collab_ops/reference/speculative.py.
constexpr uint64_t kRowSeedStride = 0x9E3779B97F4A7C15ull;

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
  ScalarKind kind;                  // shared by the targets and the draft
  const int64_t* draft_tokens;      // [batch, num_drafts], contiguous
  const int64_t* num_draft_tokens;  // [batch], or nullptr: every row uses all_num_draft_tokens
  int64_t all_num_draft_tokens;
  // [batch] per-row seeds when seed_per_row; else one base seed, on the device (seed) or passed by
  // value (seed == nullptr: seed_value). Unread when greedy.
  const int64_t* seed;
  int64_t seed_value;
  bool seed_per_row;
  int64_t batch;
  int64_t num_drafts;
  int64_t vocab;
  bool inputs_are_logits;
  bool greedy;
  float inv_temperature;  // 1 for probabilities and in greedy mode
  int64_t* tokens;        // [batch, num_drafts + 1], contiguous
  int64_t* num_emitted;   // [batch]
  int64_t* num_accepted;  // [batch]
};

constexpr uint32_t kAcceptStream = 0;
constexpr uint32_t kFinalDrawStream = 1;
constexpr uint32_t kFinalRaceStream = 2;

COLLAB_HD int64_t row_num_drafts(const SpeculativeParams& p, int64_t row) {
  return p.num_draft_tokens ? p.num_draft_tokens[row] : p.all_num_draft_tokens;
}

COLLAB_HD int64_t row_seed(const SpeculativeParams& p, int64_t row) {
  if (p.seed_per_row) return p.seed[row];
  const uint64_t base = static_cast<uint64_t>(p.seed ? p.seed[0] : p.seed_value);
  return static_cast<int64_t>(base + static_cast<uint64_t>(row) * kRowSeedStride);
}

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

// Whether every participating target row is a plain one for every row of the call, known on the
// host: then sample mode with probabilities needs no full-row pass at all.
inline bool all_rows_plain_probabilities(const SpeculativeParams& p) {
  return !p.inputs_are_logits && p.target_weights == nullptr && p.num_targets == 1 && p.target_weight_values[0] == 1.f;
}

// The target rows are read whole (normaliser, argmax, whole-row checks) unless they are
// probabilities used as given in sample mode.
COLLAB_HD bool target_rows_read_whole(const SpeculativeParams& p, const RowTargets& rt) {
  return p.greedy || p.inputs_are_logits || !rt.plain;
}

// Draft logits need the logsumexp of every used draft row; draft probabilities are used as given.
COLLAB_HD bool draft_rows_read_whole(const SpeculativeParams& p) {
  return !p.greedy && p.inputs_are_logits && p.draft != nullptr;
}

// Everything one (row, position) needs to evaluate p_t(x) for any x, found by a full-row pass
// (or trivial for probabilities used as given).
struct TargetNormaliser {
  float offset;    // logsumexp of l/T (plain logits) or of u (fused); 0 for given probabilities
  int64_t argmax;  // greedy: argmax p_t, smallest id on ties
  bool undefined;  // NaN, negative probability, +inf, or nothing left
};

struct DraftNormaliser {
  float offset;  // logsumexp(d / T)
  bool undefined;
};

COLLAB_HD int64_t target_offset(const SpeculativeParams& p, int k, int64_t row, int64_t position) {
  return row * p.target_batch_stride[k] + position * p.target_position_stride[k];
}

COLLAB_HD int64_t draft_offset(const SpeculativeParams& p, int64_t row, int64_t position) {
  return row * p.draft_batch_stride + position * p.draft_position_stride;
}

// a_k(x): the input in log space. log of a negative probability is NaN.
COLLAB_HD float log_space_input(const SpeculativeParams& p, float value) {
  return p.inputs_are_logits ? value * p.inv_temperature : logf(value);
}

// A log-space input that poisons its row (NaN, +inf) whatever else the row holds.
COLLAB_HD bool poisons_row(float a) { return a != a || a == INFINITY; }

// A logsumexp that leaves its distribution undefined: NaN, +inf, or -inf (nothing left).
COLLAB_HD bool log_normaliser_undefined(float offset) { return !(offset > -INFINITY && offset < INFINITY); }

// A probability entry read as given: a finite, non-negative number.
COLLAB_HD bool probability_entry_valid(float value) { return value >= 0.f && value < INFINITY; }

// u_t(x) of a fused target, -inf when a participating model excludes x; `poisoned` is set when a
// participating input at x is NaN or +inf.
COLLAB_HD float fused_target_score(const SpeculativeParams& p, const RowTargets& rt, int64_t row, int64_t position,
                                   int64_t col, bool& poisoned) {
  float score = 0.f;
  bool excluded = false;
  for (int j = 0; j < rt.count; ++j) {
    const int k = rt.model[j];
    const float a = log_space_input(p, load_as_float(p.targets[k], p.kind, target_offset(p, k, row, position) + col));
    excluded |= a == -INFINITY;
    poisoned |= poisons_row(a);
    score = add_product(score, rt.weight[j], a);  // no FMA: the CPU kernel rounds twice too
  }
  return excluded ? -INFINITY : score;
}

// p_t(x). For probabilities used as given this is the input itself, which may be any float: the
// caller checks it with probability_entry_valid.
COLLAB_HD float target_probability(const SpeculativeParams& p, const RowTargets& rt, const TargetNormaliser& n,
                                   int64_t row, int64_t position, int64_t col) {
  if (!rt.plain) {
    bool unused = false;
    return expf(fused_target_score(p, rt, row, position, col, unused) - n.offset);
  }
  const int k = rt.model[0];
  const float value = load_as_float(p.targets[k], p.kind, target_offset(p, k, row, position) + col);
  return p.inputs_are_logits ? expf(value * p.inv_temperature - n.offset) : value;
}

// q_t(x) for a draft given as a distribution (as given for probabilities).
COLLAB_HD float draft_probability(const SpeculativeParams& p, const DraftNormaliser& n, int64_t row, int64_t position,
                                  int64_t col) {
  const float value = load_as_float(p.draft, p.kind, draft_offset(p, row, position) + col);
  return p.inputs_are_logits ? expf(value * p.inv_temperature - n.offset) : value;
}

COLLAB_HD double speculative_uniform(int64_t seed, uint32_t index, uint32_t stream) {
  const Philox4 bits = philox4x32_10(Philox4{{index, stream, 0u, 0u}}, static_cast<uint64_t>(seed));
  return uniform_double01(bits.v[0], bits.v[1]);
}

// The race's random bits for columns 4·group .. 4·group + 3 of a row.
COLLAB_HD Philox4 final_race_bits(int64_t seed, int64_t group) {
  const uint64_t g = static_cast<uint64_t>(group);
  return philox4x32_10(Philox4{{static_cast<uint32_t>(g), kFinalRaceStream, static_cast<uint32_t>(g >> 32), 0u}},
                       static_cast<uint64_t>(seed));
}

// E = -log(1 - u), exponential with mean 1 and never 0 (u < 1 - 2^-25). log1p keeps small E, the
// ones that win the race, accurate.
COLLAB_HD float race_exponential(uint32_t bits) { return -log1pf(-uniform_open01(bits)); }

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
  const int64_t n = row_num_drafts(p, row);
  if (n < 0 || n > p.num_drafts) return false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = p.draft_tokens[row * p.num_drafts + i];
    if (id < 0 || id >= p.vocab) return false;
  }
  return true;
}

}  // namespace collab_ops
