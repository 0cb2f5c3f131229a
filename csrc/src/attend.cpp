// The attention driver: lays the key spans (attend: the causal prefix 0 .. start_pos+T-1; the
// onnxruntime op: the unmasked runs) end to end, splits them into sequence chunks (several per pool
// thread), runs the tile kernel over every (chunk, kv head), then merges the chunks' partial
// softmax states per query row.
//
// Shapes: q [1, T, H, D], caches [1, G, S, D] (heads before tokens), R = H / G query heads per kv
// head, M = R * T query rows per kv head (row m = t * R + r is query head g * R + r at token t).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>

#include "core.h"
#include "parallel.h"
#include "tile_kernel.h"

namespace qkvx {
namespace {

// The vectorized paths, best first; a path is taken when the CPU has it and the head size fits.
enum Path : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3, kAuto = -1 };
const char* const kPathNames[] = {"portable", "avx2", "avx512", "neon"};

std::atomic<int> g_forced_path{kAuto};
std::atomic<int64_t> g_chunk_rows{0};
std::atomic<int> g_forced_prefetch{-1}, g_forced_shifted{-1};  // force_read_mode

// Below this many cache bytes per chunk, waking a second thread costs more than it saves.
constexpr int64_t kMinChunkBytes = 256 * 1024;
// Chunks per pool thread when splitting: a thread that finishes early (or a core that is busy
// with another process) evens out by taking more of them.
constexpr int64_t kChunksPerThread = 4;
// With RoPE a tile visits every kv head over the same positions, so its cos/sin rows are read
// from memory once and from L2 for the other heads: the tile's table rows fit this budget.
constexpr int64_t kRopeTileTableBytes = 256 * 1024;
// Rows per tile when a before_tile hook touches them first (K and V rows of one head: L2-sized).
constexpr int64_t kHookTileRows = 512;

bool usable(int path) {
  switch (path) {
    case kPortable: return true;
#if defined(__x86_64__) || defined(_M_X64)
    case kAvx2: {
      static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c");
      return ok;
    }
    case kAvx512: {
      static const bool ok = usable(kAvx2) && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
      return ok;
    }
#endif
#if defined(__aarch64__)
    case kNeon: return true;
#endif
    default: return false;
  }
}

// The forced path (force_simd_path admits only usable ones), else the best usable one. A head
// size the path cannot split falls back to the next path down (choose_kernel).
int best_path() {
  const int forced = g_forced_path.load();
  if (forced != kAuto) return forced;
  for (int p : {kAvx512, kNeon, kAvx2}) {
    if (usable(p)) return p;
  }
  return kPortable;
}

TileKernel choose_kernel(int64_t D, bool rope) {
  // RoPE pairs element i with i + D/2, so both halves must be whole vectors.
  auto fits = [&](int64_t w) { return D % w == 0 && (!rope || D % (2 * w) == 0); };
  switch (best_path()) {
#if defined(__x86_64__) || defined(_M_X64)
    case kAvx512:
      if (fits(16)) return tile_kernel_avx512;
      [[fallthrough]];
    case kAvx2:
      if (fits(8)) return tile_kernel_avx2;
      break;
#endif
#if defined(__aarch64__)
    case kNeon:
      if (fits(4)) return tile_kernel_neon;
      break;
#endif
    default: break;
  }
  return tile_kernel_portable;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How tiles read rows on this CPU (Tile::prefetch, Tile::shifted). The Intel host measured reads a
// cache fastest from its hardware prefetchers alone, from memory and from the last-level cache,
// at every context and thread count tried, and reads rows off a line fastest with plain loads
// spanning two lines; the AMD host needs both the prefetches and the shifted aligned lines
// (README: Long context).
struct ReadMode {
  bool prefetch, shifted;
};
ReadMode read_mode() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool intel = __builtin_cpu_is("intel");
#else
  static const bool intel = false;
#endif
  auto pick = [](int forced, bool choice) { return forced < 0 ? choice : forced != 0; };
  return {pick(g_forced_prefetch.load(), !intel), pick(g_forced_shifted.load(), !intel)};
}

}  // namespace

