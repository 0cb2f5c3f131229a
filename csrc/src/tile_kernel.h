// The per-head inner loop of the attention: one kv head, one tile of consecutive cache rows, all
// M query rows that read this kv head (M = R query heads x T queries), folded into a running
// (max, sum, accumulator) per query row: the online softmax.
//
// Four instantiations of one template (tile_kernel_impl.h): portable scalar, AVX2/FMA/F16C and
// AVX-512 (each its own translation unit compiled with those flags, chosen at run time) and NEON.
#pragma once

#include <cstdint>

namespace qkvx {

struct Tile {
  // The cache rows of this tile in one head plane: row r of the tile is cache position row0 + r.
  const void* k = nullptr;        // [rows][D] of dtype
  const void* v = nullptr;        // [rows][D]; == k for K=V
  const float* k_scale = nullptr;  // [rows] (int8 only)
  const float* v_scale = nullptr;  // [rows] (int8 only)
  const float* cos = nullptr;  // RoPE half-table rows of the same positions (D/2 used), or null
  const float* sin = nullptr;
  int64_t table_stride = 0;    // floats from one table row to the next (D/2, or D for HF's tables)
  int32_t dtype = 0;               // QKVX_FLOAT32 | QKVX_FLOAT16 | QKVX_INT8
  int64_t row0 = 0;
  int64_t rows = 0;
  int64_t D = 0;
  // Query side.
  int64_t M = 0;
  const float* q = nullptr;          // [M][D], already multiplied by 1/sqrt(D)
  const int64_t* limit = nullptr;    // [M]: query row m sees cache positions <= limit[m]
  // Running state of this (chunk, kv head), updated in place.
  float* run_max = nullptr;  // [M], -inf before the first visible row
  float* run_sum = nullptr;  // [M]
  float* acc = nullptr;      // [M][D], sum of softmax weight x value row, unnormalized
  float* scratch = nullptr;  // >= tile_scratch_floats(D)
  // The tile the same thread runs next (its first next_rows rows), prefetched while this one ends
  // so the next stream starts warm; null when there is none.
  const void* next_k = nullptr;
  const void* next_v = nullptr;
  int64_t next_rows = 0;
  // Another one-query-row tile over the same rows of a different kv head, run by the same call;
  // their full blocks are read in lockstep where both running states fit the vector registers.
  const Tile* twin = nullptr;
  // How rows are read (attend.cpp decides per CPU): software prefetches of the rows ahead, and
  // fp32 rows off a 64-byte line read as aligned lines shifted into place (ShiftedRows, AVX-512)
  // rather than by loads that span two lines.
  bool prefetch = true;
  bool shifted = true;
};

// Floats of scratch one tile call needs: converted / rotated key and value rows of one block.
inline int64_t tile_scratch_floats(int64_t D) { return 2 * 8 * D; }

using TileKernel = void (*)(const Tile&);

void tile_kernel_portable(const Tile& t);
#if defined(__x86_64__) || defined(_M_X64)
void tile_kernel_avx2(const Tile& t);  // needs AVX2 + FMA + F16C, D % 8 == 0 (RoPE: D % 16 == 0)
// needs AVX-512 F/DQ/BW/VL + FMA + F16C, D % 16 == 0 (RoPE: D % 32 == 0)
void tile_kernel_avx512(const Tile& t);
#endif
#if defined(__aarch64__)
void tile_kernel_neon(const Tile& t);  // D % 4 == 0 (RoPE: D % 8 == 0)
#endif

}  // namespace qkvx
