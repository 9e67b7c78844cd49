// Torch-free row tiles of the CPU kernels: logits of any input dtype are converted to fp32 tiles
// that stay in L1, so that the arithmetic runs as plain loops the compiler vectorises.
#pragma once
#include <cstdint>

#include "common/scalar.h"

// The row loops are compute-bound (exp/log per token), so the functions that run them are also
// compiled for AVX2 and AVX-512 and the loader picks the best the CPU has. `flatten` inlines the
// whole kernel into each clone. setup.py turns FMA contraction off, so every clone gives the same
// bits. Use it on non-inline functions in the .cpp launchers.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define COLLAB_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define COLLAB_CPU_CLONES
#endif

namespace collab_ops {
namespace cpu {

// dst[i] = src[offset + i] * scale for i < count, converting from the input's dtype.
inline void load_scaled_tile(const void* src, ScalarKind kind, int64_t offset, int64_t count, float scale,
                             float* dst) {
  switch (kind) {
    case ScalarKind::kBFloat16: {
      const uint16_t* in = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = bfloat16_to_float(in[i]) * scale;
      break;
    }
    case ScalarKind::kFloat16: {
      const uint16_t* in = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = float16_to_float(in[i]) * scale;
      break;
    }
    default: {
      const float* in = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = in[i] * scale;
    }
  }
}

// dst[offset + i] = src[i] for i < count, rounded to the output's dtype.
inline void store_tile(const float* src, int64_t count, void* dst, ScalarKind kind, int64_t offset) {
  switch (kind) {
    case ScalarKind::kBFloat16: {
      uint16_t* out = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = float_to_bfloat16(src[i]);
      break;
    }
    case ScalarKind::kFloat16: {
      uint16_t* out = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = float_to_float16(src[i]);
      break;
    }
    default: {
      float* out = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = src[i];
    }
  }
}

}  // namespace cpu
}  // namespace collab_ops
