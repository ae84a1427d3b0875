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
#include <utility>
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
constexpr int32_t kQ4_1 = 10;  // GGUF blocks of 32 along k, packed by redrafter_linear_pack_blocks_cpu
constexpr int32_t kQ8_0 = 11;
constexpr int64_t kBlock = 32;
// A block panel: 16 output columns x 32 k. Q4_1: float d[16], float m[16], then 4 groups of 8 k,
// each 16 uint32 words: word j holds column j's 4-bit values for k = 8 g + i at bits 4 i..4 i + 3
// (one 64-byte load serves 8 k steps; a shift per k brings its nibble to the bottom of every
// lane); Q8_0: float d[16], then for each k 16 int8. Padded columns have d = m = q = 0, so w = 0.
constexpr int64_t kQ41PanelBytes = 16 * 4 * 2 + kBlock * 8;
constexpr int64_t kQ80PanelBytes = 16 * 4 + kBlock * 16;
inline bool isBlockFmt(int32_t d) { return d == kQ4_1 || d == kQ8_0; }
inline int64_t blockPanelBytes(int32_t d) { return d == kQ4_1 ? kQ41PanelBytes : kQ80PanelBytes; }
constexpr int64_t kPanel = 16;          // output columns per panel
constexpr int64_t kMaxRows = 6;         // rows per register tile
constexpr int64_t kRowBlock = 48;       // rows sharing one pass over a panel (8 tiles)
constexpr int64_t kPrefetchBlocks = 4;  // block tiles fetch this many blocks ahead of their reads

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
        uint32_t word;
        std::memcpy(&word, bp + 128 + ((kk >> 3) * 16 + j) * 4, 4);
        const float q = static_cast<float>((word >> (4 * (kk & 7))) & 0x0fu);
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

// One k step of a tile's chains: acc[r][v] = fma(x[r][xk], wv[v], acc[r][v]) for every row r and
// weight vector v (the step every micro-kernel below shares, whatever its weights' format).
template <int R, int NV>
__attribute__((target("avx2,fma"), always_inline)) inline void fmaRows8(__m256 (&acc)[R][NV], const float* x,
                                                                        int64_t ldx, int64_t xk,
                                                                        const __m256 (&wv)[NV]) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * ldx + xk);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xb, wv[v], acc[r][v]);
    }
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
        fmaRows8<R, 2 * P>(acc, x, ldx, kk, wv);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < 2 * P; ++v) _mm256_storeu_ps(out + r * (kPanel * P) + v * 8, acc[r][v]);
}

// Block tiles fetch ahead in each panel's stream, past its end into the panel the next tile reads
// (prefetches never fault): a decode step computes too little per byte for the hardware
// prefetchers to keep P streams ahead alone (one core streamed Q4_1 panels 2-3x faster with it).
template <int P>
__attribute__((target("sse"))) inline void prefetchBlocks(const unsigned char* w, int64_t ps, int64_t bpb, int64_t b,
                                                          int64_t nb) {
    const int64_t ab = b + kPrefetchBlocks;
    const unsigned char* base = ab < nb ? w + ab * bpb : w + P * ps + (ab - nb) * bpb;
    for (int p = 0; p < P; ++p)
        for (int64_t line = 0; line < bpb; line += 64)
            _mm_prefetch(reinterpret_cast<const char*>(base + p * ps + line), _MM_HINT_T0);
}

