// IEEE binary16 <-> binary32 in portable C++ (no F16C / NEON needed): used by the cache writes
// (round to nearest, ties to even, as torch's .half()) and by the portable attention path.
#pragma once

#include <cstdint>
#include <cstring>

namespace qkvx {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t x;
  if (e == 0x1f) {
    x = sign | 0x7f800000u | (m << 13);  // inf / nan
  } else if (e != 0) {
    x = sign | ((e + 112u) << 23) | (m << 13);  // rebias 15 -> 127
  } else if (m == 0) {
    x = sign;
  } else {  // subnormal half: m * 2^-24, exact in float
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;
    std::memcpy(&x, &f, 4);
    x |= sign;
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);  // nan / inf
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // rounds past the largest half (65504)
  if (x < 0x33000000u) return sign;             // below 2^-25: rounds to zero
  uint32_t r, rem, half;
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, m * 2^-24
    const uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u, shift = 126u - e;
    r = m >> shift;
    rem = m & ((1u << shift) - 1u);
    half = 1u << (shift - 1u);
  } else {  // normal: drop 13 mantissa bits, rebias the exponent by 112
    r = (x - 0x38000000u) >> 13;
    rem = x & 0x1fffu;
    half = 0x1000u;
  }
  if (rem > half || (rem == half && (r & 1u))) ++r;  // a carry moves into the exponent correctly
  return sign | static_cast<uint16_t>(r);
}

}  // namespace qkvx
