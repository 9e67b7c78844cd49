// Torch-free entry points of the CUDA kernels, called by the torch-facing *_cuda.cpp files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/dynamic_fusion.h"
#include "common/fusion.h"
#include "common/sampling.h"
#include "common/speculative.h"

namespace collab_ops {
namespace cuda {

// Scratch bytes that launch_fuse_logits needs for its per-chunk partial states.
int64_t fuse_logits_workspace_bytes(const FusionParams& params);
cudaError_t launch_fuse_logits(const FusionParams& params, void* workspace, int sm_count, cudaStream_t stream);

int64_t dynamic_fusion_workspace_bytes(const DynamicFusionParams& params);
cudaError_t launch_dynamic_fusion_weights(const DynamicFusionParams& params, void* workspace, cudaStream_t stream);

// Bytes of device workspace that launch_fused_sample needs for this call on a GPU with sm_count SMs.
size_t fused_sample_workspace_bytes(const SamplingParams& params, int sm_count);
cudaError_t launch_fused_sample(const SamplingParams& params, void* workspace, int sm_count, cudaStream_t stream);

// Scratch bytes that launch_speculative_verify needs: a function of the shapes and the device only.
size_t speculative_verify_workspace_bytes(const SpeculativeParams& params);
cudaError_t launch_speculative_verify(const SpeculativeParams& params, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace collab_ops
