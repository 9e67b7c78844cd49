#include "cuda/dynamic_fusion.cuh"
#include "cuda/launchers.h"

namespace collab_ops {
namespace cuda {
namespace {

constexpr int64_t kAlignment = 256;

int64_t aligned(int64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

int64_t dynamic_fusion_chunks(const DynamicFusionParams& params) {
  return (params.vocab + kDynamicChunk - 1) / kDynamicChunk;
}
int64_t dynamic_fusion_tasks(const DynamicFusionParams& params) { return params.batch * params.num_experts; }

int64_t partial_bytes(const DynamicFusionParams& params) {
  return aligned(static_cast<int64_t>(sizeof(WeightedLse)) * dynamic_fusion_slots(params.grid_size) *
                 dynamic_fusion_tasks(params) * dynamic_fusion_chunks(params));
}
int64_t flag_bytes(const DynamicFusionParams& params) {
  return aligned(static_cast<int64_t>(sizeof(uint32_t)) * dynamic_fusion_tasks(params) * dynamic_fusion_chunks(params));
}
int64_t arrival_bytes(const DynamicFusionParams& params) {
  return static_cast<int64_t>(sizeof(uint32_t)) * dynamic_fusion_tasks(params);
}

}  // namespace

int64_t dynamic_fusion_workspace_bytes(const DynamicFusionParams& params) {
  return partial_bytes(params) + flag_bytes(params) + arrival_bytes(params);
}

cudaError_t launch_dynamic_fusion_weights(const DynamicFusionParams& params, void* workspace, cudaStream_t stream) {
  const int64_t tasks = dynamic_fusion_tasks(params);
  if (tasks == 0) return cudaSuccess;
  char* base = static_cast<char*>(workspace);
  DynamicFusionLayout layout{};
  layout.chunks = dynamic_fusion_chunks(params);
  layout.partials = reinterpret_cast<WeightedLse*>(base);
  layout.chunk_flags = reinterpret_cast<uint32_t*>(base + partial_bytes(params));
  layout.arrived = reinterpret_cast<uint32_t*>(base + partial_bytes(params) + flag_bytes(params));
  const cudaError_t status = cudaMemsetAsync(layout.arrived, 0, arrival_bytes(params), stream);
  if (status != cudaSuccess) return status;
  dynamic_fusion_chunk_kernel<<<static_cast<unsigned>(tasks * layout.chunks), kDynamicThreads, 0, stream>>>(params,
                                                                                                           layout);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
