// Beam-search step of the drafter (docs/design.md section 4).
//
//   logits      [B, W, V]  float32 / float16 / bfloat16   (drafter logits of each beam)
//   beamScores  [B, W]     float32, -inf for dead beams
//   newScores   [B, W]     float32, descending per row
//   parent      [B, W]     int32 = flat // V
//   token       [B, W]     int32 = flat %  V, or vocabMap[flat % V] with a map
//   vocabMap    [V]        int32, optional (null = identity): the full-vocabulary id of each
//                          of the V logit columns, for a head with a reduced draft vocabulary
//                          (V is then its K). Entries are not range-checked here (they live
//                          on the device); the head loader checks them once (in [0, full V),
//                          distinct).
//
// Rules (identical to redrafter_trt/ops/beam_search.py):
//   x = float(logits) - rowmax;  warp (0 < warpK < V): x < kth-largest(x) -> WARP_FILL;
//   logp = (x - max(x)) - log(sum(exp(x - max(x))));   score = beamScore + logp (float32);
//   top W of the W*V candidates by score, ties to the lower flat index w*V + v.
//
// Kernel design (cpp/kernels/beam_search.cu), three launches:
//   1. chunk top-K: grid (ceil(V/4096), B*W); each block loads its 4096 logits once into
//      registers and emits its chunk's top K = max(W, warpK) (value, id) pairs, its max, its
//      sum of exp(x - chunkmax), and the count of elements tied with its K-th value that did
//      not fit (needed for the tie-inclusive warp rule).
//   2. row merge: grid (B*W); from the chunk summaries alone: row max, k-th largest (radix
//      select), log-sum-exp, and the beam's own top W candidates (radix select on rank keys).
//      Only when warped-out "filler" tokens can reach the top W (fewer than W kept tokens, or
//      the k-th value <= WARP_FILL) does it read the first W + (kept) logits of the row again.
//   3. beam merge: grid (B); top W of the W*W union by rank key, sorted.
//   The top W over W*V equals the top W of the union of each beam's own top W (docs/design.md section 4).
//
// Bytes per call it must move (DRAM): B*W*V*sizeof(T) logits read exactly once
//   + 4*B*W scores in + 12*B*W outputs; workspace traffic is B*W*ceil(V/4096)*(24 + 8*K)
//   written and read once, plus 8*B*W*W (small next to the logits when K << 4096).
// Known GPU-only deviations (integer outputs): a candidate outside a chunk's top K by raw
// logit whose float32 score collapses onto the W-th candidate's score (a tie created by
// rounding, not present in the logits) is not considered; rows containing NaN are undefined.
#pragma once

#include "redrafter/common.h"

namespace redrafter {

constexpr int kBeamChunkThreads = 256;
constexpr int kBeamChunkItems = 16;
constexpr int64_t kBeamChunk = kBeamChunkThreads * kBeamChunkItems;  // logits per stage-1 block

struct BeamSearchParams {
    const void* logits = nullptr;  // [B, W, V] of logitsType
    DataType logitsType = DataType::kFloat32;
    const float* beamScores = nullptr;  // [B, W]
    float* newScores = nullptr;         // [B, W]
    int32_t* parent = nullptr;          // [B, W]
    int32_t* token = nullptr;           // [B, W]
    const int32_t* vocabMap = nullptr;  // [V] or null: token = vocabMap[flat % V]
    int64_t batchSize = 0;              // B >= 0
    int64_t numBeams = 0;               // 1 <= W <= min(V, 64)
    int64_t vocabSize = 0;              // V >= 1, W*V <= INT32_MAX
    int64_t warpK = 0;                  // 0 or >= V: no warp
    void* workspace = nullptr;          // GPU launcher only: beamSearchWorkspaceBytes()
    size_t workspaceBytes = 0;

