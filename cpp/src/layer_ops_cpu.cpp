// The small per-layer operations of the torch backend's CPU step, one call each instead of
// several torch ops: RMSNorm, RoPE on q and k, and the gated activation silu(a) * b.
//
// Each row is computed alone in a fixed order (the RMSNorm sum of squares in 8 lanes then a fixed
// lane tree, then the tail), so results do not depend on the number of rows, their place or the
// thread count, like the linear and attention kernels. Values are float32 or bfloat16 (dtype 0 /
// 2); arithmetic is float32, bf16 outputs are rounded to nearest even once per stored value:
//   rmsnorm:  y = round(w * round(x * rsqrt(mean(x^2) + eps)))   (round = to the tensor's dtype)
//   rope:     for each head, pairs (i, i + hd/2): (a cos - b sin, b cos + a sin)
//   silu_mul: y = round(silu(a) * b), silu(a) = a / (1 + exp(-a))
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"
#include "cpu_numeric.h"
#include "redrafter/c_abi_guard.h"
#include "redrafter/common.h"

namespace redrafter {
namespace {

using cpu::bf16ToF32;
using cpu::f32ToBf16;
using cpu::kBF16;
using cpu::kF32;

inline float get(const void* p, int32_t dt, int64_t i) {
    return dt == kF32 ? static_cast<const float*>(p)[i] : bf16ToF32(static_cast<const uint16_t*>(p)[i]);
}
inline void put(void* p, int32_t dt, int64_t i, float v) {
    if (dt == kF32)
        static_cast<float*>(p)[i] = v;
    else
        static_cast<uint16_t*>(p)[i] = f32ToBf16(v);
}
inline float roundTo(int32_t dt, float v) { return dt == kF32 ? v : bf16ToF32(f32ToBf16(v)); }

Status checkDtype(int32_t dt, const char* op) {
    if (dt != kF32 && dt != kBF16)
        return Status::error(StatusCode::kInvalidArgument, "%s: dtype must be 0 (float32) or 2 (bfloat16), got %d", op,
                             static_cast<int>(dt));
    return Status::success();
}

}  // namespace

Status cpu::rmsnorm(const void* x, const void* w, void* y, int32_t dtype, int64_t rows, int64_t h, float eps) {
    Status s = checkDtype(dtype, "rmsnorm");
    if (!s.ok()) return s;
    if (rows < 0 || h < 1)
        return Status::error(StatusCode::kInvalidArgument, "rmsnorm: need rows >= 0 and h >= 1, got %lld, %lld",
                             static_cast<long long>(rows), static_cast<long long>(h));
    if (rows == 0) return Status::success();
    if (!x || !w || !y) return Status::error(StatusCode::kInvalidArgument, "rmsnorm: null pointer argument");
    for (int64_t r = 0; r < rows; ++r) {
        float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t hv = h - h % 8;
        for (int64_t i = 0; i < hv; i += 8)
            for (int j = 0; j < 8; ++j) {
                const float v = get(x, dtype, r * h + i + j);
                lane[j] = std::fma(v, v, lane[j]);
            }
        float ss = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
        for (int64_t i = hv; i < h; ++i) {
            const float v = get(x, dtype, r * h + i);
            ss = std::fma(v, v, ss);
        }
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
        for (int64_t i = 0; i < h; ++i) {
            const float n = roundTo(dtype, get(x, dtype, r * h + i) * inv);
            put(y, dtype, r * h + i, get(w, dtype, i) * n);
        }
    }
    return Status::success();
}

Status cpu::rope(void* x, int32_t dtype, int64_t rows, int64_t heads, int64_t hd, int64_t rowStride, const float* cos,
                 const float* sin) {
    Status s = checkDtype(dtype, "rope");
    if (!s.ok()) return s;
    if (rows < 0 || heads < 1 || hd < 2 || hd % 2 || rowStride < heads * hd)
        return Status::error(StatusCode::kInvalidArgument,
                             "rope: need rows >= 0, heads >= 1, even hd >= 2, row_stride >= heads * hd; got "
                             "%lld, %lld, %lld, %lld",
                             static_cast<long long>(rows), static_cast<long long>(heads), static_cast<long long>(hd),
                             static_cast<long long>(rowStride));
    if (rows == 0) return Status::success();
    if (!x || !cos || !sin) return Status::error(StatusCode::kInvalidArgument, "rope: null pointer argument");
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t hh = 0; hh < heads; ++hh) {
            const int64_t base = r * rowStride + hh * hd;
            for (int64_t i = 0; i < half; ++i) {
                const float c = cos[r * half + i], sn = sin[r * half + i];
                const float a = get(x, dtype, base + i), b = get(x, dtype, base + i + half);
                put(x, dtype, base + i, a * c - b * sn);
                put(x, dtype, base + i + half, b * c + a * sn);
            }
        }
    return Status::success();
}

Status cpu::siluMul(const void* a, int64_t lda, const void* b, int64_t ldb, void* y, int32_t dtype, int64_t rows,
                    int64_t n) {
    Status s = checkDtype(dtype, "silu_mul");
    if (!s.ok()) return s;
    if (rows < 0 || n < 1 || lda < n || ldb < n)
        return Status::error(StatusCode::kInvalidArgument, "silu_mul: need rows >= 0, n >= 1 and row strides >= n");
    if (rows == 0) return Status::success();
    if (!a || !b || !y) return Status::error(StatusCode::kInvalidArgument, "silu_mul: null pointer argument");
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < n; ++i) {
            const float av = get(a, dtype, r * lda + i), bv = get(b, dtype, r * ldb + i);
            const float act = roundTo(dtype, av / (1.0f + std::exp(-av)));
            put(y, dtype, r * n + i, act * bv);
        }
    return Status::success();
}

}  // namespace redrafter

extern "C" {

// y [rows, h] = RMSNorm(x [rows, h]) * w [h]; x, w, y of dtype `dtype`.
int32_t redrafter_rmsnorm_cpu(const void* x, const void* w, void* y, int32_t dtype, int64_t rows, int64_t h, float eps,
                              char* msg, int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len,
                                    [&] { return redrafter::cpu::rmsnorm(x, w, y, dtype, rows, h, eps); });
}

// In place on x [rows, heads, hd] (row stride `row_stride` elements, so q and k can be views of
// one fused qkv output): rotate each head's pairs (i, i + hd/2) by cos/sin [rows, hd/2] float32.
int32_t redrafter_rope_cpu(void* x, int32_t dtype, int64_t rows, int64_t heads, int64_t hd, int64_t row_stride,
                           const float* cos, const float* sin, char* msg, int64_t msg_len) {
    return redrafter::capi::guarded(
        msg, msg_len, [&] { return redrafter::cpu::rope(x, dtype, rows, heads, hd, row_stride, cos, sin); });
}

// y [rows, n] = silu(ab[:, :n]) * ab[:, n:] for ab [rows, 2n] (the fused gate|up projection).
int32_t redrafter_silu_mul_cpu(const void* ab, void* y, int32_t dtype, int64_t rows, int64_t n, char* msg,
                               int64_t msg_len) {
    return redrafter::capi::guarded(msg, msg_len, [&]() -> redrafter::Status {
        const size_t esz = dtype == redrafter::cpu::kF32 ? 4 : 2;
        const void* b = ab ? static_cast<const char*>(ab) + static_cast<size_t>(n > 0 ? n : 0) * esz : nullptr;
        return redrafter::cpu::siluMul(ab, 2 * n, b, 2 * n, y, dtype, rows, n);
    });
}

}  // extern "C"
