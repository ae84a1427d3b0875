// The CPU kernels' thread pool (cpu_pool.h).
#include "cpu_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>

#include <pthread.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RD_X86 1
#endif

namespace redrafter {
namespace {

// One atomic word describes the current job: generation (bits 40..63), workers allowed in
// (bits 31..39), open (bit 30), workers inside (bits 0..29). Entering, leaving and closing are
// compare-and-swaps on it, so a worker can only enter the job whose generation it saw, and only
// while the caller has not closed it.
constexpr uint64_t kOpen = uint64_t{1} << 30;
constexpr uint64_t kActiveMask = kOpen - 1;
inline uint64_t genOf(uint64_t w) { return w >> 40; }
inline int allowedOf(uint64_t w) { return static_cast<int>((w >> 31) & 0x1ff); }

inline void cpuPause() {
#ifdef RD_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

class Pool {
public:
    void forEach(int threads, int64_t chunks, const std::function<void(int64_t)>& f) {
        if (threads <= 1 || chunks <= 1) {
            for (int64_t c = 0; c < chunks; ++c) f(c);
            return;
        }
        std::unique_lock<std::mutex> busy(runMu_, std::try_to_lock);
        if (!busy.owns_lock()) {  // another thread is using the pool: same chunks, one thread
            for (int64_t c = 0; c < chunks; ++c) f(c);
            return;
        }
        const int helpers = std::min<int64_t>(threads - 1, chunks - 1);
        ensureWorkers(helpers);
        job_ = &f;
        chunks_ = chunks;
        next_.store(0, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lk(mu_);
            const uint64_t gen = (genOf(word_.load(std::memory_order_relaxed)) + 1) & 0xffffff;
            word_.store((gen << 40) | (static_cast<uint64_t>(helpers) << 31) | kOpen, std::memory_order_release);
        }
        cv_.notify_all();
        runChunks();
        // Close the job: workers that have not entered yet stay out; wait for those inside.
        uint64_t w = word_.load(std::memory_order_acquire);
        while (!word_.compare_exchange_weak(w, w & ~kOpen, std::memory_order_acq_rel)) {}
        while ((word_.load(std::memory_order_acquire) & kActiveMask) != 0) cpuPause();
        job_ = nullptr;
    }

    static Pool& get();
    static void forgetAfterFork();

private:
    void runChunks() {
        for (;;) {
            const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
            if (c >= chunks_) return;
            (*job_)(c);
        }
    }

    void ensureWorkers(int n) {
        while (nWorkers_ < n) {
            const int id = nWorkers_++;
            // the generation before the job about to be published: the new worker must see it
            const uint64_t seen = genOf(word_.load(std::memory_order_acquire));
            std::thread([this, id, seen] { loop(id, seen); }).detach();
        }
    }

    void loop(int id, uint64_t seen) {
        for (;;) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spinUs());
            uint64_t w;
            for (int i = 0;; ++i) {
                w = word_.load(std::memory_order_acquire);
                if (genOf(w) != seen) break;
                if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) {
                    std::unique_lock<std::mutex> lk(mu_);
                    cv_.wait(lk, [&] { return genOf(word_.load(std::memory_order_acquire)) != seen; });
                    w = word_.load(std::memory_order_acquire);
                    break;
                }
                cpuPause();
            }
            seen = genOf(w);
            if (id >= allowedOf(w)) continue;
            bool entered = false;
            while ((w & kOpen) && genOf(w) == seen) {
                if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) {
                    entered = true;
                    break;
                }
            }
            if (!entered) continue;
            runChunks();
            word_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    static int64_t spinUs() {
        static const int64_t v = [] {
            const char* s = std::getenv("REDRAFTER_CPU_SPIN_US");
            return s ? std::max<int64_t>(0, std::atoll(s)) : int64_t{100};
        }();
        return v;
    }

    std::mutex runMu_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<uint64_t> word_{0};
    std::atomic<int64_t> next_{0};
    const std::function<void(int64_t)>* job_ = nullptr;
    int64_t chunks_ = 0;
    int nWorkers_ = 0;
};

Pool* gPool = nullptr;
std::once_flag gAtFork;

void Pool::forgetAfterFork() { gPool = nullptr; }  // the child has none of the workers: leak it

Pool& Pool::get() {
    std::call_once(gAtFork, [] { pthread_atfork(nullptr, nullptr, &Pool::forgetAfterFork); });
    if (!gPool) gPool = new Pool();  // never deleted: detached workers may outlive statics
    return *gPool;
}

}  // namespace

void cpuPoolFor(int threads, int64_t chunks, const std::function<void(int64_t)>& f) {
    Pool::get().forEach(threads, chunks, f);
}

}  // namespace redrafter
