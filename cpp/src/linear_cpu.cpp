// Batch-invariant CPU linear layer: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// Layout. The weights are packed once (redrafter_linear_pack_cpu) into panels of 16 output
// columns: panel p holds w[16 p + j, k] at packed[p][k][j], the last panel zero-padded. A call
// streams each panel once, front to back, and applies it to every row of x while it sits in
// L1/L2, so verifying a 17-token tree reads the weights as often as a plain step over one token.
//
// Order. Every output element is ONE fused multiply-add chain over k in order:
//     acc = 0; for k in 0..K-1: acc = fma(x[m, k], w[n, k], acc);  y = acc (+ bias[n])
// It depends on nothing but K: not on M, the row's place in the call, the tile it falls in, the
// thread that computes it or the code path. So a row's result is bit-identical alone or among 64
// rows, with 1 or 8 threads, on the AVX2 path or the portable one (std::fma rounds once, like
// vfmadd), and speculative decoding gives the same tokens as plain decoding by construction.
//
// Micro-kernel. A tile of R rows (1..6) x P panels (1 or 2) keeps R x 2P accumulators of 8 lanes
// in registers (at most 12 of the 16 ymm), loads 2P weight vectors per k and broadcasts one x
// value per row. Six rows keep both FMA units busy (12 independent chains of latency 4); one to
// three rows take two panels at once so a decode step (M = 1) still has 4 chains in flight and is
// bound by memory, not FMA latency. Rows are processed in blocks of 48 so a panel is re-used
// from L2 while x stays in L2 too (prefill).
//
// Threads. Panels are split into contiguous ranges, one per thread, on the library's persistent
// pool (cpu_pool.h), in chunks of whole panels. Each element is computed whole by one thread, so
// the thread count never changes a bit.
//
// Types. Weights float32 or bfloat16 (bf16 widened exactly to float32 in registers: a bf16 engine
// reads half the bytes on CPUs without bf16 units), activations float32 or bf16 (widened once),
// output float32 or bf16 (round to nearest even at the end). AVX-512 or AVX2+FMA is chosen at
// run time ($REDRAFTER_NO_AVX512 keeps AVX2); the portable path computes the same chains. avx512_bf16/AMX dot products
// round pairwise and are not used: one order on every x86 CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_numeric.h"
#include "cpu_pool.h"
#include "redrafter/c_abi_guard.h"
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
constexpr int32_t kQ4_1 = 10;  // GGUF blocks of 32 along k, packed by redrafter_linear_pack_blocks_cpu
constexpr int32_t kQ8_0 = 11;
constexpr int64_t kBlock = 32;
// A block panel: 16 output columns x 32 k. Q4_1: float d[16], float m[16], then for each k 8 bytes
// (byte j: column j in the low nibble, column j + 8 in the high one); Q8_0: float d[16], then for
// each k 16 int8. Padded columns have d = m = q = 0, so w = 0.
constexpr int64_t kQ41PanelBytes = 16 * 4 * 2 + kBlock * 8;
constexpr int64_t kQ80PanelBytes = 16 * 4 + kBlock * 16;
inline bool isBlockFmt(int32_t d) { return d == kQ4_1 || d == kQ8_0; }
inline int64_t blockPanelBytes(int32_t d) { return d == kQ4_1 ? kQ41PanelBytes : kQ80PanelBytes; }
constexpr int64_t kPanel = 16;     // output columns per panel
constexpr int64_t kMaxRows = 6;    // rows per register tile
constexpr int64_t kRowBlock = 48;  // rows sharing one pass over a panel (8 tiles)

inline float loadW(const float* p) { return *p; }
inline float loadW(const uint16_t* p) { return bf16ToF32(*p); }

// ------------------------------------------------------------------------------- micro-kernels
// Tile: R rows of x (float32, row stride ldx) against P panels (panel stride ps elements).
// out[r][16 p + j] = the fma chain over k of x[r][k] * panel_p[k][j].
template <int R, int P, class W>
void tileScalar(const float* x, int64_t ldx, const W* w, int64_t ps, int64_t k, float* out) {
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
            for (int j = 0; j < kPanel; ++j) {
                float acc = 0.0f;
                const W* wp = w + p * ps + j;
                const float* xr = x + r * ldx;
                for (int64_t kk = 0; kk < k; ++kk) acc = std::fma(xr[kk], loadW(wp + kk * kPanel), acc);
                out[r * (kPanel * P) + p * kPanel + j] = acc;
            }
}

