// Known-answer test of csrc/common/philox.h against the Random123 philox4x32_10 vectors.
#include <cstdio>

#include "common/philox.h"

int main() {
  using collab_ops::Philox4;
  struct Case {
    Philox4 counter;
    unsigned long long key;
    Philox4 expected;
  } cases[] = {
      {{{0u, 0u, 0u, 0u}}, 0ull, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffffffffffull,
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0x299f31d0a4093822ull,
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  int failures = 0;
  for (const Case& c : cases) {
    const Philox4 got = collab_ops::philox4x32_10(c.counter, c.key);
    for (int i = 0; i < 4; ++i) {
      if (got.v[i] != c.expected.v[i]) {
        std::printf("mismatch: word %d got %08x expected %08x\n", i, got.v[i], c.expected.v[i]);
        ++failures;
      }
    }
  }
  const float lowest = collab_ops::uniform_open01(0u), highest = collab_ops::uniform_open01(0xffffffffu);
  if (!(lowest > 0.f && highest < 1.f)) {
    std::printf("uniform_open01 left (0, 1): %g %g\n", lowest, highest);
    ++failures;
  }
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