    // Shape, scalar and pointer checks shared by the CPU reference and the launcher.
    Status checkParams() const {
        if (batchSize < 0 || batchSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument,
                                 "beam search: batch size B must be in [0, 2^31), got %lld", (long long)batchSize);
        if (numBeams < 1 || numBeams > kMaxBeams)
            return Status::error(StatusCode::kInvalidArgument,
                                 "beam search: num_beams W must be in [1, %lld], got %lld", (long long)kMaxBeams,
                                 (long long)numBeams);
        if (vocabSize < 1 || vocabSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument,
                                 "beam search: vocab size V must be in [1, 2^31), got %lld", (long long)vocabSize);
        if (numBeams > vocabSize)
            return Status::error(
                StatusCode::kInvalidArgument,
                "beam search: num_beams W=%lld exceeds vocab size V=%lld (top W of each beam needs W <= V)",
                (long long)numBeams, (long long)vocabSize);
        if (warpK < 0)
            return Status::error(StatusCode::kInvalidArgument, "beam search: warp_k must be >= 0 (0 = off), got %lld",
                                 (long long)warpK);
        int64_t flat = 0, total = 0;
        if (!checkedProduct({numBeams, vocabSize}, kInt32Max, &flat))
            return Status::error(StatusCode::kOverflow,
                                 "beam search: W*V = %lld*%lld overflows int32 (flat candidate index)",
                                 (long long)numBeams, (long long)vocabSize);
        if (!checkedProduct({batchSize, numBeams, vocabSize, 4}, INT64_MAX, &total))
            return Status::error(StatusCode::kOverflow, "beam search: B*W*V bytes overflow int64");
        if (!dataTypeValid(static_cast<int32_t>(logitsType)))
            return Status::error(StatusCode::kInvalidArgument,
                                 "beam search: logits dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got %d",
                                 (int)logitsType);
        if (!logits || !beamScores || !newScores || !parent || !token)
            return Status::error(
                StatusCode::kInvalidArgument,
                "beam search: null pointer (logits=%p beam_scores=%p new_scores=%p parent=%p token=%p)", logits,
                (const void*)beamScores, (void*)newScores, (void*)parent, (void*)token);
        return Status::success();
    }
};

// ---- per-element logic shared by the kernel and the CPU reference -------------------------

RD_HD bool warpEnabled(int64_t warpK, int64_t vocab) {
    return warpK > 0 && warpK < vocab;
}

// The warp of one max-shifted logit: kept iff x >= the k-th largest (ties at the boundary kept).
RD_HD float warpedLogit(float shifted, float kthShifted, bool warpOn) {
    return (warpOn && !(shifted >= kthShifted)) ? kWarpFill : shifted;
}

// score = beamScore + log_softmax(warped) with torch's operation order (x - max) - logsum.
RD_HD float candidateScore(float beamScore, float warped, float warpedMax, float logSum) {
    return beamScore + ((warped - warpedMax) - logSum);
}

// The output token of logit column `column`: its full id through the optional map.
RD_HD int32_t mappedToken(const int32_t* vocabMap, uint32_t column) {
    return vocabMap ? vocabMap[column] : static_cast<int32_t>(column);
}

// Candidates per stage-1 chunk: the beam's own top W plus, with warp, the top warpK.
RD_HD int64_t beamChunkK(int64_t numBeams, int64_t warpK, int64_t vocab) {
    int64_t k = numBeams;
    if (warpEnabled(warpK, vocab) && warpK > k) k = warpK;
    return k < kBeamChunk ? k : kBeamChunk;
}

// Workspace of the GPU launcher (byte offsets; every part 256-byte aligned).
struct BeamSearchWorkspace {
    int64_t numChunks = 0, chunkK = 0;
    size_t summaryOffset = 0, listOffset = 0, rowCandOffset = 0, totalBytes = 0;
};

struct BeamChunkSummary {  // 24 bytes, one per (row, chunk)
    double sumExp;         // sum of exp(x - chunkMax) over the chunk (no-warp log-sum-exp)
    float chunkMax;
    float tailValue;  // value of the chunk's K-th candidate
    int32_t count;    // candidates written (min(K, chunk length))
    int32_t missing;  // elements equal to tailValue that did not fit in the K
};

struct BeamCandidate {  // 8 bytes
    float value;
    int32_t index;
};

inline BeamSearchWorkspace beamSearchWorkspaceLayout(int64_t batch, int64_t beams, int64_t vocab, int64_t warpK) {
    BeamSearchWorkspace ws;
    auto align = [](size_t x) { return (x + 255) & ~static_cast<size_t>(255); };
    const int64_t rows = batch * beams;
    ws.numChunks = (vocab + kBeamChunk - 1) / kBeamChunk;
    ws.chunkK = beamChunkK(beams, warpK, vocab);
    ws.summaryOffset = 0;
    ws.listOffset = align(static_cast<size_t>(rows * ws.numChunks) * sizeof(BeamChunkSummary));
    ws.rowCandOffset =
        ws.listOffset + align(static_cast<size_t>(rows * ws.numChunks * ws.chunkK) * sizeof(BeamCandidate));
    ws.totalBytes = ws.rowCandOffset + align(static_cast<size_t>(rows * beams) * sizeof(BeamCandidate));
    return ws;
}

// Bytes of device workspace invokeBeamSearchStep needs (0 for bad sizes: checkParams reports).
inline size_t beamSearchWorkspaceBytes(int64_t batch, int64_t beams, int64_t vocab, int64_t warpK) {
    if (batch < 0 || beams < 1 || beams > kMaxBeams || vocab < 1 || vocab > kInt32Max) return 0;
    return beamSearchWorkspaceLayout(batch, beams, vocab, warpK).totalBytes;
}

// DRAM bytes one call must move (the timing output divides by this).
inline int64_t beamSearchBytesMoved(int64_t batch, int64_t beams, int64_t vocab, DataType t) {
    return batch * beams * vocab * static_cast<int64_t>(dataTypeSize(t)) + 16 * batch * beams;
}

// CPU reference (cpp/src/beam_search_cpu.cpp).
Status beamSearchStepCpu(const BeamSearchParams& params);

// CUDA launcher (cpp/kernels/beam_search.cu): checks params, launches on `stream`.
Status invokeBeamSearchStep(const BeamSearchParams& params, CUstream_st* stream);

}  // namespace redrafter
