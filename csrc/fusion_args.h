// Builds the torch-free FusionParams of one fuse_logits call from its tensors, with the checks
// that guard the kernels when torch.ops.collab_ops.fuse_logits is called directly.
#pragma once
#include <torch/types.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/fusion.h"

namespace collab_ops {

inline ScalarKind scalar_kind(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Checks one [batch, >= vocab] logits input named `name` and describes its rows; an input whose
// columns are strided is copied, and the copy joins `keep_alive` so it outlives the launch.
inline LogitRows checked_logit_rows(const at::Tensor& t, const std::string& name, int64_t batch, int64_t vocab,
                                    const at::Device& device, std::vector<at::Tensor>& keep_alive) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == batch, name, " must have shape [", batch, ", V], got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) >= vocab, name, " has ", t.size(1), " columns, fewer than vocab_size=", vocab);
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the first input is on ", device);
  at::Tensor rows = t;
  if (t.size(1) > 1 && t.stride(1) != 1) {
    rows = t.contiguous();
    keep_alive.push_back(rows);
  }
  return LogitRows{rows.data_ptr(), scalar_kind(rows, name), rows.stride(0)};
}

// Weights are either a [num_models] float32 CPU tensor of per-model constants, read here on the
// host, or a [batch, num_models] float32 tensor of per-row weights on the inputs' device. Returns
// the per-row pointer (nullptr for constants) and fills `values` with the constants.
inline const float* read_model_weights(const at::Tensor& weights, const char* name, int64_t batch, int64_t num_models,
                                       const at::Device& device, float* values, int64_t& row_stride,
                                       int64_t& col_stride) {
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat, name, " must be float32");
  if (weights.dim() == 1) {
    TORCH_CHECK_VALUE(weights.device().is_cpu() && weights.size(0) == num_models, name,
                      " given per model must be a CPU tensor of ", num_models, " values, got ", weights.sizes(),
                      " on ", weights.device());
    const at::Tensor host = weights.contiguous();
    for (int64_t k = 0; k < num_models; ++k) values[k] = host.data_ptr<float>()[k];
    row_stride = col_stride = 0;
    return nullptr;
  }
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == batch && weights.size(1) == num_models, name,
                    " given per row must have shape [", batch, ", ", num_models, "], got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.device() == device, name, " given per row must be on ", device);
  row_stride = weights.stride(0);
  col_stride = weights.stride(1);
  return weights.data_ptr<float>();
}

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
