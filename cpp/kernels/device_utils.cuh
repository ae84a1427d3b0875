// Device building blocks of the ReDrafter kernels: logit loads, warp/block reductions and scans,
// and a block-wide radix select. Everything assumes blockDim.x is a multiple of 32, <= 1024;
// the radix select and the suffix scan need blockDim.x >= 256.
#pragma once

#if defined(REDRAFTER_EMULATE)
// CPU emulation of the CUDA execution model for tests without a GPU (cpp/tests/emu).
#include "cuda_emu.h"
#define RD_LAUNCH(kernel, grid, block, smem, stream, ...) ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define RD_DYNAMIC_SHARED(type, name) type* name = ::emu::dynamicShared<type>()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RD_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define RD_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include "redrafter/common.h"

namespace redrafter {
namespace device {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float toFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// Elements of T per 16-byte vector load.
template <class T>
struct Vec16 {
    static constexpr int kElems = 16 / sizeof(T);
};

// Radix-select bytes of orderedKey(float(T)) that are fixed by the higher bytes: float16
// widens to float with 13 zero mantissa bits (1 byte), bfloat16 with 16 (2 bytes).
template <class T>
struct KeyLowBytes {
    static constexpr int kValue = 0;
};
template <>
struct KeyLowBytes<__half> {
    static constexpr int kValue = 1;
};
template <>
struct KeyLowBytes<__nv_bfloat16> {
    static constexpr int kValue = 2;
};

// Loads kElems = 16/sizeof(T) consecutive logits starting at `i` (< n) as floats; elements past
// `n` become -inf and are flagged invalid by the caller (i + e < n). `vec` = the row is 16-byte
// aligned so a full vector can be loaded at once.
template <class T>
__device__ __forceinline__ void loadLogits(const T* row, int64_t i, int64_t n, bool vec,
                                           float (&out)[Vec16<T>::kElems]) {
    constexpr int kE = Vec16<T>::kElems;
    if (vec && i + kE <= n) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + i));
        T t[kE];
        memcpy(static_cast<void*>(t), &raw, sizeof(raw));  // well-defined type pun; registers only
#pragma unroll
        for (int e = 0; e < kE; ++e) out[e] = toFloat(t[e]);
    } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) out[e] = (i + e < n) ? toFloat(row[i + e]) : -INFINITY;
    }
}

template <class T>
__device__ __forceinline__ bool rowIsAligned16(const T* row) {
    return (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
}

// ---- warp and block reductions ------------------------------------------------------------

template <class V>
__device__ __forceinline__ V warpSum(V v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}

__device__ __forceinline__ float warpMax(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// Scratch for block reductions: one slot per warp.
struct ReduceScratch {
    double d[32];
    float f[32];
    int32_t i[32];
    uint32_t u[32];
};

// Sum over the block; every thread gets the result. Contains __syncthreads().
__device__ __forceinline__ double blockSum(double v, ReduceScratch& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warpSum(v);
    __syncthreads();
    if (lane == 0) s.d[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < nw; ++w) t += s.d[w];
    return t;
}

__device__ __forceinline__ uint32_t blockSumU32(uint32_t v, ReduceScratch& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warpSum(v);
    __syncthreads();
    if (lane == 0) s.u[warp] = v;
    __syncthreads();
    uint32_t t = 0;
    for (int w = 0; w < nw; ++w) t += s.u[w];
    return t;
}

// Max over the block (NaN ignored as fmaxf does); every thread gets the result.
__device__ __forceinline__ float blockMax(float v, ReduceScratch& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warpMax(v);
    __syncthreads();
    if (lane == 0) s.f[warp] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int w = 0; w < nw; ++w) t = fmaxf(t, s.f[w]);
    return t;
}

__device__ __forceinline__ int32_t blockMaxI32(int32_t v, ReduceScratch& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
    __syncthreads();
    if (lane == 0) s.i[warp] = v;
    __syncthreads();
    int32_t t = INT32_MIN;
    for (int w = 0; w < nw; ++w) t = max(t, s.i[w]);
    return t;
}

// Exclusive prefix sum over threads in threadIdx order; *total gets the block total.
template <class V>
__device__ __forceinline__ V blockExclusiveScan(V v, V* warpTotals /*[32] smem*/, V* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    V incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const V y = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += y;
    }
    __syncthreads();
    if (lane == 31) warpTotals[warp] = incl;
    __syncthreads();
    V before = V(0), all = V(0);
    for (int w = 0; w < nw; ++w) {
        if (w < warp) before += warpTotals[w];
        all += warpTotals[w];
    }
    *total = all;
    return before + incl - v;
}

// ---- block radix select -------------------------------------------------------------------

struct SelectScratch {
    uint32_t hist[256];
    double mass[256];
    uint32_t warpCount[8];
    double warpMass[8];
    uint32_t digit;
    uint32_t remaining;
    uint32_t equal;
    double massAbove;
};

