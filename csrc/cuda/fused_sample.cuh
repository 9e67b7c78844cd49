// CUDA kernels of fused_sample. Torch-free; the launcher in fused_sample.cu strings them together.
//
// A row is split into chunks, one block each, so that B = 1 still fills the GPU
// (block = row · chunks + chunk). Each chunk pass writes one ChunkPartial per block; the last block
// of a row to finish (an arrival counter in RowState) folds the row's partials into its RowState,
// so a pass is one launch. The fold is order-free (max, or, and a total order on candidates), so
// the result does not depend on which block comes last:
//   [alpha]            reference_max pass  (plausibility cut)
//   [min_p/top_k/top_p] input pass (x to the workspace for top_k/top_p; max x)
//   [top_k/top_p]      select_value_cut (one block per row, radix selection on the workspace)
//   always             sampling pass (from the inputs or the workspace) -> token
// The plain proxy-tuning / contrastive step without cuts is therefore a single launch (plus the
// memset of the row states).
#pragma once
#include <cfloat>

#include <cub/block/block_reduce.cuh>

#include "common/sampling.h"

namespace collab_ops {
namespace cuda {

constexpr int kSampleThreads = 256;
// Each thread takes 8 adjacent columns per sweep: two Philox draws of 4 words, independent, so
// their multiply chains overlap, and one 16-byte load per 16-bit model. Loops over a thread's
// columns run over all 8 lanes with a `lane < count` predicate: a runtime trip count would put the
// per-lane arrays in local memory (ptxas: a stack frame and spills).
constexpr int kColumnsPerThread = 8;
constexpr int64_t kColumnsPerSweep = kColumnsPerThread * kSampleThreads;

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
  uint32_t arrived;  // chunks of the running pass that are done; the last one folds and resets it
};

enum class ChunkPass { kReferenceMax, kStats, kSampleInputs, kSampleWorkspace };

struct SampleLayout {
  ChunkPartial* partials;  // [batch, chunks]
  RowState* rows;          // [batch], zero-initialised
  float* scores;           // [batch, vocab] x when uses_value_cut, else null
  int64_t chunks;
  int64_t chunk_columns;  // a multiple of kColumnsPerSweep
};

// Partials fold in any order (max, or, and a total order on candidates): one block reduction
// carries all three, so a block and the row's fold each wait at one reduction, not three.
struct MergePartials {
  __device__ __forceinline__ ChunkPartial operator()(const ChunkPartial& a, const ChunkPartial& b) const {
    return ChunkPartial{better_candidate(a.best, b.best), fmaxf(a.max, b.max), a.no_token | b.no_token};
  }
};

// One model's row as a block reads it: staged in shared memory once per block, so that the
// per-column loop indexes shared memory rather than the kernel parameters.
struct ModelRow {
  const void* data;  // the row's first column
  float inv_temperature;
  float weight;
  ScalarKind kind;
  bool vector_loads;  // the row starts on 16 bytes: a thread's 8 columns are 16-byte loads
};

__device__ __forceinline__ ModelRow model_row(const FusionParams& p, int k, int64_t row) {
  const int64_t element_bytes = p.kind[k] == ScalarKind::kFloat32 ? 4 : 2;
  const char* data = static_cast<const char*>(p.logits[k]) + row * p.row_stride[k] * element_bytes;
  const bool aligned = reinterpret_cast<uintptr_t>(data) % 16 == 0;
  return ModelRow{data, p.inv_temperature[k], fusion_weight(p, row, k), p.kind[k], aligned};
}

// Columns col .. col + count - 1 (count <= 8, col a multiple of 8) of one model, divided by its
// temperature: 16-byte loads where the row is aligned, element loads otherwise.
__device__ __forceinline__ void load_columns(const ModelRow& m, int64_t col, int count,
                                             float (&z)[kColumnsPerThread]) {
  if (count == kColumnsPerThread && m.vector_loads) {
    if (m.kind == ScalarKind::kFloat32) {
      const float4* v = reinterpret_cast<const float4*>(static_cast<const float*>(m.data) + col);
      const float4 low = __ldg(v), high = __ldg(v + 1);
      z[0] = low.x, z[1] = low.y, z[2] = low.z, z[3] = low.w;
      z[4] = high.x, z[5] = high.y, z[6] = high.z, z[7] = high.w;
    } else {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(m.data) + col));
      const uint32_t pairs[4] = {v.x, v.y, v.z, v.w};
      if (m.kind == ScalarKind::kBFloat16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          z[2 * i] = bits_to_float(pairs[i] << 16);
          z[2 * i + 1] = bits_to_float(pairs[i] & 0xffff0000u);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          z[2 * i] = float16_to_float(static_cast<uint16_t>(pairs[i]));
          z[2 * i + 1] = float16_to_float(static_cast<uint16_t>(pairs[i] >> 16));
        }
      }
    }
  } else {
#pragma unroll
    for (int lane = 0; lane < kColumnsPerThread; ++lane) {
      z[lane] = lane < count ? load_as_float(m.data, m.kind, col + lane) : 0.f;
    }
  }
  // Temperature 1 (the usual case) skips the multiplications, which would change no bit.
  if (m.inv_temperature != 1.f) {
#pragma unroll
    for (int lane = 0; lane < kColumnsPerThread; ++lane) z[lane] = rounded_product(z[lane], m.inv_temperature);
  }
}

