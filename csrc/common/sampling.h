// Torch-free description of one fused_sample call and the per-token arithmetic that the CPU and
// CUDA kernels share, so that both draw the same token for the same seed.
//
// Sampling is Gumbel-max: token = argmax over kept x of x + g(x), x = s / temperature, g Gumbel
// noise from Philox keyed by the row's seed with the column in the counter. The fusion's
// normalising constants c_k shift every x of a row equally, so neither the argmax nor the
// top_k / top_p / min_p sets depend on them and the kernels never compute them. The kept set is
// {x >= value_cut} (top_k, then top_p over the top_k survivors: both keep every token at or above
// some token's value) intersected with {x - max x >= log min_p}.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/fusion.h"
#include "common/philox.h"

namespace collab_ops {

struct SamplingParams {
  FusionParams fusion;  // `out` is unused
  float inv_temperature;
  int64_t top_k;    // 0 = off
  float top_p;      // 1 = off
  float log_min_p;  // -inf = off
  bool greedy;
  const int64_t* seed;  // seed[0] for every row, or seed[row] when seed_per_row
  bool seed_per_row;
  int64_t* tokens;  // [batch]
};

COLLAB_HD bool uses_top_k(const SamplingParams& s) { return !s.greedy && s.top_k > 0 && s.top_k < s.fusion.vocab; }
COLLAB_HD bool uses_top_p(const SamplingParams& s) { return !s.greedy && s.top_p < 1.f; }
COLLAB_HD bool uses_min_p(const SamplingParams& s) { return !s.greedy && s.log_min_p > -INFINITY; }
// top_k and top_p need the whole row of scores before anything is drawn: a workspace pass.
COLLAB_HD bool uses_value_cut(const SamplingParams& s) { return uses_top_k(s) || uses_top_p(s); }

// a * b rounded on its own: nvcc never contracts __fmul_rn with a later add into an FMA, so a
// scaled value feeds every sum as the CPU kernels compute it.
COLLAB_HD float rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// acc + w * z rounded twice, as the reference computes it: nvcc would otherwise contract it into
// an FMA and the CPU and CUDA kernels could disagree on a near tie.
COLLAB_HD float add_product(float acc, float w, float z) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(acc, rounded_product(w, z));
#else
  return acc + w * z;
#endif
}

// Model k's contribution to s(x) as the reference adds it: -inf excludes the token whatever the
// sign of w. (A +inf poisons the row, is_undefined_value, before its sum matters.)
COLLAB_HD float add_weighted(float score, float w, float z) {
  return z == -INFINITY ? score + (-INFINITY) : add_product(score, w, z);
}

// A score that makes the row undefined (-1): NaN or +inf at a plausible column (from finite
// inputs, only by overflow; common/fusion.h, is_undefined_value, covers +inf inputs).
COLLAB_HD bool is_undefined_score(float score) { return !(score < INFINITY); }

// Gumbel(0, 1) noise from 32 random bits: -log(E) with E = -log(1 - u) exponential. log1p keeps E
// accurate for small u, the large-noise tail that decides the argmax, where logf(u) near 1 would not.
COLLAB_HD float gumbel_noise(uint32_t bits) { return -logf(-log1pf(-uniform_open01(bits))); }

// Above the largest noise gumbel_noise can return (the smallest u, 2^-33, gives 22.874).
constexpr float kGumbelNoiseBound = 22.9f;

// The largest random word w (u = uniform_open01(w) ~ (w + 0.5) 2^-32) whose Gumbel noise can lift
// a token scoring at most x to `current_best`: noise >= d = current_best - x needs
// E = -log1p(-u) <= exp(-d), so u <= 1 - exp(-exp(-d)) <= exp(-d). A token whose word is above
// the limit cannot win, so a kernel skips its logarithms; with real logits nearly every token is
// skipped this way, where the noise bound alone skips only tokens 22.9 below the best key. The
// margin on d covers expf's error, the float rounding of u and of x + noise, so skipping never
// changes the token, and the CPU and CUDA kernels (which skip by their own tiling) still agree.
COLLAB_HD uint32_t reachable_bits_limit(float current_best, float x) {
  constexpr uint32_t kAll = 0xffffffffu;
  const float d = current_best - x - (1e-3f + 1e-5f * fabsf(current_best));
  if (!(d > -2.f)) return kAll;  // u_max near 1, or no best key yet (d = -inf), or NaN
  const float limit = floorf(expf(-d) * 4294967296.f);
  return limit >= 4294967296.f ? kAll : static_cast<uint32_t>(limit);
}

// Whether a token whose random word is `bits` can reach `current_best` (see above).
COLLAB_HD bool noise_can_reach(uint32_t bits, uint32_t bits_limit) { return bits <= bits_limit; }

// The Philox key and stream of a row's draws. A per-row seed alone keys the row's stream, so a
// row's token does not depend on its position in the batch; with one seed for the batch the row
// index is part of the counter.
struct RowStream {
  uint64_t key;
  uint64_t stream;
};

COLLAB_HD RowStream row_stream(const SamplingParams& s, int64_t row) {
  return RowStream{static_cast<uint64_t>(s.seed_per_row ? s.seed[row] : s.seed[0]),
                   s.seed_per_row ? 0 : static_cast<uint64_t>(row)};
}

// The random bits of columns 4·group .. 4·group + 3 of the row.
COLLAB_HD Philox4 sampling_bits(const RowStream& r, int64_t group) {
  const uint64_t counter = static_cast<uint64_t>(group);
  Philox4 c{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), static_cast<uint32_t>(r.stream),
             static_cast<uint32_t>(r.stream >> 32)}};
  return philox4x32_10(c, r.key);
}

COLLAB_HD Philox4 sampling_bits(const SamplingParams& s, int64_t row, int64_t group) {
  return sampling_bits(row_stream(s, row), group);
}

// A token and its Gumbel key (or score when greedy); index -1 is no token yet.
struct Candidate {
  float key;
  int64_t index;
};

COLLAB_HD Candidate no_candidate() { return Candidate{-INFINITY, -1}; }

// The larger key wins, the first index on ties, so merging partial results in any order and any
// split of the row gives the same token.
COLLAB_HD bool precedes(const Candidate& a, const Candidate& b) {
  return a.key > b.key || (a.key == b.key && a.index >= 0 && (b.index < 0 || a.index < b.index));
}

COLLAB_HD Candidate better_candidate(const Candidate& a, const Candidate& b) { return precedes(b, a) ? b : a; }

// Float order as unsigned order (radix selection of the top_k / top_p cut).
COLLAB_HD uint32_t ordered_bits(float value) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(value);
#else
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

COLLAB_HD float from_ordered_bits(uint32_t ordered) {
  return bits_to_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

// Radix digits of the selection, most significant first: 11 + 11 + 10 bits.
constexpr int kRadixLevels = 3;
constexpr int kRadixBins = 2048;
COLLAB_HD int radix_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
COLLAB_HD uint32_t radix_digit_mask(int level) { return level == 2 ? 0x3ffu : 0x7ffu; }

// Per-row facts every pass needs: the row's weights, the plausibility cut, and whether the row
// is already known to have no token.
struct RowSetup {
  float weight[kMaxFusedModels];
  float plausibility_cut;
  bool no_token;
};

}  // namespace collab_ops
