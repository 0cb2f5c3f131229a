// Portable path: the tile kernel over scalar "vectors" of one lane. Any D; the reference the
// SIMD paths are tested against, and the fallback on CPUs (or head sizes) they do not cover.
#include <cmath>

#include "half.h"
#include "tile_kernel_impl.h"

namespace qkvx {
namespace {

struct Scalar {
  static constexpr int W = 1;
  using Blk = Scalar;
  using V = float;
  static V zero() { return 0.0f; }
  static V load(const float* p) { return *p; }
  static V load_half(const uint16_t* p) { return half_to_float(*p); }
  static V load_int8(const int8_t* p) { return static_cast<float>(*p); }
  static void store(float* p, V x) { *p = x; }
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }  // no libm fma: slow without FMA hardware
  static V fnma(V a, V b, V c) { return c - a * b; }
  static void to_float(const uint16_t* h, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(h[i]);
  }
  static void to_float(const int8_t* q, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(q[i]);
  }
  static void prefetch(const char* p) { __builtin_prefetch(p); }
  static void reduce8(const V* acc, float* out) {
    for (int j = 0; j < 8; ++j) out[j] = acc[j];
  }
  static float max8(const float* x) {
    float m = x[0];
    for (int j = 1; j < 8; ++j) m = x[j] > m ? x[j] : m;
    return m;
  }
  static float sum8(const float* x) {
    float s = 0.0f;
    for (int j = 0; j < 8; ++j) s += x[j];
    return s;
  }
  static V exp(V x) { return x < kMinExponent ? 0.0f : std::exp(x); }
};

}  // namespace

void tile_kernel_portable(const Tile& t) { tile_dispatch<Scalar>(t); }

}  // namespace qkvx
