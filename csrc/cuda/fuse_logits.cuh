// CUDA kernel of fuse_logits: one thread block per row. Torch-free (compiled on its own in the
// header check); the launcher is in fuse_logits.cu.
#pragma once
#include <cub/block/block_reduce.cuh>

#include "common/fusion.h"

namespace collab_ops {
namespace cuda {

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

template <int kThreads>
__global__ void __launch_bounds__(kThreads) fuse_logits_kernel(FusionParams p) {
  const int64_t row = blockIdx.x;
  __shared__ float weight[kMaxFusedModels];
  __shared__ float offset[kMaxFusedModels];
  __shared__ float plausibility_cut;
  if (threadIdx.x < p.num_models) {
    weight[threadIdx.x] = fusion_weight(p, row, threadIdx.x);
    offset[threadIdx.x] = 0.f;
  }
  if (threadIdx.x == 0) plausibility_cut = -INFINITY;
  __syncthreads();

  for (int k = 0; k < p.num_models; ++k) {
    const bool used = weight[k] != 0.f || (p.use_plausibility && k == p.plausibility_ref);
    if (!used || !needs_row_max(p, k)) continue;
    OnlineLse local = online_lse_init();
    for (int64_t col = threadIdx.x; col < p.vocab; col += kThreads) online_lse_add(local, scaled_logit(p, k, row, col));
    const OnlineLse stats = block_merge_lse<kThreads>(local);
    if (threadIdx.x == 0) {
      if (needs_row_lse(p)) offset[k] = online_lse_value(stats);
      if (p.use_plausibility && k == p.plausibility_ref) plausibility_cut = plausibility_cut_from_max(p, stats.max);
    }
    __syncthreads();
  }

  float* out = p.out + row * p.out_row_stride;
  OnlineLse local = online_lse_init();
  bool saw_nan = false;
  for (int64_t col = threadIdx.x; col < p.vocab; col += kThreads) {
    const float score = fused_score(p, row, col, weight, offset, plausibility_cut, saw_nan);
    out[col] = score;
    online_lse_add(local, score);
  }
  if (__syncthreads_or(saw_nan)) {
    for (int64_t col = threadIdx.x; col < p.vocab; col += kThreads) out[col] = NAN;
    return;
  }
  if (!p.output_logprobs) return;
  const float lse = online_lse_value(block_merge_lse<kThreads>(local));
  // An all-excluded row stays all -inf instead of becoming (-inf) - (-inf) = NaN.
  if (lse == -INFINITY) return;
  for (int64_t col = threadIdx.x; col < p.vocab; col += kThreads) out[col] -= lse;
}

}  // namespace cuda
}  // namespace collab_ops
