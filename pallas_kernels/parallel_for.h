// ParallelFor for the native CPU kernels (included by each op's cpu_kernel.cc; the build in
// pallas_kernels/native.py puts this folder on the include path).
#ifndef JMOE_PARALLEL_FOR_H_
#define JMOE_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jmoe {

// Runs body(item, next) for item in [0, num_items) on the calling thread and on helpers
// scheduled on XLA's pool; `next` is the item the same thread runs after this one (-1 if
// none), claimed one ahead so its data can be prefetched. Items are claimed from a shared
// counter, so the caller never waits for a helper that has not started: it drains what is
// left itself, then waits only for items already claimed. Helpers that start late find
// nothing to claim and touch nothing else.
using Body = std::function<void(int64_t, int64_t)>;
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_items, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t total = 0;
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
    const Body* body = nullptr;
  };
  auto state = std::make_shared<State>();
  state->total = num_items;
  state->body = &body;
  auto work = [](State& s) {
    int64_t finished = 0;
    for (int64_t i = s.next.fetch_add(1); i < s.total; ++finished) {
      const int64_t next = s.next.fetch_add(1);
      (*s.body)(i, next < s.total ? next : -1);
      i = next;
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.done += finished;
      if (s.done == s.total) s.cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->total; });
}

}  // namespace jmoe

#endif  // JMOE_PARALLEL_FOR_H_
