// Shared definitions of the ReDrafter operators: status, data types, limits, float keys.
//
// Everything here compiles with a plain C++17 host compiler; the CUDA qualifiers appear only
// under nvcc (RD_HD expands to `__host__ __device__` there). The per-element logic of every
// operator lives in `__host__ __device__` functions in these headers so the CPU references
// (cpp/src) and the kernels (cpp/kernels) run the same code.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>

#if defined(__CUDACC__)
#define RD_HD __host__ __device__ __forceinline__
#else
#define RD_HD inline
#endif

// CUDA's stream handle without the CUDA headers: `cudaStream_t` is `CUstream_st*`.
struct CUstream_st;

namespace redrafter {

// ---------------------------------------------------------------------------------------------
// Status: what every checkParams(), CPU reference and launcher returns. Never throws, never
// aborts; the message says what was expected and what was found.

enum class StatusCode : int32_t {
    kOk = 0,
    kInvalidArgument = 1,  // a shape, a scalar or a pointer is wrong
    kOverflow = 2,         // sizes whose products overflow the index type
    kInvalidData = 3,      // tensor contents are out of range (CPU references check them)
    kCudaError = 4,        // a CUDA runtime call failed
    kUnsupported = 5,      // built without CUDA, or a case the kernel does not handle
};

struct Status {
    StatusCode code = StatusCode::kOk;
    char message[320] = {0};

    bool ok() const { return code == StatusCode::kOk; }
    static Status success() { return Status{}; }
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    static Status error(StatusCode c, const char* fmt, ...) {
        Status s;
        s.code = c;
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(s.message, sizeof(s.message), fmt, ap);
        va_end(ap);
        return s;
    }
};

#define RD_RETURN_IF_ERROR(expr)            \
    do {                                    \
        ::redrafter::Status _rd_s = (expr); \
        if (!_rd_s.ok()) return _rd_s;      \
    } while (0)

// ---------------------------------------------------------------------------------------------
// Data types of logits and caches.

enum class DataType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline size_t dataTypeSize(DataType t) { return t == DataType::kFloat32 ? 4 : 2; }
inline bool dataTypeValid(int32_t t) { return t >= 0 && t <= 2; }
inline const char* dataTypeName(DataType t) {
    return t == DataType::kFloat32 ? "float32" : t == DataType::kFloat16 ? "float16" : "bfloat16";
}

// ---------------------------------------------------------------------------------------------
// Limits (one place; checkParams() enforces them).

constexpr int64_t kMaxBeams = 64;       // W
constexpr int64_t kMaxBeamLength = 64;  // L = D + 1
constexpr int64_t kInt32Max = 2147483647;
constexpr float kWarpFill = -50000.0f;  // redrafter_trt.ops.beam_search.WARP_FILL
constexpr int32_t kPadToken = 0;        // redrafter_trt.ops.tree.PAD_TOKEN

template <class T>
RD_HD T rdMin(T a, T b) {
    return b < a ? b : a;
}
template <class T>
RD_HD T rdMax(T a, T b) {
    return a < b ? b : a;
}

RD_HD int64_t maskWords(int64_t numNodes) { return (numNodes + 31) / 32; }

// a * b with overflow detection for non-negative operands; false on overflow.
inline bool checkedMul(int64_t a, int64_t b, int64_t* out) {
    if (a < 0 || b < 0) return false;
    if (a != 0 && b > INT64_MAX / a) return false;
    *out = a * b;
    return true;
}

// Product of dims with overflow detection against `limit`.
inline bool checkedProduct(std::initializer_list<int64_t> dims, int64_t limit, int64_t* out) {
    int64_t p = 1;
    for (int64_t d : dims) {
        if (!checkedMul(p, d, &p) || p > limit) return false;
    }
    *out = p;
    return true;
}

// ---------------------------------------------------------------------------------------------
// Float bits and totally ordered keys (ties and NaN handled the same on host and device).

RD_HD uint32_t floatBits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
#endif
}

RD_HD float bitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
#endif
}

RD_HD uint64_t doubleBits(double x) {
#if defined(__CUDA_ARCH__)
    return static_cast<uint64_t>(__double_as_longlong(x));
#else
    uint64_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
#endif
}

// Monotone map float -> uint32: a < b  <=>  key(a) < key(b). -0.0 maps to +0.0 (they compare
// equal), every NaN maps above +inf (torch's sort and topk treat NaN as the largest value).
RD_HD uint32_t orderedKey(float x) {
    if (x != x) return 0xFFC00000u;  // canonical NaN, above +inf (0xFF800000)
    uint32_t u = floatBits(x);
    if ((u & 0x7FFFFFFFu) == 0) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

RD_HD float keyToFloat(uint32_t key) {
    uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
    return bitsToFloat(u);
}

// Same for doubles (the sampling reference works in float64).
RD_HD uint64_t orderedKey64(double x) {
    if (x != x) return 0xFFF8000000000000ull;
    uint64_t u = doubleBits(x);
    if ((u & 0x7FFFFFFFFFFFFFFFull) == 0) u = 0;
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Key of a (value, index) candidate: larger key = better; descending value, ties to the lower
// index. Distinct indices give distinct keys, so "top W by key" is a well-defined set.
RD_HD uint64_t rankKey(float value, uint32_t index) {
    return (static_cast<uint64_t>(orderedKey(value)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}
RD_HD uint32_t rankKeyIndex(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu); }
RD_HD float rankKeyValue(uint64_t key) { return keyToFloat(static_cast<uint32_t>(key >> 32)); }

// ---------------------------------------------------------------------------------------------
// Host conversions of 16-bit storage (the CPU references take the raw bits; kernels use
// __half / __nv_bfloat16). Both are exact widenings.

inline float halfBitsToFloat(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((mant & 0x400u) == 0) {
                mant <<= 1;
                --exp;
            }
            mant &= 0x3FFu;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    return bitsToFloat(bits);
}

inline float bf16BitsToFloat(uint16_t b) { return bitsToFloat(static_cast<uint32_t>(b) << 16); }

// Converts `n` logits of type `t` starting at element `offset` of `data` to float32.
inline void logitsToFloat(const void* data, DataType t, int64_t offset, int64_t n, float* out) {
    if (t == DataType::kFloat32) {
        std::memcpy(out, static_cast<const float*>(data) + offset, static_cast<size_t>(n) * sizeof(float));
    } else {
        const uint16_t* p = static_cast<const uint16_t*>(data) + offset;
        if (t == DataType::kFloat16) {
            for (int64_t i = 0; i < n; ++i) out[i] = halfBitsToFloat(p[i]);
        } else {
            for (int64_t i = 0; i < n; ++i) out[i] = bf16BitsToFloat(p[i]);
        }
    }
}

}  // namespace redrafter
