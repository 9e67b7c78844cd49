#include "cuda/fuse_logits.cuh"
#include "cuda/launchers.h"

namespace collab_ops {
namespace cuda {

cudaError_t launch_fuse_logits(const FusionParams& params, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  constexpr int kThreads = 512;
  fuse_logits_kernel<kThreads><<<static_cast<unsigned>(params.batch), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
