// Internal interface of the qkvx kernels: argument checks, the attention driver, cache writes.
// Callers: c_api.cpp (C ABI) and et_ops.cpp (ExecuTorch operators). Both hand over qkvx_tensor
// views, so the checks and the kernels exist once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "qkvx/kernels.h"

namespace qkvx {

// Outcome of a call: code QKVX_OK or an error code, and a one-line message naming the shapes.
struct Status {
  int code = QKVX_OK;
  char message[320] = {0};
  bool ok() const { return code == QKVX_OK; }
};

// printf-style failure (message is truncated to fit).
Status fail(int code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// "[1, 4, 128, 64]" into buf.
const char* shape_str(const qkvx_tensor* t, char* buf, size_t n);

// Elements of t (the product of its sizes), and bytes per element of a qkvx dtype.
int64_t numel(const qkvx_tensor* t);
int64_t elem_bytes(int32_t dtype);

// value [1, T, G, D] fp32 vs cache [1, G, S, D] (fp32/fp16, or int8 when int8) and start_pos.
Status check_update(const qkvx_tensor* value, const qkvx_tensor* cache, int64_t start_pos,
                    bool int8);
// scale fp32 [1, G, S, 1] beside cache [1, G, S, D].
Status check_scale(const char* op, const char* name, const qkvx_tensor* scale,
                   const qkvx_tensor* cache);

Status update_cache(const qkvx_tensor* value, qkvx_tensor* cache, int64_t start_pos);
Status update_cache_int8(const qkvx_tensor* value, qkvx_tensor* cache, qkvx_tensor* scale,
                         int64_t start_pos);

// Asks Linux for transparent huge pages on the cache's 2 MiB-aligned interior (huge_pages.cpp)
// before a write of `rows` rows at start_pos: unless the write continues the previous one to the
// same addresses. A no-op elsewhere or with QKVX_HUGE_PAGES=0.
void prefer_huge_pages(const qkvx_tensor* cache, int64_t start_pos, int64_t rows);

struct AttendArgs {
  const qkvx_tensor* q = nullptr;        // fp32 [1, T, H, D]
  const qkvx_tensor* k_cache = nullptr;  // [1, G, S, D]
  const qkvx_tensor* v_cache = nullptr;  // nullptr: K=V
  const qkvx_tensor* k_scale = nullptr;  // [1, G, S, 1] iff int8
  const qkvx_tensor* v_scale = nullptr;
  const qkvx_tensor* rope_cos = nullptr;  // [P, D] or nullptr
  const qkvx_tensor* rope_sin = nullptr;
  int64_t start_pos = 0;
  qkvx_tensor* out = nullptr;  // fp32 [1, T, H, D]
};

Status check_attend(const AttendArgs& a);
Status attend(const AttendArgs& a);  // checks, then computes: one KeySpan over the causal prefix

// A run of consecutive cache rows [begin, end) that query rows [m_begin, m_end) may read (row m
// only up to its limit); row j is rotated with table row pos0 + (j - begin). attend() reads one
// span, 0 .. start_pos + T - 1; a caller with padding masks (the onnxruntime op) reads the runs of
// unmasked rows, so masked rows are never touched.
struct KeySpan {
  int64_t begin = 0, end = 0, pos0 = 0, m_begin = 0, m_end = 0;
};

// Splits n items over some pool: calls fn(fn_ctx, i, i + 1) for every i in [0, n), then returns.
struct Pool {
  void (*run)(void* pool, int64_t n, void (*fn)(void*, int64_t, int64_t), void* fn_ctx) = nullptr;
  void* pool = nullptr;
  int64_t threads = 1;  // how many run at once (sets the number of sequence chunks)
};

// One sequence of attention over explicit spans, on pointers the caller has checked. Shapes as
// in AttendArgs without the batch: q / out [T, H, D] fp32, caches [G, S, D]; query t sits at slot
// start_pos + t and reads span rows up to it (M = R * T query rows per kv head, row m = t * R + r is
// query head g * R + r at token t).
struct SpanAttention {
  const float* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;  // == k for K=V
  const float* k_scale = nullptr;  // [G, S] iff int8
  const float* v_scale = nullptr;
  const float* cos = nullptr;  // rotary tables, rows table_stride floats apart, or null
  const float* sin = nullptr;
  int64_t table_stride = 0;
  int32_t dtype = QKVX_FLOAT32;
  int64_t T = 0, H = 0, G = 0, S = 0, D = 0;
  float scale = 0.0f;
  int64_t start_pos = 0;
  const KeySpan* spans = nullptr;
  int64_t n_spans = 0;
  float* out = nullptr;
  const Pool* pool = nullptr;  // null: qkvx's own (ExecuTorch's threadpool when built with it)
  // Rows below past_rows are read from k_past / v_past [G, past_rows, D] (fp32 / fp16, v_past ==
  // k_past for K=V) instead of k / v: the onnxruntime op reads its past input while it writes the
  // present. Tiles never straddle past_rows.
  const void* k_past = nullptr;
  const void* v_past = nullptr;
  int64_t past_rows = 0;
  // Called right before the tile kernel reads rows [row0, row0 + rows) of kv head g, on the
  // thread that runs it (the onnxruntime op copies them into its present: read once, used twice).
  void (*before_tile)(void* ctx, int64_t g, int64_t row0, int64_t rows) = nullptr;
  void* tile_ctx = nullptr;
};
// A query row no span lets see any key gets zeros.
Status attend_spans(const SpanAttention& a);

// The spans of one sequence of S = P + T slots under a padding mask [S] (nonzero = real token),
// T queries at slots P .. S - 1, R query rows per token: query t sees key j iff (j <= P + t and
// mask[j]) or j = P + t, and key j's rotary position is max(cumsum(mask)[j] - 1, 0). Each run of
// real tokens is one span for every query row (positions rise by one a row inside it); a masked new
// token is a one-row span for its own query rows. Fails when a position reaches max_pos (> 0).
Status spans_from_mask(const int64_t* mask, int64_t S, int64_t T, int64_t R, int64_t max_pos,
                       std::vector<KeySpan>& spans);

// Runtime knobs (process-wide).
// "portable" | "avx2" | "avx512" | "neon": the best path at most this one (usable on this CPU);
// null or "": the runtime choice.
Status force_simd_path(const char* name);
void set_chunk_rows(int64_t rows);  // 0 = automatic
// How tiles read the cache (Tile::prefetch, Tile::shifted): 0 / 1 forces a choice, -1 restores
// the one made for this CPU.
void force_read_mode(int prefetch, int shifted);
int64_t chunk_rows();
const char* simd_path();

}  // namespace qkvx
