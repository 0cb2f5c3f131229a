// The tile kernel, written once over a small vector-traits struct `Vt` that the including
// translation unit defines (portable scalar, AVX2, AVX-512, NEON). Everything here sits in an
// anonymous namespace: each instantiating TU is compiled with different target flags, and a shared
// inline symbol could otherwise be resolved to the AVX2 copy on a CPU without AVX2.
//
// Vt provides: W (lanes), V (vector type), zero, load, load_half, load_int8 (W elements as fp32
// lanes), store, set1, add, sub, mul, fma(a, b, c) = a * b + c, fnma(a, b, c) = c - a * b,
// to_float(const uint16_t* half, float*, n), to_float(const int8_t*, float*, n) (n % W == 0),
// prefetch(const char*) (one cache line into L1),
// reduce8(const V acc[8], float out[8]) (horizontal sums).
// Optionally (AVX-512) Shift, shift(m) and load_shifted(aligned p, Shift) = the W floats starting
// m floats past the 64-byte-aligned p, read as whole aligned lines (ShiftedRows).
// Vt::Blk is the traits struct of the block-of-8 operations (a W <= 8 one: Vt itself, or AVX2 under
// AVX-512): load/store/mul/sub/set1 over 8 floats, max8 / sum8 (of 8 floats), and exp(V) for
// arguments <= 0 that returns exactly 0 below kMinExponent.
#include <algorithm>
#include <cmath>

#include "qkvx/kernels.h"
#include "tile_kernel.h"
#include "tile_rows.h"

