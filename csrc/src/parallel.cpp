// The wheel ships libexecutorch_threadpool.so, which exports parallel_for / get_thread_count
// (declared by runtime/kernel/thread_parallel_interface.h under ET_USE_THREADPOOL) and
// ThreadPool::_unsafe_reset_threadpool, but not extension/threadpool/threadpool.h. The two
// ThreadPool members used here are therefore declared below with the signatures the library
// exports (non-virtual members: the call binds to the exported symbol, the layout is never used).
#include "parallel.h"

#if defined(QKVX_USE_THREADPOOL)
#include <executorch/runtime/kernel/thread_parallel_interface.h>

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool
#endif

namespace qkvx {

#if defined(QKVX_USE_THREADPOOL)

int64_t thread_count() { return executorch::extension::get_thread_count(); }

int64_t set_thread_count(int64_t n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool != nullptr && n >= 1) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(n));
  return thread_count();
}

void detail::run_parallel_raw(int64_t n, RangeFn fn, void* ctx) {
  if (n <= 0) return;
  if (n == 1) {  // nothing to split: no pool round trip
    fn(ctx, 0, 1);
    return;
  }
  auto body = [fn, ctx](int64_t b, int64_t e) { fn(ctx, b, e); };
  if (!executorch::extension::parallel_for(0, n, 1, body)) fn(ctx, 0, n);
}

#else

int64_t thread_count() { return 1; }
int64_t set_thread_count(int64_t) { return 1; }
void detail::run_parallel_raw(int64_t n, RangeFn fn, void* ctx) {
  if (n > 0) fn(ctx, 0, n);
}

#endif

}  // namespace qkvx