// Block formats. The weight of column j at k is decoded exactly as the gguf package's float32
// dequantisation: Q4_1 w = d * q + m (d * q exact: 11 x 4 bits, so one rounding, fused or not),
// Q8_0 w = d * q (exact). Then the same fma chain as the float32 path: the same bits as a float32
// weight holding the expansion.
template <int32_t F>
inline float decodeScalar(const unsigned char* bp, int kk, int j) {
    const float* d = reinterpret_cast<const float*>(bp);
    if (F == kQ4_1) {
        const float* mm = d + 16;
        const unsigned char b = bp[128 + kk * 8 + (j & 7)];
        const float q = static_cast<float>(j < 8 ? (b & 0x0f) : (b >> 4));
        const float prod = d[j] * q;
        return prod + mm[j];
    }
    const float q = static_cast<float>(reinterpret_cast<const int8_t*>(bp + 64)[kk * 16 + j]);
    return d[j] * q;
}

template <int R, int P, int32_t F>
void tileScalarQ(const float* x, int64_t ldx, const unsigned char* w, int64_t ps, int64_t k, float* out) {
    const int64_t nb = k / kBlock;
    constexpr int64_t bpb = F == kQ4_1 ? kQ41PanelBytes : kQ80PanelBytes;
    for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
            for (int j = 0; j < kPanel; ++j) {
                float acc = 0.0f;
                const float* xr = x + r * ldx;
                for (int64_t b = 0; b < nb; ++b) {
                    const unsigned char* bp = w + p * ps + b * bpb;
                    for (int kk = 0; kk < kBlock; ++kk)
                        acc = std::fma(xr[b * kBlock + kk], decodeScalar<F>(bp, kk, j), acc);
                }
                out[r * (kPanel * P) + p * kPanel + j] = acc;
            }
}

#ifdef RD_X86
__attribute__((target("avx2,fma"))) inline __m256 loadW8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 loadW8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int R, int P, class W>
__attribute__((target("avx2,fma"))) void tileAvx2(const float* x, int64_t ldx, const W* w, int64_t ps, int64_t k,
                                                  float* out) {
    __m256 acc[R][2 * P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
        __m256 wv[2 * P];
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) {
            const W* wp = w + p * ps + kk * kPanel;
            wv[2 * p] = loadW8(wp);
            wv[2 * p + 1] = loadW8(wp + 8);
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * ldx + kk);
#pragma GCC unroll 4
            for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_fmadd_ps(xb, wv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * P; ++v) _mm256_storeu_ps(out + r * (kPanel * P) + v * 8, acc[r][v]);
}

// AVX2 block tiles: a panel is two 8-lane halves; the same decode, the same chains.
template <int R, int P, int32_t F>
__attribute__((target("avx2,fma"))) void tileAvx2Q(const float* x, int64_t ldx, const unsigned char* w, int64_t ps,
                                                   int64_t k, float* out) {
    constexpr int64_t bpb = F == kQ4_1 ? kQ41PanelBytes : kQ80PanelBytes;
    const int64_t nb = k / kBlock;
    __m256 acc[R][2 * P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_setzero_ps();
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        __m256 dv[2 * P], mv[2 * P];
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) {
            const float* d = reinterpret_cast<const float*>(w + p * ps + b * bpb);
            dv[2 * p] = _mm256_loadu_ps(d);
            dv[2 * p + 1] = _mm256_loadu_ps(d + 8);
            if (F == kQ4_1) {
                mv[2 * p] = _mm256_loadu_ps(d + 16);
                mv[2 * p + 1] = _mm256_loadu_ps(d + 24);
            }
        }
        for (int kk = 0; kk < kBlock; ++kk) {
            __m256 wv[2 * P];
#pragma GCC unroll 2
            for (int p = 0; p < P; ++p) {
                const unsigned char* bp = w + p * ps + b * bpb;
                __m256i q0, q1;
                if (F == kQ4_1) {
                    const __m128i by = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bp + 128 + kk * 8));
                    q0 = _mm256_cvtepu8_epi32(_mm_and_si128(by, lo4));
                    q1 = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(by, 4), lo4));
                } else {
                    const __m128i by = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 64 + kk * 16));
                    q0 = _mm256_cvtepi8_epi32(by);
                    q1 = _mm256_cvtepi8_epi32(_mm_srli_si128(by, 8));
                }
                __m256 w0 = _mm256_mul_ps(dv[2 * p], _mm256_cvtepi32_ps(q0));
                __m256 w1 = _mm256_mul_ps(dv[2 * p + 1], _mm256_cvtepi32_ps(q1));
                if (F == kQ4_1) {
                    w0 = _mm256_add_ps(w0, mv[2 * p]);
                    w1 = _mm256_add_ps(w1, mv[2 * p + 1]);
                }
                wv[2 * p] = w0;
                wv[2 * p + 1] = w1;
            }
            const int64_t xk = b * kBlock + kk;