// AVX2 block tiles: a panel is two 8-lane halves; the same decode, the same chains. Q4_1 takes
// one 32-byte load per half for 8 k steps, then per k a shift, a mask and a conversion;
// w = fma(d, q, m) is the two-rounding d * q + m exactly (the product is exact).
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
    const __m256i lo4 = _mm256_set1_epi32(0x0f);
    for (int64_t b = 0; b < nb; ++b) {
        __m256 dv[2 * P], mv[2 * P];
        prefetchBlocks<P>(w, ps, bpb, b, nb);
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
        if constexpr (F == kQ4_1) {
            for (int g = 0; g < kBlock / 8; ++g) {
                __m256i qw[2 * P];
#pragma GCC unroll 2
                for (int p = 0; p < P; ++p) {
                    const unsigned char* wp = w + p * ps + b * bpb + 128 + g * 64;
                    qw[2 * p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
                    qw[2 * p + 1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32));
                }
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) {
                    __m256 wv[2 * P];
#pragma GCC unroll 4
                    for (int v = 0; v < 2 * P; ++v) {
                        const __m256i q = _mm256_and_si256(_mm256_srli_epi32(qw[v], 4 * i), lo4);
                        wv[v] = _mm256_fmadd_ps(dv[v], _mm256_cvtepi32_ps(q), mv[v]);
                    }
                    const int64_t xk = b * kBlock + g * 8 + i;
                    fmaRows8<R, 2 * P>(acc, x, ldx, xk, wv);
                }
            }
        } else {
            for (int kk = 0; kk < kBlock; ++kk) {
                __m256 wv[2 * P];
#pragma GCC unroll 2
                for (int p = 0; p < P; ++p) {
                    const unsigned char* bp = w + p * ps + b * bpb;
                    const __m128i by = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 64 + kk * 16));
                    wv[2 * p] = _mm256_mul_ps(dv[2 * p], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(by)));
                    wv[2 * p + 1] =
                        _mm256_mul_ps(dv[2 * p + 1], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(by, 8))));
                }
                const int64_t xk = b * kBlock + kk;
                fmaRows8<R, 2 * P>(acc, x, ldx, xk, wv);
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

// The AVX-512 form of fmaRows8: one 16-lane vector per panel.
template <int R, int P>
__attribute__((target("avx512f"), always_inline)) inline void fmaRows16(__m512 (&acc)[R][P], const float* x,
                                                                        int64_t ldx, int64_t xk,
                                                                        const __m512 (&wv)[P]) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
        const __m512 xb = _mm512_set1_ps(x[r * ldx + xk]);
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(xb, wv[p], acc[r][p]);
    }
}

template <int R, int P, class W>
__attribute__((target("avx512f"))) void tileAvx512(const float* x, int64_t ldx, const W* w, int64_t ps, int64_t k,
                                                   float* out) {
    __m512 acc[R][P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
        __m512 wv[P];
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) wv[p] = loadW16(w + p * ps + kk * kPanel);
        fmaRows16<R, P>(acc, x, ldx, kk, wv);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + r * (kPanel * P) + p * kPanel, acc[r][p]);
}

// AVX-512 block tiles. Q4_1: one 64-byte load per panel serves 8 k steps; per k a shift brings
// each lane's nibble to bits 0..3 and a permute of the table 0..15 (which reads only those bits)
// turns it into float: w = fma(d, q, m), exact as above.
template <int R, int P, int32_t F>
__attribute__((target("avx512f"))) void tileAvx512Q(const float* x, int64_t ldx, const unsigned char* w, int64_t ps,
                                                    int64_t k, float* out) {
    constexpr int64_t bpb = F == kQ4_1 ? kQ41PanelBytes : kQ80PanelBytes;
    const int64_t nb = k / kBlock;
    __m512 acc[R][P];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_ps();
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t b = 0; b < nb; ++b) {
        __m512 dv[P], mv[P];
        prefetchBlocks<P>(w, ps, bpb, b, nb);
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
            const float* d = reinterpret_cast<const float*>(w + p * ps + b * bpb);
            dv[p] = _mm512_loadu_ps(d);
            if (F == kQ4_1) mv[p] = _mm512_loadu_ps(d + 16);
        }
        if constexpr (F == kQ4_1) {
            for (int g = 0; g < kBlock / 8; ++g) {
                __m512i qw[P];
#pragma GCC unroll 4
                for (int p = 0; p < P; ++p) qw[p] = _mm512_loadu_si512(w + p * ps + b * bpb + 128 + g * 64);
#pragma GCC unroll 8
                for (int i = 0; i < 8; ++i) {
                    __m512 wv[P];
#pragma GCC unroll 4
                    for (int p = 0; p < P; ++p) {
                        const __m512 q = _mm512_permutexvar_ps(_mm512_srli_epi32(qw[p], 4 * i), iota);
                        wv[p] = _mm512_fmadd_ps(dv[p], q, mv[p]);
                    }
                    const int64_t xk = b * kBlock + g * 8 + i;
                    fmaRows16<R, P>(acc, x, ldx, xk, wv);
                }
            }
        } else {
            for (int kk = 0; kk < kBlock; ++kk) {
                __m512 wv[P];
#pragma GCC unroll 4
                for (int p = 0; p < P; ++p) {
                    const unsigned char* bp = w + p * ps + b * bpb;
                    const __m512i q =
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 64 + kk * 16)));
                    wv[p] = _mm512_mul_ps(dv[p], _mm512_cvtepi32_ps(q));
                }
                const int64_t xk = b * kBlock + kk;
                fmaRows16<R, P>(acc, x, ldx, xk, wv);
            }
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) _mm512_storeu_ps(out + r * (kPanel * P) + p * kPanel, acc[r][p]);
}

