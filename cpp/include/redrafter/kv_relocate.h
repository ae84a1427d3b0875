// In-place KV-cache relocation after acceptance (docs/design.md section 7).
//
// Cache layout: blocked and strided. Element (layer, kv, slot, head, t, e) of the cache lives at
//
//   kvElemOffset = slot*strideSlot + (t / tokensPerBlock)*strideBlock + (t % tokensPerBlock)*strideToken
//                + layer*strideLayer + kv*strideKv + head*strideHead + e
//
// (elements of elemBytes bytes from `cache`; head_dim is contiguous; strides in elements, int64).
// kv = 0 is K, kv = 1 is V; row b of the batch owns cache slot slots[b]; t in [0, maxSeqLen) is
// the sequence position; elements are elemBytes wide (2 for float16/bfloat16, 4 for float32, ...).
// Two layouts of this form:
//
//   contiguous (the default, KvRelocateParams::layout.tokensPerBlock == 0; redrafter_trt/ops/kv_cache.py):
//     cache[layer, kv, slot, head, t, e], shape [numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim];
//     kvContiguousLayout(): tokensPerBlock = maxSeqLen, strideToken = headDim, strideHead = maxSeqLen*headDim,
//     strideSlot = numKvHeads*strideHead, strideKv = numSlots*strideSlot, strideLayer = 2*strideKv
//     (strideBlock = numKvHeads*maxSeqLen*headDim; t / tokensPerBlock is always 0).
//   TensorRT-LLM's paged pool (redrafter_trt/trtllm/runtime.py), kvPagedLayout():
//     pool [numBlocks, numLayers, 2, numKvHeads * tpb * headDim]; slot s owns blocks
//     s*maxBlocks .. (s+1)*maxBlocks - 1, token t of slot s is in block s*maxBlocks + t / tpb at
//     position t % tpb: tokensPerBlock = tpb, strideToken = headDim, strideHead = tpb*headDim,
//     strideKv = numKvHeads*tpb*headDim, strideLayer = 2*strideKv, strideBlock = numLayers*strideLayer,
//     strideSlot = maxBlocks*strideBlock.
//
// checkParams() validates a layout: strides >= 0, 1 <= tokensPerBlock < 2^31, the dims
// (slot, block, token in block, layer, kv, head, e) do not overlap in memory (sorted by stride,
// every stride exceeds the largest offset the smaller ones reach; so distinct elements have
// distinct addresses and the kernel's threads never race), and the largest element offset fits
// int64 and lies inside the allocation: < cacheElems (elements from `cache`; with the default
// layout 0 means the contiguous size, with an explicit layout it must be given).
//
// The verify forward wrote packed node i of row b at t = cacheLengths[b] + i. With the accepted
// path q_0 = 0, q_1 .. q_n (n = numAccepted[b], strictly increasing, so q_k >= k), position
// cacheLengths[b] + q_k moves to cacheLengths[b] + k for k = 1..n, ascending; newLengths[b] =
// cacheLengths[b] + n + 1. Only the n moved positions are read and written; a move may cross a
// block boundary (source and destination in different blocks).
//
// Kernel (cpp/kernels/kv_relocate.cu): grid (ceil(layers*2*heads*headDim*elemBytes/16 / 256), B);
// one thread per (row, layer, kv, head, 16-byte vector of head_dim) loops k = 1..n in ascending
// order, so the in-place moves of one column never race (another thread never touches it).
// Vector width 16/8/4/2/1 bytes, the widest dividing the cache's address, headDim*elemBytes and
// every stride*elemBytes. Offsets are int64 (kvElemOffset, shared with the CPU reference).
// Rows whose data are invalid (slot, lengths or path out of range) are skipped and get
// newLengths[b] = -1 (the CPU reference returns an error instead). Rows must use distinct slots.
// Bytes per call it must move: 2 * sum_b n_b * numLayers * 2 * numKvHeads * headDim * elemBytes
//   (read + write) + 4*B*(L + 4).
#pragma once