#pragma GCC unroll 6
            for (int r = 0; r < R; ++r) {
                const __m256 xb = _mm256_broadcast_ss(x + r * ldx + xk);
#pragma GCC unroll 4
                for (int v = 0; v < 2 * P; ++v) acc[r][v] = _mm256_fmadd_ps(xb, wv[v], acc[r][v]);
            }
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * P; ++v) _mm256_storeu_ps(out + r * (kPanel * P) + v * 8, acc[r][v]);
}

// GCC 12 reports its own AVX-512 intrinsics' "undefined" operands as uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// AVX-512: a panel is one 16-lane register, so a tile of R rows x P panels keeps R x P
// accumulators (at most 12 of the 32 zmm); the same per-element chains, the same bits.
__attribute__((target("avx512f"))) inline __m512 loadW16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 loadW16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int R, int P, class W>
__attribute__((target("avx512f"))) void tileAvx512(const float* x, int64_t ldx, const W* w, int64_t ps, int64_t k,
                                                   float* out) {
    __m512 acc[R][P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
        __m512 wv[P];
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) wv[p] = loadW16(w + p * ps + kk * kPanel);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m512 xb = _mm512_set1_ps(x[r * ldx + kk]);
#pragma GCC unroll 2
            for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(xb, wv[p], acc[r][p]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + r * (kPanel * P) + p * kPanel, acc[r][p]);
}

template <int R, int P, int32_t F>
__attribute__((target("avx512f"))) void tileAvx512Q(const float* x, int64_t ldx, const unsigned char* w, int64_t ps,
                                                    int64_t k, float* out) {
    constexpr int64_t bpb = F == kQ4_1 ? kQ41PanelBytes : kQ80PanelBytes;
    const int64_t nb = k / kBlock;
    __m512 acc[R][P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
    const __m128i lo4 = _mm_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        __m512 dv[P], mv[P];
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) {
            const float* d = reinterpret_cast<const float*>(w + p * ps + b * bpb);
            dv[p] = _mm512_loadu_ps(d);
            if (F == kQ4_1) mv[p] = _mm512_loadu_ps(d + 16);
        }
        for (int kk = 0; kk < kBlock; ++kk) {
            __m512 wv[P];
#pragma GCC unroll 2
            for (int p = 0; p < P; ++p) {
                const unsigned char* bp = w + p * ps + b * bpb;
                __m512i q;
                if (F == kQ4_1) {
                    const __m128i by = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bp + 128 + kk * 8));
                    const __m128i both =
                        _mm_unpacklo_epi64(_mm_and_si128(by, lo4), _mm_and_si128(_mm_srli_epi16(by, 4), lo4));
                    q = _mm512_cvtepu8_epi32(both);
                } else {
                    q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 64 + kk * 16)));
                }
                __m512 wq = _mm512_mul_ps(dv[p], _mm512_cvtepi32_ps(q));
                if (F == kQ4_1) wq = _mm512_add_ps(wq, mv[p]);
                wv[p] = wq;
            }
            const int64_t xk = b * kBlock + kk;
#pragma GCC unroll 6
            for (int r = 0; r < R; ++r) {
                const __m512 xb = _mm512_set1_ps(x[r * ldx + xk]);
#pragma GCC unroll 2
                for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(xb, wv[p], acc[r][p]);
            }
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + r * (kPanel * P) + p * kPanel, acc[r][p]);
}

