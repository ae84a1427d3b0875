// A CPU emulator of the CUDA execution model, enough to run this project's kernels unchanged
// on a machine without a GPU (tests only; compiled with REDRAFTER_EMULATE).
//
// Each thread of a block is a fiber on one OS thread (a 6-register context switch on x86-64,
// ucontext elsewhere); blocks run one after another.
// __syncthreads() parks a fiber until every live thread of the block arrived; warp intrinsics
// (__shfl_*_sync, __match_any_sync) park it until all 32 lanes of its warp arrived, so they
// require converged warps, as the kernels guarantee with full masks. Shared memory is a
// function-local static (one block runs at a time). Atomics are plain read-modify-write
// (fibers never interleave inside one). A deadlock (threads waiting on barriers that can never
// complete, i.e. divergent barriers) aborts with a message.
//
// What it cannot show: timing, memory-model races between blocks, or ptxas' code generation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <ucontext.h>
#include <vector_types.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#ifndef __restrict__
#define __restrict__ __restrict
#endif

using std::max;
using std::min;

namespace emu {

enum FiberState { kRunnable = 0, kAtBlockBarrier = 1, kAtWarpBarrier = 2, kDone = 3 };

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save and
// resumes the context whose stack pointer is `next`. Weak: every translation unit may emit it.
extern "C" void emu_switch_ctx(void** save, void* next);
asm(R"(
    .text
    .weak emu_switch_ctx
    .type emu_switch_ctx,@function
emu_switch_ctx:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");
struct Context {
    void* sp = nullptr;
};
inline void switchContext(Context& from, Context& to) { emu_switch_ctx(&from.sp, to.sp); }
inline void makeContext(Context& c, char* stack, size_t bytes, void (*fn)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top) - 8;
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;  // r15 r14 r13 r12 rbx rbp
    sp[6] = reinterpret_cast<void*>(fn);          // return address
    sp[7] = nullptr;                              // keeps rsp = 8 (mod 16) at entry
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switchContext(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void makeContext(Context& c, char* stack, size_t bytes, void (*fn)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fn, 0);
}
#endif

struct Fiber {
    Context ctx;
    uint3 tid;
    int linear = 0;
    FiberState state = kRunnable;
};

struct Block {
    uint3 blockIdx;
    dim3 blockDim, gridDim;
    std::vector<Fiber> fibers;
    Context scheduler;
    int current = 0;
    std::function<void()> body;
    std::vector<uint64_t> slots;  // [warps][32] exchange values of warp intrinsics
    std::vector<char> dynamicShared;
};

inline Block*& current() {
    static Block* b = nullptr;
    return b;
}
inline Fiber& self() { return current()->fibers[current()->current]; }

inline void yieldTo(FiberState s) {
    Fiber& f = self();
    f.state = s;
    switchContext(f.ctx, current()->scheduler);
}

inline void entry() {
    current()->body();
    Fiber& f = self();
    f.state = kDone;
    switchContext(f.ctx, current()->scheduler);
    std::abort();  // never resumed
}

inline std::vector<char>& stackPool(size_t n) {
    static std::vector<char> pool;
    if (pool.size() < n) pool.resize(n);
    return pool;
}

constexpr size_t kStackBytes = 128 * 1024;

inline void runBlock(Block& blk) {
    const int n = static_cast<int>(blk.blockDim.x * blk.blockDim.y * blk.blockDim.z);
    auto& stacks = stackPool(static_cast<size_t>(n) * kStackBytes);
    blk.fibers.assign(static_cast<size_t>(n), Fiber{});
    blk.slots.assign(static_cast<size_t>((n + 31) / 32) * 32, 0);
    for (int i = 0; i < n; ++i) {
        Fiber& f = blk.fibers[static_cast<size_t>(i)];
        f.linear = i;
        f.tid = uint3{static_cast<unsigned>(i) % blk.blockDim.x,
                      (static_cast<unsigned>(i) / blk.blockDim.x) % blk.blockDim.y,
                      static_cast<unsigned>(i) / (blk.blockDim.x * blk.blockDim.y)};
        makeContext(f.ctx, stacks.data() + static_cast<size_t>(i) * kStackBytes, kStackBytes, entry);
    }
    current() = &blk;
    for (;;) {
        bool ran = false;
        for (int i = 0; i < n; ++i) {
            Fiber& f = blk.fibers[static_cast<size_t>(i)];
            if (f.state != kRunnable) continue;
            blk.current = i;
            ran = true;
            switchContext(blk.scheduler, f.ctx);
        }
        // Release barriers that are complete.
        int live = 0, atBlock = 0;
        for (auto& f : blk.fibers) {
            live += f.state != kDone;
            atBlock += f.state == kAtBlockBarrier;
        }
        if (live == 0) break;
        bool released = false;
        if (atBlock == live) {
            for (auto& f : blk.fibers)
                if (f.state == kAtBlockBarrier) f.state = kRunnable;
            released = true;
        }
        for (int w = 0; w * 32 < n; ++w) {
            int waiting = 0, lanes = std::min(32, n - w * 32);
            for (int l = 0; l < lanes; ++l)
                waiting += blk.fibers[static_cast<size_t>(w * 32 + l)].state == kAtWarpBarrier;
            if (waiting == lanes) {
                for (int l = 0; l < lanes; ++l) blk.fibers[static_cast<size_t>(w * 32 + l)].state = kRunnable;
                released = true;
            }
        }
        if (!ran && !released) {
            std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u): divergent __syncthreads or warp intrinsic\n",
                         blk.blockIdx.x, blk.blockIdx.y, blk.blockIdx.z);
            std::abort();
        }
    }
    current() = nullptr;
}

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
    Block blk;
    blk.blockDim = block;
    blk.gridDim = grid;
    blk.dynamicShared.assign(smem + 16, 0);
    blk.body = [&] { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blk.blockIdx = uint3{x, y, z};
                runBlock(blk);
            }
}

