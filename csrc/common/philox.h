// Philox-4x32-10 (Salmon et al., SC'11), the counter-based generator of cuRAND and torch: the
// numbers depend only on (key, counter), so every backend and every thread layout draws the same
// values, and a seeded call is reproducible without any generator state. Torch-free.
#pragma once
#include <cstdint>

#include "common/scalar.h"

namespace collab_ops {

struct Philox4 {
  uint32_t v[4];
};

COLLAB_HD uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

COLLAB_HD Philox4 philox4x32_10(Philox4 counter, uint64_t key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  uint32_t* c = counter.v;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi_u32(kMul0, c[0]), lo0 = kMul0 * c[0];
    const uint32_t hi1 = mul_hi_u32(kMul1, c[2]), lo1 = kMul1 * c[2];
    const uint32_t next[4] = {hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0};
    c[0] = next[0];
    c[1] = next[1];
    c[2] = next[2];
    c[3] = next[3];
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return counter;
}

// A uniform float in the open interval (0, 1) from all 32 bits: never 0, so -log(u) and
// log(-log(u)) are finite, and kept below 1. Its spacing near 0 is 2^-32: the Gumbel-max and
// exponential races are won by the smallest u of a row, and with 23 bits (spacing 2^-23) two of
// 152k equally likely tokens would tie there about 2% of the time, ties going to the lower id.
// Above 2^-8 the float rounds to 24 bits, which moves u by at most 2^-25.
COLLAB_HD float uniform_open01(uint32_t bits) {
  constexpr float kBelowOne = 0.99999994f;  // 1 - 2^-24, the largest float below 1
  const float u = (static_cast<float>(bits) + 0.5f) * 2.3283064365386963e-10f;  // 2^-32
  return u < kBelowOne ? u : kBelowOne;
}

// A uniform double in [0, 1) from 53 random bits, for draws compared against probabilities.
COLLAB_HD double uniform_double01(uint32_t high, uint32_t low) {
  const uint64_t bits = (static_cast<uint64_t>(high) << 21) ^ (low >> 11);
  return static_cast<double>(bits & ((uint64_t{1} << 53) - 1)) * 1.1102230246251565e-16;
}

}  // namespace collab_ops
