// Cache writes against independent expectations, and every argument check returning an error.
#include <cmath>
#include <cstring>
#include <string>

#include "reference.h"
#include "test_util.h"

namespace tu {

void run_update_tests() {
  const int64_t T = 3, G = 2, S = 9, D = 8, start = 5;
  Rng rng(77);
  std::vector<float> value(T * G * D);
  for (float& x : value) x = rng.uniform(-3.0f, 3.0f);
  value[0] = 1.0f + 1.0f / 2048.0f;       // exactly half way between two halves: ties to even
  value[1] = 1.0f + 3.0f / 2048.0f;       // the other tie direction
  value[2] = 70000.0f;                    // past the largest half: inf
  value[3] = 3.0e-8f;                     // a subnormal half
  for (int64_t d = 0; d < D; ++d) value[(1 * G + 1) * D + d] = 0.0f;  // an all-zero row (t=1, g=1)
  const qkvx_tensor vt = view(value.data(), QKVX_FLOAT32, {1, T, G, D});

  std::vector<float> c32(G * S * D, -9.0f);
  qkvx_tensor ct = view(c32.data(), QKVX_FLOAT32, {1, G, S, D});
  CHECK(qkvx_update_cache(&vt, &ct, start) == QKVX_OK, "update fp32: %s", qkvx_last_error());
  bool ok = true;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) {
        const float got = c32[(g * S + s) * D + d];
        const float want = (s >= start && s < start + T) ? value[((s - start) * G + g) * D + d] : -9.0f;
        ok = ok && std::memcmp(&got, &want, 4) == 0;
      }
  CHECK(ok, "update fp32: rows land at [g][start + t], other rows untouched");

  std::vector<uint16_t> c16(G * S * D, 0x1234);
  qkvx_tensor ht = view(c16.data(), QKVX_FLOAT16, {1, G, S, D});
  CHECK(qkvx_update_cache(&vt, &ht, start) == QKVX_OK, "update fp16: %s", qkvx_last_error());
  ok = true;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) {
        const double x = value[(t * G + g) * D + d];
        const uint16_t h = c16[(g * S + start + t) * D + d];
        // nearest representable half: no neighbour (h +- 1 ulp) is closer; ties -> even mantissa
        const double got = ref::half_value(h);
        if (std::fabs(x) > 65520.0) { ok = ok && std::isinf(got); continue; }
        for (int step : {-1, 1}) {
          const double nb = ref::half_value(static_cast<uint16_t>(h + step));
          if (std::isnan(nb) || std::isinf(nb)) continue;
          const double a = std::fabs(got - x), b = std::fabs(nb - x);
          ok = ok && (a < b || (a == b && (h & 1) == 0));
        }
      }
  CHECK(ok && c16[0] == 0x1234 && c16[(0 * S + start) * D] == 0x3c00 &&
            c16[(0 * S + start) * D + 1] == 0x3c02,
        "update fp16: round to nearest even, other rows untouched");

  std::vector<int8_t> c8(G * S * D, 55);
  std::vector<float> sc(G * S, -1.0f);
  qkvx_tensor qt = view(c8.data(), QKVX_INT8, {1, G, S, D});
  qkvx_tensor st = view(sc.data(), QKVX_FLOAT32, {1, G, S, 1});
  CHECK(qkvx_update_cache_int8(&vt, &qt, &st, start) == QKVX_OK, "int8: %s", qkvx_last_error());
  ok = true;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      double amax = 0.0;
      for (int64_t d = 0; d < D; ++d) amax = std::fmax(amax, std::fabs(value[(t * G + g) * D + d]));
      const double s = sc[g * S + start + t];
      const double want_s = std::fmax(amax, 1e-12) / 127.0;
      ok = ok && std::fabs(s - want_s) <= 1e-6 * want_s;
      for (int64_t d = 0; d < D; ++d) {
        const double x = value[(t * G + g) * D + d];
        const int q = c8[(g * S + start + t) * D + d];
        ok = ok && q >= -127 && q <= 127 && std::fabs(q * s - x) <= 0.5 * s * (1 + 1e-5);
        if (amax == 0.0) ok = ok && q == 0;
      }
    }
  CHECK(ok && c8[0] == 55 && sc[0] == -1.0f && std::fabs(sc[1 * S + start + 1] - 1e-12 / 127) < 1e-18,
        "update int8: per (token, head) scale max|x|/127, |q*scale - x| <= scale/2, zero row");
}

