// Minimal test harness: counters, CHECK, a seeded generator, tensor views.
#pragma once

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

}  // namespace tu
