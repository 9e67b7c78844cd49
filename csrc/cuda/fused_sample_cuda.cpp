#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "sampling_args.h"

namespace collab_ops {
namespace {

at::Tensor fused_sample_cuda(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                             c10::ArrayRef<double> temperatures, bool normalize,
                             std::optional<double> plausibility_alpha, int64_t plausibility_ref, int64_t vocab_size,
                             double temperature, int64_t top_k, double top_p, double min_p, bool greedy,
                             const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(!logits.empty(), "logits must not be empty");
  const c10::cuda::CUDAGuard device_guard(logits[0].device());
  std::vector<at::Tensor> keep_alive;
  SamplingParams s = make_sampling_params(logits, weights, temperatures.vec(), normalize, plausibility_alpha,
                                          plausibility_ref, vocab_size, temperature, top_k, top_p, min_p, greedy,
                                          seed, keep_alive);
  at::Tensor tokens = at::empty({s.fusion.batch}, logits[0].options().dtype(at::kLong));
  s.tokens = tokens.data_ptr<int64_t>();
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::fused_sample_workspace_bytes(s, sm_count))},
                                   logits[0].options().dtype(at::kByte));
  const cudaError_t status =
      cuda::launch_fused_sample(s, workspace.data_ptr(), sm_count, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "fused_sample CUDA launch failed: ", cudaGetErrorString(status));
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CUDA, m) { m.impl("fused_sample", &fused_sample_cuda); }

}  // namespace collab_ops
