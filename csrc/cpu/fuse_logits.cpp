#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/fuse_logits.h"
#include "fusion_args.h"

namespace collab_ops {
namespace {

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
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) cpu::fuse_logits_row(p, row);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) { m.impl("fuse_logits", &fuse_logits_cpu); }

}  // namespace collab_ops
