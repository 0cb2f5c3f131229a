// qkvx.CachedAttention: one onnxruntime custom op per layer that appends the new tokens to the
// past cache (writing the present output) and attends over the present with qkvx's kernels (the
// tile kernels of the .pte's qkvx::attend). Built by qkvx.export.ortops (csrc's CMake target
// qkvx_ortops), loaded with SessionOptions.register_custom_ops_library.
//
// Inputs (domain "qkvx", version 1):
//   0 query          float [B, T, H * D]   (already rotated where the model uses RoPE)
//   1 past_key       float [B, G, P, D]    (the K=V cache where k = v)
//   2 key            float [B, T, G, D]    new rows (un-rotated where rotate-on-read)
//   3 past_value     float [B, G, P, D]    optional: absent = k = v, the key cache is the values
//   4 value          float [B, T, G, D]    optional, with 3
//   5 attention_mask int64 [B, P + T]      1 = real token, 0 = padding
//   6 cos_cache      float [max_pos, D/2]  optional: present = rotate keys on read (RoPE with k = v)
//   7 sin_cache      float [max_pos, D/2]  optional, with 6
// Outputs: 0 output [B, T, H * D], 1 present_key [B, G, P + T, D], 2 present_value (with 3 / 4).
// Attributes: num_heads (H), kv_num_heads (G), scale.
//
// Semantics (those of qkvx.rewrite.OnnxDecodeModel): query t sits at slot P + t and sees key j iff
// (j <= P + t and mask[j] = 1) or j = P + t. Key j's rotary position is max(cumsum(mask)[j] - 1, 0);
// keys are rotated as in the HF Llama convention (rotate_half over the two halves of D). Query
// head h = g * R + r (R = H / G) reads kv head g.
//
// Per batch row the mask becomes key spans (qkvx::spans_from_mask) for qkvx::attend_spans: each
// run of real tokens, and a one-row span per masked new token, read by that token's query rows
// only; padding is never attended. Past rows are read from the past input, and each tile's rows
// are copied into the present just before the kernel reads them: one read of the past serves the
// copy and the attention, and the present is written around the cache.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "core.h"

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("qkvx.CachedAttention: " + what); }

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

// qkvx::Pool over onnxruntime's intra-op threads.
void ort_parallel(void* kctx, int64_t n, void (*fn)(void*, int64_t, int64_t), void* fn_ctx) {
  struct Item {
    void (*fn)(void*, int64_t, int64_t);
    void* ctx;
  } item{fn, fn_ctx};
  static_cast<const Ort::KernelContext*>(kctx)->ParallelFor(
      [](void* p, size_t i) {
        const Item& it = *static_cast<const Item*>(p);
        it.fn(it.ctx, static_cast<int64_t>(i), static_cast<int64_t>(i) + 1);
      },
      static_cast<size_t>(n), 0, &item);
}

// Copies n floats; with non-temporal stores where both ends allow: the present is written once
// and not read back here, so its lines need not be fetched into the cache first.
void copy_floats(float* dst, const float* src, int64_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(float));
}

void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The presents of one batch row [G, S, D] and where their rows come from: rows < P from the past
// planes [G, P, D], rows >= P from the new rows [T, G, D].
struct Presents {
  int64_t G, P, T, D;
  const float *past_k, *past_v, *new_k, *new_v;  // past_v / new_v null for K=V
  float *present_k, *present_v;

  void copy_past(int64_t g, int64_t r0, int64_t n) const {
    const int64_t S = P + T;
    copy_floats(present_k + (g * S + r0) * D, past_k + (g * P + r0) * D, n * D);
    if (present_v) copy_floats(present_v + (g * S + r0) * D, past_v + (g * P + r0) * D, n * D);
  }
  void copy_new() const {
    const int64_t S = P + T;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(present_k + (g * S + P + t) * D, new_k + (t * G + g) * D, D * sizeof(float));
        if (present_v) std::memcpy(present_v + (g * S + P + t) * D, new_v + (t * G + g) * D, D * sizeof(float));
      }
    }
  }
};

// before_tile: the tile's past rows go to the present as the kernel is about to read them.
void copy_tile(void* ctx, int64_t g, int64_t r0, int64_t rows) {
  const Presents& pr = *static_cast<const Presents*>(ctx);
  if (r0 >= pr.P) return;  // new rows: copied before the attention
  pr.copy_past(g, r0, std::min(rows, pr.P - r0));
  store_fence();
}

struct Kernel {
  int64_t num_heads, kv_num_heads;
  float scale;

