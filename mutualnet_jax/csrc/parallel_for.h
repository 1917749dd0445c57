// ParallelFor over XLA's intra-op thread pool, shared by the project's FFI kernels.
#ifndef MUTUALNET_JAX_CSRC_PARALLEL_FOR_H_
#define MUTUALNET_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace mutualnet {

// Runs body(first, last) over [0, n) in chunks on the pool; the calling thread takes chunks too, so the call never
// waits on a pool whose threads are all busy (it finishes the remaining chunks itself).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Body body) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(n, threads * 4);
  if (chunks <= 1) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, chunks, n, body]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < chunks;) {
      body(n * i / chunks, n * (i + 1) / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace mutualnet

#endif  // MUTUALNET_JAX_CSRC_PARALLEL_FOR_H_
