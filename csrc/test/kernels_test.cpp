// qkvx_kernels_test: the kernels through the C ABI against the float64 reference (reference.cpp).
// Rows a call must not read (positions >= start_pos + T, rope rows >= P) hold NaN, so reading one
// shows up as a NaN output. Prints "N passed, N failed"; exit status 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "reference.h"
#include "test_util.h"

namespace tu {
namespace {

struct Case {
  int64_t T, H, G, S, D, start_pos;
  int dtype;    // QKVX_FLOAT32 | QKVX_FLOAT16 | QKVX_INT8
  bool shared;  // K=V
  bool rope;
  float q_amp;  // query amplitude: larger -> peakier softmax
  uint32_t seed;
};

struct Data {
  std::vector<float> q, cos, sin;
  ref::Cache k, v;
  std::vector<float> rope_buf_cos, rope_buf_sin;  // P rows + NaN rows after
  int64_t table_width = 0;  // columns of cos / sin: 0 = the half tables (D/2)
};

const float kNaN = std::numeric_limits<float>::quiet_NaN();

void fill_cache(ref::Cache& c, const Case& k, Rng& rng) {
  const int64_t n = k.G * k.S * k.D, n_keys = k.start_pos + k.T;
  c.dtype = k.dtype;
  c.f32.assign(n, kNaN);
  c.f16.assign(n, 0x7e00);
  c.i8.assign(n, 0);
  c.scale.assign(k.G * k.S, kNaN);
  for (int64_t g = 0; g < k.G; ++g) {
    for (int64_t s = 0; s < n_keys; ++s) {
      c.scale[g * k.S + s] = rng.uniform(0.002f, 0.02f);
      for (int64_t d = 0; d < k.D; ++d) {
        const int64_t i = (g * k.S + s) * k.D + d;
        const float x = rng.uniform(-1.5f, 1.5f);
        c.f32[i] = x;
        // any bit pattern of a finite half in about [-2, 2]
        c.f16[i] = static_cast<uint16_t>(rng.integer(0, 0x3fff) | (rng.integer(0, 1) << 15));
        c.i8[i] = static_cast<int8_t>(rng.integer(-127, 127));
      }
    }
  }
}

Data make(const Case& c) {
  Rng rng(c.seed);
  Data d;
  d.q.resize(c.T * c.H * c.D);
  for (float& x : d.q) x = rng.uniform(-c.q_amp, c.q_amp);
  fill_cache(d.k, c, rng);
  if (!c.shared) fill_cache(d.v, c, rng);
  const int64_t P = c.start_pos + c.T;
  const int64_t h = c.D / 2;  // half tables [P][D/2]
  d.cos.assign((P + 3) * h, kNaN);
  d.sin.assign((P + 3) * h, kNaN);
  rope_tables(P, c.D, d.cos.data(), d.sin.data());
  return d;
}

// Runs the kernel; returns the output (empty on error). k_data / v_data: the caches' bytes placed
// elsewhere (misaligned copies), else d's own buffers.
std::vector<float> run(const Case& c, const Data& d, const void* k_data = nullptr,
                       const void* v_data = nullptr) {
  std::vector<float> out(c.T * c.H * c.D, kNaN);
  const std::vector<int64_t> cs{1, c.G, c.S, c.D}, ss{1, c.G, c.S, 1};
  qkvx_tensor q = view(d.q.data(), QKVX_FLOAT32, {1, c.T, c.H, c.D});
  qkvx_tensor k = view(k_data ? k_data : d.k.data(), c.dtype, cs);
  qkvx_tensor v = view(v_data ? v_data : d.v.data(), c.dtype, cs);
  qkvx_tensor ks = view(d.k.scale.data(), QKVX_FLOAT32, ss);
  qkvx_tensor vs = view(d.v.scale.data(), QKVX_FLOAT32, ss);
  const int64_t P = c.start_pos + c.T;
  const int64_t tw = d.table_width ? d.table_width : c.D / 2;
  qkvx_tensor rc = view(d.cos.data(), QKVX_FLOAT32, {P, tw});
  qkvx_tensor rs = view(d.sin.data(), QKVX_FLOAT32, {P, tw});
  qkvx_tensor o = view(out.data(), QKVX_FLOAT32, {1, c.T, c.H, c.D});
  const bool i8 = c.dtype == QKVX_INT8;
  const int rc_ = qkvx_attend(&q, &k, c.shared ? nullptr : &v, i8 ? &ks : nullptr,
                              i8 && !c.shared ? &vs : nullptr, c.rope ? &rc : nullptr,
                              c.rope ? &rs : nullptr, c.start_pos, &o);
  if (rc_ != QKVX_OK) {
    std::printf("  qkvx_attend failed: %s\n", qkvx_last_error());
    return {};
  }
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(a[i] - b[i]);
    if (!(e <= m)) m = e;  // NaN propagates as failure
  }
  return m;
}

const char* dname(int d) { return d == QKVX_FLOAT32 ? "fp32" : d == QKVX_FLOAT16 ? "fp16" : "int8"; }

// One case on every path this CPU has (portable, avx2, avx512 / neon), each against the reference
// and against the portable path.
void check_case(const Case& c, const char* what) {
  const Data d = make(c);
  const std::vector<double> want =
      ref::attend(d.q, c.T, c.H, c.D, d.k, c.shared ? nullptr : &d.v, c.G, c.S,
                  c.rope ? &d.cos : nullptr, c.rope ? &d.sin : nullptr, c.start_pos);
  const double tol = 2e-5 * (1.0 + c.q_amp);
  std::vector<double> portable;
  for (const char* path : {"portable", "avx2", "avx512", "neon"}) {
    if (qkvx_force_simd_path(path) != QKVX_OK) continue;  // not on this CPU
    const std::vector<float> got = run(c, d);
    const double e = max_abs_diff(got, want);
    if (portable.empty()) portable.assign(got.begin(), got.end());
    const double ep = max_abs_diff(got, portable);
    CHECK(e <= tol && ep <= tol,
          "%s: T=%lld H=%lld G=%lld S=%lld D=%lld start=%lld %s %s%s: |%s-ref| %.3g "
          "|%s-portable| %.3g (tol %.3g)",
          what, (long long)c.T, (long long)c.H, (long long)c.G, (long long)c.S, (long long)c.D,
          (long long)c.start_pos, dname(c.dtype), c.shared ? "K=V" : "K,V", c.rope ? " rope" : "",
          path, e, path, ep, tol);
  }
  qkvx_force_simd_path(nullptr);
}

// A cache's bytes copied to `offset` bytes past a 64-byte boundary, between bytes of 0xff (NaN as
// fp32 and fp16): a kernel that reads outside the cache where it matters shows NaN.
struct Placed {
  std::vector<unsigned char> buf;
  const void* data = nullptr;
  Placed(const ref::Cache& c, int64_t nbytes, int64_t offset) : buf(nbytes + 256, 0xff) {
    const auto base = reinterpret_cast<uintptr_t>(buf.data());
    unsigned char* p = buf.data() + ((64 - base % 64) % 64) + 64 + offset;
    std::memcpy(p, c.data(), nbytes);
    data = p;
  }
};

// The caches placed k_off / v_off bytes past a 64-byte line (ExecuTorch's planned buffers sit 16
// bytes past one): every path against the reference.
void check_misaligned(const Case& c, int64_t k_off, int64_t v_off) {
  const Data d = make(c);
  const std::vector<double> want =
      ref::attend(d.q, c.T, c.H, c.D, d.k, c.shared ? nullptr : &d.v, c.G, c.S,
                  c.rope ? &d.cos : nullptr, c.rope ? &d.sin : nullptr, c.start_pos);
  const int64_t es = c.dtype == QKVX_FLOAT32 ? 4 : c.dtype == QKVX_FLOAT16 ? 2 : 1;
  const int64_t nbytes = c.G * c.S * c.D * es;
  const Placed k(d.k, nbytes, k_off), v(c.shared ? d.k : d.v, nbytes, v_off);
  const double tol = 2e-5 * (1.0 + c.q_amp);
  for (const char* path : {"portable", "avx2", "avx512", "neon"}) {
    if (qkvx_force_simd_path(path) != QKVX_OK) continue;
    for (int shifted : {0, 1}) {  // loads spanning two lines, or aligned lines shifted into place
      qkvx_force_read_mode(-1, shifted);
      const double e = max_abs_diff(run(c, d, k.data, c.shared ? nullptr : v.data), want);
      CHECK(e <= tol, "misaligned cache (k +%lld, v +%lld bytes): S=%lld D=%lld start=%lld %s %s%s %s%s: "
            "|out-ref| %.3g (tol %.3g)", (long long)k_off, (long long)v_off, (long long)c.S,
            (long long)c.D, (long long)c.start_pos, dname(c.dtype), c.shared ? "K=V" : "K,V",
            c.rope ? " rope" : "", path, shifted ? " shifted" : "", e, tol);
    }
  }
  qkvx_force_read_mode(-1, -1);
  qkvx_force_simd_path(nullptr);
}

// HF's full [P, D] tables (each row's halves repeated) give exactly the half tables' output.
void check_full_tables(const Case& c) {
  const Data d = make(c);
  Data full = d;
  const int64_t h = c.D / 2, P = c.start_pos + c.T;
  full.table_width = c.D;
  full.cos.assign(P * c.D, 0.0f);
  full.sin.assign(P * c.D, 0.0f);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t i = 0; i < c.D; ++i) {
      full.cos[p * c.D + i] = d.cos[p * h + i % h];
      full.sin[p * c.D + i] = d.sin[p * h + i % h];
    }
  }
  const std::vector<float> a = run(c, d), b = run(c, full);
  CHECK(!a.empty() && a == b, "HF full rope tables [P, D] give the half tables' output (D=%lld)",
        (long long)c.D);
}

}  // namespace

