#include "cuda/dynamic_fusion.cuh"
#include "cuda/launchers.h"

namespace collab_ops {
namespace cuda {

static int64_t dynamic_fusion_chunks(const DynamicFusionParams& params) {
  return (params.vocab + kDynamicChunk - 1) / kDynamicChunk;
}

int64_t dynamic_fusion_workspace_bytes(const DynamicFusionParams& params) {
  return static_cast<int64_t>(sizeof(DynamicFusionState)) * params.batch * params.num_experts *
         dynamic_fusion_chunks(params);
}

cudaError_t launch_dynamic_fusion_weights(const DynamicFusionParams& params, void* workspace, cudaStream_t stream) {
  const int64_t tasks = params.batch * params.num_experts;
  if (tasks == 0) return cudaSuccess;
  const int64_t chunks = dynamic_fusion_chunks(params);
  auto* partials = static_cast<DynamicFusionState*>(workspace);
  dynamic_fusion_partial_kernel<<<static_cast<unsigned>(tasks * chunks), kDynamicThreads, 0, stream>>>(params, chunks,
                                                                                                        partials);
  dynamic_fusion_select_kernel<<<static_cast<unsigned>(tasks), kSelectThreads, 0, stream>>>(params, chunks, partials);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
