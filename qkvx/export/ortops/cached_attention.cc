// qkvx.CachedAttention: one onnxruntime custom op per layer that appends the new tokens to the
// past cache (writing the present output) and attends over it in the same pass, reading every
// cached row once. Built by qkvx.export.ortops, loaded with SessionOptions.register_custom_ops_library.
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
// Per (batch, kv head, chunk of keys): rows are copied to the present block by block and, while
// the block is in cache, scored against every query row of the group (keys rotated on the fly),
// with an online softmax and the value accumulation. Chunks of one (batch, kv head) are combined
// at the end (flash-decoding), so a one-kv-head cache still spreads over onnxruntime's threads.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 64;        // keys scored together (the block stays in L1)
constexpr int64_t kSuperBlock = 2048;  // keys every head of a task reads before the next ones
constexpr int64_t kMinChunk = 2048;   // keys per parallel task, at least
constexpr int64_t kMaxDim = 256;      // head_dim bound for the stack buffers
// A masked score, and the running max before any key: finite, since the library is built with
// -ffast-math (finite math only); exp(kMasked - m) underflows to 0.
const float kMasked = -std::numeric_limits<float>::max();

struct Problem {
  int64_t B, T, H, G, D, P, S, R, M, chunks, chunk_len, heads_per_task, max_pos;
  float scale;
  const float* query;
  const float* past_k;
  const float* new_k;
  const float* past_v;  // null: k = v
  const float* new_v;
  const int64_t* mask;
  const float* cos;  // null: no rotation on read
  const float* sin;
  float* out;
  float* present_k;
  float* present_v;
  std::vector<int64_t> key_pos;  // [B, S]
  // per task partial results: running max, sum, accumulator [M, D]
  std::vector<float> part_m, part_l, part_acc;
};

// Copy n floats with non-temporal stores where the target is 32-byte aligned: the present is
// written once and not read back here (the attention reads the source rows, which the copy just
// brought into cache), so the stores need not fetch the target lines first.
inline void copy_rows(float* dst, const float* src, int64_t n) {
#if defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(float));
}

inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// One block of keys [jb, je) of kv head g in batch b, against the running softmax state of that
// head's query rows (run_m, run_l, acc [M, D]).
void run_block(Problem& p, int64_t b, int64_t g, int64_t jb, int64_t je, float* run_m, float* run_l, float* acc) {
  const int64_t D = p.D, half = D / 2, S = p.S, P = p.P, T = p.T, R = p.R, n = je - jb;
  const bool shared = p.past_v == nullptr, rope = p.cos != nullptr;
  const int64_t* mask = p.mask + b * S;
  const int64_t* pos = p.key_pos.data() + b * S;
  const float* past_k = p.past_k + (b * p.G + g) * P * D;
  const float* past_v = shared ? nullptr : p.past_v + (b * p.G + g) * P * D;
  float* pres_k = p.present_k + (b * p.G + g) * S * D;
  float* pres_v = shared ? nullptr : p.present_v + (b * p.G + g) * S * D;

  alignas(64) float rot[kBlock * kMaxDim];
  alignas(64) float score[kBlock];
  const float* krow[kBlock];
  const float* vrow[kBlock];

  // 1. the present: past rows in one contiguous copy, new rows one by one
  const int64_t past_end = std::min(je, P);
  if (jb < past_end) {
    copy_rows(pres_k + jb * D, past_k + jb * D, (past_end - jb) * D);
    if (!shared) copy_rows(pres_v + jb * D, past_v + jb * D, (past_end - jb) * D);
  }
  for (int64_t j = std::max(jb, P); j < je; ++j) {
    const int64_t src = ((b * T + (j - P)) * p.G + g) * D;
    copy_rows(pres_k + j * D, p.new_k + src, D);
    if (!shared) copy_rows(pres_v + j * D, p.new_v + src, D);
  }
  // 2. keys of the block (rotated into `rot` where RoPE is applied on read) and values, read from
  // the source rows (in cache after the copy; the present was written around the cache)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = jb + i;
    const int64_t src = ((b * T + (j - P)) * p.G + g) * D;  // where a new row (j >= P) comes from
    const float* k = j < P ? past_k + j * D : p.new_k + src;
    vrow[i] = shared ? k : (j < P ? past_v + j * D : p.new_v + src);
    if (!rope || R == 1) {  // R = 1 with RoPE: the dot product below rotates as it goes
      krow[i] = k;
      continue;
    }
    const float* c = p.cos + pos[j] * half;
    const float* sn = p.sin + pos[j] * half;
    float* r = rot + i * D;
    for (int64_t d = 0; d < half; ++d) {
      r[d] = k[d] * c[d] - k[d + half] * sn[d];
      r[d + half] = k[d + half] * c[d] + k[d] * sn[d];
    }
    krow[i] = r;
  }
  // 3. every query row of this kv head against the block: online softmax
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = P + t;
    if (jb > slot) continue;  // causal: the whole block is after this query
    for (int64_t rr = 0; rr < R; ++rr) {
      const int64_t m = t * R + rr;
      const float* qv = p.query + (b * T + t) * p.H * D + (g * R + rr) * D;
      float bmax = kMasked;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = jb + i;
        if (!((j <= slot && mask[j] != 0) || j == slot)) {
          score[i] = kMasked;
          continue;
        }
        const float* k = krow[i];
        float dot = 0.0f;
        if (rope && R == 1) {
          // q . rot(k) = sum_d cos_d (q1 k1 + q2 k2) + sin_d (q2 k1 - q1 k2) over the two halves
          const float* c = p.cos + pos[j] * half;
          const float* sn = p.sin + pos[j] * half;
          for (int64_t d = 0; d < half; ++d) {
            const float k1 = k[d], k2 = k[d + half], q1 = qv[d], q2 = qv[d + half];
            dot += c[d] * (q1 * k1 + q2 * k2) + sn[d] * (q2 * k1 - q1 * k2);
          }
        } else {
          for (int64_t d = 0; d < D; ++d) dot += qv[d] * k[d];
        }
        score[i] = dot * p.scale;
        bmax = std::max(bmax, score[i]);
      }
      if (bmax == kMasked) continue;
      float* a = acc + m * D;
      const float new_m = std::max(run_m[m], bmax);
      if (new_m != run_m[m]) {
        const float alpha = run_m[m] == kMasked ? 0.0f : std::exp(run_m[m] - new_m);
        run_l[m] *= alpha;
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
        run_m[m] = new_m;
      }
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        score[i] = std::exp(score[i] - new_m);  // masked keys: exp(-FLT_MAX - m) = 0
        sum += score[i];
      }
      run_l[m] += sum;
      for (int64_t i = 0; i < n; ++i) {
        const float w = score[i];
        if (w == 0.0f) continue;
        const float* v = vrow[i];
        for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
      }
    }
  }
}

