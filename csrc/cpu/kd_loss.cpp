#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/kd_loss.h"
#include "kd_loss_args.h"

namespace collab_ops {
namespace {

COLLAB_CPU_CLONES void kd_loss_forward_rows(const KdLossParams& p, int64_t begin, int64_t end, float* loss,
                                            float* stats) {
  cpu::KdTiles tiles;
  for (int64_t row = begin; row < end; ++row) cpu::kd_loss_forward_row(p, row, tiles, loss, stats);
}

COLLAB_CPU_CLONES void kd_loss_backward_rows(const KdLossParams& p, int64_t begin, int64_t end, const float* upstream,
                                             int64_t upstream_stride, const float* stats, void* grad,
                                             ScalarKind grad_kind, int64_t columns) {
  cpu::KdTiles tiles;
  for (int64_t row = begin; row < end; ++row)
    cpu::kd_loss_backward_row(p, row, upstream[row * upstream_stride], stats, tiles, grad, grad_kind, columns, columns);
}

// Rows per task: enough columns per task that short rows do not drown in scheduling.
int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, cpu::kKdTile * 8 / std::max<int64_t>(vocab, 1)); }

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cpu(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                                       const std::optional<at::Tensor>& labels,
                                                       c10::string_view divergence, double beta, double temperature,
                                                       double soft_scale, double hard_weight, int64_t ignore_index,
                                                       int64_t vocab_size) {
  const KdLossInputs inputs =
      make_kd_loss_inputs(student_logits, teacher_logits, labels, std::string(divergence), beta, temperature,
                          soft_scale, hard_weight, ignore_index, vocab_size);
  const KdLossParams& p = inputs.params;
  const auto fp32 = student_logits.options().dtype(at::kFloat);
  at::Tensor per_position_loss = at::empty({p.rows}, fp32);
  at::Tensor row_stats = at::empty({p.rows, kKdRowStats}, fp32);
  float* loss = per_position_loss.data_ptr<float>();
  float* stats = row_stats.data_ptr<float>();
  at::parallel_for(0, p.rows, rows_per_task(p.vocab),
                   [&](int64_t begin, int64_t end) { kd_loss_forward_rows(p, begin, end, loss, stats); });
  return {per_position_loss, row_stats};
}

at::Tensor kd_loss_backward_cpu(const at::Tensor& grad_per_position, const at::Tensor& student_logits,
                                const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
                                const at::Tensor& row_stats, c10::string_view divergence, double beta,
                                double temperature, double soft_scale, double hard_weight, int64_t ignore_index,
                                int64_t vocab_size) {
  const KdLossInputs inputs =
      make_kd_loss_inputs(student_logits, teacher_logits, labels, std::string(divergence), beta, temperature,
                          soft_scale, hard_weight, ignore_index, vocab_size);
  const KdLossParams& p = inputs.params;
  TORCH_CHECK_VALUE(grad_per_position.dim() == 1 && grad_per_position.size(0) == p.rows,
                    "grad_per_position must have shape [", p.rows, "], got ", grad_per_position.sizes());
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == p.rows && row_stats.size(1) == kKdRowStats,
                    "row_stats must have shape [", p.rows, ", ", static_cast<int>(kKdRowStats), "], got ",
                    row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == at::kFloat, "row_stats must be float32, got ", row_stats.scalar_type());
  // The upstream gradient of a mean or sum is one value expanded over the rows (stride 0).
  const at::Tensor upstream = grad_per_position.to(at::kFloat);
  const at::Tensor stats = row_stats.contiguous();
  at::Tensor grad_student = at::empty(student_logits.sizes(), student_logits.options());
  const ScalarKind grad_kind = scalar_kind(grad_student, "student_logits");
  const float* upstream_data = upstream.data_ptr<float>();
  const int64_t upstream_stride = upstream.stride(0);
  const float* stats_data = stats.data_ptr<float>();
  void* grad_data = grad_student.data_ptr();
  const int64_t columns = grad_student.size(1);
  at::parallel_for(0, p.rows, rows_per_task(columns), [&](int64_t begin, int64_t end) {
    kd_loss_backward_rows(p, begin, end, upstream_data, upstream_stride, stats_data, grad_data, grad_kind, columns);
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) {
  m.impl("kd_loss_forward", &kd_loss_forward_cpu);
  m.impl("kd_loss_backward", &kd_loss_backward_cpu);
}

}  // namespace collab_ops
