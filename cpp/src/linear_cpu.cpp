// Batch-invariant CPU linear layer: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// Each weight row w[n, :] is read from memory once per call and applied to all M rows of x
// while it sits in L1, so a verify call over 17 rows streams the weights as often as a plain
// step over 1. Every output element is reduced in one fixed order that depends only on K
// (never on M, N, the row's place in the call or the thread count): 16 float32 lanes over
// k = 16 j + lane, then a fixed pairwise sum of the lanes, then the k >= 16 floor(K/16) tail in
// order. So a row's result is bit-identical whether it is computed alone or among 17 rows.
//
// Weights and activations are float32 or bfloat16 (bf16 is widened exactly to float32; products
// and sums are float32). Paths: AVX2+FMA (runtime check), and a portable scalar path with the
// same lanes, the same fused multiply-adds and the same reduction order, so both give the same
// bits. avx512_bf16/AMX dot-product instructions round differently
// (pairwise bf16 products) and are not used: one order on every x86 CPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "redrafter/c_abi_guard.h"
#include "redrafter/common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RD_X86 1
#endif

namespace redrafter {
namespace {

constexpr int32_t kF32 = 0;
constexpr int32_t kBF16 = 2;

inline float bf16ToF32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32ToBf16(float f) {  // round to nearest even, NaN kept quiet
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// Fixed lane reduction: ((l0+l8)+(l4+l12)) + ... the same tree for both paths.
inline float reduceLanes(const float* l) {
    float a[8];
    for (int i = 0; i < 8; ++i) a[i] = l[i] + l[i + 8];
    float b[4];
    for (int i = 0; i < 4; ++i) b[i] = a[i] + a[i + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// Scalar path: x row already float32 (xf), w row float32 or bf16.
template <class W>
float dotScalar(const float* xf, const W* w, int64_t k, float (*load)(W)) {
    float lane[16] = {0};
    const int64_t kv = k - k % 16;
    for (int64_t j = 0; j < kv; j += 16)
        for (int i = 0; i < 16; ++i) lane[i] = std::fma(xf[j + i], load(w[j + i]), lane[i]);
    float s = reduceLanes(lane);
    for (int64_t j = kv; j < k; ++j) s = std::fma(xf[j], load(w[j]), s);
    return s;
}

float loadF32(float v) { return v; }
float loadBf16(uint16_t v) { return bf16ToF32(v); }

#ifdef RD_X86
__attribute__((target("avx2,fma"))) inline __m256 widenBf16(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// One weight row (already float32 in wf, widened once) against all m rows of xf.
__attribute__((target("avx2,fma"))) inline float finishAvx2(__m256 a0, __m256 a1, const float* x, const float* wf,
                                                            int64_t kv, int64_t k) {
    float lane[16];
    _mm256_storeu_ps(lane, a0);
    _mm256_storeu_ps(lane + 8, a1);
    float s = reduceLanes(lane);
    for (int64_t j = kv; j < k; ++j) s = std::fma(x[j], wf[j], s);
    return s;
}

// One weight row (float32 in wf) against all m rows of xf; four rows at a time (eight
// independent accumulator chains), each row's element reduced exactly as when it runs alone.
__attribute__((target("avx2,fma"))) void rowAvx2(const float* wf, const float* xf, int64_t m, int64_t k,
                                                 float* out /* [m] */) {
    const int64_t kv = k - k % 16;
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
        const float* x0 = xf + r * k;
        const float* x1 = x0 + k;
        const float* x2 = x1 + k;
        const float* x3 = x2 + k;
        __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(),
               a11 = _mm256_setzero_ps(), a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps(),
               a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
        for (int64_t j = 0; j < kv; j += 16) {
            const __m256 w0 = _mm256_loadu_ps(wf + j), w1 = _mm256_loadu_ps(wf + j + 8);
            a00 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j), w0, a00);
            a01 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j + 8), w1, a01);
            a10 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + j), w0, a10);
            a11 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + j + 8), w1, a11);
            a20 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + j), w0, a20);
            a21 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + j + 8), w1, a21);
            a30 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + j), w0, a30);
            a31 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + j + 8), w1, a31);
        }
        out[r] = finishAvx2(a00, a01, x0, wf, kv, k);
        out[r + 1] = finishAvx2(a10, a11, x1, wf, kv, k);
        out[r + 2] = finishAvx2(a20, a21, x2, wf, kv, k);
        out[r + 3] = finishAvx2(a30, a31, x3, wf, kv, k);
    }
    for (; r < m; ++r) {
        const float* x = xf + r * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t j = 0; j < kv; j += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(wf + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(wf + j + 8), a1);
        }
        out[r] = finishAvx2(a0, a1, x, wf, kv, k);
    }
}

// m == 1 fast path: no widened copy of the weight row, same order as rowAvx2.
__attribute__((target("avx2,fma"))) float dot1Bf16Avx2(const float* x, const uint16_t* w, int64_t k) {
    const int64_t kv = k - k % 16;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < kv; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), widenBf16(w + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), widenBf16(w + j + 8), a1);
    }
    float lane[16];
    _mm256_storeu_ps(lane, a0);
    _mm256_storeu_ps(lane + 8, a1);
    float s = reduceLanes(lane);
    for (int64_t j = kv; j < k; ++j) s = std::fma(x[j], bf16ToF32(w[j]), s);
    return s;
}