// Inclusive suffix sums of the 256 bins for thread t < 256, which stands for bin 255 - t
// (so the thread order is the descending bin order). Contains __syncthreads().
__device__ __forceinline__ void binSuffix(const uint32_t* hist, uint32_t* warpTotals, uint32_t* incl, uint32_t* own) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    uint32_t v = t < 256 ? hist[255 - t] : 0u;
    uint32_t x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += y;
    }
    if (t < 256 && lane == 31) warpTotals[warp] = x;
    __syncthreads();
    if (t < 256) {
        for (int w = 0; w < warp; ++w) x += warpTotals[w];
    }
    *incl = x;
    *own = v;
}

// Warp-aggregated histogram update: lanes with the same bin add once (no same-address
// serialisation of shared atomics). Every lane of the warp must call it together;
// bin >= 256 means "nothing to add".
__device__ __forceinline__ void histAdd(uint32_t* hist, uint32_t bin) {
    const unsigned peers = __match_any_sync(kFullMask, bin);
    if (bin < 256u && static_cast<int>(threadIdx.x & 31) == __ffs(static_cast<int>(peers)) - 1)
        atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
}

// Same with a float weight per lane, accumulated into a double mass histogram.
__device__ __forceinline__ void histAddMass(uint32_t* hist, double* mass, uint32_t bin, float weight) {
    const unsigned peers = __match_any_sync(kFullMask, bin);
    float sum = 0.0f;
#pragma unroll
    for (int l = 0; l < 32; ++l) {
        const float v = __shfl_sync(kFullMask, weight, l);
        if ((peers >> l) & 1u) sum += v;
    }
    if (bin < 256u && static_cast<int>(threadIdx.x & 31) == __ffs(static_cast<int>(peers)) - 1) {
        atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
        atomicAdd(&mass[bin], static_cast<double>(sum));
    }
}

// Inclusive suffix sums of a double histogram, same thread/bin mapping as binSuffix.
__device__ __forceinline__ void binSuffixMass(const double* mass, double* warpTotals, double* incl, double* own) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    double v = t < 256 ? mass[255 - t] : 0.0;
    double x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += y;
    }
    if (t < 256 && lane == 31) warpTotals[warp] = x;
    __syncthreads();
    if (t < 256) {
        for (int w = 0; w < warp; ++w) x += warpTotals[w];
    }
    *incl = x;
    *own = v;
}

// Fills the low bytes of a radix-select result that KeyLowBytes says are not searched.
template <class Key, int kLowBytes>
__device__ __forceinline__ Key fillLowBytes(Key prefix) {
    if (kLowBytes > 0) {
        constexpr int kBits = static_cast<int>(sizeof(Key)) * 8;
        const Key top = static_cast<Key>(1) << (kBits - 1);
        const Key low = (static_cast<Key>(1) << (8 * (kLowBytes > 0 ? kLowBytes : 1))) - 1;
        if (!(prefix & top)) prefix |= low;
    }
    return prefix;
}

// k-th largest (1-based) of the keys that `forEachKey(visit)` hands to visit(key, valid) on
// each thread; the caller guarantees 1 <= k <= number of valid keys. visit must be called the
// same number of times by every lane of a warp (pass valid = false for padding). `kLowBytes`
// low bytes of every key are fixed by the higher bytes (KeyLowBytes) and are not searched.
// Returns the key; *greater = keys strictly above it, *equal = keys equal to it. All threads
// of the block must call it.
template <class Key, int kLowBytes, class ForEach>
__device__ Key blockRadixSelect(ForEach&& forEachKey, uint32_t k, SelectScratch& s, uint32_t* greater,
                                uint32_t* equal) {
    constexpr int kBits = static_cast<int>(sizeof(Key)) * 8;
    Key prefix = 0, mask = 0;
    uint32_t remaining = k;
    for (int shift = kBits - 8; shift >= 8 * kLowBytes; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) s.hist[i] = 0;
        __syncthreads();
        forEachKey([&](Key key, bool valid) {
            const bool match = valid && (key & mask) == prefix;
            histAdd(s.hist, match ? (static_cast<uint32_t>(key >> shift) & 0xFFu) : 256u);
        });
        __syncthreads();
        uint32_t incl, own;
        binSuffix(s.hist, s.warpCount, &incl, &own);
        if (threadIdx.x < 256 && own > 0 && incl - own < remaining && incl >= remaining) {
            s.digit = 255u - threadIdx.x;
            s.remaining = remaining - (incl - own);
            s.equal = own;
        }
        __syncthreads();
        prefix |= static_cast<Key>(s.digit) << shift;
        mask |= static_cast<Key>(0xFFu) << shift;
        remaining = s.remaining;
        *equal = s.equal;
        __syncthreads();
    }
    *greater = k - remaining;
    return fillLowBytes<Key, kLowBytes>(prefix);
}

}  // namespace device
}  // namespace redrafter
