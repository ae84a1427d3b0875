// Batch-invariant CPU attention over a slot KV cache with a per-query key mask.
//
// out[b, t, h, :] = sum_j p_j v_j / sum_j p_j over the keys j < S that mask[b, t, j] allows, with
// p_j = exp(s_j - max_j s_j) and s_j = scale * q[b, t, h, :] . k_j, where k_j, v_j are
// cache[0 / 1, slots[b], h / (nh / nkv), j, :] (grouped-query attention).
//
// Order. Each query row is computed alone, from its own q and its allowed keys in position
// order: the dot product as 8 lanes over d = 8 i + lane (FMA chains), then a fixed pairwise sum
// of the lanes and the d >= 8 floor(hd / 8) tail in order; the softmax sum in key order; each
// output element one FMA chain over the allowed keys in order, divided once by the sum. Nothing
// depends on T, B, the row's place in the call, the masked-out keys or the thread count. A token
// verified in a tree sees its ancestors in depth order, exactly the keys and order it sees when
// decoded plainly after they entered the cache, so tree verification and plain decoding give
// the same bits. The AVX-512, AVX2 and portable paths compute the same chains (std::fma,
// std::exp on all three; AVX-512 takes two keys' dot products per register and holds the output
// row in registers across the keys).
//
// Types: q and out float32; the cache float32 or bfloat16 (widened exactly).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_numeric.h"
#include "cpu_pool.h"
#include "redrafter/c_abi_guard.h"
#include "redrafter/c_api.h"
#include "redrafter/common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RD_X86 1
#endif

namespace redrafter {
namespace {

using cpu::bf16ToF32;
using cpu::f32ToBf16;
using cpu::kBF16;
using cpu::kF32;

inline float ld(const float* p) { return *p; }
inline float ld(const uint16_t* p) { return bf16ToF32(*p); }

inline float reduce8(const float* l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

template <class T>
float dotScalar(const float* q, const T* k, int64_t hd) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t dv = hd - hd % 8;
    for (int64_t d = 0; d < dv; d += 8)
        for (int i = 0; i < 8; ++i) lane[i] = std::fma(q[d + i], ld(k + d + i), lane[i]);
    float s = reduce8(lane);
    for (int64_t d = dv; d < hd; ++d) s = std::fma(q[d], ld(k + d), s);
    return s;
}

template <class T>
void accScalar(float* acc, float p, const T* v, int64_t hd) {
    for (int64_t d = 0; d < hd; ++d) acc[d] = std::fma(p, ld(v + d), acc[d]);
}

#ifdef RD_X86
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <class T>
__attribute__((target("avx2,fma"))) float dotAvx2(const float* q, const T* k, int64_t hd) {
    const int64_t dv = hd - hd % 8;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < dv; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a);
    float lane[8];
    _mm256_storeu_ps(lane, a);
    float s = reduce8(lane);
    for (int64_t d = dv; d < hd; ++d) s = std::fma(q[d], ld(k + d), s);
    return s;
}

template <class T>
__attribute__((target("avx2,fma"))) void accAvx2(float* acc, float p, const T* v, int64_t hd) {
    const int64_t dv = hd - hd % 8;
    const __m256 pb = _mm256_set1_ps(p);
    for (int64_t d = 0; d < dv; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pb, load8(v + d), _mm256_loadu_ps(acc + d)));
    for (int64_t d = dv; d < hd; ++d) acc[d] = std::fma(p, ld(v + d), acc[d]);
}

// AVX-512. Two keys' dot products in one register (lanes 0-7 the first key, 8-15 the second):
// each lane the same FMA chain as dotAvx2's, then reduce8's lane tree done in registers (a + b
// == b + a, so each half's lane 0 holds reduce8's value bit for bit), then the same tail.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) inline __m512 pair8(__m256 a, __m256 b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(a)), _mm256_castps_pd(b), 1));
}
__attribute__((target("avx512f"))) inline __m256 wide8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m256 wide8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f"))) inline __m512 wide16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 wide16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <class T>
__attribute__((target("avx512f"))) void dot2Avx512(const float* q, const T* ka, const T* kb, int64_t hd, float* da,
                                                   float* db) {
    const int64_t dv = hd - hd % 8;
    __m512 a = _mm512_setzero_ps();
    for (int64_t d = 0; d < dv; d += 8) {
        const __m256 q8 = _mm256_loadu_ps(q + d);
        a = _mm512_fmadd_ps(pair8(q8, q8), pair8(wide8(ka + d), wide8(kb + d)), a);
    }
    a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));  // l_i + l_i+4
    a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, _MM_SHUFFLE(1, 0, 3, 2)));     // + (l_i+2 + l_i+6)
    a = _mm512_add_ps(a, _mm512_shuffle_ps(a, a, _MM_SHUFFLE(2, 3, 0, 1)));     // + the odd lanes' sum
    float sa = _mm512_cvtss_f32(a), sb = _mm_cvtss_f32(_mm512_extractf32x4_ps(a, 2));
    for (int64_t d = dv; d < hd; ++d) {
        sa = std::fma(q[d], ld(ka + d), sa);
        sb = std::fma(q[d], ld(kb + d), sb);
    }
    *da = sa;
    *db = sb;
}

