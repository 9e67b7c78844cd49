#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/fused_sample.h"
#include "sampling_args.h"

namespace collab_ops {
namespace {

at::Tensor fused_sample_cpu(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                            c10::ArrayRef<double> temperatures, bool normalize, std::optional<double> plausibility_alpha,
                            int64_t plausibility_ref, int64_t vocab_size, double temperature, int64_t top_k,
                            double top_p, double min_p, bool greedy, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(!logits.empty(), "logits must not be empty");
  std::vector<at::Tensor> keep_alive;
  SamplingParams s = make_sampling_params(logits, weights, temperatures.vec(), normalize, plausibility_alpha,
                                          plausibility_ref, vocab_size, temperature, top_k, top_p, min_p, greedy,
                                          seed, keep_alive);
  at::Tensor tokens = at::empty({s.fusion.batch}, logits[0].options().dtype(at::kLong));
  s.tokens = tokens.data_ptr<int64_t>();
  at::Tensor workspace;
  if (uses_value_cut(s)) workspace = at::empty({s.fusion.batch, vocab_size}, logits[0].options().dtype(at::kFloat));
  cpu::fused_sample(s, at::get_num_threads(), workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                    [](int64_t count, const auto& fn) { at::parallel_for(0, count, 1, fn); });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) { m.impl("fused_sample", &fused_sample_cpu); }

}  // namespace collab_ops