#include "redrafter/common.h"

namespace redrafter {

// Strides of the blocked layout (in elements; see the header comment). tokensPerBlock == 0 marks
// "not given": KvRelocateParams then uses kvContiguousLayout() of its dims.
struct KvCacheLayout {
    int64_t tokensPerBlock = 0;
    int64_t strideSlot = 0, strideBlock = 0, strideToken = 0, strideLayer = 0, strideKv = 0, strideHead = 0;
};

// [numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim] row-major (callers check the product).
inline KvCacheLayout kvContiguousLayout(int64_t numSlots, int64_t numKvHeads, int64_t maxSeqLen, int64_t headDim) {
    KvCacheLayout l;
    l.tokensPerBlock = maxSeqLen;
    l.strideToken = headDim;
    l.strideHead = maxSeqLen * headDim;
    l.strideSlot = numKvHeads * l.strideHead;
    l.strideBlock = l.strideSlot;  // never multiplied by anything but 0
    l.strideKv = numSlots * l.strideSlot;
    l.strideLayer = 2 * l.strideKv;
    return l;
}

// TensorRT-LLM's pool [numSlots*maxBlocks, numLayers, 2, numKvHeads*tokensPerBlock*headDim].
inline KvCacheLayout kvPagedLayout(int64_t numLayers, int64_t numKvHeads, int64_t tokensPerBlock, int64_t headDim,
                                   int64_t maxBlocks) {
    KvCacheLayout l;
    l.tokensPerBlock = tokensPerBlock;
    l.strideToken = headDim;
    l.strideHead = tokensPerBlock * headDim;
    l.strideKv = numKvHeads * l.strideHead;
    l.strideLayer = 2 * l.strideKv;
    l.strideBlock = numLayers * l.strideLayer;
    l.strideSlot = maxBlocks * l.strideBlock;
    return l;
}

// Element offset of cache[layer, kv, slot, head, t, 0] in `layout` (the kernel and the CPU
// reference both address the cache through this). 0 <= t < maxSeqLen and 1 <= tokensPerBlock
// fit int32 (checkParams), so the block split is a 32-bit division.
RD_HD int64_t kvElemOffset(const KvCacheLayout& layout, int64_t layer, int64_t kv, int64_t slot, int64_t head,
                            int32_t t) {
    const int32_t tpb = static_cast<int32_t>(layout.tokensPerBlock);
    const int32_t block = t / tpb, pos = t - block * tpb;
    return slot * layout.strideSlot + static_cast<int64_t>(block) * layout.strideBlock +
           static_cast<int64_t>(pos) * layout.strideToken + layer * layout.strideLayer + kv * layout.strideKv +
           head * layout.strideHead;
}

struct KvRelocateParams {
    void* cache = nullptr;  // see `layout`; [numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim] by default
    int64_t elemBytes = 0;  // 1, 2, 4 or 8
    int64_t numLayers = 0, numSlots = 0, numKvHeads = 0, maxSeqLen = 0, headDim = 0;
    KvCacheLayout layout;            // tokensPerBlock == 0: the contiguous layout of the dims above
    int64_t cacheElems = 0;          // elements addressable from `cache`; 0 only with the default layout (= its size)
    const int32_t* slots = nullptr;  // [B]
    const int32_t* cacheLengths = nullptr;     // [B]
    const int32_t* acceptedIndices = nullptr;  // [B, L]
    const int32_t* numAccepted = nullptr;      // [B]
    int32_t* newLengths = nullptr;             // [B]
    int64_t batchSize = 0;                     // B >= 0
    int64_t beamLength = 0;                    // 1 <= L <= 64

    // The layout in use (call after the dims passed checkParams()).
    KvCacheLayout resolvedLayout() const {
        return layout.tokensPerBlock == 0 ? kvContiguousLayout(numSlots, numKvHeads, maxSeqLen, headDim) : layout;
    }