  explicit Kernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    num_heads = ki.GetAttribute<int64_t>("num_heads");
    kv_num_heads = ki.GetAttribute<int64_t>("kv_num_heads");
    scale = ki.GetAttribute<float>("scale");
    if (num_heads <= 0 || kv_num_heads <= 0 || num_heads % kv_num_heads) fail("num_heads must be a multiple of kv_num_heads");
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_in = ctx.GetInputCount();
    auto input = [&](size_t i) { return i < n_in ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
    Ort::ConstValue query = input(0), past_k = input(1), new_k = input(2), past_v = input(3), new_v = input(4),
                    mask_in = input(5), cos = input(6), sin = input(7);
    if (!query || !past_k || !new_k || !mask_in) fail("query, past_key, key and attention_mask are required");
    if (bool(past_v) != bool(new_v)) fail("past_value and value come together");
    if (bool(cos) != bool(sin)) fail("cos_cache and sin_cache come together");

    const auto qs = shape_of(query), pks = shape_of(past_k), ks = shape_of(new_k), ms = shape_of(mask_in);
    if (qs.size() != 3 || pks.size() != 4 || ms.size() != 2) fail("query [B, T, H*D], past [B, G, P, D], mask [B, S]");
    const int64_t B = qs[0], T = qs[1], H = num_heads, G = kv_num_heads, P = pks[2], D = pks[3];
    const int64_t S = P + T, R = H / G;
    if (D <= 0 || D % 2) fail("head_dim must be even");
    if (qs[2] != H * D || pks[0] != B || pks[1] != G) fail("query / past_key shapes disagree");
    int64_t kn = 1;
    for (auto d : ks) kn *= d;
    if (ks.size() < 2 || ks[0] != B || ks[1] != T || kn != B * T * G * D) fail("key must be [B, T, G, D]");
    if (ms[0] != B || ms[1] != S) fail("attention_mask must be [B, past + T]");
    if (past_v && (shape_of(past_v) != pks || shape_of(new_v) != ks)) fail("value shapes must match the key shapes");
    int64_t max_pos = 0;
    if (cos) {
      const auto cs = shape_of(cos);
      if (cs.size() != 2 || cs[1] != D / 2 || shape_of(sin) != cs) fail("cos / sin caches must be [max_pos, D/2]");
      max_pos = cs[0];
    }
    const int64_t* mask = mask_in.GetTensorData<int64_t>();
    float* out = ctx.GetOutput(0, qs).GetTensorMutableData<float>();
    const std::vector<int64_t> present_shape{B, G, S, D};
    float* present_k = ctx.GetOutput(1, present_shape).GetTensorMutableData<float>();
    float* present_v = nullptr;
    if (past_v) {
      if (ctx.GetOutputCount() < 3) fail("separate values need the present_value output");
      present_v = ctx.GetOutput(2, present_shape).GetTensorMutableData<float>();
    }
    qkvx::Pool pool;
    pool.run = ort_parallel;
    pool.pool = &ctx;
    pool.threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
    std::vector<qkvx::KeySpan> spans;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* mb = mask + b * S;
      const qkvx::Status spans_ok = qkvx::spans_from_mask(mb, S, T, R, max_pos, spans);
      if (!spans_ok.ok()) fail(spans_ok.message);
      const Presents pr{G,
                        P,
                        T,
                        D,
                        past_k.GetTensorData<float>() + b * G * P * D,
                        past_v ? past_v.GetTensorData<float>() + b * G * P * D : nullptr,
                        new_k.GetTensorData<float>() + b * T * G * D,
                        past_v ? new_v.GetTensorData<float>() + b * T * G * D : nullptr,
                        present_k + b * G * S * D,
                        present_v ? present_v + b * G * S * D : nullptr};
      pr.copy_new();
      qkvx::SpanAttention a;
      a.q = query.GetTensorData<float>() + b * T * H * D;
      a.k = pr.present_k;
      a.v = present_v ? pr.present_v : a.k;
      a.k_past = pr.past_k;
      a.v_past = past_v ? pr.past_v : a.k_past;
      a.past_rows = P;
      a.before_tile = copy_tile;
      a.tile_ctx = const_cast<Presents*>(&pr);
      a.cos = cos ? cos.GetTensorData<float>() : nullptr;
      a.sin = sin ? sin.GetTensorData<float>() : nullptr;
      a.table_stride = D / 2;
      a.T = T, a.H = H, a.G = G, a.S = S, a.D = D;
      a.scale = scale;
      a.start_pos = P;
      a.spans = spans.data();
      a.n_spans = static_cast<int64_t>(spans.size());
      a.out = out + b * T * H * D;
      a.pool = &pool;
      const qkvx::Status attended = qkvx::attend_spans(a);
      if (!attended.ok()) fail(attended.message);
      // the past rows no span read (padding) still belong in the present
      int64_t next = 0;  // first past row not yet in the present (spans come in row order)
      auto copy_gap = [&](int64_t end) {
        for (int64_t g = 0; g < G && std::min(end, P) > next; ++g) pr.copy_past(g, next, std::min(end, P) - next);
      };
      for (const qkvx::KeySpan& sp : spans) copy_gap(sp.begin), next = std::max(next, sp.end);
      copy_gap(P);
      store_fence();
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
};

struct CachedAttentionOp : Ort::CustomOpBase<CachedAttentionOp, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return "CachedAttention"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (i == 3 || i == 4 || i == 6 || i == 7) ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == 2 ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
};

CachedAttentionOp g_op;
std::once_flag g_once;
Ort::CustomOpDomain* g_domain = nullptr;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    std::call_once(g_once, [] {
      g_domain = new Ort::CustomOpDomain("qkvx");  // lives as long as the library
      g_domain->Add(&g_op);
    });
    Ort::UnownedSessionOptions(options).Add(*g_domain);
    return nullptr;
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}
