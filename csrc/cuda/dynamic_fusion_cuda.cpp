#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "dynamic_fusion_args.h"

namespace collab_ops {
namespace {

at::Tensor dynamic_fusion_weights_cuda(const at::Tensor& large, const std::vector<at::Tensor>& experts,
                                       const at::Tensor& base, const at::Tensor& grid, int64_t vocab_size) {
  const c10::cuda::CUDAGuard device_guard(large.device());
  std::vector<at::Tensor> keep_alive;
  DynamicFusionParams p = make_dynamic_fusion_params(large, experts, base, grid, vocab_size, keep_alive);
  at::Tensor out = at::empty({p.batch, p.num_experts}, large.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  at::Tensor workspace =
      at::empty({cuda::dynamic_fusion_workspace_bytes(p)}, large.options().dtype(at::kByte));
  const cudaError_t status =
      cuda::launch_dynamic_fusion_weights(p, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "dynamic_fusion_weights CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CUDA, m) { m.impl("dynamic_fusion_weights", &dynamic_fusion_weights_cuda); }

}  // namespace collab_ops
