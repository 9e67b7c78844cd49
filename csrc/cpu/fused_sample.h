// CPU kernel of fused_sample. Every row is split into column chunks so that a small batch still
// uses every core; chunks return partial (key, index) candidates that are merged in column order.
// Passes over a chunk work in tiles, so the dtype conversion and the combination are loops the
// compiler vectorises. Torch-free: the caller passes its parallel-for.
//
// Without top_k / top_p each input is read once (plus the plausibility reference's max pass when
// alpha is set and a max pass when min_p is set) and nothing of size [B, V] is written. top_k /
// top_p write the row's x into the caller's [B, V] workspace and select the value cut on it.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/sampling.h"
#include "cpu/fuse_logits.h"

namespace collab_ops {
namespace cpu {

constexpr int64_t kSampleTile = 512;
// Narrower chunks would cost more in merging and per-chunk setup than they gain in balance.
constexpr int64_t kMinChunkColumns = 8192;

// What a pass over one chunk of a row found.
struct ChunkResult {
  Candidate best;
  float max;      // of x, or of the plausibility reference's z in that pass
  bool no_token;  // a poisoned model (NaN or +inf) or an undefined score
};

inline ChunkResult empty_chunk_result() { return ChunkResult{no_candidate(), -INFINITY, false}; }

inline RowSetup make_row_setup(const FusionParams& p, int64_t row) {
  RowSetup setup{};
  for (int k = 0; k < p.num_models; ++k) setup.weight[k] = fusion_weight(p, row, k);
  setup.plausibility_cut = -INFINITY;
  setup.no_token = false;
  return setup;
}

inline ChunkResult reference_max_chunk(const FusionParams& p, int64_t row, int64_t begin, int64_t end) {
  float tile[kSampleTile];
  ChunkResult result = empty_chunk_result();
  for (int64_t col = begin; col < end; col += kSampleTile) {
    const int64_t count = std::min(kSampleTile, end - col);
    load_model_tile(p, p.plausibility_ref, row, col, count, tile);
    float tile_max = -INFINITY;
    bool tile_poisoned = false;
    for (int64_t i = 0; i < count; ++i) {
      tile_max = std::max(tile_max, tile[i]);
      tile_poisoned |= is_undefined_value(tile[i]);
    }
    result.max = std::max(result.max, tile_max);
    result.no_token |= tile_poisoned;
  }
  return result;
}

// s over one tile as the reference builds it (see common/sampling.h); returns whether the tile
// makes the row undefined.
inline bool score_tile(const FusionParams& p, const RowSetup& setup, int64_t row, int64_t col, int64_t count,
                       float* score, float* scratch) {
  int undefined = 0;
  for (int64_t i = 0; i < count; ++i) score[i] = 0.f;
  for (int k = 0; k < p.num_models; ++k) {
    const float w = setup.weight[k];
    if (w == 0.f) continue;
    load_model_tile(p, k, row, col, count, scratch);
    int poisoned = 0;
    for (int64_t i = 0; i < count; ++i) {
      const float z = scratch[i];
      poisoned |= is_undefined_value(z);
      score[i] = add_weighted(score[i], w, z);
    }
    undefined |= poisoned;
  }
  if (p.use_plausibility) {
    load_model_tile(p, p.plausibility_ref, row, col, count, scratch);
    const float cut = setup.plausibility_cut;
    for (int64_t i = 0; i < count; ++i) score[i] = scratch[i] < cut ? -INFINITY : score[i];
  }
  for (int64_t i = 0; i < count; ++i) undefined |= is_undefined_score(score[i]);
  return undefined != 0;
}

// `omp simd`: GCC keeps a plain float max reduction scalar without -ffast-math.
inline float tile_max(const float* x, int64_t count) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < count; ++i) m = std::max(m, x[i]);
  return m;
}

// The random bits of the groups of four columns that cover [col, col + count): bits[4 g + lane]
// is lane `lane` of group col / 4 + g (sampling_bits). Defined in fused_sample.cpp, compiled for
// AVX2 and AVX-512 there (COLLAB_CPU_CLONES), where the loop over groups runs one group per vector
// lane: Philox is most of a sampled tile's work.
void tile_sampling_bits(const SamplingParams& s, int64_t row, int64_t col, int64_t count, uint32_t* bits);

