// The span driver under padding masks (what the onnxruntime op runs): spans_from_mask +
// attend_spans against ref::attend_masked, on every path this CPU has, with chunk edges forced
// inside the spans and through a caller's pool. Masked rows hold NaN (cache, scales and their
// rotary rows are never read when masked), so reading one shows up as a NaN output.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core.h"
#include "reference.h"
#include "test_util.h"

namespace tu {
namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();

struct MaskCase {
  int64_t T, H, G, P, D;
  int dtype;
  bool shared, rope;
  std::vector<std::pair<int64_t, int64_t>> padding;  // masked slot ranges [a, b)
  uint32_t seed;
};

void fill(ref::Cache& c, const MaskCase& k, const std::vector<int64_t>& mask, Rng& rng) {
  const int64_t S = k.P + k.T, n = k.G * S * k.D;
  c.dtype = k.dtype;
  c.f32.assign(n, kNaN);
  c.f16.assign(n, 0x7e00);
  c.i8.assign(n, 0);
  c.scale.assign(k.G * S, kNaN);
  for (int64_t g = 0; g < k.G; ++g) {
    for (int64_t s = 0; s < S; ++s) {
      if (mask[s] == 0 && s < k.P) continue;  // padding of the past: never read
      c.scale[g * S + s] = rng.uniform(0.002f, 0.02f);
      for (int64_t d = 0; d < k.D; ++d) {
        const int64_t i = (g * S + s) * k.D + d;
        c.f32[i] = rng.uniform(-1.5f, 1.5f);
        c.f16[i] = static_cast<uint16_t>(rng.integer(0, 0x3fff) | (rng.integer(0, 1) << 15));
        c.i8[i] = static_cast<int8_t>(rng.integer(-127, 127));
      }
    }
  }
}

// The cache's rows below P moved into separate past planes [G, P, D] (what the onnxruntime op
// reads), the originals overwritten with NaN: reading a row < P from the present is a NaN output.
struct SplitPast {
  ref::Cache present, past;
  std::vector<int> visits;  // [G][P]: before_tile calls per past row
};

SplitPast split_past(const ref::Cache& c, int64_t G, int64_t S, int64_t P, int64_t D) {
  SplitPast sp{c, c, std::vector<int>(G * P, 0)};
  const size_t n = static_cast<size_t>(G * P * D);
  sp.past.f32.assign(n, 0.0f);
  sp.past.f16.assign(n, 0);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = 0; r < P * D; ++r) {
      sp.past.f32[g * P * D + r] = c.f32[g * S * D + r], sp.present.f32[g * S * D + r] = kNaN;
      sp.past.f16[g * P * D + r] = c.f16[g * S * D + r], sp.present.f16[g * S * D + r] = 0x7e00;
    }
  }
  return sp;
}

struct Visits {
  std::vector<int>* k;
  int64_t P;
};
void count_visit(void* ctx, int64_t g, int64_t r0, int64_t rows) {
  const Visits& v = *static_cast<const Visits*>(ctx);
  for (int64_t r = r0; r < r0 + rows && r < v.P; ++r) ++(*v.k)[g * v.P + r];
}

// A pool that runs the items last to first on the calling thread: the result may not depend on
// the order chunks complete in.
void reverse_pool(void*, int64_t n, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  for (int64_t i = n - 1; i >= 0; --i) fn(ctx, i, i + 1);
}

