// cub::BlockReduce for the CUDA emulator (collab_cuda_emulation.h): every thread stores its value,
// thread 0 folds them in thread order after a barrier. As in cub, only thread 0's result is
// defined; callers synchronise before reusing the storage.
#pragma once
#include "collab_cuda_emulation.h"

namespace cub {

template <class T, int kThreads>
class BlockReduce {
 public:
  struct TempStorage {
    T values[kThreads];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <class Op>
  T Reduce(T value, Op op) {
    collab_emu::Block& b = collab_emu::block();
    const int me = b.thread();
    storage_.values[me] = value;
    __syncthreads();
    if (me != 0) return value;
    T result = storage_.values[0];
    for (int t = 1; t < b.threads() && t < kThreads; ++t) {
      if (b.lane_live(t)) result = op(result, storage_.values[t]);
    }
    return result;
  }

  T Sum(T value) {
    return Reduce(value, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
