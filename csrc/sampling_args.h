// Builds the torch-free SamplingParams of one fused_sample call, with the checks that guard the
// kernels when torch.ops.collab_ops.fused_sample is called directly.
#pragma once
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/sampling.h"
#include "fusion_args.h"

namespace collab_ops {

// `keep_alive` holds the copies (strided-column inputs, the int64 seed) that must outlive the launch.
inline SamplingParams make_sampling_params(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                                           const std::vector<double>& temperatures, bool normalize,
                                           std::optional<double> plausibility_alpha, int64_t plausibility_ref,
                                           int64_t vocab_size, double temperature, int64_t top_k, double top_p,
                                           double min_p, bool greedy, const std::optional<at::Tensor>& seed,
                                           std::vector<at::Tensor>& keep_alive) {
  SamplingParams s{};
  s.fusion = make_fusion_params(logits, weights, temperatures, normalize, plausibility_alpha, plausibility_ref,
                                vocab_size, /*output_logprobs=*/false, keep_alive);
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must lie in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, "min_p must lie in [0, 1], got ", min_p);
  s.inv_temperature = static_cast<float>(1.0 / temperature);
  s.top_k = top_k;
  s.top_p = static_cast<float>(top_p);
  s.log_min_p = min_p > 0 ? static_cast<float>(std::log(min_p)) : -std::numeric_limits<float>::infinity();
  s.greedy = greedy;
  if (!greedy) {
    TORCH_CHECK_VALUE(seed.has_value(), "fused_sample needs a seed unless greedy");
    const at::Tensor& given = *seed;
    TORCH_CHECK_VALUE(given.device() == logits[0].device(), "seed must be on ", logits[0].device());
    TORCH_CHECK_VALUE(given.dim() == 0 || (given.dim() == 1 && given.size(0) == s.fusion.batch),
                      "seed must be a scalar or have shape [", s.fusion.batch, "], got ", given.sizes());
    const at::Tensor seed64 = given.to(at::kLong).contiguous();
    keep_alive.push_back(seed64);
    s.seed = seed64.data_ptr<int64_t>();
    s.seed_per_row = given.dim() == 1;
  }
  return s;
}

}  // namespace collab_ops