namespace qkvx {
namespace {

constexpr int kBlock = 8;  // rows fetched together: their scores share one exp and max

// Cache rows are prefetched this many bytes ahead of the block being read: the compute between
// loads keeps too few misses in flight for the memory latency, and a tile can be a short stream
// (with RoPE, a few thousand rows of one head before the next head's) for the hardware prefetcher
// to ramp up on. Near its end a tile prefetches the first rows of the tile its thread runs next
// (Tile::next_k), so each stream starts warm; nothing outside the two tiles is touched.
constexpr int64_t kPrefetchBytes = 10 * 1024;

// Vt::prefetch is an asm statement where it matters: GCC drops a loop of __builtin_prefetch
// calls once it is inlined into this kernel. Tile::prefetch (attend.cpp decides) turns them off.
template <class Vt, int DT>
inline void prefetch_rows(const void* base, int64_t r0, int64_t r1, int64_t D) {
  const int64_t es = kElemBytes<DT>;
  const char* p = static_cast<const char*>(base);
  for (int64_t off = r0 * D * es; off < r1 * D * es; off += 64) Vt::prefetch(p + off);
}

// Softmax weights below e^kMinExponent (relative to the running max) are exactly 0: at fp32 they
// cannot change a sum whose largest term is 1, and as denormals they would slow every FMA.
constexpr float kMinExponent = -60.0f;

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

// HF rotate_half RoPE of one row with half tables c, s [D/2] (HF's tables repeat them over both
// halves): k1 = x1 c - x2 s, k2 = x2 c + x1 s. In place (k == x) is fine: each step reads both
// halves before writing them.
template <class Vt>
inline void rotate_row(const float* x, const float* c, const float* s, float* k, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; i += Vt::W) {
    const auto x1 = Vt::load(x + i), x2 = Vt::load(x + h + i);
    const auto cv = Vt::load(c + i), sv = Vt::load(s + i);
    Vt::store(k + i, Vt::fnma(x2, sv, Vt::mul(x1, cv)));
    Vt::store(k + h + i, Vt::fma(x1, sv, Vt::mul(x2, cv)));
  }
}

// out[j] = q . k[j] for the 8 rows of a block (padding rows point at a real row); rows of KT.
template <class Vt, int KT, class Rows>
inline void dot_block(const float* q, const Rows& k, int64_t D, float* out) {
  typename Vt::V acc[kBlock];
  for (int j = 0; j < kBlock; ++j) acc[j] = Vt::zero();
  for (int64_t d = 0; d < D; d += Vt::W) {
    const auto qv = Vt::load(q + d);
    for (int j = 0; j < kBlock; ++j) acc[j] = Vt::fma(qv, k.template load<Vt, KT>(j, d), acc[j]);
  }
  Vt::reduce8(acc, out);
}

// out[j] = q . rope(k[j]) for the 8 rows of a block, no rotated copy stored: q1 . (x1 c - x2 s) +
// q2 . (x2 c + x1 s) over the halves is computed as x1 . (q1 c + q2 s) + x2 . (q2 c - q1 s), with
// the half tables c[j], s[j] [D/2] of row j's position. Turning the query rather than the row
// leaves one FMA per vector waiting on the cache read (the other four need only q and the table,
// which is in L2), so more reads are in flight. Rows of KT.
template <class Vt, int KT, class Rows, class TableRows>
inline void dot_block_rope(const float* q, const Rows& k, const TableRows& c, const TableRows& s,
                           int64_t D, float* out) {
  const int64_t h = D / 2;
  typename Vt::V acc[kBlock];
  for (int j = 0; j < kBlock; ++j) acc[j] = Vt::zero();
  for (int64_t i = 0; i < h; i += Vt::W) {
    const auto q1 = Vt::load(q + i), q2 = Vt::load(q + h + i);
    for (int j = 0; j < kBlock; ++j) {
      const auto x1 = k.template load<Vt, KT>(j, i), x2 = k.template load<Vt, KT>(j, h + i);
      const auto cv = Vt::load(static_cast<const float*>(c[j]) + i);
      const auto sv = Vt::load(static_cast<const float*>(s[j]) + i);
      const auto a = Vt::fma(q2, sv, Vt::mul(q1, cv)), bq = Vt::fnma(q1, sv, Vt::mul(q2, cv));
      acc[j] = Vt::fma(x1, a, acc[j]);
      acc[j] = Vt::fma(x2, bq, acc[j]);
    }
  }
  Vt::reduce8(acc, out);
}

// w[j] = exp(sc[j] - mx) for j < n, 0 past n; returns their sum. Full blocks stay in vectors.
template <class Bt, bool Full>
inline float exp_block(const float* sc, int n, float mx, float* w) {
  alignas(32) float x[kBlock];
  const float* src = sc;
  if (!Full) {
    for (int j = 0; j < kBlock; ++j) x[j] = j < n ? sc[j] : mx - 100.0f;
    src = x;
  }
  const auto m = Bt::set1(mx);
  for (int j = 0; j < kBlock; j += Bt::W) Bt::store(w + j, Bt::exp(Bt::sub(Bt::load(src + j), m)));
  return Bt::sum8(w);
}

// x + sum_j wv[j] * v[j][d .. d+W-1] over the 8 rows of a full block, in two chains (half the
// FMA latency); rows of VT.
template <class Vt, int VT, class Rows>
inline typename Vt::V block_axpy(typename Vt::V x, const typename Vt::V* wv, const Rows& v, int64_t d) {
  auto y = Vt::mul(wv[0], v.template load<Vt, VT>(0, d));
  for (int j = 1; j < kBlock; j += 2) x = Vt::fma(wv[j], v.template load<Vt, VT>(j, d), x);
  for (int j = 2; j < kBlock; j += 2) y = Vt::fma(wv[j], v.template load<Vt, VT>(j, d), y);
  return Vt::add(x, y);
}

// acc = acc * alpha (if rescale) + sum_j w[j] * v[j], over D columns, rows of VT; NV = kBlock
// for a full block (unrolled, weights broadcast once), 0 for a partial one (nv rows).
template <class Vt, int NV, int VT, class Rows>
inline void accumulate(float* acc, int64_t D, const float* w, const Rows& v, int nv,
                       bool rescale, float alpha) {
  const auto a = Vt::set1(alpha);
  if (NV == kBlock) {
    typename Vt::V wv[kBlock];
    for (int j = 0; j < kBlock; ++j) wv[j] = Vt::set1(w[j]);
    for (int64_t d = 0; d < D; d += Vt::W) {
      auto x = Vt::load(acc + d);
      if (rescale) x = Vt::mul(x, a);
      Vt::store(acc + d, block_axpy<Vt, VT>(x, wv, v, d));
    }
    return;
  }
  for (int64_t d = 0; d < D; d += Vt::W) {
    auto x = Vt::load(acc + d);
    if (rescale) x = Vt::mul(x, a);
    for (int j = 0; j < nv; ++j) x = Vt::fma(Vt::set1(w[j]), v.template load<Vt, VT>(j, d), x);
    Vt::store(acc + d, x);
  }
}

// Turns one block's scores sc (n rows; n == kBlock: all 8 visible, scales load as vectors) into
// softmax weights w against the running max mx, updating mx and the running sum; int8 scales are
// folded into scores and weights. Returns the factor earlier weights shrink by (1: max unchanged).
template <class Bt, int DT, bool Full>
inline float softmax_block(const Tile& t, int64_t b, int n, float* sc, float& mx, float& sum,
                           float* w) {
  float bmax;
  if (Full) {
    if (DT == QKVX_INT8) {
      for (int j = 0; j < kBlock; j += Bt::W) {
        Bt::store(sc + j, Bt::mul(Bt::load(sc + j), Bt::load(t.k_scale + b + j)));
      }
    }
    bmax = Bt::max8(sc);
  } else {
    if (DT == QKVX_INT8) {
      for (int j = 0; j < n; ++j) sc[j] *= t.k_scale[b + j];
    }
    bmax = sc[0];
    for (int j = 1; j < n; ++j) bmax = std::max(bmax, sc[j]);
  }
  float alpha = 1.0f;
  if (bmax > mx) {  // the running max moves: earlier weights shrink by exp(old - new)
    alpha = mx - bmax < kMinExponent ? 0.0f : std::exp(mx - bmax);
    mx = bmax;
    sum *= alpha;
  }
  sum += exp_block<Bt, Full>(sc, n, mx, w);
  if (DT == QKVX_INT8) {
    if (Full) {
      for (int j = 0; j < kBlock; j += Bt::W) {
        Bt::store(w + j, Bt::mul(Bt::load(w + j), Bt::load(t.v_scale + b + j)));
      }
    } else {
      for (int j = 0; j < n; ++j) w[j] *= t.v_scale[b + j];
    }
  }
  return alpha;
}

// Folds one block's scores sc (n rows; n == kBlock is the common, fully unrolled case) into query
// row m's running (max, sum, acc) in memory. Value rows are of type VT: the cache dtype read
// directly, or fp32 rows converted once for several query rows.
template <class Vt, int DT, bool Full, int VT, class Rows>
inline void fold_block(const Tile& t, int64_t m, int64_t b, int nv, float* sc, const Rows& vrow,
                       int64_t D) {
  const int n = Full ? kBlock : nv;
  alignas(32) float w[kBlock];
  const float alpha = softmax_block<typename Vt::Blk, DT, Full>(t, b, n, sc, t.run_max[m], t.run_sum[m], w);
  accumulate<Vt, Full ? kBlock : 0, VT>(t.acc + m * D, D, w, vrow, n, alpha != 1.0f, alpha);
}

}  // namespace
}  // namespace qkvx

