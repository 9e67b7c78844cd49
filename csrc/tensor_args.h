// Torch-facing argument helpers shared by the ops' launchers: dtype tags, logits rows, weights.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

#include "common/scalar.h"

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

}  // namespace collab_ops