// The plausibility cut of the reference model: -inf at the thread's columns it rules out.
__device__ __forceinline__ void apply_plausibility(const FusionParams& p, const ModelRow* models,
                                                   float plausibility_cut, int64_t col, int count,
                                                   float (&score)[kColumnsPerThread]) {
  float ref[kColumnsPerThread];
  load_columns(models[p.plausibility_ref], col, count, ref);
#pragma unroll
  for (int lane = 0; lane < kColumnsPerThread; ++lane) {
    if (lane < count && ref[lane] < plausibility_cut) score[lane] = -INFINITY;
  }
}

// Adds w_k z_k of every used model to the thread's columns, from 0. Exact: as the reference adds
// them (add_weighted: a -inf excludes its column; a NaN or +inf poisons the row, setting
// `undefined`). Not exact: the plain sums, for the common case in which every value is finite.
template <bool kExact>
__device__ __forceinline__ void add_models(const FusionParams& p, const ModelRow* models, int64_t col, int count,
                                           float (&score)[kColumnsPerThread], bool& undefined) {
#pragma unroll
  for (int lane = 0; lane < kColumnsPerThread; ++lane) score[lane] = 0.f;
  for (int k = 0; k < p.num_models; ++k) {
    const float w = models[k].weight;
    if (w == 0.f) continue;
    float z[kColumnsPerThread];
    load_columns(models[k], col, count, z);
    if (!kExact) {
      // Weights of +-1 (proxy-tuning, EFT, Li et al.'s contrastive decoding) add or subtract: w * z
      // is exactly +-z then (and a lone add has nothing to contract), so every branch gives
      // add_product's bits, with one instruction less.
      if (w == 1.f) {
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) score[lane] += z[lane];
      } else if (w == -1.f) {
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) score[lane] -= z[lane];
      } else {
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) score[lane] = add_product(score[lane], w, z[lane]);
      }
    } else {
#pragma unroll
      for (int lane = 0; lane < kColumnsPerThread; ++lane) {
        if (lane < count) {
          undefined |= is_undefined_value(z[lane]);
          score[lane] = add_weighted(score[lane], w, z[lane]);
        }
      }
    }
  }
}

// s(x) / temperature-ready scores of the thread's columns, as the reference builds them (see
// common/sampling.h), -inf where implausible; `undefined` is set by a poisoned value or score.
__device__ __forceinline__ void sampling_scores(const FusionParams& p, const ModelRow* models, float plausibility_cut,
                                                int64_t col, int count, float (&score)[kColumnsPerThread],
                                                bool& undefined) {
  add_models<true>(p, models, col, count, score, undefined);
  if (p.use_plausibility) apply_plausibility(p, models, plausibility_cut, col, count, score);
#pragma unroll
  for (int lane = 0; lane < kColumnsPerThread; ++lane) if (lane < count) undefined |= is_undefined_score(score[lane]);
}

// sampling_scores for the common case, in which every used model's value and the weighted sum are
// finite at every column of the thread: then the -inf / +inf / NaN rules change nothing, and one
// check per column replaces them. Returns false, having computed nothing the
// caller may use, when any sum is not finite; sampling_scores then recomputes the columns.
__device__ __forceinline__ bool finite_sampling_scores(const FusionParams& p, const ModelRow* models,
                                                       float plausibility_cut, int64_t col, int count,
                                                       float (&score)[kColumnsPerThread]) {
  bool unused = false;
  add_models<false>(p, models, col, count, score, unused);
  // A non-finite value of any model makes its column's sum non-finite (-inf, +inf or NaN, never
  // finite again), and the lanes past `count` hold 0: one test covers every rule.
  bool finite = true;
#pragma unroll
  for (int lane = 0; lane < kColumnsPerThread; ++lane) finite &= fabsf(score[lane]) < INFINITY;
  if (!finite) return false;
  if (p.use_plausibility) apply_plausibility(p, models, plausibility_cut, col, count, score);
  return true;
}

