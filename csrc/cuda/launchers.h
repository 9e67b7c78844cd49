// Torch-free entry points of the CUDA kernels, called by the torch-facing *_cuda.cpp files.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/fusion.h"
#include "common/speculative.h"

namespace collab_ops {
namespace cuda {

cudaError_t launch_fuse_logits(const FusionParams& params, cudaStream_t stream);

// Scratch bytes that launch_speculative_verify needs: a function of the shapes and the device only.
size_t speculative_verify_workspace_bytes(const SpeculativeParams& params);
cudaError_t launch_speculative_verify(const SpeculativeParams& params, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace collab_ops
