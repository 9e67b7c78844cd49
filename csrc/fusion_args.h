// Builds the torch-free FusionParams of one fuse_logits call from its tensors, with the checks
// that guard the kernels when torch.ops.collab_ops.fuse_logits is called directly.
#pragma once
#include <torch/types.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/fusion.h"
#include "tensor_args.h"

namespace collab_ops {

// Fills everything but the output pointer; `keep_alive` holds the inputs that were copied
// because their last dimension was strided, so they outlive the launch.
inline FusionParams make_fusion_params(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                                       const std::vector<double>& temperatures, bool normalize,
                                       std::optional<double> plausibility_alpha, int64_t plausibility_ref,
                                       int64_t vocab_size, bool output_logprobs,
                                       std::vector<at::Tensor>& keep_alive) {
  const int64_t num_models = static_cast<int64_t>(logits.size());
  TORCH_CHECK_VALUE(num_models >= 1 && num_models <= kMaxFusedModels, "logits must hold 1 to ", kMaxFusedModels,
                    " tensors, got ", num_models);
  TORCH_CHECK_VALUE(static_cast<int64_t>(temperatures.size()) == num_models, "temperatures must have ", num_models,
                    " entries, got ", temperatures.size());
  const at::Tensor& first = logits[0];
  TORCH_CHECK_VALUE(first.dim() == 2, "logits[0] must be 2-D [batch, vocab]");
  const int64_t batch = first.size(0);
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);

  FusionParams p{};
  p.num_models = static_cast<int32_t>(num_models);
  p.batch = batch;
  p.vocab = vocab_size;
  keep_alive.clear();
  for (int64_t k = 0; k < num_models; ++k) {
    TORCH_CHECK_VALUE(temperatures[k] > 0, "temperatures[", k, "] must be > 0, got ", temperatures[k]);
    const LogitRows rows = checked_logit_rows(logits[k], "logits[" + std::to_string(k) + "]", batch, vocab_size,
                                              first.device(), keep_alive);
    p.logits[k] = rows.data;
    p.kind[k] = rows.kind;
    p.row_stride[k] = rows.row_stride;
    p.inv_temperature[k] = static_cast<float>(1.0 / temperatures[k]);
  }
  p.weights = read_model_weights(weights, "weights", batch, num_models, first.device(), p.weight_values,
                                 p.weight_row_stride, p.weight_col_stride);
  p.normalize = normalize;
  p.output_logprobs = output_logprobs;
  p.use_plausibility = plausibility_alpha.has_value();
  if (p.use_plausibility) {
    const double alpha = *plausibility_alpha;
    TORCH_CHECK_VALUE(alpha > 0 && alpha <= 1, "plausibility_alpha must lie in (0, 1], got ", alpha);
    TORCH_CHECK_VALUE(plausibility_ref >= 0 && plausibility_ref < num_models, "plausibility_ref must index a model, got ",
                      plausibility_ref);
    p.log_plausibility_alpha = static_cast<float>(std::log(alpha));
    p.plausibility_ref = static_cast<int32_t>(plausibility_ref);
  }
  return p;
}

}  // namespace collab_ops
