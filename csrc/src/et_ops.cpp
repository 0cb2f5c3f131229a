// ExecuTorch operators qkvx::update_cache.out, qkvx::update_cache_int8.out, qkvx::attend.out:
// tensor-level checks (dim order, out resize), then the shared core. A failed check sets
// InvalidArgument on the context, so Method::execute returns an error instead of crashing.
//
// Schemas (declared for export in qkvx/kernels/ops.py):
//   update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out) -> Tensor(b!)
//   update_cache_int8.out(Tensor value, Tensor(a!) cache, Tensor(b!) scale, SymInt start_pos, *,
//                         Tensor(c!) out) -> Tensor(c!)
//   attend.out(Tensor q, Tensor k_cache, Tensor? v_cache, Tensor? k_scale, Tensor? v_scale,
//              Tensor? rope_cos, Tensor? rope_sin, SymInt start_pos, *, Tensor(a!) out) -> Tensor(a!)
// The update ops write the cache in place; their `out` is a placeholder nobody reads (as
// llama::update_cache), which keeps the cache a mutated buffer after export's reinplacing.
#include <initializer_list>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/dim_order_util.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "core.h"

namespace qkvx {
namespace {

using executorch::aten::optional;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

qkvx_tensor view(const Tensor& t) {
  qkvx_tensor v{};
  v.data = const_cast<void*>(t.const_data_ptr());
  v.dtype = static_cast<int32_t>(t.scalar_type());
  v.ndim = static_cast<int32_t>(t.dim());
  for (int i = 0; i < 4 && i < t.dim(); ++i) v.sizes[i] = t.size(i);
  return v;
}

bool contiguous(const Tensor& t) {
  return executorch::runtime::is_contiguous_dim_order(t.dim_order().data(), t.dim());
}

// Fails the kernel call with the core's message.
bool report(KernelRuntimeContext& ctx, const Status& s) {
  if (s.ok()) return true;
  ET_LOG(Error, "%s", s.message);
  ctx.fail(s.code == QKVX_OUT_OF_MEMORY ? Error::MemoryAllocationFailed : Error::InvalidArgument);
  return false;
}

Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache,
                         int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, contiguous(value) && contiguous(cache), InvalidArgument, out,
                      "qkvx::update_cache: value and cache must be contiguous");
  qkvx_tensor v = view(value), c = view(cache);
  report(ctx, update_cache(&v, &c, start_pos));
  return out;
}

Tensor& update_cache_int8_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache,
                              Tensor& scale, int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, contiguous(value) && contiguous(cache) && contiguous(scale),
                      InvalidArgument, out,
                      "qkvx::update_cache_int8: value, cache and scale must be contiguous");
  qkvx_tensor v = view(value), c = view(cache), s = view(scale);
  report(ctx, update_cache_int8(&v, &c, &s, start_pos));
  return out;
}

Tensor& attend_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache,
                   const optional<Tensor>& v_cache, const optional<Tensor>& k_scale,
                   const optional<Tensor>& v_scale, const optional<Tensor>& rope_cos,
                   const optional<Tensor>& rope_sin, int64_t start_pos, Tensor& out) {
  bool ok = contiguous(q) && contiguous(k_cache);
  for (const optional<Tensor>* t : {&v_cache, &k_scale, &v_scale, &rope_cos, &rope_sin}) {
    if (t->has_value()) ok = ok && contiguous(t->value());
  }
  ET_KERNEL_CHECK_MSG(ctx, ok, InvalidArgument, out, "qkvx::attend: inputs must be contiguous");
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4, InvalidArgument, out, "qkvx::attend: q must have 4 dims");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok,
                      InvalidArgument, out, "qkvx::attend: cannot resize out to q's shape");
  qkvx_tensor vq = view(q), vk = view(k_cache), vo = view(out);
  qkvx_tensor vv{}, vks{}, vvs{}, vc{}, vs{};
  AttendArgs a;
  a.q = &vq;
  a.k_cache = &vk;
  if (v_cache.has_value()) vv = view(v_cache.value()), a.v_cache = &vv;
  if (k_scale.has_value()) vks = view(k_scale.value()), a.k_scale = &vks;
  if (v_scale.has_value()) vvs = view(v_scale.value()), a.v_scale = &vvs;
  if (rope_cos.has_value()) vc = view(rope_cos.value()), a.rope_cos = &vc;
  if (rope_sin.has_value()) vs = view(rope_sin.value()), a.rope_sin = &vs;
  a.start_pos = start_pos;
  a.out = &vo;
  report(ctx, attend(a));
  return out;
}

}  // namespace
}  // namespace qkvx

EXECUTORCH_LIBRARY(qkvx, "update_cache.out", qkvx::update_cache_out);
EXECUTORCH_LIBRARY(qkvx, "update_cache_int8.out", qkvx::update_cache_int8_out);
EXECUTORCH_LIBRARY(qkvx, "attend.out", qkvx::attend_out);
