// Embedding lookup on a GGUF block table (redrafter_trt/models/blocks.py layout): the rows asked
// for, decoded to float32 with the converter's operations, so no float32 [V, H] table has to be
// in memory:
//   q8_0:  out[i, 32 b + j] = f32(d[r, b]) * f32(qs[r, 32 b + j])
//   q4_1:  out[i, 32 b + j] = f32(d[r, b]) * f32(q) + f32(m[r, b]),  q = the low nibble of byte
//          qs[r, 16 b + j] for j < 16, the high nibble of byte qs[r, 16 b + j - 16] otherwise
// with r = ids[i]. The product is exact in float32 (11 x 8 and 11 x 4 significant bits), so a
// contracted multiply-add gives the same bits as the two operations: the rows are bit-identical
// to models/blocks.py decode() and to the float32 checkpoint. Each row is independent (no
// reduction), one thread: a step looks up a few rows.
#include <cstdint>

#include "redrafter/c_abi_guard.h"
#include "redrafter/c_api.h"
#include "redrafter/common.h"

namespace redrafter {
namespace {

constexpr int32_t kQ4_1 = 10;  // the block format codes of redrafter_linear_packed_cpu
constexpr int32_t kQ8_0 = 11;
constexpr int64_t kBlock = 32;

Status embedBlocks(const void* qs, const uint16_t* d, const uint16_t* m, int32_t fmt, int64_t rows, int64_t k,
                   const int64_t* ids, int64_t count, float* out) {
    if (fmt != kQ4_1 && fmt != kQ8_0)
        return Status::error(StatusCode::kInvalidArgument,
                             "embed_blocks: unknown block format %d (10 = q4_1, 11 = q8_0)", static_cast<int>(fmt));
    if (rows < 1 || k < kBlock || k % kBlock != 0)
        return Status::error(StatusCode::kInvalidArgument,
                             "embed_blocks: table [%lld, %lld] needs rows >= 1 and K a positive multiple of 32",
                             static_cast<long long>(rows), static_cast<long long>(k));
    if (count < 0)
        return Status::error(StatusCode::kInvalidArgument, "embed_blocks: count %lld < 0",
                             static_cast<long long>(count));
    if (count == 0) return Status::success();
    if (!qs || !d || !ids || !out || (fmt == kQ4_1 && !m))
        return Status::error(StatusCode::kInvalidArgument, "embed_blocks: null pointer argument");
    for (int64_t i = 0; i < count; ++i)  // every id checked before anything is written
        if (ids[i] < 0 || ids[i] >= rows)
            return Status::error(
                StatusCode::kInvalidArgument, "embed_blocks: id %lld at position %lld is outside [0, %lld)",
                static_cast<long long>(ids[i]), static_cast<long long>(i), static_cast<long long>(rows));
    const int64_t nb = k / kBlock;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t r = ids[i];
        float* y = out + i * k;
        for (int64_t b = 0; b < nb; ++b) {
            const float dv = halfBitsToFloat(d[r * nb + b]);
            float* yb = y + b * kBlock;
            if (fmt == kQ8_0) {
                const int8_t* q = static_cast<const int8_t*>(qs) + r * k + b * kBlock;
                for (int64_t j = 0; j < kBlock; ++j) yb[j] = dv * static_cast<float>(q[j]);
            } else {
                const uint8_t* q = static_cast<const uint8_t*>(qs) + r * (k / 2) + b * (kBlock / 2);
                const float mv = halfBitsToFloat(m[r * nb + b]);
                for (int64_t j = 0; j < kBlock / 2; ++j) {
                    const float lo = dv * static_cast<float>(q[j] & 0x0F);
                    const float hi = dv * static_cast<float>(q[j] >> 4);
                    yb[j] = lo + mv;
                    yb[j + kBlock / 2] = hi + mv;
                }
            }
        }
    }
    return Status::success();
}

}  // namespace
}  // namespace redrafter

extern "C" {

// out [count, k] float32 = rows ids [count] (int64) of the block table [rows, k] (redrafter/c_api.h
// RedrafterEmbedBlocksParams); an id outside [0, rows) is an error and nothing is written.
int32_t redrafter_embed_blocks_cpu(const RedrafterEmbedBlocksParams* params, char* msg, int64_t msg_len) {
    return redrafter::capi::guardedParams(
        params, "embed_blocks", msg, msg_len, [](const RedrafterEmbedBlocksParams& a) {
            return redrafter::embedBlocks(a.qs, a.d, a.m, a.fmt, a.rows, a.k, a.ids, a.count, a.out);
        });
}

}  // extern "C"