Status force_simd_path(const char* name) {
  if (name == nullptr || name[0] == 0) {
    g_forced_path.store(kAuto);
    return Status{};
  }
  for (int p = kPortable; p <= kNeon; ++p) {
    if (std::strcmp(name, kPathNames[p]) != 0) continue;
    if (!usable(p)) return fail(QKVX_INVALID_ARGUMENT, "qkvx: this CPU cannot take the %s path", name);
    g_forced_path.store(p);
    return Status{};
  }
  return fail(QKVX_INVALID_ARGUMENT, "qkvx: unknown simd path '%s' (portable, avx2, avx512, neon)",
              name);
}
void set_chunk_rows(int64_t rows) { g_chunk_rows.store(rows < 0 ? 0 : rows); }
void force_read_mode(int prefetch, int shifted) {
  g_forced_prefetch.store(prefetch), g_forced_shifted.store(shifted);  // read_mode() interprets them
}
int64_t chunk_rows() { return g_chunk_rows.load(); }
const char* simd_path() { return kPathNames[best_path()]; }

Status attend(const AttendArgs& a) {
  Status st = check_attend(a);
  if (!st.ok()) return st;
  SpanAttention s;
  s.T = a.q->sizes[1], s.H = a.q->sizes[2], s.D = a.q->sizes[3];
  s.G = a.k_cache->sizes[1], s.S = a.k_cache->sizes[2];
  if (s.T == 0) return st;
  KeySpan all;
  all.end = a.start_pos + s.T, all.m_end = s.H / s.G * s.T;
  s.q = static_cast<const float*>(a.q->data);
  s.k = a.k_cache->data;
  s.v = a.v_cache ? a.v_cache->data : s.k;
  s.k_scale = a.k_scale ? static_cast<const float*>(a.k_scale->data) : nullptr;
  s.v_scale = a.v_cache ? (a.v_scale ? static_cast<const float*>(a.v_scale->data) : nullptr) : s.k_scale;
  s.cos = a.rope_cos ? static_cast<const float*>(a.rope_cos->data) : nullptr;
  s.sin = a.rope_sin ? static_cast<const float*>(a.rope_sin->data) : nullptr;
  s.table_stride = a.rope_cos ? a.rope_cos->sizes[1] : 0;  // HF's [P, D] tables: the first halves
  s.dtype = a.k_cache->dtype;
  s.scale = 1.0f / std::sqrt(static_cast<float>(s.D));
  s.start_pos = a.start_pos;
  s.spans = &all, s.n_spans = 1;
  s.out = static_cast<float*>(a.out->data);
  return attend_spans(s);
}

namespace {

// The spans' rows in order form one sequence of n_rows; a chunk is a range of it. Calls
// f(span, first row, rows) for the pieces of chunk [c0, c1), each within one span.
template <class F>
void for_span_pieces(const SpanAttention& a, int64_t c0, int64_t c1, const F& f) {
  int64_t seq = 0;  // sequence index of the current span's first row
  for (int64_t i = 0; i < a.n_spans && seq < c1; ++i) {
    const KeySpan& sp = a.spans[i];
    const int64_t len = sp.end - sp.begin, lo = std::max(c0, seq), hi = std::min(c1, seq + len);
    if (lo < hi) f(sp, sp.begin + (lo - seq), hi - lo);
    seq += len;
  }
}

}  // namespace