#pragma GCC diagnostic pop

using cpu::haveAvx2Fma;
using cpu::haveAvx512;
#endif

using TileFn = void (*)(const float*, int64_t, const void*, int64_t, int64_t, float*);

// One dispatch table per (weight format, SIMD path): table[g][R - 1] runs a tile of R rows over
// 1 << g panels (null where that tile would not fit the registers). A policy names its tile and
// the most rows it runs over two and over four panels.
constexpr int kGroups = 3;  // 1, 2 or 4 panels per tile
using TileTable = TileFn[kGroups][kMaxRows];

template <class W, int S>
struct DenseTiles {  // float32 / bf16 panels; S: 0 portable, 1 AVX2, 2 AVX-512
    static constexpr int kPairRows = S == 2 ? 6 : 3;
    static constexpr int kQuadRows = S == 2 ? 2 : 0;
    template <int R, int P>
    static void run(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
        const W* wp = static_cast<const W*>(w);
#ifdef RD_X86
        if constexpr (S == 2) return tileAvx512<R, P, W>(x, ldx, wp, ps, k, out);
        if constexpr (S == 1) return tileAvx2<R, P, W>(x, ldx, wp, ps, k, out);
#endif
        tileScalar<R, P, W>(x, ldx, wp, ps, k, out);
    }
};

template <int32_t F, int S>
struct BlockTiles {  // Q4_1 / Q8_0 block panels (ps: the panel stride in bytes)
    static constexpr int kPairRows = S == 2 ? 6 : 3;
    static constexpr int kQuadRows = S == 2 ? 2 : 0;
    template <int R, int P>
    static void run(const float* x, int64_t ldx, const void* w, int64_t ps, int64_t k, float* out) {
        const unsigned char* wp = static_cast<const unsigned char*>(w);
#ifdef RD_X86
        if constexpr (S == 2) return tileAvx512Q<R, P, F>(x, ldx, wp, ps, k, out);
        if constexpr (S == 1) return tileAvx2Q<R, P, F>(x, ldx, wp, ps, k, out);
#endif
        tileScalarQ<R, P, F>(x, ldx, wp, ps, k, out);
    }
};

template <class T, int R, int P>
constexpr TileFn tileOrNull() {
    constexpr int limit = P == 1 ? kMaxRows : P == 2 ? T::kPairRows : T::kQuadRows;
    if constexpr (R <= limit)
        return &T::template run<R, P>;
    else
        return nullptr;
}

template <class T, int P, int... R>
void fillRow(TileFn (&row)[kMaxRows], std::integer_sequence<int, R...>) {
    ((row[R] = tileOrNull<T, R + 1, P>()), ...);
}

