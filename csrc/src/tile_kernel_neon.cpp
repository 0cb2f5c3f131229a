// aarch64 path: NEON (always present on AArch64; fp16 rows through vcvt_f32_f16).
#include <arm_neon.h>

#include <cstring>

#include "tile_kernel_impl.h"

namespace qkvx {
namespace {

struct Neon {
  static constexpr int W = 4;
  using Blk = Neon;
  using V = float32x4_t;
  static V zero() { return vdupq_n_f32(0.0f); }
  static V load(const float* p) { return vld1q_f32(p); }
  static V load_half(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static V load_int8(const int8_t* p) {
    int32_t w;
    std::memcpy(&w, p, 4);  // 4 bytes: no over-read past the row
    const int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
  }
  static void store(float* p, V x) { vst1q_f32(p, x); }
  static V set1(float x) { return vdupq_n_f32(x); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V fnma(V a, V b, V c) { return vfmsq_f32(c, a, b); }
  static void to_float(const uint16_t* h, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 4) {
      vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
    }
  }
  static void to_float(const int8_t* q, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const int16x8_t w = vmovl_s8(vld1_s8(q + i));
      vst1q_f32(dst + i, vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))));
      vst1q_f32(dst + i + 4, vcvtq_f32_s32(vmovl_s16(vget_high_s16(w))));
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(q[i]);  // n % 8 == 4
  }
  static void prefetch(const char* p) { asm volatile("prfm pldl1keep, [%0]" : : "r"(p)); }
  static void reduce8(const V* a, float* out) {
    const V s0 = vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]));
    const V s1 = vpaddq_f32(vpaddq_f32(a[4], a[5]), vpaddq_f32(a[6], a[7]));
    vst1q_f32(out, s0);
    vst1q_f32(out + 4, s1);
  }
  static float max8(const float* x) { return vmaxvq_f32(vmaxq_f32(vld1q_f32(x), vld1q_f32(x + 4))); }
  static float sum8(const float* x) { return vaddvq_f32(vaddq_f32(vld1q_f32(x), vld1q_f32(x + 4))); }
  // Same range reduction and polynomial as the AVX2 path (Cephes expf coefficients); exactly 0
  // below kMinExponent.
  static V exp(V x) {
    const uint32x4_t keep = vcgeq_f32(x, vdupq_n_f32(kMinExponent));
    x = vmaxq_f32(x, vdupq_n_f32(kMinExponent));
    const V n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    V r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    V p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(e))), keep));
  }
};

}  // namespace

void tile_kernel_neon(const Tile& t) { tile_dispatch<Neon>(t); }

}  // namespace qkvx
