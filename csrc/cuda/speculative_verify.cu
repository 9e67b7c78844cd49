#include "cuda/device_facts.h"
#include "cuda/launchers.h"
#include "cuda/speculative_verify.cuh"

namespace collab_ops {
namespace cuda {
namespace {

constexpr int kSpeculativeThreads = 256;
// One full wave of resident blocks per launch (memory latency is hidden by blocks in flight, and
// a second, partial wave would idle most SMs at its end), and no chunk shorter than one 16-byte
// load per thread, so that a block's fixed cost (the decision, the merge) stays small next to its
// reads. Chunks are whole 16-byte vectors (8 columns).
constexpr int64_t kMinChunk = 1024;
constexpr int64_t kChunkGranule = 8;

size_t aligned(size_t bytes) { return (bytes + 255) & ~size_t{255}; }

struct Split {
  int32_t splits;
  int64_t chunk;
};

// Cuts each of `rows` vocabulary rows into at most kThreads chunks (the last block merges one
// partial per thread) so that rows * splits blocks fill the GPU's resident slots once.
Split split_rows(int64_t rows, int64_t vocab, int64_t resident_blocks) {
  const int64_t wanted = resident_blocks / (rows > 0 ? rows : 1);
  const int64_t most = (vocab + kMinChunk - 1) / kMinChunk;
  int64_t splits = wanted < most ? wanted : most;
  splits = splits < 1 ? 1 : (splits > kSpeculativeThreads ? kSpeculativeThreads : splits);
  int64_t chunk = (vocab + splits - 1) / splits;
  chunk = (chunk + kChunkGranule - 1) / kChunkGranule * kChunkGranule;
  Split s;
  s.splits = static_cast<int32_t>((vocab + chunk - 1) / chunk);
  if (s.splits < 1) s.splits = 1;
  s.chunk = chunk;
  return s;
}

struct SpeculativePlan {
  bool run_normalisers;
  Split normaliser, race;
  size_t counters, target_partials, draft_partials, target_normalisers, draft_normalisers, race_partials;
  size_t total() const {
    return counters + target_partials + draft_partials + target_normalisers + draft_normalisers + race_partials;
  }
};

// Resident blocks of each kernel on the whole device.
struct ResidentSlots {
  int64_t normaliser, verify;
};

SpeculativePlan plan(const SpeculativeParams& p) {
  const ResidentSlots slots = facts_of_current_device<ResidentSlots>([](int device) {
    int sms = 1, normaliser_per_sm = 1, verify_per_sm = 1;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&normaliser_per_sm, normaliser_kernel<kSpeculativeThreads>,
                                                  kSpeculativeThreads, 0);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&verify_per_sm, verify_kernel<kSpeculativeThreads>,
                                                  kSpeculativeThreads, 0);
    return ResidentSlots{int64_t{sms} * (normaliser_per_sm > 0 ? normaliser_per_sm : 1),
                         int64_t{sms} * (verify_per_sm > 0 ? verify_per_sm : 1)};
  });
  const int64_t normaliser_slots = slots.normaliser, verify_slots = slots.verify;
  const size_t rows = static_cast<size_t>(p.batch), positions = static_cast<size_t>(p.num_drafts + 1);
  SpeculativePlan plan{};
  // Sample mode with one plain probability target reads no row whole: no normaliser launch.
  plan.run_normalisers = p.greedy || !all_rows_plain_probabilities(p);
  plan.normaliser = split_rows(p.batch * static_cast<int64_t>(positions), p.vocab, normaliser_slots);
  plan.race = p.greedy ? Split{1, p.vocab} : split_rows(p.batch, p.vocab, verify_slots);
  plan.counters = aligned((rows * positions + rows) * sizeof(unsigned int));
  const size_t normaliser_partials = plan.run_normalisers ? rows * positions * plan.normaliser.splits : 0;
  plan.target_partials = aligned(normaliser_partials * sizeof(RowPartial));
  plan.draft_partials = aligned(normaliser_partials * sizeof(RowPartial));
  plan.target_normalisers = aligned(rows * positions * sizeof(TargetNormaliser));
  plan.draft_normalisers = aligned(rows * positions * sizeof(DraftNormaliser));
  plan.race_partials = aligned(rows * plan.race.splits * sizeof(RaceState));
  return plan;
}

}  // namespace

size_t speculative_verify_workspace_bytes(const SpeculativeParams& params) { return plan(params).total(); }

cudaError_t launch_speculative_verify(const SpeculativeParams& params, void* workspace, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  if (params.batch > 65535 || params.num_drafts + 1 > 65535) return cudaErrorInvalidConfiguration;
  const SpeculativePlan layout = plan(params);
  char* bytes = static_cast<char*>(workspace);
  SpeculativeWorkspace w{};
  w.position_done = reinterpret_cast<unsigned int*>(bytes);
  w.row_done = w.position_done + params.batch * (params.num_drafts + 1);
  bytes += layout.counters;
  w.target_partials = reinterpret_cast<RowPartial*>(bytes);
  bytes += layout.target_partials;
  w.draft_partials = reinterpret_cast<RowPartial*>(bytes);
  bytes += layout.draft_partials;
  w.target_normalisers = reinterpret_cast<TargetNormaliser*>(bytes);
  bytes += layout.target_normalisers;
  w.draft_normalisers = reinterpret_cast<DraftNormaliser*>(bytes);
  bytes += layout.draft_normalisers;
  w.race_partials = reinterpret_cast<RaceState*>(bytes);
  w.normaliser_splits = layout.normaliser.splits;
  w.normaliser_chunk = layout.normaliser.chunk;
  w.race_splits = layout.race.splits;
  w.race_chunk = layout.race.chunk;

  // The "last block done" counters start at zero on every call (the workspace is not zeroed).
  cudaError_t status = cudaMemsetAsync(workspace, 0, layout.counters, stream);
  if (status != cudaSuccess) return status;
  constexpr int kThreads = kSpeculativeThreads;
  if (layout.run_normalisers) {
    const dim3 grid(layout.normaliser.splits, static_cast<unsigned>(params.num_drafts + 1),
                    static_cast<unsigned>(params.batch));
    normaliser_kernel<kThreads><<<grid, kThreads, 0, stream>>>(params, w);
  }
  const dim3 grid(layout.race.splits, static_cast<unsigned>(params.batch));
  verify_kernel<kThreads><<<grid, kThreads, 0, stream>>>(params, w);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace collab_ops
