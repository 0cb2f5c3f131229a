// Argument checks of the three ops, shared by the C ABI and the ExecuTorch wrappers: a bad rank,
// size, dtype or position returns QKVX_INVALID_ARGUMENT and a one-line message naming the shapes;
// nothing past these checks can index outside a buffer.
#include <cstdarg>
#include <cstdio>
#include <initializer_list>

#include "core.h"

namespace qkvx {

Status fail(int code, const char* fmt, ...) {
  Status s;
  s.code = code;
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(s.message, sizeof s.message, fmt, ap);
  va_end(ap);
  return s;
}

const char* shape_str(const qkvx_tensor* t, char* buf, size_t n) {
  if (t == nullptr) {
    std::snprintf(buf, n, "None");
    return buf;
  }
  size_t used = static_cast<size_t>(std::snprintf(buf, n, "["));
  for (int i = 0; i < t->ndim && i < 4 && used < n; ++i) {
    used += static_cast<size_t>(
        std::snprintf(buf + used, n - used, "%s%lld", i ? ", " : "", (long long)t->sizes[i]));
  }
  if (used < n) std::snprintf(buf + used, n - used, "]");
  return buf;
}

int64_t numel(const qkvx_tensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->sizes[i];
  return n;
}

int64_t elem_bytes(int32_t dtype) { return dtype == QKVX_FLOAT32 ? 4 : dtype == QKVX_FLOAT16 ? 2 : 1; }

namespace {

const char* dtype_name(int32_t d) {
  switch (d) {
    case QKVX_FLOAT32: return "float32";
    case QKVX_FLOAT16: return "float16";
    case QKVX_INT8: return "int8";
    default: return "an unsupported dtype";
  }
}

bool same_shape(const qkvx_tensor* a, const qkvx_tensor* b) {
  if (a->ndim != b->ndim) return false;
  for (int i = 0; i < a->ndim; ++i) {
    if (a->sizes[i] != b->sizes[i]) return false;
  }
  return true;
}

bool has_data(const qkvx_tensor* t) { return numel(t) == 0 || t->data != nullptr; }

// A rank-4 tensor [1, a, b, c] of one of the allowed dtypes with non-negative sizes.
Status check_rank4(const char* op, const char* name, const qkvx_tensor* t, bool f32, bool f16,
                   bool i8) {
  char s[96];
  if (t == nullptr) return fail(QKVX_INVALID_ARGUMENT, "%s: %s is required", op, name);
  if (t->ndim != 4) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: %s %s must have 4 dims", op, name,
                shape_str(t, s, sizeof s));
  }
  for (int i = 0; i < 4; ++i) {
    if (t->sizes[i] < 0) {
      return fail(QKVX_INVALID_ARGUMENT, "%s: %s %s has a negative size", op, name,
                  shape_str(t, s, sizeof s));
    }
  }
  if (t->sizes[0] != 1) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: %s %s: batch must be 1", op, name,
                shape_str(t, s, sizeof s));
  }
  const bool ok = (f32 && t->dtype == QKVX_FLOAT32) || (f16 && t->dtype == QKVX_FLOAT16) ||
                  (i8 && t->dtype == QKVX_INT8);
  if (!ok) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: %s %s is %s, which this argument does not take", op,
                name, shape_str(t, s, sizeof s), dtype_name(t->dtype));
  }
  if (!has_data(t)) return fail(QKVX_INVALID_ARGUMENT, "%s: %s has no data", op, name);
  return Status{};
}

// value [1, T, G, D] against cache [1, G, S, D] and start_pos.
Status check_value_vs_cache(const char* op, const qkvx_tensor* value, const qkvx_tensor* cache,
                            int64_t start_pos) {
  char a[96], b[96];
  if (value->sizes[2] != cache->sizes[1] || value->sizes[3] != cache->sizes[3]) {
    return fail(QKVX_INVALID_ARGUMENT,
                "%s: value %s [1, T, G, D] does not match cache %s [1, G, S, D] in G or D", op,
                shape_str(value, a, sizeof a), shape_str(cache, b, sizeof b));
  }
  const int64_t T = value->sizes[1], S = cache->sizes[2];
  if (start_pos < 0 || start_pos > S - T) {
    return fail(QKVX_INVALID_ARGUMENT,
                "%s: start_pos %lld + %lld tokens outside cache %s (max_seq_len %lld)", op,
                (long long)start_pos, (long long)T, shape_str(cache, b, sizeof b), (long long)S);
  }
  return Status{};
}

}  // namespace

Status check_update(const qkvx_tensor* value, const qkvx_tensor* cache, int64_t start_pos,
                    bool int8) {
  const char* op = int8 ? "qkvx::update_cache_int8" : "qkvx::update_cache";
  Status s = check_rank4(op, "value", value, true, false, false);
  if (s.ok()) s = check_rank4(op, "cache", cache, !int8, !int8, int8);
  if (s.ok()) s = check_value_vs_cache(op, value, cache, start_pos);
  return s;
}

