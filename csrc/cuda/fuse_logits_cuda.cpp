#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "fusion_args.h"

namespace collab_ops {
namespace {

at::Tensor fuse_logits_cuda(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                            c10::ArrayRef<double> temperatures, bool normalize,
                            std::optional<double> plausibility_alpha, int64_t plausibility_ref, int64_t vocab_size,
                            bool output_logprobs) {
  TORCH_CHECK_VALUE(!logits.empty(), "logits must not be empty");
  const c10::cuda::CUDAGuard device_guard(logits[0].device());
  std::vector<at::Tensor> keep_alive;
  FusionParams p = make_fusion_params(logits, weights, temperatures.vec(), normalize, plausibility_alpha,
                                      plausibility_ref, vocab_size, output_logprobs, keep_alive);
  at::Tensor out = at::empty({p.batch, vocab_size}, logits[0].options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  at::Tensor workspace = at::empty({cuda::fuse_logits_workspace_bytes(p)}, out.options().dtype(at::kByte));
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaError_t status =
      cuda::launch_fuse_logits(p, workspace.data_ptr(), sm_count, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "fuse_logits CUDA launch failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CUDA, m) { m.impl("fuse_logits", &fuse_logits_cuda); }

}  // namespace collab_ops
