// The CUDA runtime calls of csrc/cuda's launchers, for the CUDA emulator: memory is host memory,
// the stream is ignored, every launch runs to completion before the call returns.
#pragma once
#include <cstring>

#include "collab_cuda_emulation.h"

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = void*;

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration argument";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
// Each emulated configuration is a device of its own: launchers cache what they query per device
// (csrc/cuda/device_facts.h), and a test that reshapes the emulated GPU must not get stale facts.
inline cudaError_t cudaGetDevice(int* device) {
  *device = collab_emu::device.sm_count * 4096 + collab_emu::device.blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = collab_emu::device.sm_count;
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = collab_emu::device.blocks_per_sm;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
