// The CPU model kernels' C++ entry points, shared by their C ABI functions and by the fused
// decoder forward (decoder_cpu.cpp), which calls them without crossing the C ABI in between.
// Each validates its arguments and returns a Status; the rules (order, types, batch invariance)
// are in the header comment of the file that defines it.
#pragma once

#include <cstdint>

#include "redrafter/common.h"

namespace redrafter {
namespace cpu {

// linear_cpu.cpp: y [m, n] = x [m, k] . w^T (+ bias) with w packed (float32 / bf16 panels, or
// block panels with wDtype 10 q4_1 / 11 q8_0).
Status linearPacked(const void* x, int32_t xDtype, const void* packed, int32_t wDtype, const float* bias, void* y,
                    int32_t yDtype, int64_t m, int64_t n, int64_t k, int32_t threads, int32_t forceScalar);

// attention_cpu.cpp: out [b, t, nh, hd] over one layer's cache [2, numSlots, nkv, cap, hd].
Status attention(const float* q, const void* cache, int32_t cacheDtype, const int64_t* slots, const uint8_t* mask,
                 float* out, int64_t b, int64_t t, int64_t nh, int64_t nkv, int64_t hd, int64_t s, int64_t cap,
                 int64_t numSlots, float scale, int32_t threads, int32_t forceScalar);

// layer_ops_cpu.cpp
Status rmsnorm(const void* x, const void* w, void* y, int32_t dtype, int64_t rows, int64_t h, float eps);
Status rope(void* x, int32_t dtype, int64_t rows, int64_t heads, int64_t hd, int64_t rowStride, const float* cos,
            const float* sin);
// y [rows, n] = silu(a) * b, a and b rows of stride lda / ldb elements (one fused [rows, 2n]
// gate|up output: a = ab, b = ab + n, lda = ldb = 2n).
Status siluMul(const void* a, int64_t lda, const void* b, int64_t ldb, void* y, int32_t dtype, int64_t rows, int64_t n);

}  // namespace cpu
}  // namespace redrafter
