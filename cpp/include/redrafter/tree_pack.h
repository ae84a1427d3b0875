// Tree packing: dynamic tree attention (docs/design.md section 5).
//
//   beams           [B, W, L]                 int32 draft beams (beams[:, :, 0] = g0)
//   packedTokens    [B, W*L]                  int32, first P_b valid, then PAD_TOKEN (0)
//   packedLen       [B]                       int32 P_b
//   unpacker        [B, W, L]                 int32 packed index of node (w, d)
//   positionOffsets [B, W*L]                  int32 depth of each packed node, padding 0
//   packedMask      [B, W*L, ceil(W*L/32)]    int32 words; bit j%32 of word j/32 in row i set
//                                             iff packed node j is an ancestor of i or i itself;
//                                             padding rows all zero
//
// Node (w, d) is kept iff no lower beam shares its prefix beams[w, :d+1]; the packed order is
// beam-major, depth-minor over kept nodes. Sharing is prefix-closed, so beam w keeps exactly
// its depths d >= f_w with f_w = max over w' < w of lcp(w', w) (the longest common prefix),
// and its kept nodes are contiguous in the packed order.
//
// Kernel (cpp/kernels/tree_pack.cu): one block per row; the W x W lcp matrix, f_w and the
// packed bases live in shared memory; every output word is written by one thread (coalesced).
// Bytes per call: reads 4*B*W*L, writes 4*B*(3*W*L + 1 + W*L*ceil(W*L/32)).
#pragma once

#include "redrafter/common.h"

namespace redrafter {

struct TreePackParams {
    const int32_t* beams = nullptr;      // [B, W, L]
    int32_t* packedTokens = nullptr;     // [B, W*L]
    int32_t* packedLen = nullptr;        // [B]
    int32_t* unpacker = nullptr;         // [B, W, L]
    int32_t* positionOffsets = nullptr;  // [B, W*L]
    int32_t* packedMask = nullptr;       // [B, W*L, ceil(W*L/32)]
    int64_t batchSize = 0;               // B >= 0
    int64_t numBeams = 0;                // 1 <= W <= 64
    int64_t beamLength = 0;              // 1 <= L <= 64

    Status checkParams() const {
        if (batchSize < 0 || batchSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument, "tree pack: batch size B must be in [0, 2^31), got %lld",
                                 (long long)batchSize);
        if (numBeams < 1 || numBeams > kMaxBeams)
            return Status::error(StatusCode::kInvalidArgument, "tree pack: num_beams W must be in [1, %lld], got %lld",
                                 (long long)kMaxBeams, (long long)numBeams);
        if (beamLength < 1 || beamLength > kMaxBeamLength)
            return Status::error(StatusCode::kInvalidArgument,
                                 "tree pack: beam length L = D + 1 must be in [1, %lld], got %lld",
                                 (long long)kMaxBeamLength, (long long)beamLength);
        const int64_t n = numBeams * beamLength;
        int64_t total = 0;
        if (!checkedProduct({batchSize, n, maskWords(n), 4}, INT64_MAX, &total))
            return Status::error(StatusCode::kOverflow, "tree pack: B*W*L*ceil(W*L/32) bytes overflow int64");
        if (!beams || !packedTokens || !packedLen || !unpacker || !positionOffsets || !packedMask)
            return Status::error(StatusCode::kInvalidArgument,
                                 "tree pack: null pointer (beams=%p tokens=%p len=%p unpacker=%p offsets=%p mask=%p)",
                                 (const void*)beams, (void*)packedTokens, (void*)packedLen, (void*)unpacker,
                                 (void*)positionOffsets, (void*)packedMask);
        return Status::success();
    }
};

// ---- per-element logic shared by the kernel and the CPU reference -------------------------

// Longest common prefix of two beams of length L.
RD_HD int32_t treeCommonPrefix(const int32_t* a, const int32_t* b, int32_t L) {
    int32_t d = 0;
    while (d < L && a[d] == b[d]) ++d;
    return d;
}

// f_w: the first depth of beam w that no lower beam shares (L for a duplicated beam).
RD_HD int32_t treeFirstUnshared(const uint8_t* lcp, int32_t W, int32_t w) {
    int32_t f = 0;
    for (int32_t o = 0; o < w; ++o) {
        if (lcp[o * W + w] > f) f = lcp[o * W + w];
    }
    return f;
}

// Owner of node (w, d): the lowest beam w' <= w sharing the prefix of length d + 1.
// `lcp(w', w)` is read from a W x W row-major table.
RD_HD int32_t treeOwner(const uint8_t* lcp, int32_t W, int32_t w, int32_t d) {
    for (int32_t o = 0; o < w; ++o) {
        if (lcp[o * W + w] > d) return o;
    }
    return w;
}

// Packed index of node (w, d) given f (first unshared depth per beam) and base (packed index
// of each beam's first kept node).
RD_HD int32_t treePackedIndex(const int32_t* firstUnshared, const int32_t* base, int32_t owner, int32_t d) {
    return base[owner] + d - firstUnshared[owner];
}

// Word `word` of the mask row of a kept node (w, depth): OR of the bits of its ancestors
// (w, 0..depth), whose packed indices are unpackerBeam[0..depth].
RD_HD uint32_t treeMaskWord(const int32_t* unpackerBeam, int32_t depth, int32_t word) {
    uint32_t bits = 0;
    for (int32_t d = 0; d <= depth; ++d) {
        const int32_t j = unpackerBeam[d];
        if ((j >> 5) == word) bits |= 1u << (j & 31);
    }
    return bits;
}

inline int64_t treePackBytesMoved(int64_t B, int64_t W, int64_t L) {
    const int64_t n = W * L;
    return 4 * B * W * L + 4 * B * (3 * n + 1 + n * maskWords(n));
}

Status treePackCpu(const TreePackParams& params);
Status invokeTreePack(const TreePackParams& params, CUstream_st* stream);

}  // namespace redrafter
