// Torch-free element types shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define COLLAB_HD __host__ __device__ __forceinline__
#else
#define COLLAB_HD inline
#endif

namespace collab_ops {

// The dtypes a logits input may have; inputs of one call may mix them.
enum class ScalarKind : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

COLLAB_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

COLLAB_HD uint32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

COLLAB_HD float bfloat16_to_float(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }

// IEEE binary16 to binary32, exact for every input (subnormals, inf, NaN).
COLLAB_HD float float16_to_float(uint16_t half) {
#if defined(__CUDA_ARCH__)
  // One conversion instruction: the branches below would also keep a kernel's loads from issuing
  // back to back.
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(half));
  return value;
#else
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal half: value = mantissa * 2^-24, exactly representable in float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
#endif
}

// Round to nearest even, as torch's .to(bfloat16); NaN stays a quiet NaN. Branch-free so that
// the store loops vectorise.
COLLAB_HD uint16_t float_to_bfloat16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(value != value ? (bits >> 16) | 0x40u : rounded);
}

// Round to nearest even with overflow to inf, subnormal halves and NaN kept (F. Giesen's
// float_to_half_fast3_rtne with the branches turned into selects).
COLLAB_HD uint16_t float_to_float16(float value) {
  const uint32_t bits = float_to_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  const uint32_t inf_or_nan = magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Adding 0.5f (exponent 126) shifts a subnormal half's mantissa into place and lets the FPU round.
  const uint32_t subnormal = float_to_bits(bits_to_float(magnitude) + 0.5f) - 0x3f000000u;
  // Rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even.
  const uint32_t normal = (magnitude + 0xc8000fffu + ((magnitude >> 13) & 1u)) >> 13;
  const uint32_t half = magnitude >= 0x47800000u ? inf_or_nan : (magnitude < 0x38800000u ? subnormal : normal);
  return static_cast<uint16_t>(half | sign);
}

COLLAB_HD float load_as_float(const void* base, ScalarKind kind, int64_t index) {
  switch (kind) {
    case ScalarKind::kBFloat16:
      return bfloat16_to_float(static_cast<const uint16_t*>(base)[index]);
    case ScalarKind::kFloat16:
      return float16_to_float(static_cast<const uint16_t*>(base)[index]);
    default:
      return static_cast<const float*>(base)[index];
  }
}

// One [batch, >= vocab] logits input: columns contiguous, rows row_stride elements apart.
struct LogitRows {
  const void* data;
  ScalarKind kind;
  int64_t row_stride;
};

COLLAB_HD float load_logit(const LogitRows& rows, int64_t row, int64_t col) {
  return load_as_float(rows.data, rows.kind, row * rows.row_stride + col);
}

}  // namespace collab_ops
