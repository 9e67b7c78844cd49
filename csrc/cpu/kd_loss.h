// CPU kernels of kd_loss, one row at a time in column tiles (cpu/tiles.h). Forward: one pass for
// the student's and the teacher's log-sum-exp, one pass for the divergence and Σh
// (common/divergence.h). Backward: one pass that recomputes every token's term from the row
// constants the forward saved. Torch-free; the launchers in kd_loss.cpp split rows across threads.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/divergence.h"
#include "cpu/tiles.h"

namespace collab_ops {
namespace cpu {

constexpr int64_t kKdTile = 1024;
// Independent accumulators per sweep: wide enough to fill the vector units, and each tile's
// partial sums go into a double, so 32k-token rows keep fp32-level error.
constexpr int64_t kKdLanes = 16;

// Per-thread scratch of one row's tile.
struct KdTiles {
  float student[kKdTile];  // raw logits (the hard term is at temperature 1)
  float teacher[kKdTile];  // logits / T
  float grad[kKdTile];     // the backward's output tile; the forward's per-token terms
  float grad_log_q[kKdTile];
};

// Loads `count` columns, padded to whole lane groups with −inf: a token with zero probability
// on both sides adds nothing to any sum below.
inline int64_t load_padded(const void* base, ScalarKind kind, int64_t offset, int64_t count, float scale, float* dst) {
  load_scaled_tile(base, kind, offset, count, scale, dst);
  const int64_t padded = (count + kKdLanes - 1) / kKdLanes * kKdLanes;
  for (int64_t i = count; i < padded; ++i) dst[i] = -INFINITY;
  return padded;
}

// Σ x over a tile in kKdLanes fp32 partial sums (fixed order, so results do not depend on the
// thread count), totalled in double.
inline double tile_sum(const float* x, int64_t padded) {
  float lanes[kKdLanes] = {};
  for (int64_t i = 0; i < padded; i += kKdLanes)
    for (int64_t l = 0; l < kKdLanes; ++l) lanes[l] += x[i + l];
  double total = 0.0;
  for (int64_t l = 0; l < kKdLanes; ++l) total += lanes[l];
  return total;
}

// The tile's maximum, NaN when the tile holds a NaN (a plain max would skip it), so that NaN
// rows stay NaN even where every other entry is −inf. Written with GCC/Clang vector types: without
// -ffinite-math-only GCC does not vectorise a float max from plain loops.
inline float nan_sticky_max(const float* x, int64_t padded) {
  // 16-byte vectors: GCC lowers wider ones element by element on baseline x86-64.
  typedef float Floats __attribute__((vector_size(16)));
  typedef int32_t Mask __attribute__((vector_size(16)));
  constexpr int64_t kWidth = 4, kVectors = kKdLanes / kWidth;
  Floats max_lanes[kVectors];
  Mask nan_lanes[kVectors];
  for (int64_t k = 0; k < kVectors; ++k) {
    max_lanes[k] = Floats{} - INFINITY;
    nan_lanes[k] = Mask{};
  }
  for (int64_t i = 0; i < padded; i += kKdLanes)
    for (int64_t k = 0; k < kVectors; ++k) {
      Floats v;
      std::memcpy(&v, x + i + k * kWidth, sizeof(v));
      max_lanes[k] = v > max_lanes[k] ? v : max_lanes[k];
      nan_lanes[k] |= v != v;
    }
  float result = -INFINITY;
  bool has_nan = false;
  for (int64_t k = 0; k < kVectors; ++k)
    for (int64_t l = 0; l < kWidth; ++l) {
      result = std::max(result, max_lanes[k][l]);
      has_nan |= nan_lanes[k][l] != 0;
    }
  return has_nan ? NAN : result;
}

// log Σ exp(scale·x) over a row, merged tile by tile.
class RowLse {
 public:
  // `scratch` holds kKdTile floats.
  void add_tile(const float* x, int64_t padded, float scale, float* scratch) {
    const float tile_max = nan_sticky_max(x, padded) * scale;  // exact: rounding is monotone
    if (tile_max != tile_max) has_nan_ = true;
    if (has_nan_ || tile_max == -INFINITY) return;
    for (int64_t i = 0; i < padded; ++i) scratch[i] = vector_exp(x[i] * scale - tile_max);
    const double sum = tile_sum(scratch, padded);
    if (tile_max > max_) {
      sum_ = sum_ * std::exp(static_cast<double>(max_) - tile_max) + sum;
      max_ = tile_max;
    } else {
      sum_ += sum * std::exp(static_cast<double>(tile_max) - max_);
    }
  }

  // max −inf for an all −inf row; NaN for a row holding NaN.
  LogNormaliser value() const {
    if (has_nan_) return LogNormaliser{NAN, NAN};
    if (max_ == -INFINITY || max_ == INFINITY) return LogNormaliser{max_, 0.f};
    return LogNormaliser{max_, static_cast<float>(std::log(sum_))};
  }

