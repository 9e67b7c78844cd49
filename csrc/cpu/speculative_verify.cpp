#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/speculative_verify.h"
#include "speculative_args.h"

namespace collab_ops {
namespace {

// A row's work compiled for AVX2 and AVX-512 too: the normalisers and the residual are exp-bound.
COLLAB_CPU_CLONES void verify_row(const SpeculativeParams& p, int64_t row, cpu::SpeculativeScratch& scratch) {
  cpu::speculative_verify_row(p, row, scratch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> speculative_verify_cpu(
    const at::Tensor& draft_tokens, const std::vector<at::Tensor>& targets, const at::Tensor& target_weights,
    const std::optional<at::Tensor>& draft, const at::Tensor& num_draft_tokens, bool inputs_are_logits,
    double temperature, bool greedy, const at::Tensor& seed) {
  SpeculativeOutputs outputs;
  const SpeculativeParams p = make_speculative_params(draft_tokens, targets, target_weights, draft, num_draft_tokens,
                                                      inputs_are_logits, temperature, greedy, seed, outputs);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    cpu::SpeculativeScratch scratch(p);
    for (int64_t row = begin; row < end; ++row) verify_row(p, row, scratch);
  });
  return outputs.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) { m.impl("speculative_verify", &speculative_verify_cpu); }

}  // namespace collab_ops