#pragma GCC diagnostic pop

using cpu::haveAvx2Fma;
using cpu::haveAvx512;
#endif

using TileFn = void (*)(const float*, int64_t, const void*, int64_t, int64_t, float*);

template <int R, int P, class W>
void tileScalarV(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
    tileScalar<R, P, W>(x, ldx, static_cast<const W*>(w), ps, k, out);
}
#ifdef RD_X86
template <int R, int P, class W>
void tileAvx2V(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
    tileAvx2<R, P, W>(x, ldx, static_cast<const W*>(w), ps, k, out);
}
template <int R, int P, class W>
void tileAvx512V(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
    tileAvx512<R, P, W>(x, ldx, static_cast<const W*>(w), ps, k, out);
}
#endif

template <int R, int P, int32_t F>
void tileScalarQV(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
    tileScalarQ<R, P, F>(x, ldx, static_cast<const unsigned char*>(w), ps, k, out);
}
#ifdef RD_X86
template <int R, int P, int32_t F>
void tileAvx2QV(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
    tileAvx2Q<R, P, F>(x, ldx, static_cast<const unsigned char*>(w), ps, k, out);
}
template <int R, int P, int32_t F>
void tileAvx512QV(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
    tileAvx512Q<R, P, F>(x, ldx, static_cast<const unsigned char*>(w), ps, k, out);
}
#endif

// The block formats' tables (ps: the panel stride in bytes).
template <int32_t F>
void fillTableQ(TileFn (&t)[2][6], int simd) {
#ifdef RD_X86
    if (simd == 2) {
        TileFn a[2][6] = {{tileAvx512QV<1, 1, F>, tileAvx512QV<2, 1, F>, tileAvx512QV<3, 1, F>, tileAvx512QV<4, 1, F>,
                           tileAvx512QV<5, 1, F>, tileAvx512QV<6, 1, F>},
                          {tileAvx512QV<1, 2, F>, tileAvx512QV<2, 2, F>, tileAvx512QV<3, 2, F>, tileAvx512QV<4, 2, F>,
                           tileAvx512QV<5, 2, F>, tileAvx512QV<6, 2, F>}};
        std::memcpy(t, a, sizeof(a));
        return;
    }
    if (simd == 1) {
        TileFn a[2][6] = {{tileAvx2QV<1, 1, F>, tileAvx2QV<2, 1, F>, tileAvx2QV<3, 1, F>, tileAvx2QV<4, 1, F>,
                           tileAvx2QV<5, 1, F>, tileAvx2QV<6, 1, F>},
                          {tileAvx2QV<1, 2, F>, tileAvx2QV<2, 2, F>, tileAvx2QV<3, 2, F>, nullptr, nullptr, nullptr}};
        std::memcpy(t, a, sizeof(a));
        return;
    }
#endif
    (void)simd;
    TileFn a[2][6] = {{tileScalarQV<1, 1, F>, tileScalarQV<2, 1, F>, tileScalarQV<3, 1, F>, tileScalarQV<4, 1, F>,
                       tileScalarQV<5, 1, F>, tileScalarQV<6, 1, F>},
                      {tileScalarQV<1, 2, F>, tileScalarQV<2, 2, F>, tileScalarQV<3, 2, F>, nullptr, nullptr, nullptr}};
    std::memcpy(t, a, sizeof(a));
}

