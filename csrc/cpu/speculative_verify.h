// CPU kernel of speculative_verify: one batch row at a time (the launcher in speculative_verify.cpp
// spreads rows over threads), every full-row pass in column tiles of plain loops that vectorise.
//
// Per row, with n = num_draft_tokens[b]:
//   1. Normalisers of every used position: target 0..n and, in sample mode, draft 0..n-1. The
//      invalid-row rules look at every used position, so these full-row reads are needed whatever
//      gets accepted; for a plain probability target the pass is a sum (no logarithms).
//      A fused target takes a second pass per position for the logsumexp (and argmax) of s_t.
//   2. The acceptance chain from gathered p_i(x_i), q_i(x_i): no further row reads.
//   3. The final token at the stop position: one pass writes the residual max(0, p - q) (or p for
//      the bonus) into a row buffer with per-tile sums; the uniform picks a tile from the tile sums
//      and then a column inside it (inverse CDF), so only one tile is scanned serially. The stop
//      row was just read in step 1 and is usually still in cache.
// Torch-free.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/fusion.h"
#include "common/speculative.h"
#include "cpu/fuse_logits.h"

namespace collab_ops {
namespace cpu {

constexpr int64_t kSpeculativeTile = 1024;

// Buffers one thread reuses across its rows.
struct SpeculativeScratch {
  explicit SpeculativeScratch(const SpeculativeParams& p)
      : tile(kSpeculativeTile),
        score(kSpeculativeTile),
        residual(p.vocab),
        tile_sums((p.vocab + kSpeculativeTile - 1) / kSpeculativeTile),
        target(p.num_drafts + 1),
        draft(p.num_drafts) {}
  std::vector<float> tile;
  std::vector<float> score;
  std::vector<float> residual;
  std::vector<double> tile_sums;
  std::vector<TargetNormaliser> target;
  std::vector<DraftNormaliser> draft;
};

inline void load_tile(const void* base, ScalarKind kind, int64_t offset, int64_t count, float* dst) {
  load_scaled_tile(base, kind, offset, count, 1.f, dst);
}

inline float tile_sum(const float* x, int64_t count) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += x[i];
  return sum;
}

inline float tile_min(const float* x, int64_t count) {
  float smallest = INFINITY;
#pragma omp simd reduction(min : smallest)
  for (int64_t i = 0; i < count; ++i) smallest = std::min(smallest, x[i]);
  return smallest;
}

// First index of the largest value of the tile whose value beats `best`; updates best.
inline void track_argmax(const float* x, int64_t count, int64_t col, float& best, int64_t& best_col) {
  for (int64_t i = 0; i < count; ++i) {
    if (x[i] > best) {
      best = x[i];
      best_col = col + i;
    }
  }
}

// Normaliser of one probability or logit row (a plain target model or the draft): 1/sum and the
// log-space offset, whether the row leaves its distribution undefined, and its argmax when asked.
struct RowNormaliser {
  float offset;
  float inv_sum;
  bool undefined;
  int64_t argmax;
};

inline RowNormaliser single_row_normaliser(const SpeculativeParams& p, const void* base, int64_t offset,
                                           bool want_argmax, float* tile) {
  float best = -INFINITY;
  int64_t best_col = 0;
  RowNormaliser result{};
  if (p.inputs_are_logits) {
    OnlineLse state = online_lse_init();
    for (int64_t col = 0; col < p.vocab; col += kSpeculativeTile) {
      const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
      load_scaled_tile(base, p.kind, offset + col, count, p.inv_temperature, tile);
      state = online_lse_merge(state, tile_lse(tile, count));
      if (want_argmax) track_argmax(tile, count, col, best, best_col);
    }
    result.offset = online_lse_value(state);
    result.undefined = log_normaliser_undefined(result.offset);
  } else {
    double sum = 0.0;
    float smallest = INFINITY;
    for (int64_t col = 0; col < p.vocab; col += kSpeculativeTile) {
      const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
      load_tile(base, p.kind, offset + col, count, tile);
      sum += tile_sum(tile, count);
      smallest = std::min(smallest, tile_min(tile, count));
      if (want_argmax) track_argmax(tile, count, col, best, best_col);
    }
    result.undefined = probability_sum_undefined(sum, smallest);
    result.inv_sum = static_cast<float>(1.0 / sum);
    result.offset = static_cast<float>(std::log(sum));
  }
  result.argmax = best_col;
  return result;
}

// score[i] = s_t(col + i) of a fused target, from its per-model offsets.
inline void fused_score_tile(const SpeculativeParams& p, const RowTargets& rt, const float* offset, int64_t row,
                             int64_t position, int64_t col, int64_t count, float* tile, float* score) {
  for (int64_t i = 0; i < count; ++i) score[i] = 0.f;
  for (int j = 0; j < rt.count; ++j) {
    const int k = rt.model[j];
    load_scaled_tile(p.targets[k], p.kind, target_offset(p, k, row, position) + col, count, p.inv_temperature, tile);
    if (!p.inputs_are_logits) {
      for (int64_t i = 0; i < count; ++i) tile[i] = std::log(tile[i]);
    }
    const float w = rt.weight[j], c = offset[j];
    for (int64_t i = 0; i < count; ++i) {
      // -inf excludes the token whatever the sign of w.
      score[i] = (tile[i] == -INFINITY || score[i] == -INFINITY) ? -INFINITY : score[i] + w * (tile[i] - c);
    }
  }
}

inline TargetNormaliser target_normaliser(const SpeculativeParams& p, const RowTargets& rt, int64_t row,
                                          int64_t position, SpeculativeScratch& s) {
  TargetNormaliser n{};
  n.undefined = false;
  for (int j = 0; j < rt.count; ++j) {
    const int k = rt.model[j];
    const RowNormaliser model = single_row_normaliser(p, p.targets[k], target_offset(p, k, row, position),
                                                      p.greedy && rt.plain, s.tile.data());
    n.offset[j] = model.offset;
    n.inv_sum = model.inv_sum;
    n.argmax = model.argmax;
    // A model with nothing left excludes every token: the fused target is undefined too.
    n.undefined |= model.undefined;
  }
  if (rt.plain || n.undefined) return n;

  OnlineLse state = online_lse_init();
  float best = -INFINITY;
  int64_t best_col = 0;
  for (int64_t col = 0; col < p.vocab; col += kSpeculativeTile) {
    const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
    fused_score_tile(p, rt, n.offset, row, position, col, count, s.tile.data(), s.score.data());
    state = online_lse_merge(state, tile_lse(s.score.data(), count));
    if (p.greedy) track_argmax(s.score.data(), count, col, best, best_col);
  }
  n.fused_offset = online_lse_value(state);
  n.undefined = log_normaliser_undefined(n.fused_offset);
  n.argmax = best_col;
  return n;
}

inline DraftNormaliser draft_normaliser(const SpeculativeParams& p, int64_t row, int64_t position, float* tile) {
  const RowNormaliser d = single_row_normaliser(p, p.draft, draft_offset(p, row, position), false, tile);
  return DraftNormaliser{d.offset, d.inv_sum, d.undefined};
}

// p_t over one tile into out[0..count).
inline void target_probability_tile(const SpeculativeParams& p, const RowTargets& rt, const TargetNormaliser& n,
                                    int64_t row, int64_t position, int64_t col, int64_t count, SpeculativeScratch& s,
                                    float* out) {
  if (!rt.plain) {
    fused_score_tile(p, rt, n.offset, row, position, col, count, s.tile.data(), out);
    for (int64_t i = 0; i < count; ++i) out[i] = std::exp(out[i] - n.fused_offset);
    return;
  }
  const int k = rt.model[0];
  const int64_t offset = target_offset(p, k, row, position) + col;
  if (p.inputs_are_logits) {
    load_scaled_tile(p.targets[k], p.kind, offset, count, p.inv_temperature, out);
    for (int64_t i = 0; i < count; ++i) out[i] = std::exp(out[i] - n.offset[0]);
  } else {
    load_scaled_tile(p.targets[k], p.kind, offset, count, n.inv_sum, out);
  }
}

// Fills s.residual with the stop position's mass (max(0, p - q) after a rejection at `position`,
// p alone when `subtract_draft` is false) and s.tile_sums with its per-tile sums; returns the total.
inline double stop_mass(const SpeculativeParams& p, const RowTargets& rt, int64_t row, int64_t position,
                        bool subtract_draft, SpeculativeScratch& s) {
  const bool one_hot = p.draft == nullptr;
  const int64_t rejected_id = subtract_draft ? p.draft_tokens[row * p.num_drafts + position] : -1;
  double total = 0.0;
  for (int64_t col = 0, t = 0; col < p.vocab; col += kSpeculativeTile, ++t) {
    const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
    float* mass = s.residual.data() + col;
    target_probability_tile(p, rt, s.target[position], row, position, col, count, s, mass);
    if (subtract_draft && one_hot) {
      if (rejected_id >= col && rejected_id < col + count) mass[rejected_id - col] = 0.f;
    } else if (subtract_draft) {
      const DraftNormaliser& d = s.draft[position];
      const int64_t offset = draft_offset(p, row, position) + col;
      float* q = s.tile.data();
      if (p.inputs_are_logits) {
        load_scaled_tile(p.draft, p.kind, offset, count, p.inv_temperature, q);
        for (int64_t i = 0; i < count; ++i) q[i] = std::exp(q[i] - d.offset);
      } else {
        load_scaled_tile(p.draft, p.kind, offset, count, d.inv_sum, q);
      }
      for (int64_t i = 0; i < count; ++i) mass[i] = residual_mass(mass[i], q[i]);
    }
    s.tile_sums[t] = tile_sum(mass, count);
    total += s.tile_sums[t];
  }
  return total;
}

// Inverse CDF over s.residual: the first column whose running sum exceeds uniform * total. The
// tile sums find the tile; inside it a column with mass is always returned, also when rounding
// leaves the serial running sum short of the needle.
inline int64_t draw_from_mass(const SpeculativeParams& p, double total, double uniform, const SpeculativeScratch& s) {
  const double needle = uniform * total;
  double before = 0.0;
  int64_t t = 0;
  const int64_t num_tiles = static_cast<int64_t>(s.tile_sums.size());
  while (t + 1 < num_tiles && !(before + s.tile_sums[t] > needle && s.tile_sums[t] > 0.0)) before += s.tile_sums[t++];
  const int64_t col = t * kSpeculativeTile;
  const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
  const float* mass = s.residual.data() + col;
  double running = before;
  int64_t last_with_mass = col;
  for (int64_t i = 0; i < count; ++i) {
    if (mass[i] <= 0.f) continue;
    running += mass[i];
    last_with_mass = col + i;
    if (running > needle) return col + i;
  }
  return last_with_mass;
}

inline void speculative_verify_row(const SpeculativeParams& p, int64_t row, SpeculativeScratch& s) {
  if (!row_drafts_valid(p, row)) return write_invalid_row(p, row);
  const int64_t n = p.num_draft_tokens[row];
  const RowTargets rt = row_targets(p, row);
  const bool sample = !p.greedy;
  const bool draft_given = p.draft != nullptr;
  for (int64_t t = 0; t <= n; ++t) {
    s.target[t] = target_normaliser(p, rt, row, t, s);
    if (s.target[t].undefined) return write_invalid_row(p, row);
  }
  if (sample && draft_given) {
    for (int64_t t = 0; t < n; ++t) {
      s.draft[t] = draft_normaliser(p, row, t, s.tile.data());
      if (s.draft[t].undefined) return write_invalid_row(p, row);
    }
  }

  const int64_t* drafts = p.draft_tokens + row * p.num_drafts;
  int64_t accepted = 0;
  while (accepted < n) {
    const int64_t id = drafts[accepted];
    bool ok;
    if (p.greedy) {
      ok = id == s.target[accepted].argmax;
    } else {
      const float p_of_draft = target_probability(p, rt, s.target[accepted], row, accepted, id);
      const float q_of_draft = draft_given ? draft_probability(p, s.draft[accepted], row, accepted, id) : 1.f;
      ok = accept_draft(speculative_uniform(p.seed[row], static_cast<uint32_t>(accepted), kAcceptStream), p_of_draft,
                        q_of_draft);
    }
    if (!ok) break;
    ++accepted;
  }

  if (p.greedy) return write_row(p, row, accepted, s.target[accepted].argmax);
  const double uniform = speculative_uniform(p.seed[row], 0u, kFinalDrawStream);
  double total = stop_mass(p, rt, row, accepted, accepted < n, s);
  // max(0, p - q) is zero everywhere only when p == q up to rounding: then p itself is sampled.
  if (!(total > 0.0)) total = stop_mass(p, rt, row, accepted, false, s);
  write_row(p, row, accepted, draw_from_mass(p, total, uniform, s));
}

}  // namespace cpu
}  // namespace collab_ops
