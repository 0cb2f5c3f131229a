// The two .npy shapes qkvx-run reads and writes (NumPy format 1.0 / 2.0 / 3.0, little-endian):
// token ids int64 [T] in, logits float32 [rows, vocab] out. No pickle, no other dtypes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qkvx_run {

// The int64 [T] array in `bytes`; anything else (dtype, rank, order, truncation) is a Failure.
std::vector<int64_t> parse_npy_int64_1d(const std::string& bytes);

// Writes the header of a float32 [rows, cols] .npy; the caller appends rows * cols floats.
std::string npy_float32_2d_header(int64_t rows, int64_t cols);

}  // namespace qkvx_run