// table[P - 1][R - 1]; simd: 0 portable, 1 AVX2, 2 AVX-512
template <class W>
void fillTable(TileFn (&t)[2][6], int simd) {
#ifdef RD_X86
    if (simd == 2) {
        TileFn a[2][6] = {{tileAvx512V<1, 1, W>, tileAvx512V<2, 1, W>, tileAvx512V<3, 1, W>, tileAvx512V<4, 1, W>,
                           tileAvx512V<5, 1, W>, tileAvx512V<6, 1, W>},
                          {tileAvx512V<1, 2, W>, tileAvx512V<2, 2, W>, tileAvx512V<3, 2, W>, tileAvx512V<4, 2, W>,
                           tileAvx512V<5, 2, W>, tileAvx512V<6, 2, W>}};
        std::memcpy(t, a, sizeof(a));
        return;
    }
    if (simd == 1) {
        TileFn a[2][6] = {{tileAvx2V<1, 1, W>, tileAvx2V<2, 1, W>, tileAvx2V<3, 1, W>, tileAvx2V<4, 1, W>,
                           tileAvx2V<5, 1, W>, tileAvx2V<6, 1, W>},
                          {tileAvx2V<1, 2, W>, tileAvx2V<2, 2, W>, tileAvx2V<3, 2, W>, nullptr, nullptr, nullptr}};
        std::memcpy(t, a, sizeof(a));
        return;
    }
#endif
    (void)simd;
    TileFn a[2][6] = {{tileScalarV<1, 1, W>, tileScalarV<2, 1, W>, tileScalarV<3, 1, W>, tileScalarV<4, 1, W>,
                       tileScalarV<5, 1, W>, tileScalarV<6, 1, W>},
                      {tileScalarV<1, 2, W>, tileScalarV<2, 2, W>, tileScalarV<3, 2, W>, nullptr, nullptr, nullptr}};
    std::memcpy(t, a, sizeof(a));
}

struct Call {
    const float* x;  // [m, k] float32
    const void* w;   // packed [np][k][16], float32 or bf16
    int32_t wDtype;
    const float* bias;
    void* y;
    int32_t yDtype;
    int64_t m, n, k;
    TileFn table[2][6];
    int pairRows;  // two-panel tiles for row tiles of at most this many rows
    size_t esz;    // bytes per unit of ps (1 for the block formats)
    int64_t ps;    // panel stride passed to the tiles: elements (float32/bf16) or bytes (blocks)
};

void storeTile(const Call& c, const float* tile, int rows, int64_t row0, int64_t col0, int cols, int tileStride) {
    for (int r = 0; r < rows; ++r) {
        const int64_t base = (row0 + r) * c.n + col0;
        for (int j = 0; j < cols; ++j) {
            float v = tile[r * tileStride + j];
            if (c.bias) v += c.bias[col0 + j];
            if (c.yDtype == kF32)
                static_cast<float*>(c.y)[base + j] = v;
            else
                static_cast<uint16_t*>(c.y)[base + j] = f32ToBf16(v);
        }
    }
}

// Panels [p0, p1) for every row of the call.
void runPanels(const Call& c, int64_t p0, int64_t p1) {
    const size_t esz = c.esz;
    const int64_t ps = c.ps;
    alignas(64) float tile[kMaxRows * kPanel * 2];
    for (int64_t rb = 0; rb < c.m; rb += kRowBlock) {
        const int64_t re = std::min(c.m, rb + kRowBlock);
        for (int64_t p = p0; p < p1;) {
            const int64_t group = (p + 1 < p1) ? 2 : 1;
            const char* wp = static_cast<const char*>(c.w) + static_cast<size_t>(p * ps) * esz;
            for (int64_t r = rb; r < re; r += kMaxRows) {
                const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, re - r));
                const float* xr = c.x + r * c.k;
                if (group == 2 && rows <= c.pairRows) {
                    c.table[1][rows - 1](xr, c.k, wp, ps, c.k, tile);
                    for (int g = 0; g < 2; ++g) {
                        const int64_t col0 = (p + g) * kPanel;
                        const int cols = static_cast<int>(std::min<int64_t>(kPanel, c.n - col0));
                        storeTile(c, tile + g * kPanel, rows, r, col0, cols, 2 * kPanel);
                    }
                } else {
                    for (int64_t g = 0; g < group; ++g) {
                        c.table[0][rows - 1](xr, c.k, wp + static_cast<size_t>(g * ps) * esz, ps, c.k, tile);
                        const int64_t col0 = (p + g) * kPanel;
                        const int cols = static_cast<int>(std::min<int64_t>(kPanel, c.n - col0));
                        storeTile(c, tile, rows, r, col0, cols, kPanel);
                    }
                }
            }
            p += group;
        }
    }
}

bool okDtype(int32_t d) { return d == kF32 || d == kBF16; }

