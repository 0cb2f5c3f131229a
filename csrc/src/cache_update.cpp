// Cache writes: the projection's new rows value [1, T, G, D] (tokens before heads, as the graph
// produces them) land at rows start_pos .. start_pos+T-1 of each head plane of a [1, G, S, D]
// cache (heads before tokens, so attention streams each head's rows contiguously).
#include <cmath>
#include <cstring>

#include "core.h"
#include "half.h"

namespace qkvx {

Status update_cache(const qkvx_tensor* value, qkvx_tensor* cache, int64_t start_pos) {
  Status st = check_update(value, cache, start_pos, false);
  if (!st.ok()) return st;
  prefer_huge_pages(cache, start_pos, value->sizes[1]);
  const int64_t T = value->sizes[1], G = value->sizes[2], D = value->sizes[3];
  const int64_t S = cache->sizes[2];
  const float* src = static_cast<const float*>(value->data);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const float* x = src + (t * G + g) * D;
      const int64_t row = (g * S + start_pos + t) * D;
      if (cache->dtype == QKVX_FLOAT32) {
        std::memcpy(static_cast<float*>(cache->data) + row, x, D * sizeof(float));
      } else {
        uint16_t* dst = static_cast<uint16_t*>(cache->data) + row;
        for (int64_t d = 0; d < D; ++d) dst[d] = float_to_half(x[d]);
      }
    }
  }
  return st;
}

// Symmetric int8 per (token, kv head), the arithmetic of qkvx/quant/kv.py quantize_int8 step for
// step in fp32, so an ONNX and a .pte int8 cache hold the same bytes:
//   scale = max(max|x|, 1e-12) / 127;  q = clamp(round_half_even(x / scale), -127, 127)
// An all-zero row gets scale 1e-12/127 and q = 0 (it then contributes 0 to scores and values).
Status update_cache_int8(const qkvx_tensor* value, qkvx_tensor* cache, qkvx_tensor* scale,
                         int64_t start_pos) {
  Status st = check_update(value, cache, start_pos, true);
  if (st.ok()) st = check_scale("qkvx::update_cache_int8", "scale", scale, cache);
  if (!st.ok()) return st;
  prefer_huge_pages(cache, start_pos, value->sizes[1]);
  const int64_t T = value->sizes[1], G = value->sizes[2], D = value->sizes[3];
  const int64_t S = cache->sizes[2];
  const float* src = static_cast<const float*>(value->data);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const float* x = src + (t * G + g) * D;
      float amax = 0.0f;
      for (int64_t d = 0; d < D; ++d) amax = std::fmax(amax, std::fabs(x[d]));
      const float s = std::fmax(amax, 1e-12f) / 127.0f;
      const int64_t pos = g * S + start_pos + t;
      int8_t* dst = static_cast<int8_t*>(cache->data) + pos * D;
      for (int64_t d = 0; d < D; ++d) {
        float r = std::nearbyint(x[d] / s);  // default rounding mode: to nearest, ties to even
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        dst[d] = static_cast<int8_t>(r);
      }
      static_cast<float*>(scale->data)[pos] = s;
    }
  }
  return st;
}

}  // namespace qkvx
