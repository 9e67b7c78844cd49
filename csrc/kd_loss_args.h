// Builds the torch-free KdLossParams of one kd_loss_forward/kd_loss_backward call from its
// tensors, with the checks that guard the kernels when torch.ops.collab_ops.kd_loss_* is called
// directly (the Python wrapper has already checked everything for its own calls).
#pragma once
#include <torch/types.h>

#include <optional>
#include <string>

#include "common/divergence.h"
#include "tensor_args.h"

namespace collab_ops {

inline Divergence divergence_from_name(const std::string& name) {
  if (name == "forward_kl") return Divergence::kForwardKl;
  if (name == "reverse_kl") return Divergence::kReverseKl;
  if (name == "jsd") return Divergence::kJsd;
  if (name == "skew_forward_kl") return Divergence::kSkewForwardKl;
  if (name == "skew_reverse_kl") return Divergence::kSkewReverseKl;
  TORCH_CHECK_VALUE(name == "tvd", "unknown divergence '", name,
                    "'; expected forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd");
  return Divergence::kTvd;
}

// A view with unit column stride: the input itself, or a contiguous copy kept in `keep_alive`.
inline const at::Tensor& unit_column_stride(const at::Tensor& t, at::Tensor& keep_alive) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  keep_alive = t.contiguous();
  return keep_alive;
}

// The tensors a launch reads, with the copies that must outlive it.
struct KdLossInputs {
  KdLossParams params;
  at::Tensor student_copy, teacher_copy, labels_copy;
};

inline KdLossInputs make_kd_loss_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& labels, const std::string& divergence,
                                        double beta, double temperature, double soft_scale, double hard_weight,
                                        int64_t ignore_index, int64_t vocab_size) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be 2-D [N, V], got shape ", student.sizes());
  const int64_t rows = student.size(0);
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == rows, "teacher_logits must have shape [", rows,
                    ", V], got ", teacher.sizes());
  TORCH_CHECK_VALUE(vocab_size >= 1, "vocab_size must be >= 1, got ", vocab_size);
  TORCH_CHECK_VALUE(student.size(1) >= vocab_size && teacher.size(1) >= vocab_size,
                    "vocab_size=", vocab_size, " exceeds the columns of student_logits (", student.size(1),
                    ") or teacher_logits (", teacher.size(1), ")");
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "teacher_logits is on ", teacher.device(),
                    " but student_logits is on ", student.device());
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "beta must lie in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(soft_scale >= 0 && hard_weight >= 0, "soft_scale and hard_weight must be >= 0, got ",
                    soft_scale, " and ", hard_weight);

  KdLossInputs inputs;
  KdLossParams& p = inputs.params;
  const at::Tensor& student_rows = unit_column_stride(student, inputs.student_copy);
  const at::Tensor& teacher_rows = unit_column_stride(teacher, inputs.teacher_copy);
  p.student = student_rows.data_ptr();
  p.student_kind = scalar_kind(student_rows, "student_logits");
  p.student_row_stride = student_rows.stride(0);
  p.teacher = teacher_rows.data_ptr();
  p.teacher_kind = scalar_kind(teacher_rows, "teacher_logits");
  p.teacher_row_stride = teacher_rows.stride(0);
  p.labels = nullptr;
  if (labels.has_value()) {
    TORCH_CHECK_TYPE(labels->scalar_type() == at::kLong, "labels must be int64, got ", labels->scalar_type());
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == rows, "labels must have shape [", rows, "], got ",
                      labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == student.device(), "labels is on ", labels->device(),
                      " but student_logits is on ", student.device());
    inputs.labels_copy = labels->contiguous();
    p.labels = inputs.labels_copy.data_ptr<int64_t>();
  }
  p.rows = rows;
  p.vocab = vocab_size;
  p.beta = static_cast<float>(beta);
  p.divergence = resolve_divergence(divergence_from_name(divergence), beta);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.soft_scale = static_cast<float>(soft_scale);
  p.hard_weight = static_cast<float>(hard_weight);
  p.ignore_index = ignore_index;
  return inputs;
}

}  // namespace collab_ops