 private:
  float max_ = -INFINITY;
  double sum_ = 0.0;
  bool has_nan_ = false;
};

struct SoftSums {
  double value = 0.0;
  double grad_log_q = 0.0;
};

template <Divergence kDivergence>
inline SoftSums soft_row_sums(const KdLossParams& p, int64_t row, LogNormaliser student_lse, LogNormaliser teacher_lse,
                              KdTiles& tiles) {
  SoftSums sums;
  const float inv_t = p.inv_temperature, beta = p.beta;
  const float* student = tiles.student;
  const float* teacher = tiles.teacher;
  for (int64_t col = 0; col < p.vocab; col += kKdTile) {
    const int64_t count = std::min(kKdTile, p.vocab - col);
    const int64_t padded =
        load_padded(p.student, p.student_kind, row * p.student_row_stride + col, count, 1.f, tiles.student);
    load_padded(p.teacher, p.teacher_kind, row * p.teacher_row_stride + col, count, inv_t, tiles.teacher);
    float* values = tiles.grad;
    float* grad_log_q = tiles.grad_log_q;
    for (int64_t i = 0; i < padded; ++i) {
      const DivergenceTerm term = divergence_term<kDivergence>(teacher_lse.log_probability(teacher[i]),
                                                               student_lse.log_probability(student[i] * inv_t), beta);
      values[i] = term.value;
      grad_log_q[i] = term.grad_log_q;
    }
    sums.value += tile_sum(values, padded);
    sums.grad_log_q += tile_sum(grad_log_q, padded);
  }
  return sums;
}

// grad[j] += coef · (h_j − q_j · Σh) over one tile.
template <Divergence kDivergence>
inline void add_soft_gradient(const KdLossParams& p, const float* row_stats, float coef, int64_t padded, KdTiles& tiles) {
  const float inv_t = p.inv_temperature, beta = p.beta;
  const LogNormaliser student_lse{row_stats[kStudentMax], row_stats[kStudentLogSum]};
  const LogNormaliser teacher_lse{row_stats[kTeacherMax], row_stats[kTeacherLogSum]};
  const float grad_log_q_sum = row_stats[kGradLogQSum];
  const float* student = tiles.student;
  const float* teacher = tiles.teacher;
  float* grad = tiles.grad;
  for (int64_t i = 0; i < padded; ++i) {
    const float log_q = student_lse.log_probability(student[i] * inv_t);
    const DivergenceTerm term = divergence_term<kDivergence>(teacher_lse.log_probability(teacher[i]), log_q, beta);
    grad[i] += coef * (term.grad_log_q - vector_exp(log_q) * grad_log_q_sum);
  }
}

template <Divergence kDivergence>
using DivergenceConstant = std::integral_constant<Divergence, kDivergence>;

// Calls body(DivergenceConstant<d>{}) so that each divergence gets its own vectorised loops.
template <typename Body>
inline auto with_divergence(Divergence divergence, Body body) {
  switch (divergence) {
    case Divergence::kForwardKl:
      return body(DivergenceConstant<Divergence::kForwardKl>{});
    case Divergence::kReverseKl:
      return body(DivergenceConstant<Divergence::kReverseKl>{});
    case Divergence::kJsd:
      return body(DivergenceConstant<Divergence::kJsd>{});
    case Divergence::kSkewForwardKl:
      return body(DivergenceConstant<Divergence::kSkewForwardKl>{});
    case Divergence::kSkewReverseKl:
      return body(DivergenceConstant<Divergence::kSkewReverseKl>{});
    default:
      return body(DivergenceConstant<Divergence::kTvd>{});
  }
}

inline bool has_soft_term(const KdLossParams& p) { return p.soft_scale != 0.f; }
inline bool has_hard_term(const KdLossParams& p) { return p.hard_weight != 0.f && p.labels != nullptr; }
// At T = 1 the hard term's log-sum-exp is the soft term's student one.
inline bool needs_own_hard_lse(const KdLossParams& p) {
  return has_hard_term(p) && !(has_soft_term(p) && p.inv_temperature == 1.f);
}

// Writes the row's loss and its kKdRowStats constants; rows that are not counted get zeros.
inline void kd_loss_forward_row(const KdLossParams& p, int64_t row, KdTiles& tiles, float* loss, float* stats) {
  float* row_stats = stats + row * kKdRowStats;
  for (int k = 0; k < kKdRowStats; ++k) row_stats[k] = 0.f;
  loss[row] = 0.f;
  if (!row_is_counted(p, row)) return;
  const bool soft = has_soft_term(p), hard = has_hard_term(p), own_hard_lse = needs_own_hard_lse(p);

  RowLse student_lse, teacher_lse, hard_lse;
  for (int64_t col = 0; col < p.vocab; col += kKdTile) {
    const int64_t count = std::min(kKdTile, p.vocab - col);
    const int64_t padded =
        load_padded(p.student, p.student_kind, row * p.student_row_stride + col, count, 1.f, tiles.student);
    if (own_hard_lse) hard_lse.add_tile(tiles.student, padded, 1.f, tiles.grad);
    if (!soft) continue;
    student_lse.add_tile(tiles.student, padded, p.inv_temperature, tiles.grad);
    load_padded(p.teacher, p.teacher_kind, row * p.teacher_row_stride + col, count, p.inv_temperature, tiles.teacher);
    teacher_lse.add_tile(tiles.teacher, padded, 1.f, tiles.grad);
  }

  float total = 0.f;
  LogNormaliser student{}, teacher{};
  if (soft) {
    student = student_lse.value();
    teacher = teacher_lse.value();
    row_stats[kStudentMax] = student.max, row_stats[kStudentLogSum] = student.log_sum;
    row_stats[kTeacherMax] = teacher.max, row_stats[kTeacherLogSum] = teacher.log_sum;
    const SoftSums sums = with_divergence(p.divergence, [&](auto divergence) {
      return soft_row_sums<decltype(divergence)::value>(p, row, student, teacher, tiles);
    });
    row_stats[kGradLogQSum] = static_cast<float>(sums.grad_log_q);
    const bool defined = soft_term_defined(student.value(), teacher.value());
    total += p.soft_scale * (defined ? static_cast<float>(sums.value) : NAN);
  }
  if (hard) {
    const LogNormaliser hard_normaliser = own_hard_lse ? hard_lse.value() : student;
    row_stats[kHardMax] = hard_normaliser.max, row_stats[kHardLogSum] = hard_normaliser.log_sum;
    const int64_t target = hard_target(p, row);
    const float cross_entropy =
        target < 0 ? NAN
                   : -hard_normaliser.log_probability(
                         load_as_float(p.student, p.student_kind, row * p.student_row_stride + target));
    total += p.hard_weight * cross_entropy;
  }
  loss[row] = total;
}

// Writes d(upstream · loss_row)/d(student row) over `grad_columns` columns (zero beyond vocab and
// on rows that are not counted), in the gradient's dtype.
inline void kd_loss_backward_row(const KdLossParams& p, int64_t row, float upstream, const float* stats, KdTiles& tiles,
                                 void* grad, ScalarKind grad_kind, int64_t grad_row_stride, int64_t grad_columns) {
  const float* row_stats = stats + row * kKdRowStats;
  const bool counted = row_is_counted(p, row);
  const bool soft = counted && has_soft_term(p), hard = counted && has_hard_term(p);
  const float soft_coef = upstream * p.soft_scale * p.inv_temperature;
  const float hard_coef = upstream * p.hard_weight;
  const int64_t target = hard ? hard_target(p, row) : -1;
  const LogNormaliser hard_lse{row_stats[kHardMax], row_stats[kHardLogSum]};
  const int64_t grad_offset = row * grad_row_stride;
  float* grad_tile = tiles.grad;

  for (int64_t col = 0; col < grad_columns; col += kKdTile) {
    const int64_t count = std::min(kKdTile, grad_columns - col);
    // Lanes past `count` are computed too (the −inf padding), so they start from 0 as well.
    const int64_t zeroed = std::min(kKdTile, (count + kKdLanes - 1) / kKdLanes * kKdLanes);
    for (int64_t i = 0; i < zeroed; ++i) grad_tile[i] = 0.f;
    const int64_t used = std::min(count, p.vocab - col);
    if (used > 0 && (soft || hard)) {
      const int64_t padded =
          load_padded(p.student, p.student_kind, row * p.student_row_stride + col, used, 1.f, tiles.student);
      if (soft) {
        load_padded(p.teacher, p.teacher_kind, row * p.teacher_row_stride + col, used, p.inv_temperature,
                    tiles.teacher);
        with_divergence(p.divergence, [&](auto divergence) {
          add_soft_gradient<decltype(divergence)::value>(p, row_stats, soft_coef, padded, tiles);
        });
      }
      if (hard && target >= 0) {
        const float* student = tiles.student;
        for (int64_t i = 0; i < padded; ++i) grad_tile[i] += hard_coef * vector_exp(hard_lse.log_probability(student[i]));
        if (target >= col && target < col + used) grad_tile[target - col] -= hard_coef;
      }
    }
    // Columns past vocab take no part in the loss: 0, even where the padding lanes computed
    // 0 · inf = NaN (a row whose soft term is +inf).
    for (int64_t i = std::max<int64_t>(used, 0); i < count; ++i) grad_tile[i] = 0.f;
    store_tile(grad_tile, count, grad, grad_kind, grad_offset + col);
  }
}

}  // namespace cpu
}  // namespace collab_ops
