// The wheel ships libexecutorch_threadpool.so but not extension/threadpool/threadpool.h. What is
// used here is declared with the signatures the library exports:
//   get_threadpool()->_unsafe_reset_threadpool(n)   the pool size (as the pybindings do)
//   get_pthreadpool() + pthreadpool_parallelize_1d  the pool's pthreadpool, whose 1-D loop hands
//       items out one at a time and lets idle threads steal, so a thread descheduled on a busy
//       core does not hold the others up (ExecuTorch's parallel_for gives fixed ranges)
// (non-virtual members and C functions: the calls bind to the exported symbols).
#include "parallel.h"

#if defined(QKVX_USE_THREADPOOL)
#include <cstddef>

#include <executorch/runtime/kernel/thread_parallel_interface.h>

struct pthreadpool;
extern "C" void pthreadpool_parallelize_1d(pthreadpool* pool, void (*task)(void*, size_t),
                                           void* context, size_t range, uint32_t flags);

namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
pthreadpool* get_pthreadpool();  // nullptr inside a NoThreadPoolGuard: the caller runs everything
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
  struct Item {
    RangeFn fn;
    void* ctx;
  } item{fn, ctx};
  pthreadpool_parallelize_1d(
      executorch::extension::threadpool::get_pthreadpool(),
      [](void* p, size_t i) {
        const Item& it = *static_cast<const Item*>(p);
        it.fn(it.ctx, static_cast<int64_t>(i), static_cast<int64_t>(i) + 1);
      },
      &item, static_cast<size_t>(n), 0u);
}

#else

int64_t thread_count() { return 1; }
int64_t set_thread_count(int64_t) { return 1; }
void detail::run_parallel_raw(int64_t n, RangeFn fn, void* ctx) {
  if (n > 0) fn(ctx, 0, n);
}

#endif

}  // namespace qkvx
