// The AVX2 + FMA + F16C vector traits of the tile kernel (tile_kernel_impl.h). Included only by
// translation units compiled with those flags (tile_kernel_avx2.cpp, and tile_kernel_avx512.cpp
// for its 8-wide block operations), after tile_kernel_impl.h.
#pragma once

#include <immintrin.h>

namespace qkvx {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  using Blk = Avx2;  // block-of-8 operations (scores, weights) at the same width
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V load_int8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static void to_float(const uint16_t* h, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(x));
    }
  }
  static void to_float(const int8_t* q, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
      const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x)));
    }
  }
  static void prefetch(const char* p) { asm volatile("prefetcht0 %0" : : "m"(*p)); }
  // out[j] = sum of the 8 lanes of acc[j]: a transposing tree of horizontal adds.
  static void reduce8(const V* a, float* out) {
    const V t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const V t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const V u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    // u0 = [rows 0-3, low 4 lanes | rows 0-3, high 4 lanes], u1 likewise for rows 4-7
    const V lo = _mm256_permute2f128_ps(u0, u1, 0x20), hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_storeu_ps(out, _mm256_add_ps(lo, hi));
  }
  static float max8(const float* x) {
    V m = _mm256_loadu_ps(x);
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4e));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xb1));
    return _mm256_cvtss_f32(m);
  }
  static float sum8(const float* x) {
    const __m128 a = _mm_add_ps(_mm_loadu_ps(x), _mm_loadu_ps(x + 4));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 0x55)));
  }
  // exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial (Cephes expf
  // coefficients), 2^n through the exponent bits; exactly 0 below kMinExponent.
  static V exp(V x) {
    const V keep = _mm256_cmp_ps(x, _mm256_set1_ps(kMinExponent), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(kMinExponent));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    V p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
  }
};


}  // namespace
}  // namespace qkvx