template <class T>
void fillTiles(TileTable& t, int& pairRows, int& quadRows) {
    fillRow<T, 1>(t[0], std::make_integer_sequence<int, kMaxRows>{});
    fillRow<T, 2>(t[1], std::make_integer_sequence<int, kMaxRows>{});
    fillRow<T, 4>(t[2], std::make_integer_sequence<int, kMaxRows>{});
    pairRows = T::kPairRows;
    quadRows = T::kQuadRows;
}

// simd: 0 portable, 1 AVX2, 2 AVX-512
template <template <class, int> class T, class W>
void fillFor(TileTable& t, int simd, int& pairRows, int& quadRows) {
    if (simd == 2) return fillTiles<T<W, 2>>(t, pairRows, quadRows);
    if (simd == 1) return fillTiles<T<W, 1>>(t, pairRows, quadRows);
    fillTiles<T<W, 0>>(t, pairRows, quadRows);
}

template <int32_t F>
void fillBlocks(TileTable& t, int simd, int& pairRows, int& quadRows) {
    if (simd == 2) return fillTiles<BlockTiles<F, 2>>(t, pairRows, quadRows);
    if (simd == 1) return fillTiles<BlockTiles<F, 1>>(t, pairRows, quadRows);
    fillTiles<BlockTiles<F, 0>>(t, pairRows, quadRows);
}

