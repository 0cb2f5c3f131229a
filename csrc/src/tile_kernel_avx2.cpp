// x86-64 path: AVX2 + FMA + F16C. This TU alone is compiled with -mavx2 -mfma -mf16c; the driver
// calls it only after a run-time CPU check (attend.cpp), so the library still loads and runs on
// x86-64 CPUs without AVX2.
#include "tile_kernel_impl.h"
#include "simd_avx2.h"

namespace qkvx {

void tile_kernel_avx2(const Tile& t) { tile_dispatch<Avx2>(t); }

}  // namespace qkvx