inline float halfToF32(uint16_t h) {  // IEEE binary16 -> float32, exact
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                ++e;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

int64_t blockPackedBytes(int32_t fmt, int64_t n, int64_t k) {
    return (n + kPanel - 1) / kPanel * (k / kBlock) * blockPanelBytes(fmt);
}

// qs/d/m in the stored layout (models/blocks.py: per row, Q4_1 16 bytes per block with element j
// in the low nibble of byte j and j + 16 in the high one; Q8_0 32 int8; d, m float16 per block).
Status packBlocksCpu(const void* qs, const uint16_t* d, const uint16_t* m, int32_t fmt, void* packed, int64_t n,
                     int64_t k) {
    if (!isBlockFmt(fmt))
        return Status::error(StatusCode::kInvalidArgument,
                             "linear block pack: format must be 10 (q4_1) or 11 (q8_0), got %d", static_cast<int>(fmt));
    if (n < 1 || k < kBlock || k % kBlock != 0)
        return Status::error(StatusCode::kInvalidArgument,
                             "linear block pack: need n >= 1 and k a positive multiple of 32, got n=%lld k=%lld",
                             static_cast<long long>(n), static_cast<long long>(k));
    if (!qs || !d || !packed || (fmt == kQ4_1 && !m))
        return Status::error(StatusCode::kInvalidArgument, "linear block pack: null input or output pointer");
    const int64_t nb = k / kBlock, np = (n + kPanel - 1) / kPanel, bpb = blockPanelBytes(fmt);
    unsigned char* out = static_cast<unsigned char*>(packed);
    std::memset(out, 0, static_cast<size_t>(blockPackedBytes(fmt, n, k)));
    const unsigned char* q = static_cast<const unsigned char*>(qs);
    for (int64_t p = 0; p < np; ++p)
        for (int64_t b = 0; b < nb; ++b) {
            unsigned char* bp = out + (p * nb + b) * bpb;
            float* dd = reinterpret_cast<float*>(bp);
            for (int64_t j = 0; j < kPanel; ++j) {
                const int64_t row = p * kPanel + j;
                if (row >= n) continue;
                dd[j] = halfToF32(d[row * nb + b]);
                if (fmt == kQ4_1) {
                    dd[16 + j] = halfToF32(m[row * nb + b]);
                    const unsigned char* src = q + row * (k / 2) + b * 16;
                    for (int kk = 0; kk < kBlock; ++kk) {
                        const int v = kk < 16 ? (src[kk] & 0x0f) : (src[kk - 16] >> 4);
                        unsigned char& dst = bp[128 + kk * 8 + (j & 7)];
                        dst = static_cast<unsigned char>(dst | (j < 8 ? v : v << 4));
                    }
                } else {
                    for (int kk = 0; kk < kBlock; ++kk) bp[64 + kk * 16 + j] = q[row * k + b * kBlock + kk];
                }
            }
        }
    return Status::success();
}

Status checkShape(int64_t m, int64_t n, int64_t k) {
    if (m < 0 || n < 1 || k < 1)
        return Status::error(StatusCode::kInvalidArgument,
                             "linear: need m >= 0, n >= 1, k >= 1, got m=%lld n=%lld k=%lld", static_cast<long long>(m),
                             static_cast<long long>(n), static_cast<long long>(k));
    return Status::success();
}

int64_t packedElems(int64_t n, int64_t k) { return (n + kPanel - 1) / kPanel * kPanel * k; }

template <class W>
void packRows(const W* w, W* out, int64_t n, int64_t k) {
    const int64_t np = (n + kPanel - 1) / kPanel;
    for (int64_t p = 0; p < np; ++p)
        for (int64_t kk = 0; kk < k; ++kk)
            for (int64_t j = 0; j < kPanel; ++j) {
                const int64_t row = p * kPanel + j;
                out[(p * k + kk) * kPanel + j] = row < n ? w[row * k + kk] : W(0);
            }
}

Status packCpu(const void* w, int32_t wDtype, void* packed, int64_t n, int64_t k) {
    if (!okDtype(wDtype))
        return Status::error(StatusCode::kInvalidArgument,
                             "linear pack: weight dtype must be 0 (float32) or 2 (bfloat16), got %d",
                             static_cast<int>(wDtype));
    Status s = checkShape(0, n, k);
    if (!s.ok()) return s;
    if (!w || !packed) return Status::error(StatusCode::kInvalidArgument, "linear pack: null weight or output pointer");
    if (wDtype == kF32)
        packRows(static_cast<const float*>(w), static_cast<float*>(packed), n, k);
    else
        packRows(static_cast<const uint16_t*>(w), static_cast<uint16_t*>(packed), n, k);
    return Status::success();
}

Status linearPackedCpu(const void* x, int32_t xDtype, const void* packed, int32_t wDtype, const float* bias, void* y,
                       int32_t yDtype, int64_t m, int64_t n, int64_t k, int32_t threads, int32_t forceScalar) {
    if (!okDtype(xDtype) || !(okDtype(wDtype) || isBlockFmt(wDtype)) || !okDtype(yDtype))
        return Status::error(StatusCode::kInvalidArgument,
                             "linear: dtypes must be 0 (float32) or 2 (bfloat16) (weights also 10 q4_1, 11 q8_0), "
                             "got x=%d w=%d y=%d",
                             static_cast<int>(xDtype), static_cast<int>(wDtype), static_cast<int>(yDtype));
    Status s = checkShape(m, n, k);
    if (!s.ok()) return s;
    if (isBlockFmt(wDtype) && k % kBlock != 0)
        return Status::error(StatusCode::kInvalidArgument, "linear: block weights need k a multiple of 32, got %lld",
                             static_cast<long long>(k));
    if (threads < 1 || threads > kCpuPoolMaxThreads)
        return Status::error(StatusCode::kInvalidArgument, "linear: threads must be in [1, %d], got %d",
                             kCpuPoolMaxThreads, static_cast<int>(threads));
    if (m == 0) return Status::success();
    if (!x || !packed || !y)
        return Status::error(StatusCode::kInvalidArgument, "linear: null x, packed weight or y pointer");

    std::vector<float> xw;  // bf16 activations widened once (exact)
    const float* xf = static_cast<const float*>(x);
    if (xDtype == kBF16) {
        xw.resize(static_cast<size_t>(m * k));
        const uint16_t* xh = static_cast<const uint16_t*>(x);
        for (size_t i = 0; i < xw.size(); ++i) xw[i] = bf16ToF32(xh[i]);
        xf = xw.data();
    }
#ifdef RD_X86
    const int simd = forceScalar ? 0 : haveAvx512() ? 2 : haveAvx2Fma() ? 1 : 0;
#else
    const int simd = 0;
    (void)forceScalar;
#endif
    Call c{xf, packed, wDtype, bias, y, yDtype, m, n, k, {}, simd == 2 ? 6 : 3, 0, 0};
    if (isBlockFmt(wDtype)) {
        c.esz = 1;
        c.ps = k / kBlock * blockPanelBytes(wDtype);
        if (wDtype == kQ4_1)
            fillTableQ<kQ4_1>(c.table, simd);
        else
            fillTableQ<kQ8_0>(c.table, simd);
    } else {
        c.esz = wDtype == kF32 ? 4 : 2;
        c.ps = k * kPanel;
        if (wDtype == kF32)
            fillTable<float>(c.table, simd);
        else
            fillTable<uint16_t>(c.table, simd);
    }
    const int64_t np = (n + kPanel - 1) / kPanel;
    // Chunks of whole panel pairs handed out one at a time (a pair keeps the two-panel tiles);
    // about 8 chunks per thread, so a late worker costs little and a busy core is no barrier.
    const int64_t pairs = (np + 1) / 2;
    const int64_t perChunk = std::max<int64_t>(1, pairs / (8 * static_cast<int64_t>(threads)));
    const int64_t chunks = (pairs + perChunk - 1) / perChunk;
    cpuPoolFor(threads, chunks, [&](int64_t ch) {
        const int64_t a = std::min(np, 2 * ch * perChunk);
        const int64_t b = std::min(np, 2 * (ch + 1) * perChunk);
        runPanels(c, a, b);
    });
    return Status::success();
}

}  // namespace
}  // namespace redrafter

