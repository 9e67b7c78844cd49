#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "speculative_args.h"

namespace collab_ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> speculative_verify_cuda(
    const at::Tensor& draft_tokens, const std::vector<at::Tensor>& targets, const at::Tensor& target_weights,
    const std::optional<at::Tensor>& draft, const at::Tensor& num_draft_tokens, bool inputs_are_logits,
    double temperature, bool greedy, const at::Tensor& seed) {
  const c10::cuda::CUDAGuard device_guard(draft_tokens.device());
  SpeculativeOutputs outputs;
  const SpeculativeParams p = make_speculative_params(draft_tokens, targets, target_weights, draft, num_draft_tokens,
                                                      inputs_are_logits, temperature, greedy, seed, outputs);
  TORCH_CHECK_VALUE(p.batch <= 65535, "the CUDA speculative_verify kernel takes at most 65535 rows, got ", p.batch);
  TORCH_CHECK_VALUE(p.num_drafts < 65535, "the CUDA speculative_verify kernel takes at most 65534 drafts per row, got ",
                    p.num_drafts);
  // Shape-dependent size only, from the caching allocator: capturable in a CUDA graph. The
  // launcher zeroes the counters at its start with a memset on the same stream.
  const at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::speculative_verify_workspace_bytes(p))},
                                         draft_tokens.options().dtype(at::kByte));
  const cudaError_t status = cuda::launch_speculative_verify(p, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "speculative_verify CUDA launch failed: ", cudaGetErrorString(status));
  return outputs.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CUDA, m) { m.impl("speculative_verify", &speculative_verify_cuda); }

}  // namespace collab_ops
