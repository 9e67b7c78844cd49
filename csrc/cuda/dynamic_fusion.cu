#include <algorithm>

#include "cuda/device_facts.h"
#include "cuda/dynamic_fusion.cuh"
#include "cuda/launchers.h"

namespace collab_ops {
namespace cuda {
namespace {

constexpr int64_t kAlignment = 256;

int64_t aligned(int64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

int64_t dynamic_fusion_tasks(const DynamicFusionParams& params) { return params.batch * params.num_experts; }

struct DynamicFusionPlan {
  int64_t tiles, splits;
  int64_t partial_bytes, flag_bytes, arrival_bytes;
  int64_t total() const { return partial_bytes + flag_bytes + arrival_bytes; }
};

// As many blocks per task as fit the GPU's resident slots in one wave, at most one per tile: the
// kernel is bound by arithmetic, not by memory latency, so one wave of blocks with near-equal runs
// of tiles balances the SMs, where one block per tile left a partial last wave and merged every
// tile's states separately. A batch with more tasks than slots gets one block per task.
DynamicFusionPlan plan(const DynamicFusionParams& params) {
  const int64_t resident = facts_of_current_device<int64_t>([](int device) {
    int sms = 1, blocks_per_sm = 1;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, dynamic_fusion_kernel, kDynamicThreads, 0);
    return int64_t{std::max(sms, 1)} * std::max(blocks_per_sm, 1);
  });
  const int64_t tasks = dynamic_fusion_tasks(params);
  DynamicFusionPlan plan{};
  plan.tiles = std::max<int64_t>(1, (params.vocab + kDynamicTile - 1) / kDynamicTile);
  plan.splits = std::clamp<int64_t>(resident / std::max<int64_t>(tasks, 1), 1, plan.tiles);
  const int64_t blocks = tasks * plan.splits;
  plan.partial_bytes = aligned(static_cast<int64_t>(sizeof(WeightedLse)) * dynamic_fusion_slots(params.grid_size) * blocks);
  plan.flag_bytes = aligned(static_cast<int64_t>(sizeof(uint32_t)) * blocks);
  plan.arrival_bytes = static_cast<int64_t>(sizeof(uint32_t)) * tasks;
  return plan;
}

}  // namespace

int64_t dynamic_fusion_workspace_bytes(const DynamicFusionParams& params) { return plan(params).total(); }

cudaError_t launch_dynamic_fusion_weights(const DynamicFusionParams& params, void* workspace, cudaStream_t stream) {
  const int64_t tasks = dynamic_fusion_tasks(params);
  if (tasks == 0) return cudaSuccess;
  const DynamicFusionPlan planned = plan(params);
  if (tasks * planned.splits > 0x7fffffff) return cudaErrorInvalidConfiguration;
  char* base = static_cast<char*>(workspace);
  DynamicFusionLayout layout{};
  layout.tiles = planned.tiles;
  layout.splits = planned.splits;
  layout.partials = reinterpret_cast<WeightedLse*>(base);
  layout.split_flags = reinterpret_cast<uint32_t*>(base + planned.partial_bytes);
  layout.arrived = reinterpret_cast<uint32_t*>(base + planned.partial_bytes + planned.flag_bytes);
  const cudaError_t status = cudaMemsetAsync(layout.arrived, 0, planned.arrival_bytes, stream);
  if (status != cudaSuccess) return status;
  dynamic_fusion_kernel<<<static_cast<unsigned>(tasks * planned.splits), kDynamicThreads, 0, stream>>>(params, layout);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
