// CPU kernel of speculative_verify: one batch row at a time (the launcher in speculative_verify.cpp
// spreads rows over threads), every full-row pass in column tiles of plain loops that vectorise.
// What is read and checked is set in common/speculative.h; per row, with n = num_draft_tokens[b]:
//   1. Normalisers of the rows read whole: target rows 0..n for logits, fused targets and greedy
//      mode (one pass each: the logsumexp and argmax of l/T or of the fused score u), draft rows
//      0..n-1 for draft logits. Probabilities used as given need none of this.
//   2. The drafted entries p_i(x_i), q_i(x_i) of every used position (checked), then the
//      acceptance chain: no further row reads.
//   3. The final token at the stop position: one pass writes the mass max(0, p - q) (or p for the
//      bonus) into a row buffer with per-tile sums, checking given probabilities on the way; the
//      uniform picks a tile from the tile sums and then a column inside it (inverse CDF), so only
//      one tile is scanned serially.
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

inline float tile_sum(const float* x, int64_t count) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += x[i];
  return sum;
}

// Whether every value of the tile is a valid probability read as given (finite, non-negative).
inline bool tile_probabilities_valid(const float* x, int64_t count) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < count; ++i) bad |= !probability_entry_valid(x[i]);
  return bad == 0;
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

// One row read whole, as a single input (a plain target model or the draft): the logsumexp of
// l/T for logits, or the checks of probabilities used as given (greedy); the argmax when asked.
struct RowNormaliser {
  float offset;
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
    bool valid = true;
    for (int64_t col = 0; col < p.vocab; col += kSpeculativeTile) {
      const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
      load_scaled_tile(base, p.kind, offset + col, count, 1.f, tile);
      valid &= tile_probabilities_valid(tile, count);
      track_argmax(tile, count, col, best, best_col);
    }
    result.offset = 0.f;
    result.undefined = !valid || !(best > 0.f);  // bad entries, or no mass at all
  }
  result.argmax = best_col;
  return result;
}

// score[i] = u_t(col + i) of a fused target; returns false when a participating input in the tile
// is NaN or +inf (the row is poisoned).
inline bool fused_score_tile(const SpeculativeParams& p, const RowTargets& rt, int64_t row, int64_t position,
                             int64_t col, int64_t count, float* tile, float* score) {
  for (int64_t i = 0; i < count; ++i) score[i] = 0.f;
  int poisoned = 0;
  for (int j = 0; j < rt.count; ++j) {
    const int k = rt.model[j];
    load_scaled_tile(p.targets[k], p.kind, target_offset(p, k, row, position) + col, count, p.inv_temperature, tile);
    if (!p.inputs_are_logits) {
      for (int64_t i = 0; i < count; ++i) tile[i] = std::log(tile[i]);
    }
    const float w = rt.weight[j];
    for (int64_t i = 0; i < count; ++i) {
      poisoned |= poisons_row(tile[i]);
      // -inf excludes the token whatever the sign of w.
      const float term = score[i] + w * tile[i];
      score[i] = ((tile[i] == -INFINITY) | (score[i] == -INFINITY)) ? -INFINITY : term;
    }
  }
  return poisoned == 0;
}

inline TargetNormaliser target_normaliser(const SpeculativeParams& p, const RowTargets& rt, int64_t row,
                                          int64_t position, SpeculativeScratch& s) {
  TargetNormaliser n{};
  if (rt.plain) {
    const int k = rt.model[0];
    const RowNormaliser model =
        single_row_normaliser(p, p.targets[k], target_offset(p, k, row, position), p.greedy, s.tile.data());
    n.offset = model.offset;
    n.argmax = model.argmax;
    n.undefined = model.undefined;
    return n;
  }
  OnlineLse state = online_lse_init();
  float best = -INFINITY;
  int64_t best_col = 0;
  bool clean = true;
  for (int64_t col = 0; col < p.vocab; col += kSpeculativeTile) {
    const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
    clean &= fused_score_tile(p, rt, row, position, col, count, s.tile.data(), s.score.data());
    state = online_lse_merge(state, tile_lse(s.score.data(), count));
    if (p.greedy) track_argmax(s.score.data(), count, col, best, best_col);
  }
  n.offset = online_lse_value(state);
  n.undefined = !clean || log_normaliser_undefined(n.offset);
  n.argmax = best_col;
  return n;
}

inline DraftNormaliser draft_normaliser(const SpeculativeParams& p, int64_t row, int64_t position, float* tile) {
  const RowNormaliser d = single_row_normaliser(p, p.draft, draft_offset(p, row, position), false, tile);
  return DraftNormaliser{d.offset, d.undefined};
}