Status attend_spans(const SpanAttention& a) {
  const int64_t T = a.T, H = a.H, D = a.D, G = a.G, S = a.S;
  if (T == 0) return Status{};
  if (a.past_rows > 0 && (a.k_past == nullptr || a.v_past == nullptr || a.k_scale != nullptr)) {
    return fail(QKVX_INVALID_ARGUMENT, "qkvx::attend_spans: past planes need k_past, v_past and no scales");
  }
  const int64_t R = H / G, M = R * T;
  const bool shared = a.v == a.k, rope = a.cos != nullptr;
  const TileKernel kernel = choose_kernel(D, rope);
  int64_t n_rows = 0;
  for (int64_t i = 0; i < a.n_spans; ++i) n_rows += a.spans[i].end - a.spans[i].begin;
  const int64_t row_bytes = G * D * elem_bytes(a.dtype) * (shared ? 1 : 2);  // every kv head's
  const ReadMode mode = read_mode();

  // Sequence chunks: kChunksPerThread per pool thread, none smaller than kMinChunkBytes, and
  // exactly one when single-threaded (no split and no merge cost then).
  const int64_t threads = a.pool ? a.pool->threads : thread_count();
  int64_t chunk = g_chunk_rows.load();
  if (chunk <= 0) {
    const int64_t min_rows = ceil_div(kMinChunkBytes, row_bytes > 0 ? row_bytes : 1);
    int64_t n = threads > 1 ? threads * kChunksPerThread : 1;
    if (n > ceil_div(n_rows, min_rows)) n = ceil_div(n_rows, min_rows);
    if (n < 1) n = 1;
    chunk = ceil_div(ceil_div(n_rows, n), 8) * 8;  // whole blocks of rows
  }
  const int64_t n_chunks = n_rows > 0 ? ceil_div(n_rows, chunk) : 0;
  const int64_t rope_rows = kRopeTileTableBytes / (D * static_cast<int64_t>(sizeof(float)));  // D/2 each
  int64_t tile_rows = rope ? (rope_rows > 256 ? rope_rows : 256) : chunk;
  // A before_tile hook reads the tile's rows just before the kernel does: keep them in L2.
  if (a.before_tile && tile_rows > kHookTileRows) tile_rows = kHookTileRows;

  // Queries regrouped per kv head and pre-scaled: qg [G][M][D].
  // Per chunk state: acc [G][M][D], then max [G][M], then sum [G][M].
  const int64_t state_per_chunk = G * M * (D + 2);
  std::unique_ptr<float[]> qg(new (std::nothrow) float[G * M * D]);
  std::unique_ptr<float[]> state(new (std::nothrow) float[n_chunks * state_per_chunk + 1]);
  std::unique_ptr<int64_t[]> limit(new (std::nothrow) int64_t[M]);  // last slot row m sees
  if (!qg || !state || !limit) return fail(QKVX_OUT_OF_MEMORY, "qkvx::attend: out of memory");
  for (int64_t m = 0; m < M; ++m) limit[m] = a.start_pos + m / R;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t t = m / R, h = g * R + m % R;
      const float* src = a.q + (t * H + h) * D;
      float* dst = qg.get() + (g * M + m) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.scale;
    }
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n_chunks; ++c) {
    float* s = state.get() + c * state_per_chunk;
    for (int64_t i = 0; i < G * M * D; ++i) s[i] = 0.0f;
    for (int64_t i = 0; i < G * M; ++i) s[G * M * D + i] = neg_inf, s[G * M * (D + 1) + i] = 0.0f;
  }

  const int64_t eb = elem_bytes(a.dtype), ts = a.table_stride;
  const char* kbase = static_cast<const char*>(a.k);
  const char* vbase = static_cast<const char*>(a.v);
  const char* pk = static_cast<const char*>(a.k_past);
  const char* pv = static_cast<const char*>(a.v_past);
  std::atomic<bool> oom{false};

  auto run_chunks = [&](int64_t c_begin, int64_t c_end) {
    std::unique_ptr<float[]> scratch(new (std::nothrow) float[tile_scratch_floats(D)]);
    if (!scratch) {
      oom.store(true);
      return;
    }
    for (int64_t c = c_begin; c < c_end; ++c) {
      float* s = state.get() + c * state_per_chunk;
      for_span_pieces(a, c * chunk, std::min(n_rows, (c + 1) * chunk),
                      [&](const KeySpan& sp, int64_t first, int64_t len) {
        const int64_t mb = sp.m_begin, mrows = sp.m_end - sp.m_begin, end = first + len;
        auto rows_at = [&](int64_t r0) {  // rows of the tile starting at r0: one source per tile
          const int64_t n = std::min(end - r0, tile_rows);
          return r0 < a.past_rows ? std::min(n, a.past_rows - r0) : n;
        };
        // First row of head g's tile at r0 in the past plane (rows below past_rows) or the cache.
        auto row_at = [&](const char* past, const char* cache, int64_t g, int64_t r0) {
          return r0 < a.past_rows ? past + (g * a.past_rows + r0) * D * eb : cache + (g * S + r0) * D * eb;
        };
        for (int64_t r0 = first, rows = 0; r0 < end; r0 += rows) {
          rows = rows_at(r0);
          const int64_t pos = sp.pos0 + (r0 - sp.begin);  // rotary table row of r0
          // Head g's tile; st: heads per kernel call (2: g and g + 1 as twins), which also
          // steps to the tile the same slot runs next.
          auto make = [&](int64_t g, int64_t st) {
            Tile t;
            const int64_t row = g * S + r0;  // first row of the tile in this head plane
            t.k = row_at(pk, kbase, g, r0);
            t.v = row_at(pv, vbase, g, r0);
            // The tile this thread runs next in the same slot: st heads on, or further on.
            const bool wrap = g + st >= G;
            const int64_t ng = wrap ? g % st : g + st, nr = wrap ? r0 + rows : r0;
            if (nr < end) {
              t.next_k = row_at(pk, kbase, ng, nr), t.next_v = row_at(pv, vbase, ng, nr);
              t.next_rows = rows_at(nr);
            }
            t.prefetch = mode.prefetch;
            t.shifted = mode.shifted;
            t.k_scale = a.k_scale ? a.k_scale + row : nullptr;
            t.v_scale = a.v_scale ? a.v_scale + row : nullptr;
            t.cos = rope ? a.cos + pos * ts : nullptr;
            t.sin = rope ? a.sin + pos * ts : nullptr;
            t.table_stride = ts;
            t.dtype = a.dtype;
            t.row0 = r0;
            t.rows = rows;
            t.D = D;
            t.M = mrows;
            t.q = qg.get() + (g * M + mb) * D;
            t.limit = limit.get() + mb;
            t.acc = s + (g * M + mb) * D;
            t.run_max = s + G * M * D + g * M + mb;
            t.run_sum = s + G * M * (D + 1) + g * M + mb;
            t.scratch = scratch.get();
            return t;
          };
          // One query row per kv head (decode without GQA): heads go in twos, so the kernel
          // reads two streams at once as QKV's separate K and V planes do.
          const bool twins = mrows == 1 && !a.before_tile;
          for (int64_t g = 0; g < G;) {
            const int64_t st = twins && g + 1 < G ? 2 : 1;
            Tile t = make(g, st), twin;
            if (st == 2) twin = make(g + 1, st), t.twin = &twin;
            if (a.before_tile) a.before_tile(a.tile_ctx, g, r0, rows);
            kernel(t);
            g += st;
          }
        }
      });
    }
  };
  if (a.pool != nullptr && n_chunks > 1) {
    a.pool->run(a.pool->pool, n_chunks,
                [](void* f, int64_t b, int64_t e) { (*static_cast<decltype(run_chunks)*>(f))(b, e); },
                &run_chunks);
  } else {
    run_parallel(n_chunks, run_chunks);
  }
  if (oom.load()) return fail(QKVX_OUT_OF_MEMORY, "qkvx::attend: out of memory");

  // Merge: out = sum_c e^(max_c - max) acc_c / sum_c e^(max_c - max) sum_c, skipping chunks that
  // hold no row visible to the query row.
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t t = m / R, h = g * R + m % R;
      float* dst = a.out + (t * H + h) * D;
      float mx = neg_inf;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float v = state[c * state_per_chunk + G * M * D + g * M + m];
        mx = v > mx ? v : mx;
      }
      float denom = 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float* s = state.get() + c * state_per_chunk;
        const float cmax = s[G * M * D + g * M + m];
        if (cmax == neg_inf) continue;
        const float f = n_chunks == 1 ? 1.0f : std::exp(cmax - mx);
        denom += f * s[G * M * (D + 1) + g * M + m];
        const float* acc = s + (g * M + m) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += f * acc[d];
      }
      const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  }
  return Status{};
}

}  // namespace qkvx