    Status checkParams() const {
        if (batchSize < 0 || batchSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: batch size B must be in [0, 2^31), got %lld", (long long)batchSize);
        if (beamLength < 1 || beamLength > kMaxBeamLength)
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: accepted path length L must be in [1, %lld], got %lld",
                                 (long long)kMaxBeamLength, (long long)beamLength);
        if (elemBytes != 1 && elemBytes != 2 && elemBytes != 4 && elemBytes != 8)
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: element size must be 1, 2, 4 or 8 bytes, got %lld",
                                 (long long)elemBytes);
        if (numLayers < 1 || numSlots < 1 || numKvHeads < 1 || maxSeqLen < 1 || headDim < 1)
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: cache dims [layers=%lld, 2, slots=%lld, kv_heads=%lld, max_seq=%lld, "
                                 "head_dim=%lld] must all be >= 1",
                                 (long long)numLayers, (long long)numSlots, (long long)numKvHeads, (long long)maxSeqLen,
                                 (long long)headDim);
        if (numSlots > kInt32Max || maxSeqLen > kInt32Max || numKvHeads > kInt32Max || headDim > kInt32Max)
            return Status::error(StatusCode::kOverflow,
                                 "kv relocate: slots, max_seq, kv_heads and head_dim must each fit int32");
        int64_t total = 0;
        if (!checkedProduct({numLayers, 2, numKvHeads, headDim, elemBytes}, kInt32Max, &total))
            return Status::error(
                StatusCode::kOverflow,
                "kv relocate: layers*2*kv_heads*head_dim*elem_bytes (bytes per position) must fit int32");
        int64_t bound = cacheElems;
        if (layout.tokensPerBlock == 0) {
            if (!checkedProduct({numLayers, 2, numSlots, numKvHeads, maxSeqLen, headDim, elemBytes}, INT64_MAX, &total))
                return Status::error(StatusCode::kOverflow, "kv relocate: cache bytes overflow int64");
            if (bound == 0) bound = total / elemBytes;
        } else {
            RD_RETURN_IF_ERROR(checkLayout());
        }
        if (bound < 1)
            return Status::error(
                StatusCode::kInvalidArgument,
                "kv relocate: cache_elems (elements addressable from the cache pointer) must be >= 1%s, got %lld",
                layout.tokensPerBlock == 0 ? "" : " with a strided layout", (long long)cacheElems);
        int64_t last = 0;
        RD_RETURN_IF_ERROR(lastElemOffset(&last));
        int64_t bytes = 0;
        if (last >= bound || !checkedMul(bound, elemBytes, &bytes))
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: the layout reaches element offset %lld but the cache holds "
                                 "cache_elems=%lld elements of %lld bytes",
                                 (long long)last, (long long)bound, (long long)elemBytes);
        if (!cache || !slots || !cacheLengths || !acceptedIndices || !numAccepted || !newLengths)
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: null pointer (cache=%p slots=%p cache_lengths=%p accepted_indices=%p "
                                 "num_accepted=%p new_lengths=%p)",
                                 cache, (const void*)slots, (const void*)cacheLengths, (const void*)acceptedIndices,
                                 (const void*)numAccepted, (void*)newLengths);
        return Status::success();
    }

