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

#pragma GCC diagnostic pop

bool haveAvx2Fma() {
    static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return v;
}

bool haveAvx512() {
    static const bool v = __builtin_cpu_supports("avx512f") && std::getenv("REDRAFTER_NO_AVX512") == nullptr;
    return v;
}
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
    const size_t esz = c.wDtype == kF32 ? 4 : 2;
    const int64_t ps = c.k * kPanel;  // elements per panel
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
    if (!okDtype(xDtype) || !okDtype(wDtype) || !okDtype(yDtype))
        return Status::error(StatusCode::kInvalidArgument,
                             "linear: dtypes must be 0 (float32) or 2 (bfloat16), got x=%d w=%d y=%d",
                             static_cast<int>(xDtype), static_cast<int>(wDtype), static_cast<int>(yDtype));
    Status s = checkShape(m, n, k);
    if (!s.ok()) return s;
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
    Call c{xf, packed, wDtype, bias, y, yDtype, m, n, k, {}, simd == 2 ? 6 : 3};
    if (wDtype == kF32)
        fillTable<float>(c.table, simd);
    else
        fillTable<uint16_t>(c.table, simd);
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

// The SIMD path that runs on this CPU: 2 AVX-512, 1 AVX2+FMA, 0 none (the portable path).
int32_t redrafter_linear_simd_cpu(void) {
#ifdef RD_X86
    return redrafter::haveAvx512() ? 2 : redrafter::haveAvx2Fma() ? 1 : 0;
#else
    return 0;
#endif
}

}  // extern "C"
