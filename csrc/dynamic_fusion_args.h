// Builds the torch-free DynamicFusionParams of one dynamic_fusion_weights call from its tensors.
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

#include "common/dynamic_fusion.h"
#include "tensor_args.h"

namespace collab_ops {

inline DynamicFusionParams make_dynamic_fusion_params(const at::Tensor& large, const std::vector<at::Tensor>& experts,
                                                      const at::Tensor& base, const at::Tensor& grid,
                                                      int64_t vocab_size, std::vector<at::Tensor>& keep_alive) {
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxFusionExperts, "experts must hold 1 to ",
                    kMaxFusionExperts, " tensors, got ", num_experts);
  TORCH_CHECK_VALUE(large.dim() == 2, "large must be 2-D [batch, vocab], got ", large.sizes());
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  TORCH_CHECK_TYPE(grid.scalar_type() == at::kFloat, "grid must be float32");
  TORCH_CHECK_VALUE(grid.dim() == 1 && grid.numel() >= 1 && grid.numel() <= kMaxFusionGrid,
                    "grid must be 1-D with 1 to ", kMaxFusionGrid, " candidates, got ", grid.sizes());
  TORCH_CHECK_VALUE(grid.device() == large.device(), "grid must be on ", large.device());
  const int64_t batch = large.size(0);
  DynamicFusionParams p{};
  p.large = checked_logit_rows(large, "large", batch, vocab_size, large.device(), keep_alive);
  p.base = checked_logit_rows(base, "base", batch, vocab_size, large.device(), keep_alive);
  for (int64_t t = 0; t < num_experts; ++t)
    p.experts[t] = checked_logit_rows(experts[t], "experts[" + std::to_string(t) + "]", batch, vocab_size,
                                      large.device(), keep_alive);
  const at::Tensor grid_values = grid.contiguous();
  keep_alive.push_back(grid_values);
  p.grid = grid_values.data_ptr<float>();
  p.grid_size = static_cast<int32_t>(grid.numel());
  p.num_experts = static_cast<int32_t>(num_experts);
  p.batch = batch;
  p.vocab = vocab_size;
  return p;
}

}  // namespace collab_ops
