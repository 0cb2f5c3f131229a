/*
 * qkvx kernels, C ABI: the one entry point shared by every caller that is not ExecuTorch itself
 * (Python ctypes for PyTorch eager, the C++ tests, an app that wants the kernels without a .pte).
 * The ExecuTorch operator wrappers (et_ops.cpp) call the same C++ core.
 *
 * Every tensor is passed as a qkvx_tensor: a contiguous buffer, its dtype code and its sizes.
 * An absent optional tensor (PyTorch None) is passed as a NULL pointer. The caller guarantees
 * contiguity (row-major); everything else (ranks, sizes, dtypes, ranges) is checked here and a
 * violation returns QKVX_INVALID_ARGUMENT with a one-line message from qkvx_last_error().
 */
#ifndef QKVX_KERNELS_H
#define QKVX_KERNELS_H

#include <stdint.h>

#if defined(_WIN32)
#define QKVX_API
#else
#define QKVX_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* dtype codes: the PyTorch / ExecuTorch ScalarType numbers, so wrappers pass them through. */
enum { QKVX_INT8 = 1, QKVX_FLOAT16 = 5, QKVX_FLOAT32 = 6 };

/* return codes */
enum { QKVX_OK = 0, QKVX_INVALID_ARGUMENT = 1, QKVX_OUT_OF_MEMORY = 2 };

typedef struct qkvx_tensor {
  void* data;        /* first element, row-major contiguous */
  int32_t dtype;     /* QKVX_INT8 | QKVX_FLOAT16 | QKVX_FLOAT32 (others are rejected) */
  int32_t ndim;      /* 0..4 */
  int64_t sizes[4];  /* sizes[0..ndim) */
} qkvx_tensor;

/* value fp32 [1, T, G, D] -> rows start_pos .. start_pos+T-1 of every head plane of
 * cache [1, G, S, D] (fp32, or fp16 rounded to nearest even). */
QKVX_API int qkvx_update_cache(const qkvx_tensor* value, qkvx_tensor* cache, int64_t start_pos);

/* value fp32 [1, T, G, D] -> cache int8 [1, G, S, D] and scale fp32 [1, G, S, 1]: per (token,
 * kv head) scale = max(max|x|, 1e-12) / 127, q = round_half_even(x / scale) clamped to
 * [-127, 127] (qkvx/quant/kv.py quantize_int8; an all-zero row gets scale 1e-12/127, q = 0). */
QKVX_API int qkvx_update_cache_int8(const qkvx_tensor* value, qkvx_tensor* cache, qkvx_tensor* scale,
                           int64_t start_pos);

/* Causal attention of q fp32 [1, T, H, D] (query t at absolute position start_pos + t) over rows
 * 0 .. start_pos+T-1 of k_cache [1, G, S, D] (fp32 | fp16 | int8). v_cache NULL: K=V, the same
 * rows are the values; else same shape and dtype as k_cache. k_scale / v_scale [1, G, S, 1] fp32
 * iff int8 (K=V: k_scale only). rope_cos / rope_sin [P, D/2] fp32 (P >= start_pos + T) or both
 * NULL: key row s is rotated with position s while read (HF rotate_half); values are used as
 * stored. HF's full [P, D] tables (which repeat the halves) are taken too: their first D/2 columns.
 * Query head h reads kv head h / (H / G); scale 1/sqrt(D). out fp32 [1, T, H, D]. */
QKVX_API int qkvx_attend(const qkvx_tensor* q, const qkvx_tensor* k_cache, const qkvx_tensor* v_cache,
                const qkvx_tensor* k_scale, const qkvx_tensor* v_scale,
                const qkvx_tensor* rope_cos, const qkvx_tensor* rope_sin, int64_t start_pos,
                qkvx_tensor* out);

/* The message of this thread's last failed call ("" if none). */
QKVX_API const char* qkvx_last_error(void);

/* Threads of the pool the kernels split work over (ExecuTorch's threadpool when built with it;
 * shared with XNNPACK and the ExecuTorch runtime in the same process). Returns the count in
 * effect afterwards; 1 when built without a threadpool. Setting it replaces the pool: call it
 * only while no other thread runs work on the pool (ExecuTorch's _unsafe_reset_threadpool). */
QKVX_API int qkvx_set_num_threads(int n);
QKVX_API int qkvx_num_threads(void);

/* Which vectorized path the attention takes on this CPU: "avx512", "avx2", "neon" or "portable"
 * (head sizes a path cannot split into whole vectors fall back to the next one). */
QKVX_API const char* qkvx_simd_path(void);

/* Testing: take at most the named path ("portable", "avx2", "avx512", "neon"); NULL or "" restores
 * the runtime choice. An unknown name, or a path this CPU lacks, is an error (the choice stays). */
QKVX_API int qkvx_force_simd_path(const char* name);

/* Testing: rows per sequence chunk when the work is split (0 = automatic). Lets a test put
 * chunk boundaries anywhere. Returns the previous value. */
QKVX_API int64_t qkvx_set_chunk_rows(int64_t rows);

/* Testing: how the attention reads cache rows, chosen per CPU (README, "Long context"): prefetch =
 * software prefetches of the rows ahead; shifted = fp32 rows off a 64-byte line read as aligned
 * lines shifted into place (AVX-512) instead of with loads spanning two lines. 0 or 1 forces a
 * choice, -1 restores the one made for this CPU. The results are the same either way. */
QKVX_API void qkvx_force_read_mode(int prefetch, int shifted);

#ifdef __cplusplus
}
#endif

#endif /* QKVX_KERNELS_H */
