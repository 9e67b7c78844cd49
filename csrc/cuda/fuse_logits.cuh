// CUDA kernels of fuse_logits. Torch-free (compiled on its own in the header check); the launcher
// is in fuse_logits.cu.
//
// A row is split into chunks of kFusionChunk columns, one thread block each (a 1-D grid of
// batch x chunks blocks, so any batch size fits), so that a batch of
// one row still spreads over the whole GPU and every thread keeps kColumnsPerThread independent
// loads in flight (one block per row left each SM waiting on memory latency). Row-wide
// quantities come from per-chunk partial log-sum-exp states merged by one warp of each block of
// the next kernel:
//   1. (logits output or plausibility mask) model_stats_kernel: per chunk and model, max/lse;
//   2. score_kernel: merges 1 into the per-row offsets and cut, writes the fused scores and the
//      log-sum-exp state of them of its chunks (several per block when the batch is large);
//   3. finish_kernel: merges 2 per row, subtracts the row's log-sum-exp (log-prob output) and
//      turns a row with a NaN in a participating model into all NaN.
#pragma once
#include <cub/block/block_reduce.cuh>

#include "common/fusion.h"

namespace collab_ops {
namespace cuda {

constexpr int kFusionThreads = 256;
constexpr int kColumnsPerThread = 8;
constexpr int64_t kFusionChunk = static_cast<int64_t>(kFusionThreads) * kColumnsPerThread;

struct MergeLse {
  __device__ __forceinline__ OnlineLse operator()(const OnlineLse& a, const OnlineLse& b) const {
    return online_lse_merge(a, b);
  }
};

template <int kThreads>
__device__ OnlineLse block_merge_lse(OnlineLse local) {
  using Reduce = cub::BlockReduce<OnlineLse, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ OnlineLse result;
  const OnlineLse merged = Reduce(storage).Reduce(local, MergeLse());
  if (threadIdx.x == 0) result = merged;
  __syncthreads();
  return result;
}

// Partial states live in [batch, num_chunks(, num_models)] workspaces.
struct FusionWorkspace {
  OnlineLse* model_stats;  // [batch, num_chunks, num_models], used by kernels 1 and 2
  OnlineLse* score_stats;  // [batch, score_blocks]
  int64_t num_chunks;
  // score_kernel's blocks each take chunks_per_score_block consecutive chunks of a row (the last
  // block of a row fewer), so that its setup and block-wide merge are paid per block, not per chunk.
  int64_t chunks_per_score_block;
  int64_t score_blocks;  // per row
};

// One warp merges `count` partial states (lane i takes i, i + 32, ...; then a shuffle tree), so that
// a row of 75 chunks costs each lane three merges rather than one thread 75. The result is in lane 0.
__device__ __forceinline__ OnlineLse warp_merge_partials(const OnlineLse* partials, int64_t count, int64_t stride) {
  const int lane = threadIdx.x % 32;
  OnlineLse state = online_lse_init();
  for (int64_t i = lane; i < count; i += 32) state = online_lse_merge(state, partials[i * stride]);
  for (int offset = 16; offset > 0; offset >>= 1) {
    OnlineLse other;
    other.max = __shfl_down_sync(0xffffffffu, state.max, offset);
    other.sum = __shfl_down_sync(0xffffffffu, state.sum, offset);
    other.has_nan = __shfl_down_sync(0xffffffffu, state.has_nan, offset);
    state = online_lse_merge(state, other);
  }
  return state;
}

// A thread's columns of a chunk are the kColumnsPerThread adjacent ones from this one: where the
// row starts on 16 bytes they are one (16-bit) or two (fp32) 16-byte loads, and a warp's loads
// cover 512 contiguous bytes.
__device__ __forceinline__ int64_t thread_first_column(int64_t begin) {
  return begin + static_cast<int64_t>(kColumnsPerThread) * threadIdx.x;
}

__device__ __forceinline__ void unpack(const uint4& raw, uint16_t* values) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    values[2 * j] = static_cast<uint16_t>(words[j] & 0xffffu);
    values[2 * j + 1] = static_cast<uint16_t>(words[j] >> 16);
  }
}

