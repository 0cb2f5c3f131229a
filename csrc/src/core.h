// Internal interface of the qkvx kernels: argument checks, the attention driver, cache writes.
// Callers: c_api.cpp (C ABI) and et_ops.cpp (ExecuTorch operators). Both hand over qkvx_tensor
// views, so the checks and the kernels exist once.
#pragma once

#include <cstddef>
#include <cstdint>

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

// value [1, T, G, D] fp32 vs cache [1, G, S, D] (fp32/fp16, or int8 when int8) and start_pos.
Status check_update(const qkvx_tensor* value, const qkvx_tensor* cache, int64_t start_pos,
                    bool int8);
// scale fp32 [1, G, S, 1] beside cache [1, G, S, D].
Status check_scale(const char* op, const char* name, const qkvx_tensor* scale,
                   const qkvx_tensor* cache);

Status update_cache(const qkvx_tensor* value, qkvx_tensor* cache, int64_t start_pos);
Status update_cache_int8(const qkvx_tensor* value, qkvx_tensor* cache, qkvx_tensor* scale,
                         int64_t start_pos);

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
Status attend(const AttendArgs& a);  // checks, then computes

// Runtime knobs (process-wide).
// "portable" | "avx2" | "avx512" | "neon": the best path at most this one (usable on this CPU);
// null or "": the runtime choice.
Status force_simd_path(const char* name);
void set_chunk_rows(int64_t rows);  // 0 = automatic
int64_t chunk_rows();
const char* simd_path();

}  // namespace qkvx
