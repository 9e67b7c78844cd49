// Builds the torch-free SpeculativeParams of one speculative_verify call from its tensors, with the
// checks that guard the kernels when torch.ops.collab_ops.speculative_verify is called directly,
// and allocates the outputs (sizes depend on shapes only, so the call stays graph-capturable).
// num_draft_tokens: [batch] on the device, or a 0-dim CPU tensor (every row uses that many drafts).
// seed: [batch] per-row seeds or a 0-dim base seed (on the device, or on the CPU, read here); any
// int64 tensor when greedy (unread).
#pragma once
#include <torch/types.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/speculative.h"
#include "tensor_args.h"

namespace collab_ops {

struct SpeculativeOutputs {
  at::Tensor tokens;
  at::Tensor num_emitted;
  at::Tensor num_accepted;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple() const { return {tokens, num_emitted, num_accepted}; }
};

inline void check_index_vector(const at::Tensor& t, const char* name, int64_t batch, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch && t.is_contiguous(), name, " must be a contiguous [", batch,
                    "] tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but draft_tokens is on ", device);
}

// An int64 argument given per row ([batch] on the device) or once for every row: a 0-dim tensor on
// the device, or a 0-dim CPU tensor read here on the host (no device kernel, no synchronisation).
// Returns the device pointer (nullptr when read on the host into `host_value`).
inline const int64_t* read_row_or_scalar(const at::Tensor& t, const char* name, int64_t batch,
                                         const at::Device& device, bool& per_row, int64_t& host_value) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  per_row = t.dim() != 0;
  host_value = 0;
  if (per_row) {
    check_index_vector(t, name, batch, device);
    return t.data_ptr<int64_t>();
  }
  if (t.device().is_cpu()) {
    host_value = *t.data_ptr<int64_t>();
    return nullptr;
  }
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but draft_tokens is on ", device);
  return t.data_ptr<int64_t>();
}

// Checks a [batch, positions, vocab] score tensor and returns its batch and position strides.
inline void check_scores(const at::Tensor& t, const char* name, int64_t batch, int64_t positions, int64_t vocab,
                         at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == batch && t.size(1) == positions && t.size(2) == vocab, name,
                    " must have shape [", batch, ", ", positions, ", ", vocab, "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have the dtype of targets[0] (", dtype, "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(vocab <= 1 || t.stride(2) == 1, name, " must have a unit stride in the vocabulary dimension");
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but draft_tokens is on ", device);
}

inline SpeculativeParams make_speculative_params(const at::Tensor& draft_tokens, const std::vector<at::Tensor>& targets,
                                                 const at::Tensor& target_weights,
                                                 const std::optional<at::Tensor>& draft,
                                                 const at::Tensor& num_draft_tokens, bool inputs_are_logits,
                                                 double temperature, bool greedy, const at::Tensor& seed,
                                                 SpeculativeOutputs& outputs) {
  TORCH_CHECK_TYPE(draft_tokens.scalar_type() == at::kLong, "draft_tokens must be int64");
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2 && draft_tokens.is_contiguous(),
                    "draft_tokens must be a contiguous [batch, K] tensor, got shape ", draft_tokens.sizes());
  const at::Device device = draft_tokens.device();
  const int64_t batch = draft_tokens.size(0), num_drafts = draft_tokens.size(1);
  const int64_t num_targets = static_cast<int64_t>(targets.size());
  TORCH_CHECK_VALUE(num_targets >= 1 && num_targets <= kMaxSpeculativeTargets, "targets must hold 1 to ",
                    kMaxSpeculativeTargets, " tensors, got ", num_targets);
  TORCH_CHECK_VALUE(targets[0].dim() == 3, "targets[0] must be 3-D [batch, K+1, vocab], got shape ", targets[0].sizes());
  const int64_t vocab = targets[0].size(2);
  TORCH_CHECK_VALUE(vocab >= 1, "targets[0] has an empty vocabulary");
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(inputs_are_logits || temperature == 1.0, "temperature must be 1 with probabilities, got ",
                    temperature);
  const at::ScalarType dtype = targets[0].scalar_type();

  SpeculativeParams p{};
  p.kind = scalar_kind(targets[0], "targets[0]");
  p.num_targets = static_cast<int32_t>(num_targets);
  for (int64_t k = 0; k < num_targets; ++k) {
    const std::string name = "targets[" + std::to_string(k) + "]";
    check_scores(targets[k], name.c_str(), batch, num_drafts + 1, vocab, dtype, device);
    p.targets[k] = targets[k].data_ptr();
    p.target_batch_stride[k] = targets[k].stride(0);
    p.target_position_stride[k] = targets[k].stride(1);
  }
  p.target_weights = read_model_weights(target_weights, "target_weights", batch, num_targets, device,
                                        p.target_weight_values, p.weight_row_stride, p.weight_col_stride);
  if (draft.has_value()) {
    check_scores(*draft, "draft", batch, num_drafts, vocab, dtype, device);
    p.draft = draft->data_ptr();
    p.draft_batch_stride = draft->stride(0);
    p.draft_position_stride = draft->stride(1);
  }
  bool counts_per_row = false;
  p.num_draft_tokens = read_row_or_scalar(num_draft_tokens, "num_draft_tokens", batch, device, counts_per_row,
                                          p.all_num_draft_tokens);
  TORCH_CHECK_VALUE(counts_per_row || num_draft_tokens.device().is_cpu(),
                    "num_draft_tokens must be [batch] on the device or a 0-dim CPU tensor, got a 0-dim tensor on ",
                    num_draft_tokens.device());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be int64, got ", seed.scalar_type());
  if (!greedy) p.seed = read_row_or_scalar(seed, "seed", batch, device, p.seed_per_row, p.seed_value);
  p.draft_tokens = draft_tokens.data_ptr<int64_t>();
  p.batch = batch;
  p.num_drafts = num_drafts;
  p.vocab = vocab;
  p.inputs_are_logits = inputs_are_logits;
  p.greedy = greedy;
  // Greedy: T > 0 moves neither the argmax nor a row's validity, and l * (1/T) in float32 could round
  // a near-tie into a tie that the smaller id would win.
  p.inv_temperature = greedy ? 1.f : static_cast<float>(1.0 / temperature);

  const auto index_options = draft_tokens.options().dtype(at::kLong);
  outputs.tokens = at::empty({batch, num_drafts + 1}, index_options);
  outputs.num_emitted = at::empty({batch}, index_options);
  outputs.num_accepted = at::empty({batch}, index_options);
  p.tokens = outputs.tokens.data_ptr<int64_t>();
  p.num_emitted = outputs.num_emitted.data_ptr<int64_t>();
  p.num_accepted = outputs.num_accepted.data_ptr<int64_t>();
  return p;
}

}  // namespace collab_ops
