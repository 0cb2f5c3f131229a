// The direct pass of the tile kernel: one query row per kv head (decode without GQA), full blocks
// read in place in the cache dtype, the running state held in registers for the whole tile.
// Included by tile_kernel_impl.h after the block helpers it uses (dot_block, softmax_block,
// block_axpy, prefetch_rows).
#pragma once

namespace qkvx {
namespace {

// RoPE scores of rows b .. b+7 of the tile (rows of k), each key rotated by its own position's
// table row (TS floats apart). Not by rows composed from others (row p turned by row j for p + j):
// the tables' fp32 angles are rounded (HF's and qkvx's Rope), more so at deep positions, and the
// model was trained on each row as it is (csrc/README.md).
template <class Vt, int DT, int D, int64_t TS, class Rows>
inline void rope_block_scores(const Tile& t, int64_t b, const Rows& k, float* sc) {
  using Tr = StrideRows<TS * 4>;
  const int64_t off = b * TS * 4;
  dot_block_rope<Vt, DT>(t.q, k, Tr{reinterpret_cast<const char*>(t.cos) + off},
                         Tr{reinterpret_cast<const char*>(t.sin) + off}, D, sc);
}

// Software prefetches of tile rows r0 .. r1-1, continuing into the first rows of the tile the same
// thread runs next (Tile::next_k) past this one's end; nothing when Tile::prefetch is off.
template <class Vt, int DT>
struct RowPrefetch {
  const Tile& t;
  int64_t D;
  void rows(const void* k, const void* v, int64_t r0, int64_t r1) const {
    if (r0 >= r1) return;
    prefetch_rows<Vt, DT>(k, r0, r1, D);
    if (v != k) prefetch_rows<Vt, DT>(v, r0, r1, D);
  }
  void operator()(int64_t r0, int64_t r1) const {
    if (!t.prefetch) return;
    rows(t.k, t.v, r0, std::min(r1, t.rows));
    if (r1 > t.rows && t.next_k != nullptr) {
      rows(t.next_k, t.next_v, std::max(r0, t.rows) - t.rows, std::min(r1 - t.rows, t.next_rows));
    }
  }
};

// Rows from one block to the next that prefetches run ahead of the reads.
template <int DT>
int64_t prefetch_ahead(int64_t D) {
  return std::max<int64_t>(kBlock, kPrefetchBytes / (D * kElemBytes<DT>));
}

// One block of tile t (rows b .. b+7, all visible) folded into a one-query-row running state held
// in registers: acc [D] as D/W vectors, max, sum. k, v: the block's Rows. Forced inline: called
// out of line, the state would go through memory on every block.
template <class Vt, int DT, int D, class Rows>
[[gnu::always_inline]] inline void direct_block(const Tile& t, int64_t b, const Rows& k, const Rows& v,
                                                typename Vt::V* acc, float& mx, float& sum) {
  constexpr int NV = D / Vt::W;
  alignas(32) float sc[kBlock];
  if (t.cos == nullptr) {
    dot_block<Vt, DT>(t.q, k, D, sc);
  } else if (t.table_stride == D / 2) {  // half tables [P, D/2]
    rope_block_scores<Vt, DT, D, D / 2>(t, b, k, sc);
  } else {  // HF's [P, D] tables: the first half of each row
    rope_block_scores<Vt, DT, D, D>(t, b, k, sc);
  }
  alignas(32) float w[kBlock];
  const float alpha = softmax_block<typename Vt::Blk, DT, true>(t, b, kBlock, sc, mx, sum, w);
  if (alpha != 1.0f) {
    const auto a = Vt::set1(alpha);
    for (int i = 0; i < NV; ++i) acc[i] = Vt::mul(acc[i], a);
  }
  typename Vt::V wv[kBlock];
  for (int j = 0; j < kBlock; ++j) wv[j] = Vt::set1(w[j]);
  for (int i = 0; i < NV; ++i) acc[i] = block_axpy<Vt, DT>(acc[i], wv, v, i * Vt::W);
}

// The leading n rows (full blocks) of NT one-query-row tiles over the same rows of different kv
// heads, read in lockstep block by block: NT = 2 gives the memory system two streams, as the
// separate K and V planes of QKV do. rows(base, b): the Rows of the block at tile row b of the
// plane at base.
template <class Vt, int DT, int D, int NT, class MakeRows>
void direct_rows_of(const Tile* const* ts, int64_t n, const MakeRows& rows) {
  constexpr int NV = D / Vt::W;
  const int64_t ahead = prefetch_ahead<DT>(D);
  // Each tile's state under its own name (not an array indexed by a loop over the tiles) so that
  // it can stay in registers.
  typename Vt::V acc0[NV], acc1[NV];
  float mx0 = ts[0]->run_max[0], sum0 = ts[0]->run_sum[0], mx1 = 0.0f, sum1 = 0.0f;
  for (int i = 0; i < NV; ++i) acc0[i] = Vt::load(ts[0]->acc + i * Vt::W);
  if constexpr (NT == 2) {
    for (int i = 0; i < NV; ++i) acc1[i] = Vt::load(ts[1]->acc + i * Vt::W);
    mx1 = ts[1]->run_max[0], sum1 = ts[1]->run_sum[0];
  }
  auto block = [&](const Tile& t, int64_t b, typename Vt::V* acc, float& mx, float& sum)
                   __attribute__((always_inline)) {
    RowPrefetch<Vt, DT>{t, D}(b + ahead, b + ahead + kBlock);
    direct_block<Vt, DT, D>(t, b, rows(t.k, b), rows(t.v, b), acc, mx, sum);
  };
  for (int64_t b = 0; b < n; b += kBlock) {
    block(*ts[0], b, acc0, mx0, sum0);
    if constexpr (NT == 2) block(*ts[1], b, acc1, mx1, sum1);
  }
  for (int i = 0; i < NV; ++i) Vt::store(ts[0]->acc + i * Vt::W, acc0[i]);
  ts[0]->run_max[0] = mx0, ts[0]->run_sum[0] = sum0;
  if constexpr (NT == 2) {
    for (int i = 0; i < NV; ++i) Vt::store(ts[1]->acc + i * Vt::W, acc1[i]);
    ts[1]->run_max[0] = mx1, ts[1]->run_sum[0] = sum1;
  }
}

// The direct pass of tile t and its twin (Tile::twin, same rows), as far as it goes: returns the
// rows done in each, the leading full blocks whose 8 rows are all visible. Twins go in lockstep
// when both running states fit 8 vector registers (AVX-512 at D = 64), else one after the other.
template <class Vt, int DT, int D>
int64_t direct_rows(const Tile& t) {
  const int64_t visible = std::min(t.rows, t.limit[0] - t.row0 + 1);  // causal: up to limit[0]
  const int64_t n = visible > 0 ? visible / kBlock * kBlock : 0;
  if (n == 0) return 0;
  const Tile* ts[2] = {&t, t.twin};
  auto run = [&](const auto& rows) {
    if (t.twin == nullptr) {
      direct_rows_of<Vt, DT, D, 1>(ts, n, rows);
    } else if constexpr (2 * D / Vt::W <= 8) {
      direct_rows_of<Vt, DT, D, 2>(ts, n, rows);
    } else {
      direct_rows_of<Vt, DT, D, 1>(ts, n, rows);
      direct_rows_of<Vt, DT, D, 1>(ts + 1, n, rows);
    }
  };
  constexpr int64_t rb = D * kElemBytes<DT>;
  if constexpr (DT == QKVX_FLOAT32 && HasShiftedLoad<Vt>::value && rb % 64 == 0) {
    const auto off = reinterpret_cast<uintptr_t>(t.k) % 64;
    auto at = [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == off; };
    const bool twin_at = t.twin == nullptr || (at(t.twin->k) && at(t.twin->v));
    if (t.shifted && off != 0 && off % 4 == 0 && at(t.v) && twin_at) {
      const auto shift = Vt::shift(static_cast<int>(off / 4));
      run([&](const void* base, int64_t b) {
        return ShiftedRows<Vt, rb>{static_cast<const char*>(base) + b * rb - off, shift};
      });
      return n;
    }
  }
  run([](const void* base, int64_t b) { return StrideRows<rb>{static_cast<const char*>(base) + b * rb}; });
  return n;
}

}  // namespace
}  // namespace qkvx