extern "C" {

// Elements of the packed weight for an [n, k] weight (panels of 16 rows, zero-padded).
int64_t redrafter_linear_packed_elems(int64_t n, int64_t k) {
    return (n < 1 || k < 1) ? 0 : redrafter::packedElems(n, k);
}

// Packs w [n, k] (dtype 0 = float32, 2 = bfloat16) into `packed`
// (redrafter_linear_packed_elems(n, k) elements of the same dtype).
int32_t redrafter_linear_pack_cpu(const void* w, int32_t w_dtype, void* packed, int64_t n, int64_t k, char* msg,
                                  int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len, [&] { return redrafter::packCpu(w, w_dtype, packed, n, k); });
}

// y [m, n] = x [m, k] . w^T (+ bias [n], float32) with w packed by redrafter_linear_pack_cpu;
// dtypes 0 = float32, 2 = bfloat16; `threads` workers over the panels (1..256);
// force_scalar = 1 takes the portable path (tests). Returns 0 or a StatusCode, message in msg.
int32_t redrafter_linear_packed_cpu(const void* x, int32_t x_dtype, const void* packed, int32_t w_dtype,
                                    const float* bias, void* y, int32_t y_dtype, int64_t m, int64_t n, int64_t k,
                                    int32_t threads, int32_t force_scalar, char* msg, int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len, [&] {
        return redrafter::linearPackedCpu(x, x_dtype, packed, w_dtype, bias, y, y_dtype, m, n, k, threads,
                                          force_scalar);
    });
}

