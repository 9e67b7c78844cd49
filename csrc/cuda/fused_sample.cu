#include <algorithm>

#include "cuda/fused_sample.cuh"
#include "cuda/launchers.h"

namespace collab_ops {
namespace cuda {
namespace {

constexpr size_t kAlignment = 256;

size_t aligned(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

// At most kSampleBlocksPerSm blocks per SM over the whole batch (one wave: a second, partial one
// would idle most SMs at its end), so that a single row still spreads over the GPU.
SampleLayout plan(const SamplingParams& params, int sm_count) {
  // (an empty batch plans as one row: the workspace size must not divide by zero; nothing launches)
  const int64_t batch = std::max<int64_t>(1, params.fusion.batch), vocab = params.fusion.vocab;
  const int64_t wanted_chunks = std::max<int64_t>(1, kSampleBlocksPerSm * static_cast<int64_t>(sm_count) / batch);
  const int64_t columns = (vocab + wanted_chunks - 1) / wanted_chunks;
  SampleLayout layout{};
  layout.chunk_columns = (columns + kColumnsPerSweep - 1) / kColumnsPerSweep * kColumnsPerSweep;
  layout.chunks = (vocab + layout.chunk_columns - 1) / layout.chunk_columns;
  return layout;
}

size_t partial_bytes(const SamplingParams& params, const SampleLayout& layout) {
  return aligned(sizeof(ChunkPartial) * params.fusion.batch * layout.chunks);
}
size_t row_bytes(const SamplingParams& params) { return aligned(sizeof(RowState) * params.fusion.batch); }
size_t score_bytes(const SamplingParams& params) {
  return uses_value_cut(params) ? sizeof(float) * params.fusion.batch * params.fusion.vocab : 0;
}

}  // namespace

size_t fused_sample_workspace_bytes(const SamplingParams& params, int sm_count) {
  return partial_bytes(params, plan(params, sm_count)) + row_bytes(params) + score_bytes(params);
}

cudaError_t launch_fused_sample(const SamplingParams& params, void* workspace, int sm_count, cudaStream_t stream) {
  const int64_t batch = params.fusion.batch;
  if (batch == 0) return cudaSuccess;
  SampleLayout layout = plan(params, sm_count);
  char* base = static_cast<char*>(workspace);
  layout.partials = reinterpret_cast<ChunkPartial*>(base);
  layout.rows = reinterpret_cast<RowState*>(base + partial_bytes(params, layout));
  layout.scores = uses_value_cut(params) ? reinterpret_cast<float*>(base + partial_bytes(params, layout) + row_bytes(params))
                                         : nullptr;
  cudaError_t status = cudaMemsetAsync(layout.rows, 0, sizeof(RowState) * batch, stream);
  if (status != cudaSuccess) return status;

  const unsigned chunk_blocks = static_cast<unsigned>(batch * layout.chunks);
  if (params.fusion.use_plausibility) {
    sample_chunk_kernel<ChunkPass::kReferenceMax><<<chunk_blocks, kSampleThreads, 0, stream>>>(params, layout);
  }
  if (uses_value_cut(params) || uses_min_p(params)) {
    sample_chunk_kernel<ChunkPass::kStats><<<chunk_blocks, kSampleThreads, 0, stream>>>(params, layout);
  }
  if (uses_value_cut(params)) {
    select_value_cut_kernel<<<static_cast<unsigned>(batch), kSelectThreads, 0, stream>>>(params, layout);
    sample_chunk_kernel<ChunkPass::kSampleWorkspace><<<chunk_blocks, kSampleThreads, 0, stream>>>(params, layout);
  } else {
    sample_chunk_kernel<ChunkPass::kSampleInputs><<<chunk_blocks, kSampleThreads, 0, stream>>>(params, layout);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
