// exp and log written without branches or library calls, so that the loops calling them
// vectorise on the CPU (glibc's expf/logf only vectorise under -ffast-math, which would also
// break the NaN/inf semantics the kernels keep). Both are the Cephes single-precision
// approximations, within about 1 ulp on normal inputs, and handle ±inf, NaN, 0 and subnormals.
// On the GPU they are the device's own expf/logf.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/scalar.h"

namespace collab_ops {

COLLAB_HD float vector_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Beyond these bounds the result is 0 or inf whatever the polynomial says.
  const float clamped = x < -110.f ? -110.f : (x > 90.f ? 90.f : x);
  const float safe = x != x ? 0.f : clamped;
  // Round to nearest through the float mantissa (no SSE4.1 round instruction at baseline x86-64).
  const float round_magic = 12582912.f;  // 1.5 * 2^23
  const float n = (safe * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (safe - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.f;
  // 2^n in two factors so that n in [-159, 130] never leaves the normal exponent range; the
  // second multiplication produces subnormals, 0 or inf with correct rounding.
  const int32_t exponent = static_cast<int32_t>(n);
  const int32_t half_exponent = exponent / 2;
  const float scale_a = bits_to_float(static_cast<uint32_t>(half_exponent + 127) << 23);
  const float scale_b = bits_to_float(static_cast<uint32_t>(exponent - half_exponent + 127) << 23);
  const float result = exp_r * scale_a * scale_b;
  return x != x ? x : result;
#endif
}

// log(x): -inf at 0, NaN below 0 and at NaN, inf at inf.
COLLAB_HD float vector_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  // Subnormals are scaled into the normal range first; the exponent is corrected below.
  const bool subnormal = x < 1.17549435e-38f;
  const float normal = subnormal ? x * 8388608.f : x;  // 2^23
  const uint32_t bits = float_to_bits(normal);
  int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xffu) - 126 - (subnormal ? 23 : 0);
  // Mantissa in [0.5, 1), moved to [sqrt(1/2), sqrt(2)) - 1 so the polynomial stays accurate.
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  const bool below_sqrt_half = m < 0.707106781186547524f;
  exponent -= below_sqrt_half ? 1 : 0;
  m = below_sqrt_half ? m + m - 1.f : m - 1.f;
  const float e = static_cast<float>(exponent);
  const float z = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  float y = poly * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  const float result = (m + y) + e * 0.693359375f;
  const float special = x == 0.f ? -INFINITY : (x == INFINITY ? INFINITY : NAN);
  return (x > 0.f && x < INFINITY) ? result : special;
#endif
}

}  // namespace collab_ops