#include "tile_direct.h"  // the one-query-row pass over full blocks, built on the helpers above

namespace qkvx {
namespace {

// Rows b0 .. rows-1 of tile t by blocks of 8: several query rows, tail blocks, any head size.
template <class Vt, int DT, int DC>
void block_loop(const Tile& t, int64_t b0) {
  const int64_t D = DC ? DC : t.D;
  float* kbuf = t.scratch;               // [8][D]: keys as fp32 (rotated with RoPE)
  float* vbuf = t.scratch + kBlock * D;  // [8][D]: values as fp32
  const bool shared = t.v == t.k, rope = t.cos != nullptr;
  const int64_t es = kElemBytes<DT>;
  const RowPrefetch<Vt, DT> prefetch{t, D};
  // One query row (decode without GQA) reads every row in the cache dtype as it goes, rotating
  // keys in registers; several query rows share rows converted (and rotated) to fp32 once.
  const bool direct = t.M == 1;
  const int64_t ahead = prefetch_ahead<DT>(D);
  for (int64_t b = b0; b < t.rows; b += kBlock) {
    prefetch(b + ahead, b + ahead + kBlock);
    const int nb = static_cast<int>(std::min<int64_t>(kBlock, t.rows - b));
    const int64_t s0 = t.row0 + b;  // cache position of the block's first row
    const void* krow[kBlock];
    const void* vrow[kBlock];
    const void* crow[kBlock];  // RoPE table rows (const float*)
    const void* srow[kBlock];
    // The only read of these cache rows: each serves every query row's score and value.
    for (int j = 0; j < nb; ++j) {
      const int64_t r = b + j;
      if (rope) crow[j] = t.cos + r * t.table_stride, srow[j] = t.sin + r * t.table_stride;
      if (direct) {  // one query row: convert (and rotate) while computing, nothing stored
        krow[j] = static_cast<const char*>(t.k) + r * D * es;
        vrow[j] = static_cast<const char*>(t.v) + r * D * es;
        continue;
      }
      float* kslot = kbuf + j * D;
      float* vslot = vbuf + j * D;
      const float* kraw = fetch_row<Vt, DT>(t.k, r, D, shared && rope ? vslot : kslot);
      if (rope) {
        rotate_row<Vt>(kraw, static_cast<const float*>(crow[j]), static_cast<const float*>(srow[j]), kslot,
                       D);
        krow[j] = kslot;
      } else {
        krow[j] = kraw;
      }
      vrow[j] = shared ? kraw : fetch_row<Vt, DT>(t.v, r, D, vslot);
    }
    for (int j = nb; j < kBlock; ++j) {
      krow[j] = krow[0];
      if (rope) crow[j] = crow[0], srow[j] = srow[0];
    }
    for (int64_t m = 0; m < t.M; ++m) {
      const int64_t visible = t.limit[m] - s0 + 1;  // causal: rows s0 .. limit[m]
      if (visible <= 0) continue;
      const int nv = visible < nb ? static_cast<int>(visible) : nb;
      alignas(32) float sc[kBlock];
      const PtrRows kr{krow}, vr{vrow}, cr{crow}, sr{srow};
      if (direct && rope) {
        dot_block_rope<Vt, DT>(t.q + m * D, kr, cr, sr, D, sc);
      } else if (direct) {
        dot_block<Vt, DT>(t.q + m * D, kr, D, sc);
      } else {
        dot_block<Vt, QKVX_FLOAT32>(t.q + m * D, kr, D, sc);
      }
      if (direct && nv == kBlock) {
        fold_block<Vt, DT, true, DT>(t, m, b, nv, sc, vr, D);
      } else if (direct) {
        fold_block<Vt, DT, false, DT>(t, m, b, nv, sc, vr, D);
      } else if (nv == kBlock) {
        fold_block<Vt, DT, true, QKVX_FLOAT32>(t, m, b, nv, sc, vr, D);
      } else {
        fold_block<Vt, DT, false, QKVX_FLOAT32>(t, m, b, nv, sc, vr, D);
      }
    }
  }
}

// Tile t and its twin (Tile::twin), if any. DC: the head size as a compile-time constant (0: use
// t.D), so the common sizes get every row-length loop unrolled.
template <class Vt, int DT, int DC>
void tile_loop(const Tile& t) {
  const int64_t D = DC ? DC : t.D;
  const int64_t ahead = prefetch_ahead<DT>(D);
  RowPrefetch<Vt, DT>{t, D}(0, ahead);
  if (t.twin != nullptr) RowPrefetch<Vt, DT>{*t.twin, D}(0, ahead);
  int64_t b0 = 0;
  if constexpr (DC != 0) {
    if (t.M == 1) b0 = direct_rows<Vt, DT, DC>(t);
  }
  block_loop<Vt, DT, DC>(t, b0);
  if (t.twin != nullptr) block_loop<Vt, DT, DC>(*t.twin, b0);
}

template <class Vt, int DT>
void tile_dtype(const Tile& t) {
  switch (t.D) {
    case 64: tile_loop<Vt, DT, 64>(t); break;
    case 128: tile_loop<Vt, DT, 128>(t); break;
    default: tile_loop<Vt, DT, 0>(t); break;
  }
}

template <class Vt>
void tile_dispatch(const Tile& t) {
  switch (t.dtype) {
    case QKVX_FLOAT32: tile_dtype<Vt, QKVX_FLOAT32>(t); break;
    case QKVX_FLOAT16: tile_dtype<Vt, QKVX_FLOAT16>(t); break;
    default: tile_dtype<Vt, QKVX_INT8>(t); break;
  }
}

}  // namespace
}  // namespace qkvx
