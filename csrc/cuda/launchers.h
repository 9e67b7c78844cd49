// Torch-free entry points of the CUDA kernels, called by the torch-facing *_cuda.cpp files.
#pragma once
#include <cuda_runtime_api.h>

#include "common/fusion.h"

namespace collab_ops {
namespace cuda {

cudaError_t launch_fuse_logits(const FusionParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace collab_ops
