// Torch-free entry points of the CUDA kernels, called by the torch-facing *_cuda.cpp files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/fusion.h"
#include "common/sampling.h"

namespace collab_ops {
namespace cuda {

cudaError_t launch_fuse_logits(const FusionParams& params, cudaStream_t stream);

// Bytes of device workspace that launch_fused_sample needs for this call on a GPU with sm_count SMs.
size_t fused_sample_workspace_bytes(const SamplingParams& params, int sm_count);
cudaError_t launch_fused_sample(const SamplingParams& params, void* workspace, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace collab_ops
