// Minimal test harness: counters, CHECK, a seeded generator, tensor views.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "qkvx/kernels.h"

namespace tu {

inline int& passed() { static int n = 0; return n; }
inline int& failed() { static int n = 0; return n; }

#define CHECK(cond, ...)                                    \
  do {                                                      \
    if (cond) {                                             \
      ++tu::passed();                                       \
    } else {                                                \
      ++tu::failed();                                       \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);      \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
    }                                                       \
  } while (0)

inline qkvx_tensor view(const void* data, int32_t dtype, std::vector<int64_t> sizes) {
  qkvx_tensor t{};
  t.data = const_cast<void*>(data);
  t.dtype = dtype;
  t.ndim = static_cast<int32_t>(sizes.size());
  for (size_t i = 0; i < sizes.size() && i < 4; ++i) t.sizes[i] = sizes[i];
  return t;
}

struct Rng {
  std::mt19937 g;
  explicit Rng(uint32_t seed) : g(seed) {}
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); }
};

void run_attend_tests();
void run_update_tests();
void run_error_tests();
void run_span_tests();

// RoPE half tables [P][D/2] built as qkvx's Rope and HF's rotary embedding build them: fp32
// inverse frequencies times fp32 positions, so an angle carries its fp32 rounding (the most at
// deep positions), which the model saw in training. A kernel must use each position's
// own row: rows composed from others differ by that rounding. Rows from P on are left as given.
inline void rope_tables(int64_t P, int64_t D, float* cos, float* sin) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float inv_freq = 1.0f / static_cast<float>(std::pow(10000.0, static_cast<double>(2 * i) / D));
    for (int64_t p = 0; p < P; ++p) {
      const float a = static_cast<float>(p) * inv_freq;
      cos[p * h + i] = static_cast<float>(std::cos(static_cast<double>(a)));
      sin[p * h + i] = static_cast<float>(std::sin(static_cast<double>(a)));
    }
  }
}

}  // namespace tu
