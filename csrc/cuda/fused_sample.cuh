// CUDA kernels of fused_sample. Torch-free; the launcher in fused_sample.cu strings them together.
//
// A row is split into chunks, one block each, so that B = 1 still fills the
// GPU (block = row · chunks + chunk). Chunk passes write one ChunkPartial per block; a merge kernel (one thread per row) folds
// them into the row's RowState, in column order, so the result does not depend on the layout:
//   [alpha]            reference_max pass -> merge      (plausibility cut)
//   [min_p/top_k/top_p] input pass (x to the workspace for top_k/top_p) -> merge (max x)
//   [top_k/top_p]      select_value_cut (one block per row, radix selection on the workspace)
//   always             sampling pass (from the inputs or the workspace) -> merge (tokens)
#pragma once
#include <cub/block/block_reduce.cuh>

#include "common/sampling.h"

namespace collab_ops {
namespace cuda {

constexpr int kSampleThreads = 256;
// Each thread takes 4 adjacent columns, one Philox draw.
constexpr int64_t kColumnsPerSweep = 4 * kSampleThreads;

struct ChunkPartial {
  Candidate best;
  float max;
  int32_t no_token;
};

struct RowState {
  float plausibility_cut;
  float x_max;
  float value_cut;
  int32_t no_token;
};

enum class ChunkPass { kReferenceMax, kStats, kSampleInputs, kSampleWorkspace };

struct SampleLayout {
  ChunkPartial* partials;  // [batch, chunks]
  RowState* rows;          // [batch], zero-initialised
  float* scores;           // [batch, vocab] x when uses_value_cut, else null
  int64_t chunks;
  int64_t chunk_columns;  // a multiple of kColumnsPerSweep
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct BetterOp {
  __device__ __forceinline__ Candidate operator()(const Candidate& a, const Candidate& b) const {
    return better_candidate(a, b);
  }
};

// s(x) as the reference builds it (see common/sampling.h), -inf where implausible.
__device__ __forceinline__ float sampling_score(const FusionParams& p, const float* weight, float plausibility_cut,
                                                int64_t row, int64_t col, bool& undefined) {
  float score = 0.f;
  for (int k = 0; k < p.num_models; ++k) {
    const float w = weight[k];
    if (w == 0.f) continue;
    const float z = scaled_logit(p, k, row, col);
    // log_softmax of a row holding +inf is NaN/-inf everywhere: no token.
    undefined |= (z != z) || (p.normalize && z == INFINITY);
    score = add_weighted(score, w, z);
  }
  if (p.use_plausibility && scaled_logit(p, p.plausibility_ref, row, col) < plausibility_cut) score = -INFINITY;
  undefined |= is_undefined_score(score);
  return score;
}

template <ChunkPass kPass>
__global__ void __launch_bounds__(kSampleThreads) sample_chunk_kernel(SamplingParams s, SampleLayout layout) {
  const FusionParams& p = s.fusion;
  const int64_t row = blockIdx.x / layout.chunks, chunk = blockIdx.x % layout.chunks;
  const int64_t begin = chunk * layout.chunk_columns;
  const int64_t end = min(p.vocab, begin + layout.chunk_columns);
  const RowState state = layout.rows[row];
  __shared__ float weight[kMaxFusedModels];
  if (threadIdx.x < p.num_models) weight[threadIdx.x] = fusion_weight(p, row, threadIdx.x);
  __syncthreads();

  constexpr bool kSample = kPass == ChunkPass::kSampleInputs || kPass == ChunkPass::kSampleWorkspace;
  const float scale = s.greedy ? 1.f : s.inv_temperature;
  const float min_p_cut = uses_min_p(s) ? state.x_max + s.log_min_p : -INFINITY;
  const float keep_from = fmaxf(min_p_cut, kPass == ChunkPass::kSampleWorkspace ? state.value_cut : -INFINITY);
  float* scores_row = layout.scores == nullptr ? nullptr : layout.scores + row * p.vocab;
  float local_max = -INFINITY;
  bool undefined = false;
  Candidate best = no_candidate();
  if (!state.no_token) {
    for (int64_t first = begin + 4 * threadIdx.x; first < end; first += kColumnsPerSweep) {
      const int64_t group = first / 4;
      Philox4 bits{};
      if (kSample && !s.greedy) bits = sampling_bits(s, row, group);
      for (int lane = 0; lane < 4 && first + lane < end; ++lane) {
        const int64_t col = first + lane;
        float x;
        if (kPass == ChunkPass::kReferenceMax) {
          x = scaled_logit(p, p.plausibility_ref, row, col);
          undefined |= x != x;
        } else if (kPass == ChunkPass::kSampleWorkspace) {
          x = scores_row[col];
        } else {
          x = sampling_score(p, weight, state.plausibility_cut, row, col, undefined) * scale;
          if (kPass == ChunkPass::kStats && scores_row != nullptr) scores_row[col] = x;
        }
        local_max = fmaxf(local_max, x);
        if (!kSample || x == -INFINITY) continue;
        if (s.greedy) {
          best = better_candidate(best, Candidate{x, col});
        } else if (x >= keep_from) {
          best = better_candidate(best, Candidate{x + gumbel_noise(bits.v[lane]), col});
        }
      }
    }
  }
  const bool any_undefined = __syncthreads_or(undefined);
  using MaxReduce = cub::BlockReduce<float, kSampleThreads>;
  using BestReduce = cub::BlockReduce<Candidate, kSampleThreads>;
  __shared__ union {
    typename MaxReduce::TempStorage max;
    typename BestReduce::TempStorage best;
  } storage;
  const float block_max = MaxReduce(storage.max).Reduce(local_max, MaxOp());
  __syncthreads();
  const Candidate block_best = BestReduce(storage.best).Reduce(best, BetterOp());
  if (threadIdx.x == 0) {
    layout.partials[blockIdx.x] = ChunkPartial{block_best, block_max, any_undefined ? 1 : 0};
  }
}

// Folds a pass's chunk partials into each row's state (one thread per row, chunks in order).
template <ChunkPass kPass>
__global__ void merge_chunks_kernel(SamplingParams s, SampleLayout layout) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= s.fusion.batch) return;
  RowState& state = layout.rows[row];
  Candidate best = no_candidate();
  float max = -INFINITY;
  bool no_token = state.no_token != 0;
  for (int64_t c = 0; c < layout.chunks; ++c) {
    const ChunkPartial part = layout.partials[row * layout.chunks + c];
    best = better_candidate(best, part.best);
    max = fmaxf(max, part.max);
    no_token |= part.no_token != 0;
  }
  if (kPass == ChunkPass::kReferenceMax) {
    // A +inf in the reference makes every ratio p_ref / max p_ref NaN or 0.
    state.no_token = no_token || max == INFINITY;
    state.plausibility_cut = plausibility_cut_from_max(s.fusion, max);
  } else if (kPass == ChunkPass::kStats) {
    state.no_token = no_token || max == -INFINITY;
    state.x_max = max;
  } else {
    s.tokens[row] = no_token || best.index < 0 ? -1 : best.index;
  }
}

constexpr int kSelectThreads = 1024;

// Warp 0 walks the histogram from the highest bin and returns the first non-empty bin at which
// above + (sum of value over the walked bins) reaches target, or the last non-empty bin when none
// does; `above` becomes the sum over the bins before it. Lane l owns 64 consecutive bins.
__device__ int find_cut_bin(const unsigned* count, const double* value, double target, double& above) {
  constexpr int kBinsPerLane = kRadixBins / 32;
  __shared__ int chosen_bin;
  __shared__ double chosen_above;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int top = kRadixBins - 1 - lane * kBinsPerLane;
    double lane_sum = 0;
    bool lane_nonempty = false;
    for (int i = 0; i < kBinsPerLane; ++i) {
      lane_sum += value[top - i];
      lane_nonempty |= count[top - i] != 0;
    }
    double inclusive = lane_sum;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const double other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    const unsigned reaching = __ballot_sync(0xffffffffu, lane_nonempty && above + inclusive >= target);
    const unsigned nonempty = __ballot_sync(0xffffffffu, lane_nonempty);
    const int owner = reaching ? __ffs(reaching) - 1 : 31 - __clz(nonempty);
    if (lane == owner) {
      double running = above + inclusive - lane_sum, running_before_bin = running;
      int bin = -1;
      for (int i = 0; i < kBinsPerLane; ++i) {
        if (count[top - i] == 0) continue;
        bin = top - i;
        running_before_bin = running;
        if (running + value[bin] >= target) break;
        running += value[bin];
      }
      chosen_bin = bin;
      chosen_above = running_before_bin;
    }
  }
  __syncthreads();
  above = chosen_above;
  return chosen_bin;
}

