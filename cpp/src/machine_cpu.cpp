// The machine's own limits, measured by the kernels' own means (redrafter-bench --calibrate):
// the memory read bandwidth (a streaming sum over a buffer larger than the caches, on the
// kernels' thread pool) and the float32 FMA peak (independent FMA chains on every thread).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu_numeric.h"
#include "cpu_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RD_X86 1
#endif

namespace redrafter {
namespace {

#ifdef RD_X86
__attribute__((target("avx2,fma"))) float sumAvx2(const float* p, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    float l[8];
    _mm256_storeu_ps(l, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float s = l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
    for (; i < n; ++i) s += p[i];
    return s;
}

__attribute__((target("avx2,fma"))) float fmaAvx2(int64_t iters, float seed) {
    __m256 a[12];
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(seed * 1e-7f);
    for (int j = 0; j < 12; ++j) a[j] = _mm256_set1_ps(seed + static_cast<float>(j));
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
        for (int j = 0; j < 12; ++j) a[j] = _mm256_fmadd_ps(a[j], m, c);
    float l[8];
    __m256 s = a[0];
    for (int j = 1; j < 12; ++j) s = _mm256_add_ps(s, a[j]);
    _mm256_storeu_ps(l, s);
    return l[0] + l[7];
}

// GCC 12 reports its own AVX-512 intrinsics' "undefined" operands as uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) float fmaAvx512(int64_t iters, float seed) {
    __m512 a[12];
    const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(seed * 1e-7f);
    for (int j = 0; j < 12; ++j) a[j] = _mm512_set1_ps(seed + static_cast<float>(j));
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 12
        for (int j = 0; j < 12; ++j) a[j] = _mm512_fmadd_ps(a[j], m, c);
    __m512 s = a[0];
    for (int j = 1; j < 12; ++j) s = _mm512_add_ps(s, a[j]);
    return _mm512_reduce_add_ps(s);
}

#pragma GCC diagnostic pop
#endif

float sumScalar(const float* p, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) s[j] += p[i + j];
    float t = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    for (; i < n; ++i) t += p[i];
    return t;
}

}  // namespace
}  // namespace redrafter

extern "C" {

// Sum of buf [n] float32 read once on `threads` threads (contiguous chunks of 1 MiB).
float redrafter_read_sum_cpu(const float* buf, int64_t n, int32_t threads) {
    if (!buf || n <= 0) return 0.0f;
    const int64_t chunk = int64_t{1} << 18;
    const int64_t chunks = (n + chunk - 1) / chunk;
    std::vector<float> part(static_cast<size_t>(chunks));
    redrafter::cpuPoolFor(std::max(1, std::min(threads, redrafter::kCpuPoolMaxThreads)), chunks, [&](int64_t c) {
        const int64_t a = c * chunk, len = std::min(chunk, n - a);
#ifdef RD_X86
        part[static_cast<size_t>(c)] =
            redrafter::cpu::haveAvx2Fma() ? redrafter::sumAvx2(buf + a, len) : redrafter::sumScalar(buf + a, len);
#else
        part[static_cast<size_t>(c)] = redrafter::sumScalar(buf + a, len);
#endif
    });
    float s = 0;
    for (float v : part) s += v;
    return s;
}

// `chunks` x `iters` x 12 x (16 with AVX-512, else 8) float32 FMAs shared by `threads` threads
// (the caller times it), on the widest path the linear kernel uses; 0 when the CPU has no
// AVX2+FMA (no peak to measure).
float redrafter_fma_burn_cpu(int64_t iters, int64_t chunks, int32_t threads) {
#ifdef RD_X86
    if (!redrafter::cpu::haveAvx2Fma() || chunks < 1) return 0.0f;
    const int nt = std::max(1, std::min(threads, redrafter::kCpuPoolMaxThreads));
    std::vector<float> out(static_cast<size_t>(chunks));
    redrafter::cpuPoolFor(nt, chunks, [&](int64_t c) {
        const float seed = 1.0f + static_cast<float>(c);
        out[static_cast<size_t>(c)] =
            redrafter::cpu::haveAvx512() ? redrafter::fmaAvx512(iters, seed) : redrafter::fmaAvx2(iters, seed);
    });
    float s = 0;
    for (float v : out) s += v;
    return s;
#else
    (void)iters;
    (void)chunks;
    (void)threads;
    return 0.0f;
#endif
}

}  // extern "C"