// One task: batch b, kv heads [g0, g0 + heads_per_task), keys of chunk c. Super-blocks of keys
// outside, heads inside: the rotary table rows of a super-block stay in L2 while every head reads
// them, and each head's rows are read in runs long enough for the prefetcher.
void run_task(Problem& p, int64_t task) {
  const int64_t c = task % p.chunks, rest = task / p.chunks;
  const int64_t groups = p.G / p.heads_per_task, b = rest / groups, g0 = (rest % groups) * p.heads_per_task;
  const int64_t M = p.M, D = p.D;
  const int64_t j0 = c * p.chunk_len, j1 = std::min(p.S, j0 + p.chunk_len);
  for (int64_t g = g0; g < g0 + p.heads_per_task; ++g) {
    const int64_t part = (b * p.G + g) * p.chunks + c;
    std::fill(&p.part_m[part * M], &p.part_m[part * M] + M, kMasked);
    std::fill(&p.part_l[part * M], &p.part_l[part * M] + M, 0.0f);
    std::fill(&p.part_acc[part * M * D], &p.part_acc[part * M * D] + M * D, 0.0f);
  }
  for (int64_t sb = j0; sb < j1; sb += kSuperBlock) {
    const int64_t se = std::min(j1, sb + kSuperBlock);
    for (int64_t g = g0; g < g0 + p.heads_per_task; ++g) {
      const int64_t part = (b * p.G + g) * p.chunks + c;
      for (int64_t jb = sb; jb < se; jb += kBlock)
        run_block(p, b, g, jb, std::min(se, jb + kBlock), &p.part_m[part * M], &p.part_l[part * M],
                  &p.part_acc[part * M * D]);
    }
  }
  store_fence();
}