// The value v such that the kept tokens are those with x >= v among x >= floor: with weights of 1
// and target k this is the k-th largest; with weights exp(x - x_max) and target top_p · total it
// is the top_p cut (ties at v kept).
__device__ float select_cut(const float* x, int64_t n, float floor, bool by_mass, float x_max, double target) {
  __shared__ unsigned count[kRadixBins];
  __shared__ double value[kRadixBins];
  uint32_t prefix = 0, prefix_mask = 0;
  double above = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    const int shift = radix_shift(level);
    const uint32_t digit_mask = radix_digit_mask(level);
    for (int bin = threadIdx.x; bin < kRadixBins; bin += blockDim.x) {
      count[bin] = 0;
      value[bin] = 0;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float xi = x[i];
      const uint32_t bits = ordered_bits(xi);
      if (!(xi >= floor) || (bits & prefix_mask) != prefix) continue;
      const uint32_t bin = (bits >> shift) & digit_mask;
      atomicAdd(&count[bin], 1u);
      atomicAdd(&value[bin], by_mass ? static_cast<double>(__expf(xi - x_max)) : 1.0);
    }
    __syncthreads();
    const int bin = find_cut_bin(count, value, target, above);
    prefix |= static_cast<uint32_t>(bin) << shift;
    prefix_mask |= digit_mask << shift;
    __syncthreads();
  }
  return from_ordered_bits(prefix);
}

__device__ double block_sum(double local) {
  using Reduce = cub::BlockReduce<double, kSelectThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ double total;
  const double sum = Reduce(storage).Sum(local);
  if (threadIdx.x == 0) total = sum;
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kSelectThreads) select_value_cut_kernel(SamplingParams s, SampleLayout layout) {
  const int64_t row = blockIdx.x;
  RowState& state = layout.rows[row];
  if (state.no_token) return;
  const int64_t n = s.fusion.vocab;
  const float* x = layout.scores + row * n;
  float cut = uses_top_k(s) ? select_cut(x, n, -INFINITY, false, state.x_max, static_cast<double>(s.top_k))
                            : -INFINITY;
  if (uses_top_p(s)) {
    double local = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (x[i] >= cut) local += __expf(x[i] - state.x_max);
    }
    const double total = block_sum(local);
    cut = select_cut(x, n, cut, true, state.x_max, static_cast<double>(s.top_p) * total);
  }
  if (threadIdx.x == 0) state.value_cut = cut;
}

}  // namespace cuda
}  // namespace collab_ops