private:
    // An explicit layout: non-negative strides, tokensPerBlock in [1, 2^31), dims that do not overlap.
    Status checkLayout() const {
        const KvCacheLayout& l = layout;
        if (l.tokensPerBlock < 1 || l.tokensPerBlock > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument,
                                 "kv relocate: tokens_per_block must be in [1, 2^31), got %lld",
                                 (long long)l.tokensPerBlock);
        if (l.strideSlot < 0 || l.strideBlock < 0 || l.strideToken < 0 || l.strideLayer < 0 || l.strideKv < 0 ||
            l.strideHead < 0)
            return Status::error(
                StatusCode::kInvalidArgument,
                "kv relocate: strides must be >= 0, got slot=%lld block=%lld token=%lld layer=%lld kv=%lld head=%lld",
                (long long)l.strideSlot, (long long)l.strideBlock, (long long)l.strideToken, (long long)l.strideLayer,
                (long long)l.strideKv, (long long)l.strideHead);
        // (extent, stride) of every dim with more than one index; e is (headDim, 1).
        struct Dim {
            int64_t n, stride;
            const char* name;
        };
        Dim d[7] = {{headDim, 1, "head_dim"},
                    {rdMin(l.tokensPerBlock, maxSeqLen), l.strideToken, "token"},
                    {(maxSeqLen - 1) / l.tokensPerBlock + 1, l.strideBlock, "block"},
                    {numKvHeads, l.strideHead, "head"},
                    {2, l.strideKv, "kv"},
                    {numLayers, l.strideLayer, "layer"},
                    {numSlots, l.strideSlot, "slot"}};
        for (int i = 1; i < 7; ++i)  // insertion sort by stride
            for (int j = i; j > 0 && d[j].stride < d[j - 1].stride; --j) {
                Dim t = d[j];
                d[j] = d[j - 1];
                d[j - 1] = t;
            }
        int64_t reach = 0;  // largest offset of the dims sorted so far
        for (const Dim& x : d) {
            if (x.n <= 1) continue;
            if (x.stride <= reach)
                return Status::error(StatusCode::kInvalidArgument,
                                     "kv relocate: the layout's dims overlap: %s stride %lld does not exceed %lld, the "
                                     "largest offset of the dims with smaller strides",
                                     x.name, (long long)x.stride, (long long)reach);
            int64_t span = 0;
            if (!checkedMul(x.n - 1, x.stride, &span) || span > INT64_MAX - reach)
                return Status::error(StatusCode::kOverflow,
                                     "kv relocate: element offsets of the layout overflow int64");
            reach += span;
        }
        return Status::success();
    }

    // Largest element offset any (layer, kv, slot, head, t, e) reaches, overflow-checked.
    Status lastElemOffset(int64_t* out) const {
        const KvCacheLayout l = resolvedLayout();
        // Within a block the offset grows with t, and block ends grow with the block: the largest
        // token offset is at t = maxSeqLen - 1 or at the end of the block before the last one.
        const int64_t lastBlock = (maxSeqLen - 1) / l.tokensPerBlock;
        const int64_t ts[2] = {(maxSeqLen - 1) % l.tokensPerBlock, l.tokensPerBlock - 1};
        const int64_t bs[2] = {lastBlock, lastBlock - 1};
        int64_t best = -1;
        for (int i = 0; i < 2; ++i) {
            if (bs[i] < 0) continue;
            int64_t terms[7] = {0, 0, 0, 0, 0, 0, 0};
            const bool fine =
                checkedMul(numSlots - 1, l.strideSlot, &terms[0]) && checkedMul(bs[i], l.strideBlock, &terms[1]) &&
                checkedMul(ts[i], l.strideToken, &terms[2]) && checkedMul(numLayers - 1, l.strideLayer, &terms[3]) &&
                checkedMul(1, l.strideKv, &terms[4]) && checkedMul(numKvHeads - 1, l.strideHead, &terms[5]);
            terms[6] = headDim - 1;
            int64_t sum = 0;
            bool ok = fine;
            for (int64_t t : terms) {
                if (!ok || t > INT64_MAX - sum) {
                    ok = false;
                    break;
                }
                sum += t;
            }
            if (!ok)
                return Status::error(StatusCode::kOverflow,
                                     "kv relocate: element offsets of the layout overflow int64");
            best = rdMax(best, sum);
        }
        *out = best;
        return Status::success();
    }
};

// ---- per-element logic shared by the kernel and the CPU reference -------------------------

// Element offset of cache[layer, kv, slot, head, t, 0] in the contiguous (default) layout; equals
// kvElemOffset(kvContiguousLayout(numSlots, numKvHeads, maxSeqLen, headDim), ...).
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
RD_HD int32_t kvCheckRow(int32_t slot, int32_t cacheLength, int32_t n, const int32_t* q, int32_t L, int64_t numSlots,
                          int64_t maxSeqLen) {
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
