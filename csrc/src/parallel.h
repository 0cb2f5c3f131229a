// Splitting work over ExecuTorch's threadpool (the pool XNNPACK and the runtime share) when the
// library is built with QKVX_USE_THREADPOOL, else running it on the calling thread.
#pragma once

#include <cstdint>

namespace qkvx {

// Threads work is split over (1 without a threadpool).
int64_t thread_count();

// Sets the pool size; returns the size in effect afterwards.
int64_t set_thread_count(int64_t n);

// Runs f(i, i + 1) for every i in [0, n) on the pool's threads (items handed out one at a time,
// idle threads steal) and waits.
// Fn: any callable taking (int64_t, int64_t).
template <class Fn>
void run_parallel(int64_t n, const Fn& f);

namespace detail {
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void run_parallel_raw(int64_t n, RangeFn fn, void* ctx);
}  // namespace detail

template <class Fn>
void run_parallel(int64_t n, const Fn& f) {
  detail::run_parallel_raw(
      n, [](void* ctx, int64_t b, int64_t e) { (*static_cast<const Fn*>(ctx))(b, e); },
      const_cast<Fn*>(&f));
}

}  // namespace qkvx
