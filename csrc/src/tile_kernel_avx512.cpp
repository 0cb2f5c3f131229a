// x86-64 path: AVX-512 (F, DQ, BW, VL) + FMA + F16C. Rows move 16 lanes at a time, and the 32
// vector registers hold a query, eight block accumulators and the RoPE operands at once; the
// block-of-8 operations (scores, softmax weights) stay 8-wide (Avx2). Compiled alone with these
// flags and called only after a run-time CPU check (attend.cpp).
#include "tile_kernel_impl.h"
#include "simd_avx2.h"

namespace qkvx {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using Blk = Avx2;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load_int8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // Floats m .. m+15 past the 64-byte-aligned p (0 < m < 16): lanes m.. of p's line and lanes
  // ..m-1 of the next, joined by one two-source permute. The masked-off lanes are not read, so
  // nothing outside the row's own bytes is touched.
  struct Shift {
    __m512i idx;
    __mmask16 first, second;
  };
  static Shift shift(int m) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_add_epi32(iota, _mm512_set1_epi32(m)), static_cast<__mmask16>(0xffffu << m),
            static_cast<__mmask16>((1u << m) - 1u)};
  }
  static V load_shifted(const float* p, const Shift& s) {
    return _mm512_permutex2var_ps(_mm512_maskz_load_ps(s.first, p), s.idx,
                                  _mm512_maskz_load_ps(s.second, p + 16));
  }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static void to_float(const uint16_t* h, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += W) _mm512_storeu_ps(dst + i, load_half(h + i));
  }
  static void to_float(const int8_t* q, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += W) _mm512_storeu_ps(dst + i, load_int8(q + i));
  }
  static void prefetch(const char* p) { Avx2::prefetch(p); }
  // out[j] = sum of the 16 lanes of acc[j]: fold each to 8 lanes, then Avx2's transposing tree.
  static void reduce8(const V* a, float* out) {
    __m256 h[8];
    for (int j = 0; j < 8; ++j) {
      h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm512_extractf32x8_ps(a[j], 1));
    }
    Avx2::reduce8(h, out);
  }
};

}  // namespace

void tile_kernel_avx512(const Tile& t) { tile_dispatch<Avx512>(t); }

}  // namespace qkvx
