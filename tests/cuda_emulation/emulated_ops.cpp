// The CUDA launchers of csrc/cuda run on CPU tensors through the CUDA emulator: the same argument
// checks and params builders as csrc/cuda/*_cuda.cpp (csrc/*_args.h), host memory for the device's,
// and the emulated device's SM count. Built by tests/cuda_emulation/emulator_build.py.
#include <torch/extension.h>

#include "cuda/launchers.h"
#include "dynamic_fusion_args.h"
#include "sampling_args.h"
#include "speculative_args.h"

namespace collab_ops {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, " emulated CUDA launch failed: ", cudaGetErrorString(status));
}

at::Tensor fuse_logits(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                       const std::vector<double>& temperatures, bool normalize, std::optional<double> plausibility_alpha,
                       int64_t plausibility_ref, int64_t vocab_size, bool output_logprobs) {
  std::vector<at::Tensor> keep_alive;
  FusionParams p = make_fusion_params(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref,
                                      vocab_size, output_logprobs, keep_alive);
  at::Tensor out = at::empty({p.batch, vocab_size}, logits[0].options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  at::Tensor workspace = at::empty({cuda::fuse_logits_workspace_bytes(p)}, out.options().dtype(at::kByte));
  check_launch(cuda::launch_fuse_logits(p, workspace.data_ptr(), collab_emu::device.sm_count, nullptr), "fuse_logits");
  return out;
}

at::Tensor fused_sample(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                        const std::vector<double>& temperatures, bool normalize,
                        std::optional<double> plausibility_alpha, int64_t plausibility_ref, int64_t vocab_size,
                        double temperature, int64_t top_k, double top_p, double min_p, bool greedy,
                        const std::optional<at::Tensor>& seed) {
  std::vector<at::Tensor> keep_alive;
  SamplingParams s = make_sampling_params(logits, weights, temperatures, normalize, plausibility_alpha,
                                          plausibility_ref, vocab_size, temperature, top_k, top_p, min_p, greedy,
                                          seed, keep_alive);
  at::Tensor tokens = at::empty({s.fusion.batch}, logits[0].options().dtype(at::kLong));
  s.tokens = tokens.data_ptr<int64_t>();
  const int sm_count = collab_emu::device.sm_count;
  at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::fused_sample_workspace_bytes(s, sm_count))},
                                   logits[0].options().dtype(at::kByte));
  check_launch(cuda::launch_fused_sample(s, workspace.data_ptr(), sm_count, nullptr), "fused_sample");
  return tokens;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> speculative_verify(
    const at::Tensor& draft_tokens, const std::vector<at::Tensor>& targets, const at::Tensor& target_weights,
    const std::optional<at::Tensor>& draft, const at::Tensor& num_draft_tokens, bool inputs_are_logits,
    double temperature, bool greedy, const at::Tensor& seed) {
  SpeculativeOutputs outputs;
  const SpeculativeParams p = make_speculative_params(draft_tokens, targets, target_weights, draft, num_draft_tokens,
                                                      inputs_are_logits, temperature, greedy, seed, outputs);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(cuda::speculative_verify_workspace_bytes(p))},
                                         draft_tokens.options().dtype(at::kByte));
  check_launch(cuda::launch_speculative_verify(p, workspace.data_ptr(), nullptr), "speculative_verify");
  return outputs.as_tuple();
}

at::Tensor dynamic_fusion_weights(const at::Tensor& large, const std::vector<at::Tensor>& experts,
                                  const at::Tensor& base, const at::Tensor& grid, int64_t vocab_size) {
  std::vector<at::Tensor> keep_alive;
  DynamicFusionParams p = make_dynamic_fusion_params(large, experts, base, grid, vocab_size, keep_alive);
  at::Tensor out = at::empty({p.batch, p.num_experts}, large.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  at::Tensor workspace = at::empty({cuda::dynamic_fusion_workspace_bytes(p)}, large.options().dtype(at::kByte));
  check_launch(cuda::launch_dynamic_fusion_weights(p, workspace.data_ptr(), nullptr), "dynamic_fusion_weights");
  return out;
}

}  // namespace
}  // namespace collab_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "csrc/cuda's kernels and launchers on CPU tensors, through the CUDA emulator (tests only)";
  module.def("fuse_logits", &collab_ops::fuse_logits);
  module.def("fused_sample", &collab_ops::fused_sample);
  // The Python wrapper passes speculative_verify's arguments by name.
  module.def("speculative_verify", &collab_ops::speculative_verify, pybind11::arg("draft_tokens"),
             pybind11::arg("targets"), pybind11::arg("target_weights"), pybind11::arg("draft"),
             pybind11::arg("num_draft_tokens"), pybind11::arg("inputs_are_logits"), pybind11::arg("temperature"),
             pybind11::arg("greedy"), pybind11::arg("seed"));
  module.def("dynamic_fusion_weights", &collab_ops::dynamic_fusion_weights);
  module.def("blocks_launched", []() { return collab_emu::blocks_launched; });
  module.def("set_device", [](int sm_count, int blocks_per_sm) {
    collab_emu::device.sm_count = sm_count;
    collab_emu::device.blocks_per_sm = blocks_per_sm;
  });
}
