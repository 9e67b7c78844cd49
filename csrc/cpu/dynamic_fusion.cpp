#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/dynamic_fusion.h"
#include "dynamic_fusion_args.h"

namespace collab_ops {
namespace {

// The whole (row, expert) task compiled for AVX2 and AVX-512 too: its slot sweeps are exp-bound.
COLLAB_CPU_CLONES float dynamic_fusion_task(const DynamicFusionParams& p, int64_t row, int expert) {
  return cpu::dynamic_fusion_weight(p, row, expert);
}

at::Tensor dynamic_fusion_weights_cpu(const at::Tensor& large, const std::vector<at::Tensor>& experts,
                                      const at::Tensor& base, const at::Tensor& grid, int64_t vocab_size) {
  std::vector<at::Tensor> keep_alive;
  DynamicFusionParams p = make_dynamic_fusion_params(large, experts, base, grid, vocab_size, keep_alive);
  at::Tensor out = at::empty({p.batch, p.num_experts}, large.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  const int64_t tasks = p.batch * p.num_experts;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / p.num_experts;
      const int expert = static_cast<int>(task % p.num_experts);
      p.out[task] = dynamic_fusion_task(p, row, expert);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(collab_ops, CPU, m) { m.impl("dynamic_fusion_weights", &dynamic_fusion_weights_cpu); }

}  // namespace collab_ops