template <class T>
T* dynamicShared() {
    return reinterpret_cast<T*>(current()->dynamicShared.data());
}

// ---- warp exchange --------------------------------------------------------------------------

template <class T>
uint64_t toBits(T v) {
    static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T>
T fromBits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

// Publishes v, waits for the warp, returns every lane's value via `read(lane)`.
template <class T, class Read>
auto exchange(T v, Read&& read) {
    Fiber& f = self();
    const int warp = f.linear / 32, lane = f.linear % 32;
    uint64_t* slots = current()->slots.data() + warp * 32;
    slots[lane] = toBits(v);
    yieldTo(kAtWarpBarrier);
    auto r = read(slots, lane);
    yieldTo(kAtWarpBarrier);  // nobody overwrites a slot before every lane has read
    return r;
}

inline int warpLanes() {
    Fiber& f = self();
    const int n = static_cast<int>(current()->fibers.size());
    return std::min(32, n - (f.linear / 32) * 32);
}

}  // namespace emu

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::current()->blockIdx)
#define blockDim (::emu::current()->blockDim)
#define gridDim (::emu::current()->gridDim)

inline void __syncthreads() { ::emu::yieldTo(::emu::kAtBlockBarrier); }

template <class T>
T __shfl_sync(unsigned, T v, int src) {
    return ::emu::exchange(v, [&](const uint64_t* s, int) { return ::emu::fromBits<T>(s[src & 31]); });
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return ::emu::exchange(v, [&](const uint64_t* s, int lane) { return ::emu::fromBits<T>(s[(lane ^ mask) & 31]); });
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    return ::emu::exchange(v, [&](const uint64_t* s, int lane) {
        return ::emu::fromBits<T>(s[lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane]);
    });
}
template <class T>
unsigned __match_any_sync(unsigned, T v) {
    const int lanes = ::emu::warpLanes();
    return ::emu::exchange(v, [&](const uint64_t* s, int lane) {
        unsigned m = 0;
        for (int l = 0; l < lanes; ++l) m |= (s[l] == s[lane]) ? (1u << l) : 0u;
        return m;
    });
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T>
T __ldg(const T* p) {
    return *p;
}

template <class T, class U>
T atomicAdd(T* a, U v) {
    const T old = *a;
    *a = static_cast<T>(old + static_cast<T>(v));
    return old;
}
template <class T, class U>
T atomicMin(T* a, U v) {
    const T old = *a;
    if (static_cast<T>(v) < old) *a = static_cast<T>(v);
    return old;
}
template <class T, class U>
T atomicMax(T* a, U v) {
    const T old = *a;
    if (old < static_cast<T>(v)) *a = static_cast<T>(v);
    return old;
}

// ---- runtime API subset (host memory stands in for device memory) --------------------------
// The toolkit headers already declare the real API; the emulated one gets its own names.

inline cudaError_t& emuLastError() {
    static cudaError_t e = cudaSuccess;
    return e;
}
inline cudaError_t emu_cudaGetLastError() {
    const cudaError_t e = emuLastError();
    emuLastError() = cudaSuccess;
    return e;
}
inline const char* emu_cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : "emulated CUDA error";
}
inline cudaError_t emu_cudaGetDeviceCount(int* n) {
    *n = 1;
    return cudaSuccess;
}
inline cudaError_t emu_cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    std::memset(p, 0, sizeof(*p));
    std::snprintf(p->name, sizeof(p->name), "CPU emulator (cpp/tests/emu/cuda_emu.h)");
    p->major = 0;
    p->minor = 0;
    p->multiProcessorCount = 1;
    return cudaSuccess;
}
inline cudaError_t emu_cudaMalloc(void** p, size_t n) {
    *p = std::malloc(n);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t emu_cudaFree(void* p) {
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t emu_cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
    std::memcpy(d, s, n);
    return cudaSuccess;
}
inline cudaError_t emu_cudaDeviceSynchronize() { return cudaSuccess; }

struct CUevent_st {
    std::chrono::steady_clock::time_point t;
};
inline cudaError_t emu_cudaEventCreate(cudaEvent_t* e) {
    *e = new CUevent_st;
    return cudaSuccess;
}
inline cudaError_t emu_cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
inline cudaError_t emu_cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
    e->t = std::chrono::steady_clock::now();
    return cudaSuccess;
}
inline cudaError_t emu_cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t emu_cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
    return cudaSuccess;
}

#define cudaGetLastError emu_cudaGetLastError
#define cudaGetErrorString emu_cudaGetErrorString
#define cudaGetDeviceCount emu_cudaGetDeviceCount
#define cudaGetDeviceProperties emu_cudaGetDeviceProperties
#define cudaMalloc emu_cudaMalloc
#define cudaFree emu_cudaFree
#define cudaMemcpy emu_cudaMemcpy
#define cudaDeviceSynchronize emu_cudaDeviceSynchronize
#define cudaEventCreate emu_cudaEventCreate
#define cudaEventDestroy emu_cudaEventDestroy
#define cudaEventRecord emu_cudaEventRecord
#define cudaEventSynchronize emu_cudaEventSynchronize
#define cudaEventElapsedTime emu_cudaEventElapsedTime
