#include <algorithm>

#include "cuda/fuse_logits.cuh"
#include "cuda/launchers.h"

namespace collab_ops {
namespace cuda {

int64_t fuse_logits_workspace_bytes(const FusionParams& params) {
  const int64_t chunks = (params.vocab + kFusionChunk - 1) / kFusionChunk;
  return static_cast<int64_t>(sizeof(OnlineLse)) * params.batch * chunks * (params.num_models + 1);
}

cudaError_t launch_fuse_logits(const FusionParams& params, void* workspace, int sm_count, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  FusionWorkspace ws;
  ws.num_chunks = (params.vocab + kFusionChunk - 1) / kFusionChunk;
  ws.model_stats = static_cast<OnlineLse*>(workspace);
  ws.score_stats = ws.model_stats + params.batch * ws.num_chunks * params.num_models;
  // A chunk per block while that fills the GPU (as for one row), else about one wave of blocks.
  const int64_t resident_blocks = static_cast<int64_t>(kScoreBlocksPerSm) * std::max(1, sm_count);
  ws.chunks_per_score_block = (params.batch * ws.num_chunks + resident_blocks - 1) / resident_blocks;
  ws.score_blocks = (ws.num_chunks + ws.chunks_per_score_block - 1) / ws.chunks_per_score_block;
  const dim3 grid(static_cast<unsigned>(ws.num_chunks * params.batch));
  bool any_stats = false;
  for (int k = 0; k < params.num_models; ++k) any_stats |= needs_row_max(params, k);
  if (any_stats) model_stats_kernel<<<grid, kFusionThreads, 0, stream>>>(params, ws);
  const dim3 score_grid(static_cast<unsigned>(ws.score_blocks * params.batch));
  score_kernel<<<score_grid, kFusionThreads, 0, stream>>>(params, ws);
  finish_kernel<<<grid, kFusionThreads, 0, stream>>>(params, ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
