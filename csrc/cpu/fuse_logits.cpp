#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/fuse_logits.h"
#include "fusion_args.h"

namespace collab_ops {
namespace {

// Chunks of at least this many columns: smaller ones cost more in merging than they gain.
constexpr int64_t kMinChunkColumns = 8 * cpu::kFusionTile;

struct ChunkGrid {
  int64_t chunks_per_row;
  int64_t chunk_columns;  // a multiple of the tile
  int64_t begin(int64_t chunk) const { return chunk * chunk_columns; }
  int64_t end(int64_t chunk, int64_t vocab) const { return std::min(vocab, (chunk + 1) * chunk_columns); }
};

// Enough (row, chunk) tasks for every thread to get a few, without chunks below kMinChunkColumns.
ChunkGrid chunk_grid(int64_t batch, int64_t vocab) {
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t by_threads = (wanted_tasks + batch - 1) / batch;
  const int64_t by_size = std::max<int64_t>(1, vocab / kMinChunkColumns);
  const int64_t chunks = std::max<int64_t>(1, std::min(by_threads, by_size));
  const int64_t tiles = (vocab + cpu::kFusionTile - 1) / cpu::kFusionTile;
  const int64_t chunk_columns = ((tiles + chunks - 1) / chunks) * cpu::kFusionTile;
  return ChunkGrid{(vocab + chunk_columns - 1) / chunk_columns, chunk_columns};
}

COLLAB_CPU_CLONES void model_stats_tasks(const FusionParams& p, const ChunkGrid& grid, int64_t begin, int64_t end,
                                         OnlineLse* stats) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / grid.chunks_per_row, chunk = task % grid.chunks_per_row;
    for (int k = 0; k < p.num_models; ++k) {
      const bool used = fusion_weight(p, row, k) != 0.f || (p.use_plausibility && k == p.plausibility_ref);
      if (used && needs_row_max(p, k))
        stats[task * p.num_models + k] = cpu::model_chunk_stats(p, k, row, grid.begin(chunk), grid.end(chunk, p.vocab));
    }
  }
}

COLLAB_CPU_CLONES void score_tasks(const FusionParams& p, const ChunkGrid& grid, int64_t begin, int64_t end,
                                   const cpu::FusionRowConstants* constants, OnlineLse* stats) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / grid.chunks_per_row, chunk = task % grid.chunks_per_row;
    stats[task] = cpu::score_chunk(p, row, grid.begin(chunk), grid.end(chunk, p.vocab), constants[row]);
  }
}

// Merges the per-chunk model statistics of a row into its weights, offsets and plausibility cut.
cpu::FusionRowConstants row_constants(const FusionParams& p, const ChunkGrid& grid, int64_t row,
                                      const OnlineLse* model_stats) {
  cpu::FusionRowConstants c;
  c.plausibility_cut = -INFINITY;
  for (int k = 0; k < p.num_models; ++k) {
    c.weight[k] = fusion_weight(p, row, k);
    c.offset[k] = 0.f;
    const bool used = c.weight[k] != 0.f || (p.use_plausibility && k == p.plausibility_ref);
    if (!used || !needs_row_max(p, k)) continue;
    OnlineLse stats = online_lse_init();
    for (int64_t chunk = 0; chunk < grid.chunks_per_row; ++chunk)
      stats = online_lse_merge(stats, model_stats[(row * grid.chunks_per_row + chunk) * p.num_models + k]);
    if (needs_row_lse(p)) c.offset[k] = online_lse_value(stats);
    if (p.use_plausibility && k == p.plausibility_ref) c.plausibility_cut = plausibility_cut_from_max(p, stats.max);
  }
  return c;
}

at::Tensor fuse_logits_cpu(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                           c10::ArrayRef<double> temperatures, bool normalize,
                           std::optional<double> plausibility_alpha, int64_t plausibility_ref, int64_t vocab_size,
                           bool output_logprobs) {
  std::vector<at::Tensor> keep_alive;
  FusionParams p = make_fusion_params(logits, weights, temperatures.vec(), normalize, plausibility_alpha,
                                      plausibility_ref, vocab_size, output_logprobs, keep_alive);
  at::Tensor out = at::empty({p.batch, vocab_size}, logits[0].options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  if (p.batch == 0) return out;

  const ChunkGrid grid = chunk_grid(p.batch, p.vocab);
  const int64_t tasks = p.batch * grid.chunks_per_row;
  bool any_stats = false;
  for (int k = 0; k < p.num_models; ++k) any_stats |= needs_row_max(p, k);
  std::vector<OnlineLse> model_stats(any_stats ? tasks * p.num_models : 0);
  if (any_stats) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      model_stats_tasks(p, grid, begin, end, model_stats.data());
    });
  }
  std::vector<cpu::FusionRowConstants> constants(p.batch);
  for (int64_t row = 0; row < p.batch; ++row) constants[row] = row_constants(p, grid, row, model_stats.data());

  std::vector<OnlineLse> score_stats(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    score_tasks(p, grid, begin, end, constants.data(), score_stats.data());
  });

  std::vector<float> row_lse(p.batch);
  std::vector<char> poisoned(p.batch);
  bool any_finish = false;
  for (int64_t row = 0; row < p.batch; ++row) {
    OnlineLse stats = online_lse_init();
    for (int64_t chunk = 0; chunk < grid.chunks_per_row; ++chunk)
      stats = online_lse_merge(stats, score_stats[row * grid.chunks_per_row + chunk]);
    poisoned[row] = stats.has_nan;
    row_lse[row] = online_lse_value(stats);
    any_finish |= stats.has_nan || (output_logprobs && row_lse[row] != -INFINITY);
  }
  if (any_finish) {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / grid.chunks_per_row, chunk = task % grid.chunks_per_row;
        cpu::finish_chunk(p, row, grid.begin(chunk), grid.end(chunk, p.vocab), row_lse[row], poisoned[row]);
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) { m.impl("fuse_logits", &fuse_logits_cpu); }

}  // namespace collab_ops
