#include "cuda/launchers.h"
#include "cuda/speculative_verify.cuh"

namespace collab_ops {
namespace cuda {
namespace {

constexpr int kSpeculativeThreads = 256;
// Enough blocks to keep every SM busy with a few resident blocks; no chunk shorter than this, so
// a block's fixed cost (merging partials, the acceptance chain) stays small next to its reads.
constexpr int kBlocksPerSm = 4;
constexpr int64_t kMinChunk = 2048;

size_t aligned(size_t bytes) { return (bytes + 255) & ~size_t{255}; }

struct SpeculativePlan {
  int32_t splits;
  int64_t chunk;
  size_t model_partials, target_normalisers, draft_normalisers, fused_partials, mass_partials, decisions;
  size_t total() const {
    return model_partials + target_normalisers + draft_normalisers + fused_partials + mass_partials + decisions;
  }
};

SpeculativePlan plan(const SpeculativeParams& p) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t positions = p.num_drafts + 1;
  const int64_t row_blocks = p.batch * positions > 0 ? p.batch * positions : 1;
  const int64_t wanted = (int64_t{kBlocksPerSm} * sms + row_blocks - 1) / row_blocks;
  const int64_t most = (p.vocab + kMinChunk - 1) / kMinChunk;
  SpeculativePlan plan{};
  plan.splits = static_cast<int32_t>(wanted < most ? wanted : most);
  plan.chunk = (p.vocab + plan.splits - 1) / plan.splits;
  const size_t rows = static_cast<size_t>(p.batch), slots = static_cast<size_t>(p.num_targets + 1);
  plan.model_partials = aligned(rows * positions * slots * plan.splits * sizeof(RowPartial));
  plan.target_normalisers = aligned(rows * positions * sizeof(TargetNormaliser));
  plan.draft_normalisers = aligned(rows * positions * sizeof(DraftNormaliser));
  plan.fused_partials = aligned(rows * positions * plan.splits * sizeof(RowPartial));
  plan.mass_partials = aligned(rows * plan.splits * sizeof(float2));
  plan.decisions = aligned(rows * sizeof(RowDecision));
  return plan;
}

}  // namespace

size_t speculative_verify_workspace_bytes(const SpeculativeParams& params) { return plan(params).total(); }

cudaError_t launch_speculative_verify(const SpeculativeParams& params, void* workspace, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.batch > 65535) return cudaErrorInvalidConfiguration;
  const SpeculativePlan layout = plan(params);
  char* bytes = static_cast<char*>(workspace);
  SpeculativeWorkspace w{};
  w.model_partials = reinterpret_cast<RowPartial*>(bytes);
  bytes += layout.model_partials;
  w.target_normalisers = reinterpret_cast<TargetNormaliser*>(bytes);
  bytes += layout.target_normalisers;
  w.draft_normalisers = reinterpret_cast<DraftNormaliser*>(bytes);
  bytes += layout.draft_normalisers;
  w.fused_partials = reinterpret_cast<RowPartial*>(bytes);
  bytes += layout.fused_partials;
  w.mass_partials = reinterpret_cast<float2*>(bytes);
  bytes += layout.mass_partials;
  w.decisions = reinterpret_cast<RowDecision*>(bytes);
  w.splits = layout.splits;
  w.chunk = layout.chunk;

  constexpr int kThreads = kSpeculativeThreads;
  const dim3 position_grid(layout.splits, static_cast<unsigned>(params.num_drafts + 1),
                           static_cast<unsigned>(params.batch));
  const dim3 row_grid(layout.splits, static_cast<unsigned>(params.batch));
  const size_t normaliser_bytes = (params.num_drafts + 1) * sizeof(TargetNormaliser);
  normaliser_partials_kernel<kThreads><<<position_grid, kThreads, 0, stream>>>(params, w);
  fused_partials_kernel<kThreads><<<position_grid, kThreads, 0, stream>>>(params, w);
  stop_mass_kernel<kThreads><<<row_grid, kThreads, normaliser_bytes, stream>>>(params, w);
  if (!params.greedy) {
    draw_final_token_kernel<kThreads><<<static_cast<unsigned>(params.batch), kThreads, 0, stream>>>(params, w);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