// Combine the chunks of (b, g) into the output.
void finish(Problem& p, int64_t bg) {
  const int64_t b = bg / p.G, g = bg % p.G, D = p.D, M = p.M;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = m / p.R, rr = m % p.R;
    float gmax = kMasked;
    for (int64_t c = 0; c < p.chunks; ++c) gmax = std::max(gmax, p.part_m[(bg * p.chunks + c) * M + m]);
    float* o = p.out + (b * p.T + t) * p.H * D + (g * p.R + rr) * D;
    std::fill(o, o + D, 0.0f);
    float l = 0.0f;
    for (int64_t c = 0; c < p.chunks; ++c) {
      const int64_t task = bg * p.chunks + c;
      const float cm = p.part_m[task * M + m];
      if (cm == kMasked) continue;
      const float f = std::exp(cm - gmax);
      l += f * p.part_l[task * M + m];
      const float* a = &p.part_acc[(task * M + m) * D];
      for (int64_t d = 0; d < D; ++d) o[d] += f * a[d];
    }
    const float inv = 1.0f / l;  // l > 0: every query sees its own slot
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

void task_fn(void* data, size_t i) { run_task(*static_cast<Problem*>(data), static_cast<int64_t>(i)); }
void finish_fn(void* data, size_t i) { finish(*static_cast<Problem*>(data), static_cast<int64_t>(i)); }

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("qkvx.CachedAttention: " + what); }

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

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
                    mask = input(5), cos = input(6), sin = input(7);
    if (!query || !past_k || !new_k || !mask) fail("query, past_key, key and attention_mask are required");
    if (bool(past_v) != bool(new_v)) fail("past_value and value come together");
    if (bool(cos) != bool(sin)) fail("cos_cache and sin_cache come together");

    Problem p{};
    const auto qs = shape_of(query), pks = shape_of(past_k), ks = shape_of(new_k), ms = shape_of(mask);
    if (qs.size() != 3 || pks.size() != 4 || ms.size() != 2) fail("query [B, T, H*D], past [B, G, P, D], mask [B, S]");
    p.B = qs[0], p.T = qs[1], p.H = num_heads, p.G = kv_num_heads, p.P = pks[2], p.D = pks[3];
    p.S = p.P + p.T, p.R = p.H / p.G, p.M = p.T * p.R, p.scale = scale;
    if (p.D > kMaxDim || p.D % 2) fail("head_dim must be even and at most 256");
    if (qs[2] != p.H * p.D || pks[0] != p.B || pks[1] != p.G) fail("query / past_key shapes disagree");
    int64_t kn = 1;
    for (auto d : ks) kn *= d;
    if (ks.size() < 2 || ks[0] != p.B || ks[1] != p.T || kn != p.B * p.T * p.G * p.D) fail("key must be [B, T, G, D]");
    if (ms[0] != p.B || ms[1] != p.S) fail("attention_mask must be [B, past + T]");
    if (past_v) {
      if (shape_of(past_v) != pks || shape_of(new_v) != ks) fail("value shapes must match the key shapes");
    }
    p.max_pos = 0;
    if (cos) {
      const auto cs = shape_of(cos);
      if (cs.size() != 2 || cs[1] != p.D / 2 || shape_of(sin) != cs) fail("cos / sin caches must be [max_pos, D/2]");
      p.max_pos = cs[0];
    }
    p.query = query.GetTensorData<float>();
    p.past_k = past_k.GetTensorData<float>();
    p.new_k = new_k.GetTensorData<float>();
    p.past_v = past_v ? past_v.GetTensorData<float>() : nullptr;
    p.new_v = new_v ? new_v.GetTensorData<float>() : nullptr;
    p.mask = mask.GetTensorData<int64_t>();
    p.cos = cos ? cos.GetTensorData<float>() : nullptr;
    p.sin = sin ? sin.GetTensorData<float>() : nullptr;

    p.out = ctx.GetOutput(0, qs).GetTensorMutableData<float>();
    const std::vector<int64_t> present_shape{p.B, p.G, p.S, p.D};
    p.present_k = ctx.GetOutput(1, present_shape).GetTensorMutableData<float>();
    p.present_v = nullptr;
    if (past_v) {
      if (ctx.GetOutputCount() < 3) fail("separate values need the present_value output");
      p.present_v = ctx.GetOutput(2, present_shape).GetTensorMutableData<float>();
    }

    p.key_pos.resize(p.B * p.S);
    for (int64_t b = 0; b < p.B; ++b) {
      int64_t c = 0;
      for (int64_t j = 0; j < p.S; ++j) {
        c += p.mask[b * p.S + j];
        const int64_t q = std::max<int64_t>(c - 1, 0);
        if (p.cos && q >= p.max_pos) fail("a key position exceeds the rotary tables");
        p.key_pos[b * p.S + j] = q;
      }
    }
    // Decode (few query rows): a task takes every kv head over one chunk of keys, so the chunks
    // spread over onnxruntime's threads whatever the kv head count. Prefill (many rows): a task
    // takes one kv head over all keys (the partial state of many rows stays small).
    const int64_t bg = p.B * p.G;
    if (p.M <= 64) {
      p.heads_per_task = p.G;
      p.chunks = std::max<int64_t>(1, std::min<int64_t>((p.S + kMinChunk - 1) / kMinChunk, 8));
    } else {
      p.heads_per_task = 1;
      p.chunks = 1;
    }
    p.chunk_len = (p.S + p.chunks - 1) / p.chunks;
    const int64_t tasks = p.B * (p.G / p.heads_per_task) * p.chunks;
    p.part_m.assign(bg * p.chunks * p.M, 0.0f);
    p.part_l.assign(bg * p.chunks * p.M, 0.0f);
    p.part_acc.assign(bg * p.chunks * p.M * p.D, 0.0f);
    ctx.ParallelFor(task_fn, static_cast<size_t>(tasks), 0, &p);
    ctx.ParallelFor(finish_fn, static_cast<size_t>(bg), 0, &p);
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
