// Independent float64 reference for the qkvx kernels' tests: the textbook formulas (two-pass
// softmax, explicit dequantization and rotation), sharing no code with the kernels.
#pragma once

#include <cstdint>
#include <vector>

namespace ref {

// fp16 bits -> value, by the IEEE formula (not by bit re-packing as the kernels do).
double half_value(uint16_t h);

struct Cache {
  int dtype = 6;                   // 6 fp32, 5 fp16, 1 int8 (QKVX codes)
  std::vector<float> f32;          // [G][S][D]
  std::vector<uint16_t> f16;       // [G][S][D]
  std::vector<int8_t> i8;          // [G][S][D]
  std::vector<float> scale;        // [G][S] (int8)
  double at(int64_t g, int64_t s, int64_t d, int64_t S, int64_t D) const;  // dequantized
  const void* data() const;  // the buffer of dtype, as the kernels take it
};

// out [T][H][D] = causal softmax(q k^T / sqrt(D)) v with query t at position start_pos + t,
// key rows rotated by position (HF rotate_half) when half tables cos/sin [P][D/2] are given, v = k's stored
// rows when v is null.
std::vector<double> attend(const std::vector<float>& q, int64_t T, int64_t H, int64_t D,
                           const Cache& k, const Cache* v, int64_t G, int64_t S,
                           const std::vector<float>* cos, const std::vector<float>* sin,
                           int64_t start_pos);

// As attend, under a padding mask [start_pos + T] (nonzero = real token), with the given softmax
// scale: query t sees key s iff (s <= start_pos + t and mask[s]) or s == start_pos + t, and key s is
// rotated with position max(cumsum(mask)[s] - 1, 0). Rows no query sees may hold anything.
std::vector<double> attend_masked(const std::vector<float>& q, int64_t T, int64_t H, int64_t D,
                                  const Cache& k, const Cache* v, int64_t G, int64_t S,
                                  const std::vector<float>* cos, const std::vector<float>* sin,
                                  int64_t start_pos, const std::vector<int64_t>& mask, double scale);

}  // namespace ref
