// C ABI (include/qkvx/kernels.h) over the C++ core: the error message of the last failed call is
// kept per thread for qkvx_last_error().
#include <cstdio>

#include "core.h"
#include "parallel.h"

namespace {
thread_local char g_last_error[320] = {0};

int finish(const qkvx::Status& s) {
  if (s.ok()) {
    g_last_error[0] = '\0';
  } else {
    std::snprintf(g_last_error, sizeof g_last_error, "%s", s.message);
  }
  return s.code;
}
}  // namespace

extern "C" {

int qkvx_update_cache(const qkvx_tensor* value, qkvx_tensor* cache, int64_t start_pos) {
  return finish(qkvx::update_cache(value, cache, start_pos));
}

int qkvx_update_cache_int8(const qkvx_tensor* value, qkvx_tensor* cache, qkvx_tensor* scale,
                           int64_t start_pos) {
  return finish(qkvx::update_cache_int8(value, cache, scale, start_pos));
}

int qkvx_attend(const qkvx_tensor* q, const qkvx_tensor* k_cache, const qkvx_tensor* v_cache,
                const qkvx_tensor* k_scale, const qkvx_tensor* v_scale,
                const qkvx_tensor* rope_cos, const qkvx_tensor* rope_sin, int64_t start_pos,
                qkvx_tensor* out) {
  qkvx::AttendArgs a;
  a.q = q;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.k_scale = k_scale;
  a.v_scale = v_scale;
  a.rope_cos = rope_cos;
  a.rope_sin = rope_sin;
  a.start_pos = start_pos;
  a.out = out;
  return finish(qkvx::attend(a));
}

const char* qkvx_last_error(void) { return g_last_error; }

int qkvx_set_num_threads(int n) { return static_cast<int>(qkvx::set_thread_count(n)); }
int qkvx_num_threads(void) { return static_cast<int>(qkvx::thread_count()); }
const char* qkvx_simd_path(void) { return qkvx::simd_path(); }

int qkvx_force_simd_path(const char* name) { return finish(qkvx::force_simd_path(name)); }

void qkvx_force_read_mode(int prefetch, int shifted) { qkvx::force_read_mode(prefetch, shifted); }

int64_t qkvx_set_chunk_rows(int64_t rows) {
  const int64_t prev = qkvx::chunk_rows();
  qkvx::set_chunk_rows(rows);
  return prev;
}

}  // extern "C"
