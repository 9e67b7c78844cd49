#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/fused_sample.h"
#include "sampling_args.h"

namespace collab_ops {
namespace cpu {

COLLAB_CPU_CLONES void tile_sampling_bits(const SamplingParams& s, int64_t row, int64_t col, int64_t count,
                                          uint32_t* bits) {
  const RowStream stream = row_stream(s, row);
  const int64_t first = col / 4, groups = (col + count + 3) / 4 - first;
  for (int64_t g = 0; g < groups; ++g) {
    const Philox4 r = sampling_bits(stream, first + g);
    for (int lane = 0; lane < 4; ++lane) bits[4 * g + lane] = r.v[lane];
  }
}

COLLAB_CPU_CLONES ChunkResult input_pass_chunk(const SamplingParams& s, const RowSetup& setup, int64_t row,
                                               int64_t begin, int64_t end, bool sample, float min_p_cut,
                                               float* workspace_row) {
  float score[kSampleTile];
  float scratch[kSampleTile];
  const FusionParams& p = s.fusion;
  const float scale = s.greedy ? 1.f : s.inv_temperature;
  ChunkResult result = empty_chunk_result();
  for (int64_t col = begin; col < end; col += kSampleTile) {
    const int64_t count = std::min(kSampleTile, end - col);
    result.no_token |= score_tile(p, setup, row, col, count, score, scratch);
    for (int64_t i = 0; i < count; ++i) score[i] *= scale;
    if (workspace_row != nullptr) std::copy(score, score + count, workspace_row + col);
    result.max = std::max(result.max, tile_max(score, count));
    if (sample) sample_tile(s, row, col, count, score, -INFINITY, min_p_cut, result.best);
  }
  return result;
}

}  // namespace cpu

namespace {

at::Tensor fused_sample_cpu(const std::vector<at::Tensor>& logits, const at::Tensor& weights,
                            c10::ArrayRef<double> temperatures, bool normalize, std::optional<double> plausibility_alpha,
                            int64_t plausibility_ref, int64_t vocab_size, double temperature, int64_t top_k,
                            double top_p, double min_p, bool greedy, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(!logits.empty(), "logits must not be empty");
  std::vector<at::Tensor> keep_alive;
  SamplingParams s = make_sampling_params(logits, weights, temperatures.vec(), normalize, plausibility_alpha,
                                          plausibility_ref, vocab_size, temperature, top_k, top_p, min_p, greedy,
                                          seed, keep_alive);
  at::Tensor tokens = at::empty({s.fusion.batch}, logits[0].options().dtype(at::kLong));
  s.tokens = tokens.data_ptr<int64_t>();
  at::Tensor workspace;
  if (uses_value_cut(s)) workspace = at::empty({s.fusion.batch, vocab_size}, logits[0].options().dtype(at::kFloat));
  cpu::fused_sample(s, at::get_num_threads(), workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                    [](int64_t count, const auto& fn) { at::parallel_for(0, count, 1, fn); });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) { m.impl("fused_sample", &fused_sample_cpu); }

}  // namespace collab_ops