__device__ __forceinline__ void unpack(const uint4& raw, float* values) {
  values[0] = __uint_as_float(raw.x), values[1] = __uint_as_float(raw.y);
  values[2] = __uint_as_float(raw.z), values[3] = __uint_as_float(raw.w);
}

// kFull: the chunk lies inside the vocabulary (every chunk of a row but the last), so the loads
// need no bounds check; the kernels branch on it once per block.
template <bool kFull, typename Element, typename Convert>
__device__ __forceinline__ void load_typed_columns(const Element* row_data, int64_t begin, int64_t vocab,
                                                   float inv_temperature, Convert convert, float* z) {
  const int64_t first = thread_first_column(begin);
  const Element* source = row_data + first;
  if (kFull && reinterpret_cast<uintptr_t>(row_data) % 16 == 0) {
    constexpr int kPerLoad = 16 / sizeof(Element);
    Element values[kColumnsPerThread];
#pragma unroll
    for (int j = 0; j < kColumnsPerThread / kPerLoad; ++j) {
      unpack(__ldg(reinterpret_cast<const uint4*>(source) + j), values + j * kPerLoad);
    }
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) z[i] = convert(values[i]) * inv_temperature;
  } else {
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) {
      z[i] = kFull || first + i < vocab ? convert(__ldg(source + i)) * inv_temperature : -INFINITY;
    }
  }
}

// The thread's kColumnsPerThread columns of model k, scaled by 1/T_k; -inf past the vocabulary.
// The dtype is resolved once per call, so the column loads issue back to back.
template <bool kFull>
__device__ __forceinline__ void load_model_columns(const FusionParams& p, int k, int64_t row, int64_t begin,
                                                   float* z) {
  const int64_t offset = row * p.row_stride[k];
  const float inv_temperature = p.inv_temperature[k];
  switch (p.kind[k]) {
    case ScalarKind::kBFloat16:
      load_typed_columns<kFull>(static_cast<const uint16_t*>(p.logits[k]) + offset, begin, p.vocab, inv_temperature,
                                [](uint16_t v) { return bfloat16_to_float(v); }, z);
      break;
    case ScalarKind::kFloat16:
      load_typed_columns<kFull>(static_cast<const uint16_t*>(p.logits[k]) + offset, begin, p.vocab, inv_temperature,
                                [](uint16_t v) { return float16_to_float(v); }, z);
      break;
    default:
      load_typed_columns<kFull>(static_cast<const float*>(p.logits[k]) + offset, begin, p.vocab, inv_temperature,
                                [](float v) { return v; }, z);
  }
}

__device__ __forceinline__ bool chunk_is_full(const FusionParams& p, int64_t begin) {
  return begin + kFusionChunk <= p.vocab;
}

__global__ void __launch_bounds__(kFusionThreads) model_stats_kernel(FusionParams p, FusionWorkspace ws) {
  const int64_t chunk = blockIdx.x % ws.num_chunks, row = blockIdx.x / ws.num_chunks;
  const int64_t begin = chunk * kFusionChunk;
  for (int k = 0; k < p.num_models; ++k) {
    const bool used = fusion_weight(p, row, k) != 0.f || (p.use_plausibility && k == p.plausibility_ref);
    if (!used || !needs_row_max(p, k)) continue;  // uniform across the block
    float z[kColumnsPerThread];
    if (chunk_is_full(p, begin)) {
      load_model_columns<true>(p, k, row, begin, z);
    } else {
      load_model_columns<false>(p, k, row, begin, z);
    }
    const OnlineLse merged = block_merge_lse<kFusionThreads>(values_lse(z));
    if (threadIdx.x == 0) ws.model_stats[(row * ws.num_chunks + chunk) * p.num_models + k] = merged;
  }
}