// Reads a partial another block wrote, past this SM's L1.
__device__ __forceinline__ ChunkPartial load_partial(const ChunkPartial* part) {
  return ChunkPartial{Candidate{__ldcg(&part->best.key), __ldcg(&part->best.index)}, __ldcg(&part->max),
                      __ldcg(&part->no_token)};
}

// The launcher plans kSampleBlocksPerSm blocks per SM; telling ptxas so lets it use the registers
// that leaves (it otherwise spilled a few in the sampling pass).
constexpr int kSampleBlocksPerSm = 4;

template <ChunkPass kPass>
__global__ void __launch_bounds__(kSampleThreads, kSampleBlocksPerSm) sample_chunk_kernel(SamplingParams s, SampleLayout layout) {
  const FusionParams& p = s.fusion;
  const int64_t row = blockIdx.x / layout.chunks, chunk = blockIdx.x % layout.chunks;
  const int64_t begin = chunk * layout.chunk_columns;
  const int64_t end = min(p.vocab, begin + layout.chunk_columns);
  const RowState state = layout.rows[row];
  __shared__ ModelRow models[kMaxFusedModels];
  // The best key any thread of the block has drawn so far, as ordered bits (atomicMax on floats).
  __shared__ uint32_t block_best_bits;
  if (threadIdx.x < p.num_models) models[threadIdx.x] = model_row(p, threadIdx.x, row);
  if (threadIdx.x == 0) block_best_bits = ordered_bits(-INFINITY);
  __syncthreads();

  constexpr bool kSample = kPass == ChunkPass::kSampleInputs || kPass == ChunkPass::kSampleWorkspace;
  const bool draw = kSample && !s.greedy;
  const float scale = s.greedy ? 1.f : s.inv_temperature;
  const float min_p_cut = uses_min_p(s) ? state.x_max + s.log_min_p : -INFINITY;
  const float keep_from = fmaxf(min_p_cut, kPass == ChunkPass::kSampleWorkspace ? state.value_cut : -INFINITY);
  // The lowest score a drawn column may have: -inf is never drawn, and x >= draw_from is false for NaN.
  const float draw_from = fmaxf(keep_from, -FLT_MAX);
  float* scores_row = layout.scores == nullptr ? nullptr : layout.scores + row * p.vocab;
  float local_max = -INFINITY;
  bool undefined = false;
  Candidate best = no_candidate();
  // A key some thread of the block has drawn: a column whose key x + noise cannot reach it cannot
  // be the row's token. Below x + kGumbelNoiseBound it skips the Philox draw; otherwise the draw's
  // word decides (reachable_bits_limit) whether it needs the logarithms, which only a few
  // columns of a row do once the bar has risen. Skipping never changes the token, so the CPU kernel
  // (which skips by its own tiling) still agrees. Warps publish their best key after every sweep of
  // 2048 columns and read the block's without a barrier: the value only grows and is always a drawn
  // key, so a stale read only skips less.
  float shared_best_key = -INFINITY;
  // Read once: inside the loop the compiler would reload the seed from memory for every draw.
  const RowStream stream = draw ? row_stream(s, row) : RowStream{0, 0};
  if (!state.no_token) {
    // Every thread runs every sweep, so that the warp can share its best key after each one.
    for (int64_t sweep = begin; sweep < end; sweep += kColumnsPerSweep) {
      const int64_t first = sweep + kColumnsPerThread * threadIdx.x;
      const int count = first >= end ? 0 : static_cast<int>(end - first < kColumnsPerThread ? end - first : kColumnsPerThread);
      float x[kColumnsPerThread];
      if (kPass == ChunkPass::kReferenceMax) {
        load_columns(models[p.plausibility_ref], first, count, x);
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) if (lane < count) undefined |= x[lane] != x[lane];
      } else if (kPass == ChunkPass::kSampleWorkspace) {
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) {
          x[lane] = lane < count ? scores_row[first + lane] : -INFINITY;
        }
      } else {
        if (!finite_sampling_scores(p, models, state.plausibility_cut, first, count, x)) {
          sampling_scores(p, models, state.plausibility_cut, first, count, x, undefined);
        }
        if (scale != 1.f) {  // (x * 1 would change no bit)
#pragma unroll
          for (int lane = 0; lane < kColumnsPerThread; ++lane) x[lane] = rounded_product(x[lane], scale);
        }
        if (kPass == ChunkPass::kStats && scores_row != nullptr) {
#pragma unroll
          for (int lane = 0; lane < kColumnsPerThread; ++lane) if (lane < count) scores_row[first + lane] = x[lane];
        }
      }
      if (!kSample) {  // the sampling passes' fold reads no maximum
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) if (lane < count) local_max = fmaxf(local_max, x[lane]);
      }
      if (kSample && s.greedy) {
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) if (lane < count) {
          if (x[lane] != -INFINITY) best = better_candidate(best, Candidate{x[lane], first + lane});
        }
      } else if (draw) {
        const float must_reach = fmaxf(shared_best_key, best.key);
        bool reachable[kColumnsPerThread];
        bool any_reachable = false;
        float top = -INFINITY;
#pragma unroll
        for (int lane = 0; lane < kColumnsPerThread; ++lane) {
          reachable[lane] = lane < count && x[lane] >= draw_from && !(x[lane] + kGumbelNoiseBound < must_reach);
          any_reachable |= reachable[lane];
          top = reachable[lane] ? fmaxf(top, x[lane]) : top;
        }
        if (any_reachable) {
          // Both draws unconditionally: they interleave, and a thread that needs one nearly always
          // needs the other. One limit from the larger score of the 8 only skips less.
          const Philox4 bits[2] = {sampling_bits(stream, first / 4), sampling_bits(stream, first / 4 + 1)};
          const uint32_t bits_limit = reachable_bits_limit(must_reach, top);
#pragma unroll
          for (int lane = 0; lane < kColumnsPerThread; ++lane) {
            const uint32_t word = bits[lane / 4].v[lane % 4];
            if (reachable[lane] && noise_can_reach(word, bits_limit)) {
              best = better_candidate(best, Candidate{x[lane] + gumbel_noise(word), first + lane});
            }
          }
        }
        float key = best.key;
        for (int offset = 16; offset > 0; offset >>= 1) key = fmaxf(key, __shfl_xor_sync(0xffffffffu, key, offset));
        if (threadIdx.x % 32 == 0 && key > shared_best_key) atomicMax(&block_best_bits, ordered_bits(key));
        shared_best_key = from_ordered_bits(*static_cast<volatile uint32_t*>(&block_best_bits));
      }
    }
  }
  using PartialReduce = cub::BlockReduce<ChunkPartial, kSampleThreads>;
  __shared__ typename PartialReduce::TempStorage storage;
  __shared__ bool folds_the_row;
  const ChunkPartial block = PartialReduce(storage).Reduce(ChunkPartial{best, local_max, undefined ? 1 : 0},
                                                           MergePartials());
  if (threadIdx.x == 0) {
    layout.partials[blockIdx.x] = block;
    __threadfence();  // the partial is visible before the arrival is counted
    folds_the_row = atomicAdd(&layout.rows[row].arrived, 1u) == layout.chunks - 1;
  }
  __syncthreads();
  if (!folds_the_row) return;

  // The row's last block: fold every chunk's partial into the row state.
  __threadfence();
  ChunkPartial part = ChunkPartial{no_candidate(), -INFINITY, 0};
  for (int64_t c = threadIdx.x; c < layout.chunks; c += kSampleThreads) {
    part = MergePartials()(part, load_partial(layout.partials + row * layout.chunks + c));
  }
  const ChunkPartial folded = PartialReduce(storage).Reduce(part, MergePartials());
  const bool no_token = folded.no_token != 0 || state.no_token != 0;
  const float row_max = folded.max;
  const Candidate row_best = folded.best;
  if (threadIdx.x != 0) return;
  RowState& out = layout.rows[row];
  out.arrived = 0;  // the next pass counts from zero
  if (kPass == ChunkPass::kReferenceMax) {
    // A +inf in the reference makes every ratio p_ref / max p_ref NaN or 0.
    out.no_token = no_token || row_max == INFINITY;
    out.plausibility_cut = plausibility_cut_from_max(p, row_max);
  } else if (kPass == ChunkPass::kStats) {
    out.no_token = no_token || row_max == -INFINITY;
    out.x_max = row_max;
  } else {
    s.tokens[row] = no_token || row_best.index < 0 ? -1 : row_best.index;
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
