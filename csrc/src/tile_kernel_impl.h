// The tile kernel, written once over a small vector-traits struct `Vt` that the including
// translation unit defines (portable scalar, AVX2, NEON). Everything here sits in an anonymous
// namespace: each instantiating TU is compiled with different target flags, and a shared inline
// symbol could otherwise be resolved to the AVX2 copy on a CPU without AVX2.
//
// Vt provides: W (lanes), V (vector type), zero, load, store, set1, add, sub, mul,
// fma(a, b, c) = a * b + c, to_float(const uint16_t* half, float*, n), to_float(const int8_t*,
// float*, n) (n % W == 0), reduce8(const V acc[8], float out[8]) (horizontal sums), exp(V) for
// arguments <= 0 (below -87 it may give a tiny denormal instead of 0; callers never use those).
#include <algorithm>
#include <cmath>

#include "qkvx/kernels.h"
#include "tile_kernel.h"

namespace qkvx {
namespace {

constexpr int kBlock = 8;  // rows fetched together: their scores share one exp and max

// Row r of a head plane as fp32: the cache row itself (fp32) or converted into dst.
template <class Vt, int DT>
inline const float* fetch_row(const void* base, int64_t r, int64_t D, float* dst) {
  if (DT == QKVX_FLOAT32) return static_cast<const float*>(base) + r * D;
  if (DT == QKVX_FLOAT16) {
    Vt::to_float(static_cast<const uint16_t*>(base) + r * D, dst, D);
  } else {
    Vt::to_float(static_cast<const int8_t*>(base) + r * D, dst, D);
  }
  return dst;
}

// HF rotate_half RoPE of one row: k = x * cos + cat(-x2, x1) * sin. In place (k == x) is fine:
// each step reads both halves before writing them.
template <class Vt>
inline void rotate_row(const float* x, const float* c, const float* s, float* k, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; i += Vt::W) {
    const auto x1 = Vt::load(x + i), x2 = Vt::load(x + h + i);
    const auto lo = Vt::sub(Vt::mul(x1, Vt::load(c + i)), Vt::mul(x2, Vt::load(s + i)));
    const auto hi = Vt::fma(x1, Vt::load(s + h + i), Vt::mul(x2, Vt::load(c + h + i)));
    Vt::store(k + i, lo);
    Vt::store(k + h + i, hi);
  }
}

// out[j] = q . k[j] for the 8 rows of a block (padding rows point at a real row).
template <class Vt>
inline void dot_block(const float* q, const float* const* k, int64_t D, float* out) {
  typename Vt::V acc[kBlock];
  for (int j = 0; j < kBlock; ++j) acc[j] = Vt::zero();
  for (int64_t d = 0; d < D; d += Vt::W) {
    const auto qv = Vt::load(q + d);
    for (int j = 0; j < kBlock; ++j) acc[j] = Vt::fma(qv, Vt::load(k[j] + d), acc[j]);
  }
  Vt::reduce8(acc, out);
}

// w[j] = exp(sc[j] - mx) for j < nv; returns their sum.
template <class Vt>
inline float exp_block(const float* sc, int nv, float mx, float* w) {
  alignas(32) float x[kBlock];
  for (int j = 0; j < kBlock; ++j) x[j] = j < nv ? sc[j] - mx : -100.0f;
  for (int j = 0; j < kBlock; j += Vt::W) Vt::store(w + j, Vt::exp(Vt::load(x + j)));
  float s = 0.0f;
  for (int j = 0; j < nv; ++j) s += w[j];
  return s;
}

// acc = acc * alpha (if rescale) + sum_j w[j] * v[j], over D columns.
template <class Vt>
inline void accumulate(float* acc, int64_t D, const float* w, const float* const* v, int nv,
                       bool rescale, float alpha) {
  const auto a = Vt::set1(alpha);
  for (int64_t d = 0; d < D; d += Vt::W) {
    auto x = Vt::load(acc + d);
    if (rescale) x = Vt::mul(x, a);
    for (int j = 0; j < nv; ++j) x = Vt::fma(Vt::set1(w[j]), Vt::load(v[j] + d), x);
    Vt::store(acc + d, x);
  }
}

template <class Vt, int DT>
void tile_loop(const Tile& t) {
  const int64_t D = t.D;
  float* kbuf = t.scratch;               // [8][D]: keys as fp32 (rotated with RoPE)
  float* vbuf = t.scratch + kBlock * D;  // [8][D]: values as fp32
  const bool shared = t.v == t.k, rope = t.cos != nullptr;
  for (int64_t b = 0; b < t.rows; b += kBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, t.rows - b));
    const int64_t s0 = t.row0 + b;  // cache position of the block's first row
    const float* krow[kBlock];
    const float* vrow[kBlock];
    // The only read of these cache rows: each serves every query row's score and value.
    for (int j = 0; j < nb; ++j) {
      const int64_t r = b + j;
      float* kslot = kbuf + j * D;
      float* vslot = vbuf + j * D;
      const float* kraw = fetch_row<Vt, DT>(t.k, r, D, shared && rope ? vslot : kslot);
      if (rope) {
        rotate_row<Vt>(kraw, t.cos + r * D, t.sin + r * D, kslot, D);
        krow[j] = kslot;
      } else {
        krow[j] = kraw;
      }
      vrow[j] = shared ? kraw : fetch_row<Vt, DT>(t.v, r, D, vslot);
    }
    for (int j = nb; j < kBlock; ++j) krow[j] = krow[0];
    for (int64_t m = 0; m < t.M; ++m) {
      const int64_t visible = t.limit[m] - s0 + 1;  // causal: rows s0 .. limit[m]
      if (visible <= 0) continue;
      const int nv = visible < nb ? static_cast<int>(visible) : nb;
      float sc[kBlock];
      dot_block<Vt>(t.q + m * D, krow, D, sc);
      if (DT == QKVX_INT8) {
        for (int j = 0; j < nv; ++j) sc[j] *= t.k_scale[b + j];
      }
      float bmax = sc[0];
      for (int j = 1; j < nv; ++j) bmax = std::max(bmax, sc[j]);
      float& mx = t.run_max[m];
      bool rescale = false;
      float alpha = 1.0f;
      if (bmax > mx) {  // the running max moves: earlier weights shrink by exp(old - new)
        alpha = std::exp(mx - bmax);
        rescale = true;
        mx = bmax;
        t.run_sum[m] *= alpha;
      }
      alignas(32) float w[kBlock];
      t.run_sum[m] += exp_block<Vt>(sc, nv, mx, w);
      if (DT == QKVX_INT8) {
        for (int j = 0; j < nv; ++j) w[j] *= t.v_scale[b + j];
      }
      accumulate<Vt>(t.acc + m * D, D, w, vrow, nv, rescale, alpha);
    }
  }
}

template <class Vt>
void tile_dispatch(const Tile& t) {
  switch (t.dtype) {
    case QKVX_FLOAT32: tile_loop<Vt, QKVX_FLOAT32>(t); break;
    case QKVX_FLOAT16: tile_loop<Vt, QKVX_FLOAT16>(t); break;
    default: tile_loop<Vt, QKVX_INT8>(t); break;
  }
}

}  // namespace
}  // namespace qkvx
