// How the tile kernel addresses and loads the rows of a block of 8 (tile_kernel_impl.h, same
// anonymous namespace: each instantiating TU compiles it with its own target flags).
#pragma once

#include <cstdint>
#include <type_traits>

#include "qkvx/kernels.h"

namespace qkvx {
namespace {

// Bytes of one element of a cache dtype.
template <int DT>
constexpr int64_t kElemBytes = DT == QKVX_FLOAT32 ? 4 : DT == QKVX_FLOAT16 ? 2 : 1;

// Elements d .. d+W-1 of a row whose elements are of type ET, as fp32 lanes.
template <class Vt, int ET>
inline typename Vt::V ld(const void* row, int64_t d) {
  if (ET == QKVX_FLOAT32) return Vt::load(static_cast<const float*>(row) + d);
  if (ET == QKVX_FLOAT16) return Vt::load_half(static_cast<const uint16_t*>(row) + d);
  return Vt::load_int8(static_cast<const int8_t*>(row) + d);
}

// Row j of a block of 8: a pointer per row (tail blocks, whose padding rows repeat a real one, and
// rows converted into scratch), or consecutive rows of a head plane read in place, base + j * Bytes
// with Bytes known at compile time. The second keeps three base pointers (keys, cos, sin) where
// 24 row pointers would not fit the general-purpose registers and spill in the inner loop.
// load<Vt, ET>(j, d): elements d .. d+W-1 of row j as fp32 lanes.
struct PtrRows {
  const void* const* p;
  const void* operator[](int j) const { return p[j]; }
  template <class Vt, int ET>
  typename Vt::V load(int j, int64_t d) const {
    return ld<Vt, ET>(p[j], d);
  }
};
template <int64_t Bytes>
struct StrideRows {
  const char* base;
  const void* operator[](int j) const { return base + j * Bytes; }
  template <class Vt, int ET>
  typename Vt::V load(int j, int64_t d) const {
    return ld<Vt, ET>(base + j * Bytes, d);
  }
};

// fp32 rows that start m floats past a 64-byte boundary (Bytes a multiple of 64, so all rows of
// a head plane share m), read as whole aligned lines joined by Vt::load_shifted. Where a vector is
// a cache line (AVX-512) an unaligned load is split across two lines, and ExecuTorch's runtimes
// place planned buffers, the caches among them, 16 bytes past a line. On the AMD host a RoPE K=V
// decode loop over such a cache took about 1.25x longer with plain loads; the Intel host runs it
// faster with them, so Tile::shifted chooses.
template <class Vt, int64_t Bytes>
struct ShiftedRows {
  const char* base;  // row 0, rounded down to its 64-byte line
  typename Vt::Shift shift;
  template <class, int>
  typename Vt::V load(int j, int64_t d) const {
    return Vt::load_shifted(reinterpret_cast<const float*>(base + j * Bytes) + d, shift);
  }
};
template <class T, class = void>
struct HasShiftedLoad : std::false_type {};
template <class T>
struct HasShiftedLoad<T, std::void_t<typename T::Shift>> : std::true_type {};

}  // namespace
}  // namespace qkvx
