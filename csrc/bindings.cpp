// The one place where collab_ops' operator schemas are declared. Backends implement them with
// TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; Python registers fake kernels for torch.compile.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(collab_ops, m) {
  m.def(
      "fuse_logits(Tensor[] logits, Tensor weights, float[] temperatures, bool normalize, "
      "float? plausibility_alpha, int plausibility_ref, int vocab_size, bool output_logprobs) -> Tensor");
  m.def("dynamic_fusion_weights(Tensor large, Tensor[] experts, Tensor base, Tensor grid, int vocab_size) -> Tensor");
  m.def(
      "fused_sample(Tensor[] logits, Tensor weights, float[] temperatures, bool normalize, "
      "float? plausibility_alpha, int plausibility_ref, int vocab_size, float temperature, int top_k, "
      "float top_p, float min_p, bool greedy, Tensor? seed) -> Tensor");
  m.def(
      "speculative_verify(Tensor draft_tokens, Tensor[] targets, Tensor target_weights, Tensor? draft, "
      "Tensor num_draft_tokens, bool inputs_are_logits, float temperature, bool greedy, Tensor seed) "
      "-> (Tensor, Tensor, Tensor)");
  // kd_loss: per-position losses plus the per-row constants (student, teacher and hard-term
  // log-sum-exp, Σ ∂L/∂log q) from which the backward recomputes the gradient.
  m.def(
      "kd_loss_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, str divergence, float beta, "
      "float temperature, float soft_scale, float hard_weight, int ignore_index, int vocab_size) "
      "-> (Tensor per_position_loss, Tensor row_stats)");
  m.def(
      "kd_loss_backward(Tensor grad_per_position, Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "Tensor row_stats, str divergence, float beta, float temperature, float soft_scale, float hard_weight, "
      "int ignore_index, int vocab_size) -> Tensor grad_student_logits");
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "collab_ops compiled kernels; the operators live in torch.ops.collab_ops";
  module.def("compiled_with_cuda", []() {
#ifdef COLLAB_OPS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