struct Call {
    const float* x;  // [m, k] float32
    const void* w;   // packed panels: float32 / bf16 [np][k][16], or block panels (bytes)
    int32_t wDtype;
    const float* bias;
    void* y;
    int32_t yDtype;
    int64_t m, n, k;
    TileTable table;
    int pairRows;  // two-panel tiles for row tiles of at most this many rows
    int quadRows;  // four-panel tiles (more independent chains for a decode step) up to this many
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

// Panels [p0, p1) for every row of the call: each row tile takes the panels four, two or one at
// a time, as wide as its row count allows (the bits do not depend on the grouping).
void runPanels(const Call& c, int64_t p0, int64_t p1) {
    alignas(64) float tile[kMaxRows * kPanel * 4];
    for (int64_t rb = 0; rb < c.m; rb += kRowBlock) {
        const int64_t re = std::min(c.m, rb + kRowBlock);
        for (int64_t p = p0; p < p1;) {
            const int64_t group = std::min<int64_t>(4, p1 - p);
            for (int64_t r = rb; r < re; r += kMaxRows) {
                const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, re - r));
                const float* xr = c.x + r * c.k;
                for (int64_t q = 0; q < group;) {
                    const int g = (group - q >= 4 && rows <= c.quadRows)   ? 2
                                  : (group - q >= 2 && rows <= c.pairRows) ? 1
                                                                           : 0;
                    const int np = 1 << g;
                    const char* wp = static_cast<const char*>(c.w) + static_cast<size_t>((p + q) * c.ps) * c.esz;
                    c.table[g][rows - 1](xr, c.k, wp, c.ps, c.k, tile);
                    for (int j = 0; j < np; ++j) {
                        const int64_t col0 = (p + q + j) * kPanel;
                        const int cols = static_cast<int>(std::min<int64_t>(kPanel, c.n - col0));
                        storeTile(c, tile + j * kPanel, rows, r, col0, cols, np * kPanel);
                    }
                    q += np;
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
                        const uint32_t v = kk < 16 ? (src[kk] & 0x0f) : (src[kk - 16] >> 4);
                        unsigned char* word = bp + 128 + ((kk >> 3) * 16 + j) * 4;
                        uint32_t w;
                        std::memcpy(&w, word, 4);
                        w |= v << (4 * (kk & 7));
                        std::memcpy(word, &w, 4);
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

}  // namespace

Status cpu::linearPacked(const void* x, int32_t xDtype, const void* packed, int32_t wDtype, const float* bias, void* y,
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
    Call c{xf, packed, wDtype, bias, y, yDtype, m, n, k, {}, 0, 0, 0, 0};
    if (isBlockFmt(wDtype)) {
        c.esz = 1;
        c.ps = k / kBlock * blockPanelBytes(wDtype);
        if (wDtype == kQ4_1)
            fillBlocks<kQ4_1>(c.table, simd, c.pairRows, c.quadRows);
        else
            fillBlocks<kQ8_0>(c.table, simd, c.pairRows, c.quadRows);
    } else {
        c.esz = wDtype == kF32 ? 4 : 2;
        c.ps = k * kPanel;
        if (wDtype == kF32)
            fillFor<DenseTiles, float>(c.table, simd, c.pairRows, c.quadRows);
        else
            fillFor<DenseTiles, uint16_t>(c.table, simd, c.pairRows, c.quadRows);
    }
    const int64_t np = (n + kPanel - 1) / kPanel;
    // Chunks of whole panel groups (four for a decode step's rows, else pairs: a group keeps its
    // wide tiles) handed out one at a time; about 8 chunks per thread, so a late worker costs
    // little and a busy core is no barrier.
    const int64_t unit = m <= c.quadRows ? 4 : 2;
    const int64_t units = (np + unit - 1) / unit;
    const int64_t perChunk = std::max<int64_t>(1, units / (8 * static_cast<int64_t>(threads)));
    const int64_t chunks = (units + perChunk - 1) / perChunk;
    cpuPoolFor(threads, chunks, [&](int64_t ch) {
        const int64_t a = std::min(np, unit * ch * perChunk);
        const int64_t b = std::min(np, unit * (ch + 1) * perChunk);
        runPanels(c, a, b);
    });
    return Status::success();
}

namespace {

// redrafter_linear_cpu: w [n, k] float32 / bf16 packed into a temporary, then the packed product.
Status linearUnpacked(const RedrafterLinearParams& a) {
    if (isBlockFmt(a.w_dtype))
        return Status::error(StatusCode::kInvalidArgument,
                             "linear: block weights (w dtype %d) must be packed first "
                             "(redrafter_linear_pack_blocks_cpu)",
                             static_cast<int>(a.w_dtype));
    if (a.w_dtype != kF32 && a.w_dtype != kBF16)
        return cpu::linearPacked(a.x, a.x_dtype, a.w, a.w_dtype, a.bias, a.y, a.y_dtype, a.m, a.n, a.k, a.threads,
                                 a.force_scalar);
    Status s = checkShape(a.m, a.n, a.k);
    if (!s.ok()) return s;
    const size_t esz = a.w_dtype == kF32 ? 4 : 2;
    std::vector<unsigned char> packed(static_cast<size_t>(packedElems(a.n, a.k)) * esz);
    s = packCpu(a.w, a.w_dtype, packed.data(), a.n, a.k);
    if (!s.ok()) return s;
    return cpu::linearPacked(a.x, a.x_dtype, packed.data(), a.w_dtype, a.bias, a.y, a.y_dtype, a.m, a.n, a.k, a.threads,
                             a.force_scalar);
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

// y [m, n] = x [m, k] . w^T (+ bias [n], float32) with w packed by redrafter_linear_pack_cpu
// (redrafter/c_api.h RedrafterLinearParams). Returns 0 or a StatusCode, message in msg.
int32_t redrafter_linear_packed_cpu(const RedrafterLinearParams* params, char* msg, int64_t msg_len) {
    return redrafter::capi::guardedParams(params, "linear", msg, msg_len, [](const RedrafterLinearParams& a) {
        return redrafter::cpu::linearPacked(a.x, a.x_dtype, a.w, a.w_dtype, a.bias, a.y, a.y_dtype, a.m, a.n, a.k,
                                            a.threads, a.force_scalar);
    });
}

// The same product with an unpacked w [n, k]: packs into a temporary first (tests, one-off calls).
int32_t redrafter_linear_cpu(const RedrafterLinearParams* params, char* msg, int64_t msg_len) {
    return redrafter::capi::guardedParams(params, "linear", msg, msg_len,
                                          [](const RedrafterLinearParams& a) { return redrafter::linearUnpacked(a); });
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