__attribute__((target("avx2,fma"))) void widenRowAvx2(const uint16_t* w, float* wf, int64_t k) {
    const int64_t kv = k - k % 8;
    for (int64_t j = 0; j < kv; j += 8) _mm256_storeu_ps(wf + j, widenBf16(w + j));
    for (int64_t j = kv; j < k; ++j) wf[j] = bf16ToF32(w[j]);
}

bool haveAvx2Fma() {
    static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return v;
}
#endif

Status linearCpu(const void* x, int32_t xDtype, const void* w, int32_t wDtype, const float* bias, void* y,
                 int32_t yDtype, int64_t m, int64_t n, int64_t k, int32_t forceScalar) {
    auto okDtype = [](int32_t d) { return d == kF32 || d == kBF16; };
    if (!okDtype(xDtype) || !okDtype(wDtype) || !okDtype(yDtype))
        return Status::error(StatusCode::kInvalidArgument,
                             "linear: dtypes must be 0 (float32) or 2 (bfloat16), got x=%d w=%d y=%d",
                             static_cast<int>(xDtype), static_cast<int>(wDtype), static_cast<int>(yDtype));
    if (m < 0 || n < 1 || k < 1)
        return Status::error(StatusCode::kInvalidArgument,
                             "linear: need m >= 0, n >= 1, k >= 1, got m=%lld n=%lld k=%lld", static_cast<long long>(m),
                             static_cast<long long>(n), static_cast<long long>(k));
    if (m == 0) return Status::success();
    if (!x || !w || !y) return Status::error(StatusCode::kInvalidArgument, "linear: null x, w or y pointer");
    // Activations widened once to float32 (exact for bf16).
    std::vector<float> xf(static_cast<size_t>(m * k));
    if (xDtype == kF32) {
        std::memcpy(xf.data(), x, xf.size() * sizeof(float));
    } else {
        const uint16_t* xh = static_cast<const uint16_t*>(x);
        for (size_t i = 0; i < xf.size(); ++i) xf[i] = bf16ToF32(xh[i]);
    }
    std::vector<float> acc(static_cast<size_t>(m));
    std::vector<float> wrow(wDtype == kBF16 ? static_cast<size_t>(k) : 0);
#ifdef RD_X86
    const bool simd = !forceScalar && haveAvx2Fma();
#else
    const bool simd = false;
    (void)forceScalar;
#endif
    for (int64_t o = 0; o < n; ++o) {
        if (wDtype == kF32) {
            const float* wr = static_cast<const float*>(w) + o * k;
#ifdef RD_X86
            if (simd) {
                rowAvx2(wr, xf.data(), m, k, acc.data());
            } else
#endif
                for (int64_t r = 0; r < m; ++r) acc[r] = dotScalar<float>(xf.data() + r * k, wr, k, loadF32);
        } else {
            const uint16_t* wr = static_cast<const uint16_t*>(w) + o * k;
#ifdef RD_X86
            if (simd && m == 1) {
                acc[0] = dot1Bf16Avx2(xf.data(), wr, k);
            } else if (simd) {
                widenRowAvx2(wr, wrow.data(), k);
                rowAvx2(wrow.data(), xf.data(), m, k, acc.data());
            } else
#endif
                for (int64_t r = 0; r < m; ++r) acc[r] = dotScalar<uint16_t>(xf.data() + r * k, wr, k, loadBf16);
        }
        const float b = bias ? bias[o] : 0.0f;
        for (int64_t r = 0; r < m; ++r) {
            const float v = acc[r] + b;
            if (yDtype == kF32)
                static_cast<float*>(y)[r * n + o] = v;
            else
                static_cast<uint16_t*>(y)[r * n + o] = f32ToBf16(v);
        }
    }
    return Status::success();
}

}  // namespace
}  // namespace redrafter

extern "C" {

// y [m, n] = x [m, k] . w [n, k]^T (+ bias [n], float32); dtypes 0 = float32, 2 = bfloat16.
// force_scalar = 1 takes the portable path (tests). Returns 0 or a StatusCode, message in msg.
int32_t redrafter_linear_cpu(const void* x, int32_t x_dtype, const void* w, int32_t w_dtype, const float* bias, void* y,
                             int32_t y_dtype, int64_t m, int64_t n, int64_t k, int32_t force_scalar, char* msg,
                             int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len, [&] {
        return redrafter::linearCpu(x, x_dtype, w, w_dtype, bias, y, y_dtype, m, n, k, force_scalar);
    });
}

// 1 when the SIMD (AVX2+FMA) path runs on this CPU, else 0.
int32_t redrafter_linear_simd_cpu(void) {
#ifdef RD_X86
    return redrafter::haveAvx2Fma() ? 1 : 0;
#else
    return 0;
#endif
}

}  // extern "C"