Status check_scale(const char* op, const char* name, const qkvx_tensor* scale,
                   const qkvx_tensor* cache) {
  char a[96], b[96];
  Status s = check_rank4(op, name, scale, true, false, false);
  if (!s.ok()) return s;
  if (scale->sizes[1] != cache->sizes[1] || scale->sizes[2] != cache->sizes[2] ||
      scale->sizes[3] != 1) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: %s %s must be [1, G, S, 1] for cache %s", op, name,
                shape_str(scale, a, sizeof a), shape_str(cache, b, sizeof b));
  }
  return Status{};
}

Status check_attend(const AttendArgs& x) {
  const char* op = "qkvx::attend";
  char a[96], b[96];
  Status s = check_rank4(op, "q", x.q, true, false, false);
  if (s.ok()) s = check_rank4(op, "k_cache", x.k_cache, true, true, true);
  if (!s.ok()) return s;
  const qkvx_tensor *q = x.q, *k = x.k_cache;
  const int64_t T = q->sizes[1], H = q->sizes[2], D = q->sizes[3];
  const int64_t G = k->sizes[1], S = k->sizes[2];
  if (k->sizes[3] != D || D == 0) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: q %s and k_cache %s: head_dim differs (or is 0)", op,
                shape_str(q, a, sizeof a), shape_str(k, b, sizeof b));
  }
  if (G == 0 || H % G != 0) {
    return fail(QKVX_INVALID_ARGUMENT,
                "%s: q %s has %lld heads, not a multiple of k_cache %s's %lld kv heads", op,
                shape_str(q, a, sizeof a), (long long)H, shape_str(k, b, sizeof b), (long long)G);
  }
  if (x.start_pos < 0 || x.start_pos > S - T) {
    return fail(QKVX_INVALID_ARGUMENT,
                "%s: start_pos %lld + %lld queries outside k_cache %s (max_seq_len %lld)", op,
                (long long)x.start_pos, (long long)T, shape_str(k, b, sizeof b), (long long)S);
  }
  if (x.v_cache != nullptr) {
    s = check_rank4(op, "v_cache", x.v_cache, true, true, true);
    if (!s.ok()) return s;
    if (!same_shape(x.v_cache, k) || x.v_cache->dtype != k->dtype) {
      return fail(QKVX_INVALID_ARGUMENT, "%s: v_cache %s (%s) differs from k_cache %s (%s)", op,
                  shape_str(x.v_cache, a, sizeof a), dtype_name(x.v_cache->dtype),
                  shape_str(k, b, sizeof b), dtype_name(k->dtype));
    }
  }
  if (k->dtype == QKVX_INT8) {
    s = check_scale(op, "k_scale", x.k_scale, k);
    if (!s.ok()) return s;
    if (x.v_cache != nullptr) {
      s = check_scale(op, "v_scale", x.v_scale, k);
      if (!s.ok()) return s;
    } else if (x.v_scale != nullptr) {
      return fail(QKVX_INVALID_ARGUMENT, "%s: K=V (v_cache None) takes k_scale only, got v_scale",
                  op);
    }
  } else if (x.k_scale != nullptr || x.v_scale != nullptr) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: k_scale / v_scale are for an int8 cache; k_cache is %s",
                op, dtype_name(k->dtype));
  }
  if ((x.rope_cos == nullptr) != (x.rope_sin == nullptr)) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: rope_cos and rope_sin come together", op);
  }
  for (const qkvx_tensor* r : {x.rope_cos, x.rope_sin}) {
    if (r == nullptr) continue;
    if (r->ndim != 2 || r->dtype != QKVX_FLOAT32 || D % 2 != 0 ||
        (r->sizes[1] != D / 2 && r->sizes[1] != D) || r->sizes[1] != x.rope_cos->sizes[1] ||
        r->sizes[0] < x.start_pos + T || !has_data(r)) {
      return fail(QKVX_INVALID_ARGUMENT,
                  "%s: rope table %s must be float32 [P >= %lld, D / 2 = %lld] (or HF's [P, D]), "
                  "cos and sin alike, with D even",
                  op, shape_str(r, a, sizeof a), (long long)(x.start_pos + T), (long long)(D / 2));
    }
  }
  s = check_rank4(op, "out", x.out, true, false, false);
  if (!s.ok()) return s;
  if (!same_shape(x.out, q)) {
    return fail(QKVX_INVALID_ARGUMENT, "%s: out %s must have q's shape %s", op,
                shape_str(x.out, a, sizeof a), shape_str(q, b, sizeof b));
  }
  return Status{};
}

}  // namespace qkvx
