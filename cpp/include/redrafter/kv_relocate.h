// In-place KV-cache relocation after acceptance (SPEC section 7).
//
// Cache layout (one contiguous tensor, row-major; redrafter_trt/ops/kv_cache.py uses the same):
//
//   cache[layer, kv, slot, head, t, e]   shape [numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim]
//   kv = 0 is K, kv = 1 is V; row b of the batch owns cache slot slots[b]; t is the sequence
//   position; elements are elemBytes wide (2 for float16/bfloat16, 4 for float32, ...).
//   element offset = ((((layer*2 + kv)*numSlots + slot)*numKvHeads + head)*maxSeqLen + t)*headDim + e
//
// The verify forward wrote packed node i of row b at t = cacheLengths[b] + i. With the accepted
// path q_0 = 0, q_1 .. q_n (n = numAccepted[b], strictly increasing, so q_k >= k), position
// cacheLengths[b] + q_k moves to cacheLengths[b] + k for k = 1..n, ascending; newLengths[b] =
// cacheLengths[b] + n + 1. Only the n moved positions are read and written.
//
// Kernel (cpp/kernels/kv_relocate.cu): grid (ceil(layers*2*heads*headDim*elemBytes/16 / 256), B);
// one thread per (row, layer, kv, head, 16-byte vector of head_dim) loops k = 1..n in ascending
// order, so the in-place moves of one column never race (another thread never touches it).
// Vector width 16/8/4/2/1 bytes, chosen from the alignment of the cache and of headDim*elemBytes.
// Rows whose data are invalid (slot, lengths or path out of range) are skipped and get
// newLengths[b] = -1 (the CPU reference returns an error instead). Rows must use distinct slots.
// Bytes per call it must move: 2 * sum_b n_b * numLayers * 2 * numKvHeads * headDim * elemBytes
//   (read + write) + 4*B*(L + 4).
#pragma once

#include "redrafter/common.h"

namespace redrafter {

struct KvRelocateParams {
    void* cache = nullptr;  // [numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim]
    int64_t elemBytes = 0;  // 1, 2, 4 or 8
    int64_t numLayers = 0, numSlots = 0, numKvHeads = 0, maxSeqLen = 0, headDim = 0;
    const int32_t* slots = nullptr;            // [B]
    const int32_t* cacheLengths = nullptr;     // [B]
    const int32_t* acceptedIndices = nullptr;  // [B, L]
    const int32_t* numAccepted = nullptr;      // [B]
    int32_t* newLengths = nullptr;             // [B]
    int64_t batchSize = 0;                     // B >= 0
    int64_t beamLength = 0;                    // 1 <= L <= 64

    Status checkParams() const {
        if (batchSize < 0 || batchSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument, "kv relocate: batch size B must be in [0, 2^31), got %lld", (long long)batchSize);
        if (beamLength < 1 || beamLength > kMaxBeamLength)
            return Status::error(StatusCode::kInvalidArgument, "kv relocate: accepted path length L must be in [1, %lld], got %lld", (long long)kMaxBeamLength, (long long)beamLength);
        if (elemBytes != 1 && elemBytes != 2 && elemBytes != 4 && elemBytes != 8)
            return Status::error(StatusCode::kInvalidArgument, "kv relocate: element size must be 1, 2, 4 or 8 bytes, got %lld", (long long)elemBytes);
        if (numLayers < 1 || numSlots < 1 || numKvHeads < 1 || maxSeqLen < 1 || headDim < 1)
            return Status::error(StatusCode::kInvalidArgument, "kv relocate: cache dims [layers=%lld, 2, slots=%lld, kv_heads=%lld, max_seq=%lld, head_dim=%lld] must all be >= 1",
                                 (long long)numLayers, (long long)numSlots, (long long)numKvHeads, (long long)maxSeqLen, (long long)headDim);
        if (numSlots > kInt32Max || maxSeqLen > kInt32Max || numKvHeads > kInt32Max || headDim > kInt32Max)
            return Status::error(StatusCode::kOverflow, "kv relocate: slots, max_seq, kv_heads and head_dim must each fit int32");
        int64_t total = 0;
        if (!checkedProduct({numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim, elemBytes}, INT64_MAX, &total))
            return Status::error(StatusCode::kOverflow, "kv relocate: cache bytes overflow int64");
        if (!checkedProduct({numLayers, 2, numKvHeads, headDim, elemBytes}, kInt32Max, &total))
            return Status::error(StatusCode::kOverflow, "kv relocate: layers*2*kv_heads*head_dim*elem_bytes (bytes per position) must fit int32");
        if (!cache || !slots || !cacheLengths || !acceptedIndices || !numAccepted || !newLengths)
            return Status::error(StatusCode::kInvalidArgument, "kv relocate: null pointer (cache=%p slots=%p cache_lengths=%p accepted_indices=%p num_accepted=%p new_lengths=%p)",
                                 cache, (const void*)slots, (const void*)cacheLengths, (const void*)acceptedIndices, (const void*)numAccepted, (void*)newLengths);
        return Status::success();
    }
};

// ---- per-element logic shared by the kernel and the CPU reference -------------------------

// Element offset of cache[layer, kv, slot, head, t, 0].
RD_HD int64_t kvOffset(int64_t layer, int64_t kv, int64_t slot, int64_t head, int64_t t, int64_t numSlots,
                       int64_t numKvHeads, int64_t maxSeqLen, int64_t headDim) {
    return ((((layer * 2 + kv) * numSlots + slot) * numKvHeads + head) * maxSeqLen + t) * headDim;
}

enum KvRowError : int32_t {
    kKvRowOk = 0,
    kKvBadSlot = 1,
    kKvBadLength = 2,
    kKvBadNumAccepted = 3,
    kKvBadPath = 4,
    kKvOutOfCache = 5,
};

// Validates one row; `q` = acceptedIndices row (q[0] is the root and is not read).
RD_HD int32_t kvCheckRow(int32_t slot, int32_t cacheLength, int32_t n, const int32_t* q, int32_t L,
                         int64_t numSlots, int64_t maxSeqLen) {
    if (slot < 0 || slot >= numSlots) return kKvBadSlot;
    if (cacheLength < 0) return kKvBadLength;
    if (n < 0 || n >= L) return kKvBadNumAccepted;
    int32_t prev = 0;
    for (int32_t k = 1; k <= n; ++k) {
        if (q[k] <= prev) return kKvBadPath;
        prev = q[k];
    }
    // Every read position cacheLength + q_k and the new length must lie inside the cache.
    if (static_cast<int64_t>(cacheLength) + prev >= maxSeqLen && n > 0) return kKvOutOfCache;
    if (static_cast<int64_t>(cacheLength) + n + 1 > maxSeqLen) return kKvOutOfCache;
    return kKvRowOk;
}

inline int64_t kvRelocateBytesMoved(int64_t totalAccepted, int64_t layers, int64_t heads, int64_t headDim,
                                    int64_t elemBytes, int64_t B, int64_t L) {
    return 2 * totalAccepted * layers * 2 * heads * headDim * elemBytes + 4 * B * (L + 4);
}

Status kvRelocateCpu(const KvRelocateParams& params);
Status invokeKvRelocate(const KvRelocateParams& params, CUstream_st* stream);

}  // namespace redrafter