// The same product with an unpacked w [n, k]: packs into a temporary first (tests, one-off calls).
int32_t redrafter_linear_cpu(const void* x, int32_t x_dtype, const void* w, int32_t w_dtype, const float* bias, void* y,
                             int32_t y_dtype, int64_t m, int64_t n, int64_t k, int32_t force_scalar, char* msg,
                             int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len, [&]() -> redrafter::Status {
        if (redrafter::isBlockFmt(w_dtype))
            return redrafter::Status::error(redrafter::StatusCode::kInvalidArgument,
                                            "linear: block weights (w dtype %d) must be packed first "
                                            "(redrafter_linear_pack_blocks_cpu)",
                                            static_cast<int>(w_dtype));
        if (w_dtype != redrafter::kF32 && w_dtype != redrafter::kBF16)
            return redrafter::linearPackedCpu(x, x_dtype, w, w_dtype, bias, y, y_dtype, m, n, k, 1, force_scalar);
        redrafter::Status s = redrafter::checkShape(m, n, k);
        if (!s.ok()) return s;
        const size_t esz = w_dtype == redrafter::kF32 ? 4 : 2;
        std::vector<unsigned char> packed(static_cast<size_t>(redrafter::packedElems(n, k)) * esz);
        s = redrafter::packCpu(w, w_dtype, packed.data(), n, k);
        if (!s.ok()) return s;
        return redrafter::linearPackedCpu(x, x_dtype, packed.data(), w_dtype, bias, y, y_dtype, m, n, k, 1,
                                          force_scalar);
    });
}

// Bytes of a block weight [n, k] (format 10 q4_1, 11 q8_0) packed by
// redrafter_linear_pack_blocks_cpu; 0 for a bad format or shape.
int64_t redrafter_linear_blocks_packed_bytes(int32_t fmt, int64_t n, int64_t k) {
    if (!redrafter::isBlockFmt(fmt) || n < 1 || k < redrafter::kBlock || k % redrafter::kBlock != 0) return 0;
    return redrafter::blockPackedBytes(fmt, n, k);
}

// Packs a GGUF block weight [n, k] in the stored layout (qs, float16 d and m; m null for q8_0)
// into block panels for redrafter_linear_packed_cpu with w_dtype = fmt.
int32_t redrafter_linear_pack_blocks_cpu(const void* qs, const uint16_t* d, const uint16_t* m, int32_t fmt,
                                         void* packed, int64_t n, int64_t k, char* msg, int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len,
                                    [&] { return redrafter::packBlocksCpu(qs, d, m, fmt, packed, n, k); });
}

// The SIMD path that runs on this CPU: 2 AVX-512, 1 AVX2+FMA, 0 none (the portable path).
int32_t redrafter_linear_simd_cpu(void) {
#ifdef RD_X86
    return redrafter::haveAvx512() ? 2 : redrafter::haveAvx2Fma() ? 1 : 0;
#else
    return 0;
#endif
}

}  // extern "C"