void check_mask_case(const MaskCase& c) {
  const int64_t S = c.P + c.T, R = c.H / c.G, half = c.D / 2;
  std::vector<int64_t> mask(S, 1);
  for (auto [a, b] : c.padding)
    for (int64_t s = a; s < b; ++s) mask[s] = 0;
  Rng rng(c.seed);
  std::vector<float> q(c.T * c.H * c.D);
  for (float& x : q) x = rng.uniform(-2.0f, 2.0f);
  ref::Cache k, v;
  fill(k, c, mask, rng);
  if (!c.shared) fill(v, c, mask, rng);
  std::vector<float> cos(S * half), sin(S * half);  // positions <= S - 1
  rope_tables(S, c.D, cos.data(), sin.data());
  const double scale = 0.3;
  const std::vector<double> want = ref::attend_masked(q, c.T, c.H, c.D, k, c.shared ? nullptr : &v, c.G, S,
                                                      c.rope ? &cos : nullptr, c.rope ? &sin : nullptr, c.P,
                                                      mask, scale);
  std::vector<qkvx::KeySpan> spans;
  const qkvx::Status made = qkvx::spans_from_mask(mask.data(), S, c.T, R, c.rope ? S : 0, spans);
  CHECK(made.ok(), "spans_from_mask: %s", made.message);
  qkvx::Pool pool;
  pool.run = reverse_pool;
  pool.threads = 3;
  // Past planes (no int8: the onnxruntime op's caches are fp32): every real past row is handed to
  // before_tile exactly once, padding never.
  const bool splittable = c.dtype != QKVX_INT8;
  SplitPast ks = split_past(k, c.G, S, c.P, c.D), vs = split_past(c.shared ? k : v, c.G, S, c.P, c.D);
  for (const char* path : {"portable", "avx2", "avx512", "neon"}) {
    if (qkvx_force_simd_path(path) != QKVX_OK) continue;
    for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(13)}) {
      const qkvx::Pool* pools[] = {nullptr, &pool};
      for (int split = 0; split < (splittable ? 3 : 2); ++split) {
        const qkvx::Pool* p = pools[split % 2];
        const int64_t prev = qkvx_set_chunk_rows(chunk);
        std::vector<float> out(c.T * c.H * c.D, kNaN);
        qkvx::SpanAttention a;
        a.q = q.data();
        a.k = k.data();
        a.v = c.shared ? a.k : v.data();
        Visits visits{&ks.visits, c.P};
        if (split == 2) {
          std::fill(ks.visits.begin(), ks.visits.end(), 0);
          a.k = ks.present.data();
          a.v = c.shared ? a.k : vs.present.data();
          a.k_past = ks.past.data();
          a.v_past = c.shared ? a.k_past : vs.past.data();
          a.past_rows = c.P;
          a.before_tile = count_visit;
          a.tile_ctx = &visits;
        }
        a.k_scale = c.dtype == QKVX_INT8 ? k.scale.data() : nullptr;
        a.v_scale = c.dtype == QKVX_INT8 ? (c.shared ? k.scale.data() : v.scale.data()) : nullptr;
        a.cos = c.rope ? cos.data() : nullptr;
        a.sin = c.rope ? sin.data() : nullptr;
        a.table_stride = half;
        a.dtype = c.dtype;
        a.T = c.T, a.H = c.H, a.G = c.G, a.S = S, a.D = c.D;
        a.scale = static_cast<float>(scale);
        a.start_pos = c.P;
        a.spans = spans.data();
        a.n_spans = static_cast<int64_t>(spans.size());
        a.out = out.data();
        a.pool = p;
        const qkvx::Status st = qkvx::attend_spans(a);
        qkvx_set_chunk_rows(prev);
        double e = 0.0;
        for (size_t i = 0; i < out.size(); ++i) {
          const double d = std::fabs(out[i] - want[i]);
          if (!(d <= e)) e = d;  // NaN propagates as failure
        }
        const double tol = c.dtype == QKVX_FLOAT32 ? 1e-5 : 3e-5;
        CHECK(st.ok() && e <= tol, "masked: T=%lld H=%lld G=%lld P=%lld D=%lld dtype %d %s%s %s chunk %lld %s%s: |d| %.3g",
              (long long)c.T, (long long)c.H, (long long)c.G, (long long)c.P, (long long)c.D, c.dtype,
              c.shared ? "K=V" : "K,V", c.rope ? " rope" : "", path, (long long)chunk,
              p ? "reverse pool" : "own pool", split == 2 ? ", past planes" : "", e);
        if (split == 2) {
          bool once = true;
          for (int64_t g = 0; g < c.G; ++g)
            for (int64_t r = 0; r < c.P; ++r) once = once && ks.visits[g * c.P + r] == (mask[r] != 0 ? 1 : 0);
          CHECK(once, "before_tile: each real past row once, padding never (P=%lld chunk %lld)", (long long)c.P,
                (long long)chunk);
        }
      }
    }
  }
  qkvx_force_simd_path(nullptr);
}

}  // namespace

void run_span_tests() {
  uint32_t seed = 900;
  for (int dt : {QKVX_FLOAT32, QKVX_FLOAT16, QKVX_INT8}) {
    for (bool shared : {true, false}) {
      for (bool rope : {false, true}) {
        // decode: left padding, a hole, the new token itself masked
        check_mask_case({1, 4, 4, 90, 64, dt, shared, rope, {{0, 17}, {40, 51}, {90, 91}}, seed++});
        // GQA prefill: left padding, a masked new token between real ones
        check_mask_case({5, 8, 2, 30, 32, dt, shared, rope, {{0, 9}, {32, 33}}, seed++});
      }
    }
  }
  // No left padding (row 0 is real): a hole only, and no mask at all.
  check_mask_case({1, 4, 2, 70, 64, QKVX_FLOAT32, true, true, {{20, 30}}, seed++});
  check_mask_case({2, 4, 4, 70, 64, QKVX_FLOAT16, false, false, {}, seed++});
  // A sequence of padding only but the new token (each query sees just its own slot), no past.
  check_mask_case({1, 2, 1, 12, 16, QKVX_FLOAT32, true, true, {{0, 12}}, seed++});
  check_mask_case({3, 2, 2, 0, 16, QKVX_FLOAT32, true, true, {{0, 3}}, seed++});
  // spans_from_mask: a position past the rotary tables is an error, not a read.
  std::vector<int64_t> ones(10, 1);
  std::vector<qkvx::KeySpan> spans;
  const qkvx::Status st = qkvx::spans_from_mask(ones.data(), 10, 1, 1, 9, spans);
  CHECK(!st.ok() && st.code == QKVX_INVALID_ARGUMENT, "position 9 with 9 table rows is refused");
}

}  // namespace tu