// Folds one tile of x (columns col .. col + count - 1) into `best`. Tiles of a chunk come in column
// order, so a later token only wins with a strictly larger key. A tile whose keys provably cannot
// win skips the Philox draw; a token that cannot win skips the logarithms.
inline void sample_tile(const SamplingParams& s, int64_t row, int64_t col, int64_t count, const float* x,
                        float value_cut, float min_p_cut, Candidate& best) {
  const float keep_from = std::max(value_cut, min_p_cut);
  const float top = tile_max(x, count);
  if (s.greedy) {
    if (!(top > best.key)) return;
    for (int64_t i = 0; i < count; ++i) {
      if (x[i] == top) {
        best = Candidate{top, col + i};
        return;
      }
    }
    return;
  }
  if (top == -INFINITY || top < keep_from) return;
  if (top + kGumbelNoiseBound < best.key) return;
  const uint32_t bits_limit = reachable_bits_limit(best.key, top);
  uint32_t bits[kSampleTile + 4];
  tile_sampling_bits(s, row, col, count, bits);
  const int64_t skew = col % 4;  // bits[0] belongs to column col - skew
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t b = bits[i + skew];
    if (!noise_can_reach(b, bits_limit) || !(x[i] >= keep_from) || x[i] == -INFINITY) continue;
    // A column whose x cannot reach the best key even with the largest noise cannot win.
    if (x[i] + kGumbelNoiseBound < best.key) continue;
    const float key = x[i] + gumbel_noise(b);
    if (key > best.key) best = Candidate{key, col + i};
  }
}

// One chunk of the row from the inputs: x = s / temperature (s itself when greedy), its max and
// undefinedness, and, when `sample`, the chunk's best candidate among x >= min_p_cut.
// Defined in fused_sample.cpp, compiled for AVX2 and AVX-512 (COLLAB_CPU_CLONES).
ChunkResult input_pass_chunk(const SamplingParams& s, const RowSetup& setup, int64_t row, int64_t begin, int64_t end,
                             bool sample, float min_p_cut, float* workspace_row);

inline ChunkResult workspace_sample_chunk(const SamplingParams& s, int64_t row, int64_t begin, int64_t end,
                                          const float* workspace_row, float value_cut, float min_p_cut) {
  ChunkResult result = empty_chunk_result();
  for (int64_t col = begin; col < end; col += kSampleTile) {
    const int64_t count = std::min(kSampleTile, end - col);
    sample_tile(s, row, col, count, workspace_row + col, value_cut, min_p_cut, result.best);
  }
  return result;
}

// The k-th largest value of x[0..n) (k <= n), by radix selection on the ordered bits.
inline float kth_largest(const float* x, int64_t n, int64_t k) {
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t remaining = k;
  std::vector<int64_t> counts(kRadixBins);
  for (int level = 0; level < kRadixLevels; ++level) {
    const int shift = radix_shift(level);
    const uint32_t digit_mask = radix_digit_mask(level);
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = ordered_bits(x[i]);
      if ((bits & prefix_mask) == prefix) ++counts[(bits >> shift) & digit_mask];
    }
    for (int64_t bin = digit_mask; bin >= 0; --bin) {
      if (counts[bin] >= remaining) {
        prefix |= static_cast<uint32_t>(bin) << shift;
        break;
      }
      remaining -= counts[bin];
    }
    prefix_mask |= digit_mask << shift;
  }
  return from_ordered_bits(prefix);
}

// The top_p cut over the tokens with x >= floor: the value v of the least probable kept token,
// where a token is kept iff the mass of strictly more probable tokens is < top_p (ties at v kept).
inline float top_p_cut(const float* x, int64_t n, float floor, float x_max, float top_p) {
  std::vector<float> mass(n);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    mass[i] = x[i] >= floor ? std::exp(x[i] - x_max) : 0.f;
    total += mass[i];
  }
  const double target = static_cast<double>(top_p) * total;
  uint32_t prefix = 0, prefix_mask = 0;
  double above = 0;  // mass of the tokens above the current prefix
  std::vector<double> bin_mass(kRadixBins);
  std::vector<int64_t> bin_count(kRadixBins);
  for (int level = 0; level < kRadixLevels; ++level) {
    const int shift = radix_shift(level);
    const uint32_t digit_mask = radix_digit_mask(level);
    std::fill(bin_mass.begin(), bin_mass.end(), 0.0);
    std::fill(bin_count.begin(), bin_count.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      if (!(x[i] >= floor)) continue;
      const uint32_t bits = ordered_bits(x[i]);
      if ((bits & prefix_mask) != prefix) continue;
      const uint32_t bin = (bits >> shift) & digit_mask;
      bin_mass[bin] += mass[i];
      ++bin_count[bin];
    }
    // The first bin whose cumulative mass reaches the target holds the cut; if rounding leaves the
    // total short of it, every token is needed and the cut is in the last non-empty bin.
    int64_t chosen = -1;
    double above_chosen = above;
    for (int64_t bin = digit_mask; bin >= 0; --bin) {
      if (bin_count[bin] == 0) continue;
      chosen = bin;
      above_chosen = above;
      if (above + bin_mass[bin] >= target) break;
      above += bin_mass[bin];
    }
    above = above_chosen;
    prefix |= static_cast<uint32_t>(chosen) << shift;
    prefix_mask |= digit_mask << shift;
  }
  return from_ordered_bits(prefix);
}