// p_t over one tile into out[0..count).
inline void target_probability_tile(const SpeculativeParams& p, const RowTargets& rt, const TargetNormaliser& n,
                                    int64_t row, int64_t position, int64_t col, int64_t count, SpeculativeScratch& s,
                                    float* out) {
  if (!rt.plain) {
    fused_score_tile(p, rt, row, position, col, count, s.tile.data(), out);
    for (int64_t i = 0; i < count; ++i) out[i] = std::exp(out[i] - n.offset);
    return;
  }
  const int k = rt.model[0];
  const int64_t offset = target_offset(p, k, row, position) + col;
  if (p.inputs_are_logits) {
    load_scaled_tile(p.targets[k], p.kind, offset, count, p.inv_temperature, out);
    for (int64_t i = 0; i < count; ++i) out[i] = std::exp(out[i] - n.offset);
  } else {
    load_scaled_tile(p.targets[k], p.kind, offset, count, 1.f, out);
  }
}

// The stop position's mass, tile by tile.
struct StopMass {
  double total;
  bool valid;  // every probability read as given was a valid entry
};

// Fills s.residual with the stop position's mass (max(0, p - q) after a rejection at `position`,
// p alone when `subtract_draft` is false) and s.tile_sums with its per-tile sums.
inline StopMass stop_mass(const SpeculativeParams& p, const RowTargets& rt, int64_t row, int64_t position,
                          bool subtract_draft, SpeculativeScratch& s) {
  const bool one_hot = p.draft == nullptr;
  const bool check_target = !target_rows_read_whole(p, rt);
  const bool check_draft = subtract_draft && !one_hot && !draft_rows_read_whole(p);
  const int64_t rejected_id = subtract_draft ? p.draft_tokens[row * p.num_drafts + position] : -1;
  StopMass result{0.0, true};
  for (int64_t col = 0, t = 0; col < p.vocab; col += kSpeculativeTile, ++t) {
    const int64_t count = std::min(kSpeculativeTile, p.vocab - col);
    float* mass = s.residual.data() + col;
    target_probability_tile(p, rt, s.target[position], row, position, col, count, s, mass);
    if (check_target) result.valid &= tile_probabilities_valid(mass, count);
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
        load_scaled_tile(p.draft, p.kind, offset, count, 1.f, q);
      }
      if (check_draft) result.valid &= tile_probabilities_valid(q, count);
      for (int64_t i = 0; i < count; ++i) mass[i] = residual_mass(mass[i], q[i]);
    }
    s.tile_sums[t] = tile_sum(mass, count);
    result.total += s.tile_sums[t];
  }
  return result;
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
  const int64_t n = row_num_drafts(p, row);
  const RowTargets rt = row_targets(p, row);
  const bool draft_given = p.draft != nullptr;
  for (int64_t t = 0; t <= n; ++t) {
    if (target_rows_read_whole(p, rt)) {
      s.target[t] = target_normaliser(p, rt, row, t, s);
      if (s.target[t].undefined) return write_invalid_row(p, row);
    } else {
      s.target[t] = TargetNormaliser{0.f, 0, false};
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    if (draft_rows_read_whole(p)) {
      s.draft[t] = draft_normaliser(p, row, t, s.tile.data());
      if (s.draft[t].undefined) return write_invalid_row(p, row);
    } else {
      s.draft[t] = DraftNormaliser{0.f, false};
    }
  }

  const int64_t* drafts = p.draft_tokens + row * p.num_drafts;
  int64_t accepted = 0;
  if (p.greedy) {
    while (accepted < n && drafts[accepted] == s.target[accepted].argmax) ++accepted;
    return write_row(p, row, accepted, s.target[accepted].argmax);
  }

  // Every used drafted entry is read (the CUDA kernel gathers them all at once), then the chain.
  const int64_t seed = row_seed(p, row);
  accepted = n;
  for (int64_t i = 0; i < n; ++i) {
    const float p_of_draft = target_probability(p, rt, s.target[i], row, i, drafts[i]);
    const float q_of_draft = draft_given ? draft_probability(p, s.draft[i], row, i, drafts[i]) : 1.f;
    if (!probability_entry_valid(p_of_draft) || !probability_entry_valid(q_of_draft)) {
      return write_invalid_row(p, row);
    }
    if (accepted == n &&
        !accept_draft(speculative_uniform(seed, static_cast<uint32_t>(i), kAcceptStream), p_of_draft, q_of_draft)) {
      accepted = i;
    }
  }

  const double uniform = speculative_uniform(seed, 0u, kFinalDrawStream);
  StopMass mass = stop_mass(p, rt, row, accepted, accepted < n, s);
  if (!mass.valid) return write_invalid_row(p, row);
  // max(0, p - q) is zero everywhere only when p <= q everywhere: then p itself is sampled.
  if (!(mass.total > 0.0)) mass = stop_mass(p, rt, row, accepted, false, s);
  if (!(mass.total > 0.0)) return write_invalid_row(p, row);  // the stop row has no mass
  write_row(p, row, accepted, draw_from_mass(p, mass.total, uniform, s));
}

}  // namespace cpu
}  // namespace collab_ops