// The softmax-weighted sum with the NV x 16 output lanes held in registers across the keys: each
// element the same FMA chain over the allowed keys as accAvx2 / accScalar.
template <class T, int NV>
__attribute__((target("avx512f"))) float accumulateAvx512(const float* sc, const uint8_t* m, const T* vals, int64_t s,
                                                          int64_t hd, float mx, float* o) {
    __m512 acc[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    float sum = 0.0f;
    for (int64_t j = 0; j < s; ++j) {
        if (!m[j]) continue;
        const float p = std::exp(sc[j] - mx);
        sum += p;
        const __m512 pb = _mm512_set1_ps(p);
        const T* vj = vals + j * hd;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(pb, wide16(vj + 16 * v), acc[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + 16 * v, acc[v]);
    return sum;
}
#pragma GCC diagnostic pop

template <class T>
using AccFn = float (*)(const float*, const uint8_t*, const T*, int64_t, int64_t, float, float*);

// The register-held sum for head sizes 16, 32, ..., 128; null otherwise (the AVX2 path then).
template <class T>
AccFn<T> accumulatorFor(int64_t hd) {
    switch (hd) {
        case 16:
            return accumulateAvx512<T, 1>;
        case 32:
            return accumulateAvx512<T, 2>;
        case 48:
            return accumulateAvx512<T, 3>;
        case 64:
            return accumulateAvx512<T, 4>;
        case 80:
            return accumulateAvx512<T, 5>;
        case 96:
            return accumulateAvx512<T, 6>;
        case 112:
            return accumulateAvx512<T, 7>;
        case 128:
            return accumulateAvx512<T, 8>;
        default:
            return nullptr;
    }
}

using cpu::haveAvx2Fma;
using cpu::haveAvx512;
#endif

struct AttnCall {
    const float* q;     // [B, T, nh, hd]
    const void* cache;  // [2, slots, nkv, cap, hd] (one layer)
    int32_t cacheDtype;
    const int64_t* slots;  // [B]
    const uint8_t* mask;   // [B, T, S]
    float* out;            // [B, T, nh, hd]
    int64_t b, t, nh, nkv, hd, s, cap, numSlots;
    float scale;
    int simd;  // 0 portable, 1 AVX2, 2 AVX-512
};

template <class T>
void queryRow(const AttnCall& c, int64_t row /* b * T * nh + t * nh + h */, std::vector<float>& sc) {
    const int64_t h = row % c.nh;
    const int64_t bt = row / c.nh;
    const int64_t bi = bt / c.t;
    const int64_t kvh = h / (c.nh / c.nkv);
    const T* cache = static_cast<const T*>(c.cache);
    const int64_t plane = c.numSlots * c.nkv * c.cap * c.hd;  // K -> V
    const T* keys = cache + ((c.slots[bi] * c.nkv + kvh) * c.cap) * c.hd;
    const T* vals = keys + plane;
    const float* q = c.q + row * c.hd;
    const uint8_t* m = c.mask + bt * c.s;
    float* o = c.out + row * c.hd;
    sc.resize(static_cast<size_t>(c.s));
    float mx = -std::numeric_limits<float>::infinity();
#ifdef RD_X86
    if (c.simd == 2) {  // keys two at a time (the same per-key sums)
        int64_t pend = -1;
        for (int64_t j = 0; j < c.s; ++j) {
            if (!m[j]) continue;
            if (pend < 0) {
                pend = j;
                continue;
            }
            float da, db;
            dot2Avx512<T>(q, keys + pend * c.hd, keys + j * c.hd, c.hd, &da, &db);
            sc[pend] = da * c.scale;
            mx = std::max(mx, sc[pend]);
            sc[j] = db * c.scale;
            mx = std::max(mx, sc[j]);
            pend = -1;
        }
        if (pend >= 0) {
            sc[pend] = dotAvx2<T>(q, keys + pend * c.hd, c.hd) * c.scale;
            mx = std::max(mx, sc[pend]);
        }
    } else
#endif
        for (int64_t j = 0; j < c.s; ++j) {
            if (!m[j]) continue;
#ifdef RD_X86
            const float d = c.simd ? dotAvx2<T>(q, keys + j * c.hd, c.hd) : dotScalar<T>(q, keys + j * c.hd, c.hd);
#else
        const float d = dotScalar<T>(q, keys + j * c.hd, c.hd);
#endif
            sc[j] = d * c.scale;
            mx = std::max(mx, sc[j]);
        }
    std::fill(o, o + c.hd, 0.0f);
    if (mx == -std::numeric_limits<float>::infinity()) return;  // no key allowed: zeros
    float sum = 0.0f;
#ifdef RD_X86
    const AccFn<T> held = c.simd == 2 ? accumulatorFor<T>(c.hd) : nullptr;
    if (held) {
        sum = held(sc.data(), m, vals, c.s, c.hd, mx, o);
    } else
#endif
        for (int64_t j = 0; j < c.s; ++j) {
            if (!m[j]) continue;
            const float p = std::exp(sc[j] - mx);
            sum += p;
#ifdef RD_X86
            if (c.simd)
                accAvx2<T>(o, p, vals + j * c.hd, c.hd);
            else
#endif
                accScalar<T>(o, p, vals + j * c.hd, c.hd);
        }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < c.hd; ++d) o[d] *= inv;
}

}  // namespace

Status cpu::attention(const float* q, const void* cache, int32_t cacheDtype, const int64_t* slots, const uint8_t* mask,
                      float* out, int64_t b, int64_t t, int64_t nh, int64_t nkv, int64_t hd, int64_t s, int64_t cap,
                      int64_t numSlots, float scale, int32_t threads, int32_t forceScalar) {
    if (cacheDtype != kF32 && cacheDtype != kBF16)
        return Status::error(StatusCode::kInvalidArgument,
                             "attention: cache dtype must be 0 (float32) or 2 (bfloat16), got %d",
                             static_cast<int>(cacheDtype));
    if (b < 0 || t < 0 || nh < 1 || nkv < 1 || hd < 1 || s < 1 || cap < s || numSlots < 1 || nh % nkv != 0)
        return Status::error(StatusCode::kInvalidArgument,
                             "attention: bad shape b=%lld t=%lld nh=%lld nkv=%lld hd=%lld S=%lld cap=%lld slots=%lld "
                             "(need nh %% nkv == 0, 1 <= S <= cap)",
                             static_cast<long long>(b), static_cast<long long>(t), static_cast<long long>(nh),
                             static_cast<long long>(nkv), static_cast<long long>(hd), static_cast<long long>(s),
                             static_cast<long long>(cap), static_cast<long long>(numSlots));
    if (threads < 1 || threads > kCpuPoolMaxThreads)
        return Status::error(StatusCode::kInvalidArgument, "attention: threads must be in [1, %d], got %d",
                             kCpuPoolMaxThreads, static_cast<int>(threads));
    if (b == 0 || t == 0) return Status::success();
    if (!q || !cache || !slots || !mask || !out)
        return Status::error(StatusCode::kInvalidArgument, "attention: null pointer argument");
    for (int64_t i = 0; i < b; ++i)
        if (slots[i] < 0 || slots[i] >= numSlots)
            return Status::error(StatusCode::kInvalidArgument, "attention: slots[%lld] = %lld outside [0, %lld)",
                                 static_cast<long long>(i), static_cast<long long>(slots[i]),
                                 static_cast<long long>(numSlots));
#ifdef RD_X86
    const int simd = forceScalar ? 0 : haveAvx512() ? 2 : haveAvx2Fma() ? 1 : 0;
#else
    const int simd = 0;
    (void)forceScalar;
#endif
    const AttnCall c{q, cache, cacheDtype, slots, mask, out, b, t, nh, nkv, hd, s, cap, numSlots, scale, simd};
    const int64_t rows = b * t * nh;
    // Chunks of about 1 M multiply-adds at most (a hand-off costs a few microseconds).
    const int64_t perRow = std::max<int64_t>(1, s * hd * 2);
    // At least one chunk per thread when there are rows enough (a decode step's few heads).
    const int64_t rowsPerChunk =
        std::max<int64_t>(1, std::min((int64_t{1} << 20) / perRow, (rows + threads - 1) / threads));
    const int64_t chunks = (rows + rowsPerChunk - 1) / rowsPerChunk;
    cpuPoolFor(threads, chunks, [&](int64_t ch) {
        std::vector<float> sc;
        const int64_t r1 = std::min(rows, (ch + 1) * rowsPerChunk);
        for (int64_t r = ch * rowsPerChunk; r < r1; ++r) {
            if (cacheDtype == kF32)
                queryRow<float>(c, r, sc);
            else
                queryRow<uint16_t>(c, r, sc);
        }
    });
    return Status::success();
}

}  // namespace redrafter

extern "C" {

// out [b, t, nh, hd] float32 = attention of q over one layer's cache (redrafter/c_api.h
// RedrafterAttentionParams).
int32_t redrafter_attention_cpu(const RedrafterAttentionParams* params, char* msg, int64_t msg_len) {
    return redrafter::capi::guardedParams(params, "attention", msg, msg_len, [](const RedrafterAttentionParams& a) {
        return redrafter::cpu::attention(a.q, a.cache, a.cache_dtype, a.slots, a.mask, a.out, a.b, a.t, a.nh, a.nkv,
                                         a.hd, a.s, a.cap, a.num_slots, a.scale, a.threads, a.force_scalar);
    });
}

}  // extern "C"