void run_error_tests() {
  const int64_t H = 4, G = 2, S = 16, D = 8;
  std::vector<float> q(2 * H * D, 0.5f), kc(G * S * D, 0.1f), out(2 * H * D), sc(G * S, 0.1f),
      rope(S * D, 0.5f);
  std::vector<int8_t> k8(G * S * D, 1);
  qkvx_tensor qv = view(q.data(), QKVX_FLOAT32, {1, 2, H, D});
  qkvx_tensor kv = view(kc.data(), QKVX_FLOAT32, {1, G, S, D});
  qkvx_tensor k8v = view(k8.data(), QKVX_INT8, {1, G, S, D});
  qkvx_tensor sv = view(sc.data(), QKVX_FLOAT32, {1, G, S, 1});
  qkvx_tensor ov = view(out.data(), QKVX_FLOAT32, {1, 2, H, D});
  qkvx_tensor rv = view(rope.data(), QKVX_FLOAT32, {S, D / 2});
  auto expect_error = [](int rc, const char* what) {
    CHECK(rc == QKVX_INVALID_ARGUMENT && std::strlen(qkvx_last_error()) > 10 &&
              std::strchr(qkvx_last_error(), '\n') == nullptr,
          "%s: want one-line InvalidArgument, got rc %d '%s'", what, rc, qkvx_last_error());
  };
  CHECK(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 3, &ov) == QKVX_OK,
        "valid call: %s", qkvx_last_error());
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, -1, &ov), "start -1");
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 15, &ov), "start+T > S");
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, INT64_MAX, &ov), "huge start");
  expect_error(qkvx_attend(&qv, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &ov), "no k_cache");
  qkvx_tensor bad = view(q.data(), QKVX_FLOAT32, {1, 2, 3, D});  // 3 heads over 2 kv heads
  qkvx_tensor bad_out = view(out.data(), QKVX_FLOAT32, {1, 2, 3, D});
  expect_error(qkvx_attend(&bad, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &bad_out), "H % G");
  bad = view(q.data(), QKVX_FLOAT32, {1, 2, 8, 4});  // head_dim 4 vs 8
  expect_error(qkvx_attend(&bad, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &ov), "D differs");
  bad = view(q.data(), QKVX_FLOAT32, {2, 1, H, D});
  expect_error(qkvx_attend(&bad, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &ov), "batch 2");
  bad = view(q.data(), QKVX_FLOAT16, {1, 2, H, D});
  expect_error(qkvx_attend(&bad, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &ov), "fp16 q");
  bad = view(q.data(), QKVX_FLOAT32, {2, H, D});
  expect_error(qkvx_attend(&bad, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &ov), "3-dim q");
  qkvx_tensor other = view(kc.data(), QKVX_FLOAT32, {1, G, S - 1, D});
  expect_error(qkvx_attend(&qv, &kv, &other, nullptr, nullptr, nullptr, nullptr, 0, &ov), "v shape");
  expect_error(qkvx_attend(&qv, &kv, &k8v, nullptr, nullptr, nullptr, nullptr, 0, &ov), "v dtype");
  expect_error(qkvx_attend(&qv, &k8v, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &ov), "int8 no scale");
  expect_error(qkvx_attend(&qv, &k8v, nullptr, &sv, &sv, nullptr, nullptr, 0, &ov), "K=V with v_scale");
  expect_error(qkvx_attend(&qv, &k8v, &k8v, &sv, nullptr, nullptr, nullptr, 0, &ov), "int8 no v_scale");
  expect_error(qkvx_attend(&qv, &kv, nullptr, &sv, nullptr, nullptr, nullptr, 0, &ov), "scale on fp32");
  other = view(sc.data(), QKVX_FLOAT32, {1, G, S, 2});
  expect_error(qkvx_attend(&qv, &k8v, nullptr, &other, nullptr, nullptr, nullptr, 0, &ov), "scale shape");
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, &rv, nullptr, 0, &ov), "cos only");
  qkvx_tensor short_rope = view(rope.data(), QKVX_FLOAT32, {4, D / 2});
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, &short_rope, &short_rope, 3, &ov), "rope short");
  other = view(rope.data(), QKVX_FLOAT32, {S, D / 2 + 1});
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, &other, &other, 0, &ov), "rope width");
  qkvx_tensor wide = view(rope.data(), QKVX_FLOAT32, {S / 2, D});
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, &rv, &wide, 0, &ov), "cos / sin widths");
  other = view(out.data(), QKVX_FLOAT32, {1, 1, H, D});
  expect_error(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, nullptr, nullptr, 0, &other), "out shape");
  expect_error(qkvx_force_simd_path("sse9"), "unknown simd path");
  CHECK(std::strcmp(qkvx_simd_path(), "portable") != 0 || qkvx_force_simd_path("avx2") != QKVX_OK,
        "an unknown path name leaves the runtime choice");
  CHECK(qkvx_attend(&qv, &kv, nullptr, nullptr, nullptr, &rv, &rv, 14, &ov) == QKVX_OK,
        "valid rope call at the last position: %s", qkvx_last_error());

  qkvx_tensor val = view(q.data(), QKVX_FLOAT32, {1, 2, G, D});
  expect_error(qkvx_update_cache(&val, &kv, 15), "update past S");
  expect_error(qkvx_update_cache(&val, &kv, -2), "update start -2");
  expect_error(qkvx_update_cache(&val, &k8v, 0), "update into int8");
  qkvx_tensor val3 = view(q.data(), QKVX_FLOAT32, {1, 2, 4, 4});
  expect_error(qkvx_update_cache(&val3, &kv, 0), "update G/D mismatch");
  expect_error(qkvx_update_cache_int8(&val, &k8v, &other, 0), "update_int8 scale shape");
  expect_error(qkvx_update_cache_int8(&val, &kv, &sv, 0), "update_int8 into fp32");
  expect_error(qkvx_update_cache_int8(&val, &k8v, &sv, 15), "update_int8 past S");
  CHECK(qkvx_update_cache_int8(&val, &k8v, &sv, 14) == QKVX_OK, "update_int8 at the end: %s",
        qkvx_last_error());
}

}  // namespace tu