inline float value_cut(const SamplingParams& s, const float* x, float x_max) {
  const int64_t n = s.fusion.vocab;
  float cut = uses_top_k(s) ? kth_largest(x, n, s.top_k) : -INFINITY;
  if (uses_top_p(s)) cut = top_p_cut(x, n, cut, x_max, s.top_p);
  return cut;
}

// Runs a whole fused_sample call. parallel_for(count, fn) must call fn(begin, end) on disjoint
// ranges covering [0, count). `workspace` is [batch, vocab] fp32 when uses_value_cut(s), else unused.
template <class ParallelFor>
void fused_sample(const SamplingParams& s, int num_threads, float* workspace, ParallelFor&& parallel_for) {
  const FusionParams& p = s.fusion;
  const int64_t batch = p.batch, vocab = p.vocab;
  if (batch == 0) return;
  const int64_t wanted_chunks = (num_threads + batch - 1) / batch;
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted_chunks, vocab / kMinChunkColumns));
  const int64_t chunk_columns = ((vocab + chunks - 1) / chunks + kSampleTile - 1) / kSampleTile * kSampleTile;
  std::vector<RowSetup> setup(batch);
  std::vector<ChunkResult> partial(batch * chunks);

  // Runs pass(row, begin, end) on every chunk, then merge(row, results in column order).
  auto over_chunks = [&](auto&& pass, auto&& merge) {
    parallel_for(batch * chunks, [&](int64_t first, int64_t last) {
      for (int64_t item = first; item < last; ++item) {
        const int64_t row = item / chunks, begin = (item % chunks) * chunk_columns;
        partial[item] = setup[row].no_token || begin >= vocab ? empty_chunk_result()
                                                              : pass(row, begin, std::min(vocab, begin + chunk_columns));
      }
    });
    for (int64_t row = 0; row < batch; ++row) {
      ChunkResult merged = empty_chunk_result();
      for (int64_t c = 0; c < chunks; ++c) {
        const ChunkResult& part = partial[row * chunks + c];
        merged.best = better_candidate(merged.best, part.best);
        merged.max = std::max(merged.max, part.max);
        merged.no_token |= part.no_token;
      }
      merge(row, merged);
    }
  };

  for (int64_t row = 0; row < batch; ++row) setup[row] = make_row_setup(p, row);
  if (p.use_plausibility) {
    over_chunks([&](int64_t row, int64_t begin, int64_t end) { return reference_max_chunk(p, row, begin, end); },
                [&](int64_t row, const ChunkResult& merged) {
                  setup[row].no_token |= merged.no_token;  // a NaN or +inf in the reference
                  setup[row].plausibility_cut = plausibility_cut_from_max(p, merged.max);
                });
  }

  std::vector<float> x_max(batch, -INFINITY);
  const bool needs_stats_pass = uses_value_cut(s) || uses_min_p(s);
  float* const ws = uses_value_cut(s) ? workspace : nullptr;
  if (needs_stats_pass) {
    over_chunks(
        [&](int64_t row, int64_t begin, int64_t end) {
          return input_pass_chunk(s, setup[row], row, begin, end, false, -INFINITY, ws ? ws + row * vocab : nullptr);
        },
        [&](int64_t row, const ChunkResult& merged) {
          setup[row].no_token |= merged.no_token || merged.max == -INFINITY;
          x_max[row] = merged.max;
        });
  }
  std::vector<float> cut(batch, -INFINITY);
  if (ws != nullptr) {
    parallel_for(batch, [&](int64_t first, int64_t last) {
      for (int64_t row = first; row < last; ++row) {
        if (!setup[row].no_token) cut[row] = value_cut(s, ws + row * vocab, x_max[row]);
      }
    });
  }
  auto min_p_cut = [&](int64_t row) { return uses_min_p(s) ? x_max[row] + s.log_min_p : -INFINITY; };
  over_chunks(
      [&](int64_t row, int64_t begin, int64_t end) {
        if (ws != nullptr) return workspace_sample_chunk(s, row, begin, end, ws + row * vocab, cut[row], min_p_cut(row));
        return input_pass_chunk(s, setup[row], row, begin, end, true, min_p_cut(row), nullptr);
      },
      [&](int64_t row, const ChunkResult& merged) {
        const bool no_token = setup[row].no_token || merged.no_token || merged.best.index < 0;
        s.tokens[row] = no_token ? -1 : merged.best.index;
      });
}

}  // namespace cpu
}  // namespace collab_ops
