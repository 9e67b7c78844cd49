// Facts of the current device that a launcher plans with (its SM count, a kernel's resident blocks
// per SM), queried once per device: the occupancy calculator costs microseconds of host time, which
// a small launch (one row of speculative verification) would otherwise pay on every call.
#pragma once
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>

namespace collab_ops {
namespace cuda {

// query(device) -> Facts, run the first time each device asks; each call site (its own lambda type)
// keeps its own table.
template <typename Facts, typename Query>
Facts facts_of_current_device(Query query) {
  int device = 0;
  cudaGetDevice(&device);
  static std::mutex mutex;
  static std::map<int, Facts> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  const Facts facts = query(device);
  known.emplace(device, facts);
  return facts;
}

}  // namespace cuda
}  // namespace collab_ops