void run_attend_tests() {
  const int dtypes[] = {QKVX_FLOAT32, QKVX_FLOAT16, QKVX_INT8};
  uint32_t seed = 1;
  // Every dtype x K=V / separate x RoPE x MHA / GQA / MQA, decode at odd lengths, context 1 and
  // the full cache. MHA decode runs kv heads in twos (Tile::twin); 3 heads leave one alone.
  struct Shape { int64_t H, G; } shapes[] = {{4, 4}, {3, 3}, {8, 2}, {6, 1}};
  for (int dt : dtypes) {
    for (bool shared : {true, false}) {
      for (bool rope : {false, true}) {
        for (const Shape& sh : shapes) {
          for (int64_t start : {int64_t(0), int64_t(36), int64_t(96)}) {  // 96 = S - 1: full
            check_case({1, sh.H, sh.G, 97, 64, start, dt, shared, rope, 2.0f, seed++}, "decode");
          }
        }
      }
    }
  }
  // Deep positions, where the tables' fp32 angles are rounded the most (rope_tables), with a
  // peaked softmax: every key row must be rotated by its own position's table row, as the model
  // was (rows composed from others fail this by ~1.7x the tolerance).
  for (int dt : dtypes) {
    check_case({1, 2, 2, 30001, 64, 30000, dt, true, true, 12.0f, seed++}, "deep rope");
  }
  // Prefill with causality: T > 1 from position 0 and from the middle.
  for (int dt : dtypes) {
    for (bool rope : {false, true}) {
      check_case({5, 4, 2, 64, 32, 0, dt, true, rope, 2.0f, seed++}, "prefill");
      check_case({7, 4, 2, 64, 32, 13, dt, true, rope, 2.0f, seed++}, "prefill");
      check_case({9, 8, 1, 40, 16, 31, dt, false, rope, 2.0f, seed++}, "prefill");
    }
  }
  check_full_tables({1, 4, 4, 97, 64, 96, QKVX_FLOAT32, true, true, 2.0f, seed++});
  check_full_tables({3, 4, 2, 40, 32, 20, QKVX_INT8, true, true, 2.0f, seed++});
  // Peaked softmax (large scores): the running max moves and rescales.
  check_case({1, 4, 4, 300, 64, 299, QKVX_FLOAT32, true, false, 12.0f, seed++}, "peaked");
  check_case({3, 4, 2, 300, 64, 200, QKVX_INT8, true, true, 40.0f, seed++}, "peaked");
  // Head sizes the SIMD paths do not take (portable fallback) and a small one they do.
  check_case({2, 2, 1, 50, 6, 20, QKVX_FLOAT32, true, true, 2.0f, seed++}, "odd D");
  check_case({1, 2, 2, 50, 12, 30, QKVX_FLOAT16, true, true, 2.0f, seed++}, "D=12 rope");
  check_case({1, 2, 2, 50, 8, 49, QKVX_INT8, false, false, 2.0f, seed++}, "D=8");
  for (int dt : dtypes) {  // D = 128 has its own unrolled instantiation
    check_case({1, 4, 2, 70, 128, 69, dt, true, true, 2.0f, seed++}, "D=128");
    check_case({3, 4, 4, 70, 128, 30, dt, false, false, 2.0f, seed++}, "D=128");
  }
  // Caches not on a 64-byte line: the first and last rows of the buffer read, every dtype, K=V and
  // separate planes at equal and at different offsets.
  for (int dt : dtypes) {
    for (int64_t off : {int64_t(4), int64_t(16), int64_t(48)}) {
      for (bool rope : {false, true}) {
        check_misaligned({1, 4, 4, 97, 64, 96, dt, true, rope, 2.0f, seed++}, off, off);
        check_misaligned({1, 4, 2, 70, 128, 69, dt, false, rope, 2.0f, seed++}, off, off);
      }
      check_misaligned({1, 4, 4, 97, 64, 50, dt, false, true, 2.0f, seed++}, off, 64 - off);
    }
  }
  // A call reading more than L2 holds (16 kv heads x 2200 rows x 256 bytes), aligned, and off a
  // line with K=V + RoPE; with and without software prefetches (each CPU takes one of them).
  for (int prefetch : {0, 1}) {
    qkvx_force_read_mode(prefetch, -1);
    check_case({1, 16, 16, 2200, 64, 2199, QKVX_FLOAT32, true, true, 2.0f, seed++},
               prefetch ? "long stream, prefetched" : "long stream");
  }
  qkvx_force_read_mode(-1, -1);
  check_misaligned({1, 16, 16, 2200, 64, 2150, QKVX_FLOAT32, true, true, 2.0f, seed++}, 16, 16);
  // Sequence split: forced chunk sizes put chunk edges at odd places (last chunk partial, a
  // chunk of one row, prefill limits inside a chunk), on one thread and on two.
  for (int threads : {1, 2}) {
    qkvx_set_num_threads(threads);
    for (int64_t chunk : {int64_t(1), int64_t(8), int64_t(13), int64_t(64)}) {
      const int64_t prev = qkvx_set_chunk_rows(chunk);
      check_case({1, 4, 2, 130, 64, 129, QKVX_FLOAT32, true, true, 2.0f, seed++}, "chunked");
      check_case({6, 4, 4, 130, 32, 50, QKVX_INT8, true, false, 2.0f, seed++}, "chunked");
      check_case({1, 8, 1, 130, 64, 100, QKVX_FLOAT16, false, false, 2.0f, seed++}, "chunked");
      qkvx_set_chunk_rows(prev);
    }
    // Automatic split at a context long enough for two chunks.
    check_case({1, 4, 2, 4096, 64, 4095, QKVX_FLOAT32, true, false, 2.0f, seed++}, "auto split");
    check_case({1, 4, 4, 4096, 64, 3001, QKVX_INT8, true, true, 2.0f, seed++}, "auto split");
  }
  CHECK(qkvx_set_num_threads(1) >= 1, "threads");
}

}  // namespace tu

int main() {
  std::printf("qkvx kernels: simd path %s, %d pool threads; paths compared:", qkvx_simd_path(),
              qkvx_num_threads());
  for (const char* path : {"portable", "avx2", "avx512", "neon"}) {
    if (qkvx_force_simd_path(path) == QKVX_OK) std::printf(" %s", path);
  }
  qkvx_force_simd_path(nullptr);
  std::printf("\n");
  tu::run_attend_tests();
  tu::run_update_tests();
  tu::run_error_tests();
  tu::run_span_tests();
  std::printf("%d passed, %d failed\n", tu::passed(), tu::failed());
  return tu::failed() == 0 ? 0 : 1;
}
