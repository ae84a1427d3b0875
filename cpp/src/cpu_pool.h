// The CPU kernels' persistent thread pool (linear, attention).
//
// cpuPoolFor(threads, chunks, f) runs f(c) once for every chunk c in [0, chunks) on the calling
// thread and up to threads - 1 workers, and returns when all chunks are done. Chunks are handed
// out one at a time from a shared counter, so a worker that the OS has not scheduled yet costs
// nothing: the caller takes its chunks, and a worker that wakes after the job is closed does not
// enter it. A chunk is always computed whole by one thread, so kernels that give each output to
// one chunk get the same bits with any thread count.
//
// Workers spin briefly after a job (the next kernel call of a step usually comes within
// microseconds; $REDRAFTER_CPU_SPIN_US, default 100), then sleep on a condition variable.
// Fork-safe (a child starts a new pool). A call from a second thread while the pool is busy runs
// on the calling thread alone.
#pragma once

#include <cstdint>
#include <functional>

namespace redrafter {

constexpr int kCpuPoolMaxThreads = 256;

void cpuPoolFor(int threads, int64_t chunks, const std::function<void(int64_t)>& f);

}  // namespace redrafter