// Adds w_k (z_k - c_k) of every used model to the thread's columns. Exact: the rules of
// common/fusion.h, a -inf excluding its column (bit i of `excluded`) and a NaN or +inf setting
// `poisoned` (is_undefined_value).
// Not exact: the sums alone, for the common case in which every value is finite.
template <bool kFull, bool kExact>
__device__ __forceinline__ void add_models(const FusionParams& p, const float* weight, const float* offset,
                                           int64_t row, int64_t begin, float (&score)[kColumnsPerThread],
                                           uint32_t& excluded, bool& poisoned) {
  for (int k = 0; k < p.num_models; ++k) {
    const float w = weight[k];
    if (w == 0.f) continue;  // uniform across the block
    float z[kColumnsPerThread];
    load_model_columns<kFull>(p, k, row, begin, z);
    const float c = offset[k];
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) {
      if (kExact) {
        poisoned |= is_undefined_value(z[i]);
        excluded |= static_cast<uint32_t>(z[i] == -INFINITY) << i;
      }
      score[i] += w * (z[i] - c);
    }
  }
}

// The thread's columns of the fused score: s, or -inf where a model excludes the token or the
// plausibility cut does; `poisoned` is set by a NaN or +inf in a participating model.
template <bool kFull>
__device__ __forceinline__ void score_columns(const FusionParams& p, const float* weight, const float* offset,
                                              float plausibility_cut, int64_t row, int64_t begin,
                                              float (&score)[kColumnsPerThread], bool& poisoned) {
  // Model by model, every column of the thread is loaded before any arithmetic and nothing is
  // stored here: a store to `out` between loads would serialise them (the compiler cannot rule
  // out aliasing), leaving each thread one load in flight.
  // Bit i: column i is excluded (one register rather than a predicate or register per column).
  uint32_t excluded = 0;
  if (p.use_plausibility) {
    float z[kColumnsPerThread];
    load_model_columns<kFull>(p, p.plausibility_ref, row, begin, z);
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) {
      poisoned |= is_undefined_value(z[i]);
      excluded |= static_cast<uint32_t>(z[i] < plausibility_cut) << i;
    }
  }
#pragma unroll
  for (int i = 0; i < kColumnsPerThread; ++i) score[i] = 0.f;
  add_models<kFull, false>(p, weight, offset, row, begin, score, excluded, poisoned);
  // A -inf, +inf or NaN value (or a column past the vocabulary, loaded as -inf) leaves its sum
  // non-finite: only then are the columns summed again under the exact rules.
  bool finite = true;
#pragma unroll
  for (int i = 0; i < kColumnsPerThread; ++i) finite &= fabsf(score[i]) < INFINITY;
  if (!finite) {
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) score[i] = 0.f;
    add_models<kFull, true>(p, weight, offset, row, begin, score, excluded, poisoned);
  }
#pragma unroll
  for (int i = 0; i < kColumnsPerThread; ++i) {
    const bool in_vocab = kFull || thread_first_column(begin) + i < p.vocab;
    score[i] = (excluded >> i & 1u) || !in_vocab ? -INFINITY : score[i];
  }
}

// The launcher sizes score_kernel's grid to about one round of kScoreBlocksPerSm blocks per SM
// (several chunks per block at large batches); ptxas keeps the registers within that.
constexpr int kScoreBlocksPerSm = 5;

// Writes the thread's columns of the fused score to `out` and returns their log-sum-exp state.
template <bool kFull>
__device__ __forceinline__ OnlineLse score_chunk(const FusionParams& p, const float* weight, const float* offset,
                                                 float plausibility_cut, int64_t row, int64_t begin) {
  float score[kColumnsPerThread];
  bool poisoned = false;
  score_columns<kFull>(p, weight, offset, plausibility_cut, row, begin, score, poisoned);
  const int64_t first = thread_first_column(begin);
  float* out = p.out + row * p.out_row_stride + first;
  if (kFull && reinterpret_cast<uintptr_t>(p.out + row * p.out_row_stride) % 16 == 0) {
    static_assert(kColumnsPerThread == 8, "two 16-byte stores");
    float4* vectors = reinterpret_cast<float4*>(out);
    vectors[0] = float4{score[0], score[1], score[2], score[3]};
    vectors[1] = float4{score[4], score[5], score[6], score[7]};
  } else {
#pragma unroll
    for (int i = 0; i < kColumnsPerThread; ++i) {
      if (first + i < p.vocab) out[i] = score[i];
    }
  }
  // A NaN or +inf in a participating model poisons the row: carried in the partial state's flag.
  OnlineLse columns = values_lse(score);
  columns.has_nan |= poisoned;
  return columns;
}

