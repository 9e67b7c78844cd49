// Checks of the torch-free helpers that the CPU and CUDA kernels share (compiled with the host C++
// compiler): the skip test of Gumbel-max sampling never skips a token that could win, the uniform
// draws keep their resolution where races are decided, and values_lse agrees with a float64 log-sum-exp and with torch's rules for NaN and infinities.
#include <cmath>
#include <cstdio>
#include <random>

#include "common/fusion.h"
#include "common/sampling.h"

using namespace collab_ops;

static int failures = 0;

static void expect(bool ok, const char* what, double a, double b) {
  if (!ok && failures++ < 20) std::printf("FAIL %s: %.9g %.9g\n", what, a, b);
}

// A random word above reachable_bits_limit(best, x) gives a key x + noise below best.
static void check_skip_is_conservative() {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> gap(-3.f, 25.f), level(-2000.f, 2000.f);
  for (int trial = 0; trial < 200000; ++trial) {
    const float best = trial % 4 == 0 ? level(rng) : level(rng) / 100.f;
    const float x = best - gap(rng);
    const uint32_t limit = reachable_bits_limit(best, x);
    for (uint64_t w = uint64_t{limit} + 1; w <= uint64_t{limit} + 4 && w <= 0xffffffffu; ++w) {
      const float key = x + gumbel_noise(static_cast<uint32_t>(w));
      expect(key < best, "key above the best from a skipped word", key, best);
    }
  }
  // The limit is tight enough to skip: a gap of 10 leaves about e^-10 of the words.
  const uint32_t limit = reachable_bits_limit(10.f, 0.f);
  expect(limit < 196000u && limit > 190000u, "limit for a gap of 10", limit, std::exp(-10.0) * 4294967296.0);
  expect(reachable_bits_limit(-INFINITY, 0.f) == 0xffffffffu, "no best key yet", 0, 0);
  expect(reachable_bits_limit(1.f, 5.f) == 0xffffffffu, "x above the best", 0, 0);
}

// uniform_open01 keeps 2^-32 steps near 0, where the races are decided (its range: philox_known_answers).
static void check_uniform_resolution() {
  for (uint32_t w = 0; w < 1000; ++w) {
    expect(uniform_open01(w) < uniform_open01(w + 1), "distinct small draws", uniform_open01(w), uniform_open01(w + 1));
  }
  expect(std::fabs(uniform_open01(0x80000000u) - 0.5f) <= 6e-8f, "the middle word", uniform_open01(0x80000000u), 0.5);
  // The skip below x + kGumbelNoiseBound relies on no draw's noise reaching the bound.
  expect(gumbel_noise(0u) < kGumbelNoiseBound && gumbel_noise(0u) > kGumbelNoiseBound - 0.1f, "the largest noise",
         gumbel_noise(0u), kGumbelNoiseBound);
}

static double reference_lse(const float* x, int n) {
  double m = -INFINITY;
  for (int i = 0; i < n; ++i) m = std::isnan(x[i]) ? m : std::fmax(m, static_cast<double>(x[i]));
  if (std::isinf(m)) return m;
  double s = 0;
  for (int i = 0; i < n; ++i) s += std::isnan(x[i]) ? 0.0 : std::exp(x[i] - m);
  return m + std::log(s);
}

static void check_values_lse() {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.f, 8.f);
  for (int trial = 0; trial < 10000; ++trial) {
    float x[8];
    for (float& v : x) v = normal(rng);
    for (int i = 0; i < trial % 9; ++i) x[(i * 5 + trial) % 8] = -INFINITY;
    const double want = reference_lse(x, 8);
    const float got = online_lse_value(values_lse(x));
    expect(std::isinf(want) ? got == want : std::fabs(got - want) <= 1e-6 * (1 + std::fabs(want)), "values_lse", got, want);
  }
  float with_nan[8] = {1.f, NAN, 2.f, -INFINITY, 0.f, 0.f, 0.f, 0.f};
  expect(std::isnan(online_lse_value(values_lse(with_nan))), "NaN poisons", 0, 0);
  float with_inf[8] = {1.f, INFINITY, 2.f, -INFINITY, 0.f, 0.f, 0.f, 0.f};
  expect(online_lse_value(values_lse(with_inf)) == INFINITY, "+inf gives +inf", 0, 0);
  float none[8];
  for (float& v : none) v = -INFINITY;
  expect(online_lse_value(values_lse(none)) == -INFINITY, "all -inf gives -inf", 0, 0);
}

int main() {
  check_skip_is_conservative();
  check_uniform_resolution();
  check_values_lse();
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