__global__ void __launch_bounds__(kFusionThreads, kScoreBlocksPerSm) score_kernel(FusionParams p, FusionWorkspace ws) {
  const int64_t block = blockIdx.x % ws.score_blocks, row = blockIdx.x / ws.score_blocks;
  __shared__ float weight[kMaxFusedModels];
  __shared__ float offset[kMaxFusedModels];
  __shared__ float plausibility_cut;
  static_assert(kFusionThreads / 32 >= kMaxFusedModels, "one warp per model merges its partials");
  const int k = threadIdx.x / 32;  // warp k serves model k
  if (k < p.num_models) {
    const float w = fusion_weight(p, row, k);
    const bool used = w != 0.f || (p.use_plausibility && k == p.plausibility_ref);
    const bool merges = used && needs_row_max(p, k);  // uniform across the warp
    OnlineLse stats = online_lse_init();
    if (merges) {
      stats = warp_merge_partials(ws.model_stats + row * ws.num_chunks * p.num_models + k, ws.num_chunks,
                                  p.num_models);
    }
    if (threadIdx.x % 32 == 0) {
      weight[k] = w;
      offset[k] = merges && needs_row_lse(p) ? online_lse_value(stats) : 0.f;
      if (merges && p.use_plausibility && k == p.plausibility_ref) {
        plausibility_cut = plausibility_cut_from_max(p, stats.max);
      }
    }
  }
  if (threadIdx.x == 0 && !p.use_plausibility) plausibility_cut = -INFINITY;
  __syncthreads();

  const int64_t first_chunk = block * ws.chunks_per_score_block;
  const int64_t end_chunk =
      first_chunk + ws.chunks_per_score_block < ws.num_chunks ? first_chunk + ws.chunks_per_score_block : ws.num_chunks;
  OnlineLse local = online_lse_init();
  for (int64_t chunk = first_chunk; chunk < end_chunk; ++chunk) {
    const int64_t begin = chunk * kFusionChunk;
    const OnlineLse columns = chunk_is_full(p, begin)
                                  ? score_chunk<true>(p, weight, offset, plausibility_cut, row, begin)
                                  : score_chunk<false>(p, weight, offset, plausibility_cut, row, begin);
    local = online_lse_merge(local, columns);
  }
  const OnlineLse merged = block_merge_lse<kFusionThreads>(local);
  if (threadIdx.x == 0) ws.score_stats[row * ws.score_blocks + block] = merged;
}

__global__ void __launch_bounds__(kFusionThreads) finish_kernel(FusionParams p, FusionWorkspace ws) {
  // Rows in reverse order of score_kernel's: the scores it wrote last are the likeliest still in L2.
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  const int64_t chunk = block % ws.num_chunks, row = block / ws.num_chunks;
  const int64_t begin = chunk * kFusionChunk;
  float* out = p.out + row * p.out_row_stride + begin + threadIdx.x;
  // Log-prob output reads every score anyway: the loads go out before the row's partial states are
  // merged, so their latency hides behind the merge instead of following it.
  float value[kColumnsPerThread];
#pragma unroll
  for (int i = 0; i < kColumnsPerThread; ++i) {
    value[i] = p.output_logprobs && begin + i * kFusionThreads + threadIdx.x < p.vocab ? out[i * kFusionThreads] : 0.f;
  }
  __shared__ OnlineLse row_stats;
  if (threadIdx.x < 32) {
    const OnlineLse merged = warp_merge_partials(ws.score_stats + row * ws.score_blocks, ws.score_blocks, 1);
    if (threadIdx.x == 0) row_stats = merged;
  }
  __syncthreads();
  const bool poisoned = row_stats.has_nan;
  const float lse = online_lse_value(row_stats);
  // Nothing to do: logits output of a clean row, or an all-excluded row that stays all -inf.
  if (!poisoned && (!p.output_logprobs || lse == -INFINITY)) return;
#pragma unroll
  for (int i = 0; i < kColumnsPerThread; ++i) {
    if (begin + i * kFusionThreads + threadIdx.x < p.vocab) out[i * kFusionThreads] = poisoned ? NAN : value[i] - lse;
  }
}

}  // namespace cuda
}  // namespace collab_ops
