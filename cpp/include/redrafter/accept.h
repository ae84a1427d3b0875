// Acceptance of a verified tree (docs/design.md section 6): greedy and exact sampling in one tree walk.
//
//   logits          [B, N, V]  float32/float16/bfloat16 base logits at the packed nodes
//                              (N >= every packed length, usually W*L; padding never read)
//   beams           [B, W, L]  int32 draft beams
//   unpacker        [B, W, L]  int32 packed index of node (w, d)
//   packedLen       [B]        int32, optional (nullptr): nodes >= packedLen[b] are never read
//   temperature     [B] float32 (<= 0: greedy), topK [B] int32 (0: off), topP [B] float32
//   uniforms        [B, L]     float32 in [0, 1): the uniform of the d-th emitted token
//   numAccepted [B], bestBeam [B], bonus [B]            int32
//   acceptedIndices [B, L]     int32 packed indices of the accepted path (root 0 first; entries
//                              past numAccepted repeat the last node)
//   emitted         [B, L]     int32, optional: the tokens the step adds, then -1
//
// The walk (acceptWalkRow, shared): at depth d the walk stands at a packed node whose path is
// beams[w, :d+1] for every w in `match`; it draws x there with uniforms[b, d]; if a beam in
// `match` continues with x it moves to that child (lowest such beam), else x is the bonus.
// For greedy rows this is the longest-prefix rule of docs/design.md section 6 (lowest beam on ties).
//
// Kernel design (cpp/kernels/accept.cu): a node's draw depends only on its logits and on the
// uniform of its depth, so
//   1. draw: grid (N, B), one block (256 threads) per packed node: finds the node's depth from
//      the unpacker, reads the node's logits and writes its draw to the workspace. The row is
//      read in tiles of 256 * kE ids (kE = 16 / sizeof(T): 4 for float32, 8 for 16-bit types).
//      Weights are float32 per element, exp((x - max) / T), summed in float64.
//      Greedy rows: one pass, max and argmax together.
//      Sampling rows: one streaming pass that also finds max/argmax and
//        - (top-k on, or top-p on) keeps an on-chip candidate buffer (4096 entries of ordered
//          key + id, 32 KB of static shared memory) of every token with key >= a rising
//          admission threshold: when fewer than a tile's worth of slots are free, the block
//          radix-selects on the buffer (not on the row), keeps the top k (top-k on; boundary
//          ties kept) or the top (4096 - tile) / 2 (top-k off; if the ties at that key do not
//          fit, the threshold rises past them) and compacts;
//        - (top-k off, top-p on) accumulates the row's mass with an online max, rescaled in
//          float64 when the running max rises;
//        - (top-k and top-p off) stores one float64 mass per tile, relative to the running max.
//      After the pass, on-chip:
//        top-k on, k <= (4096 - tile) / 2 (1536 for float32, 1024 for 16-bit types): the k-th
//          key, the mass, the top-p cut (radix descent on mass; ties at the cut by lowest id
//          via a radix select on ids) and the inverse CDF in id order (radix descent on ids),
//          all over the buffer;
//        top-k off, top-p on: the same when the buffer's mass reaches p * S (the nucleus is a
//          prefix of the descending order, so it then lies in the buffer);
//        pure temperature: the tile whose cumulative mass crosses u * S, then that one tile is
//          RE-READ (<= 256 * kE logits = 4 KB, normally from L2) to find the token.
//      Anything the buffer cannot hold exactly (more boundary ties than slots, a larger k, a
//      nucleus beyond the buffer), rows with a non-finite max or 1/T, and pure-temperature rows
//      of more than 512 tiles take the multi-pass fallback: the row is re-read (normally from L2) for
//      the top-k radix select (2 passes for bfloat16, 3 for float16, 4 for float32), the sum,
//      the top-p radix descent and the inverse-CDF scans. Results are the same on every path
//      except where float summation order moves u * S (p * S) across a CDF (top-p) step by an
//      ulp. Shared memory: ~43.7 KB static per block, so 2 blocks fit per SM on sm_86/89.
//   2. walk: grid (ceil(B/128)), one thread per row runs acceptWalkRow over the draws.
// Bytes per call it must move (DRAM): sum_b P_b * V * sizeof(T) logits (each packed node once;
//   B*N*V*sizeof(T) when packedLen is null) + 4*B*(2*W*L + 4 + 2*L) + 8*B*N workspace.
//   On top of that, not counted: pure-temperature nodes re-read one tile (<= 4 KB), and
//   fallback nodes re-read their row (L2 traffic as long as the row stays resident).
// The emulator build (REDRAFTER_EMULATE) counts every global logits load per node
// (AcceptEmuStats) and redrafter_emu_check asserts the counts above.
#pragma once

#include "redrafter/common.h"

#if defined(REDRAFTER_EMULATE)
#include <vector>
#endif

namespace redrafter {

struct AcceptParams {
    const void* logits = nullptr;  // [B, N, V]
    DataType logitsType = DataType::kFloat32;
    const int32_t* beams = nullptr;      // [B, W, L]
    const int32_t* unpacker = nullptr;   // [B, W, L]
    const int32_t* packedLen = nullptr;  // [B] or nullptr
    const float* temperature = nullptr;  // [B]
    const int32_t* topK = nullptr;       // [B]
    const float* topP = nullptr;         // [B]
    const float* uniforms = nullptr;     // [B, L]
    int32_t* numAccepted = nullptr;      // [B]
    int32_t* bestBeam = nullptr;         // [B]
    int32_t* bonus = nullptr;            // [B]
    int32_t* acceptedIndices = nullptr;  // [B, L]
    int32_t* emitted = nullptr;          // [B, L] or nullptr
    int64_t batchSize = 0;               // B >= 0
    int64_t numNodes = 0;                // N >= 1
    int64_t vocabSize = 0;               // V >= 1
    int64_t numBeams = 0;                // 1 <= W <= 64
    int64_t beamLength = 0;              // 1 <= L <= 64
    void* workspace = nullptr;           // GPU launcher only: acceptWorkspaceBytes()
    size_t workspaceBytes = 0;

    Status checkParams() const {
        if (batchSize < 0 || batchSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument, "accept: batch size B must be in [0, 2^31), got %lld",
                                 (long long)batchSize);
        if (numBeams < 1 || numBeams > kMaxBeams)
            return Status::error(StatusCode::kInvalidArgument, "accept: num_beams W must be in [1, %lld], got %lld",
                                 (long long)kMaxBeams, (long long)numBeams);
        if (beamLength < 1 || beamLength > kMaxBeamLength)
            return Status::error(StatusCode::kInvalidArgument,
                                 "accept: beam length L = D + 1 must be in [1, %lld], got %lld",
                                 (long long)kMaxBeamLength, (long long)beamLength);
        if (numNodes < 1 || numNodes > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument,
                                 "accept: number of logits rows per sequence N must be in [1, 2^31), got %lld",
                                 (long long)numNodes);
        if (vocabSize < 1 || vocabSize > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument, "accept: vocab size V must be in [1, 2^31), got %lld",
                                 (long long)vocabSize);
        int64_t total = 0;
        if (!checkedProduct({batchSize, numNodes, vocabSize, 4}, INT64_MAX, &total))
            return Status::error(StatusCode::kOverflow, "accept: B*N*V bytes overflow int64 (B=%lld N=%lld V=%lld)",
                                 (long long)batchSize, (long long)numNodes, (long long)vocabSize);
        if (!dataTypeValid(static_cast<int32_t>(logitsType)))
            return Status::error(StatusCode::kInvalidArgument,
                                 "accept: logits dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got %d",
                                 (int)logitsType);
        if (!logits || !beams || !unpacker || !temperature || !topK || !topP || !uniforms || !numAccepted ||
            !bestBeam || !bonus || !acceptedIndices)
            return Status::error(
                StatusCode::kInvalidArgument,
                "accept: null pointer among logits, beams, unpacker, temperature, top_k, top_p, uniforms, "
                "num_accepted, best_beam, bonus, accepted_indices (only packed_len and emitted may be null)");
        return Status::success();
    }
};

// ---- per-element logic shared by the kernel and the CPU reference -------------------------

RD_HD int32_t lowestSetBit(uint64_t x) {
#if defined(__CUDA_ARCH__)
    return __ffsll(static_cast<long long>(x)) - 1;
#else
    return __builtin_ctzll(x);
#endif
}

RD_HD uint64_t allBeamsMask(int32_t W) { return W >= 64 ? ~0ull : ((1ull << W) - 1); }

// Beams of `match` whose token at depth d equals x.
RD_HD uint64_t acceptChildren(const int32_t* beams, int32_t W, int32_t L, uint64_t match, int32_t d, int32_t x) {
    uint64_t child = 0;
    for (int32_t w = 0; w < W; ++w) {
        if (((match >> w) & 1ull) && beams[w * L + d] == x) child |= 1ull << w;
    }
    return child;
}

// Walks one row's tree. `draw(node, depth)` returns the token drawn at a packed node.
// Packed indices outside [0, numNodes) are replaced by 0 (the CPU reference rejects them first).
template <class DrawFn>
RD_HD void acceptWalkRow(const int32_t* beams, const int32_t* unpacker, int32_t W, int32_t L, int32_t numNodes,
                          DrawFn& draw, int32_t* acceptedIndices, int32_t* emitted, int32_t* numAccepted,
                          int32_t* bestBeam, int32_t* bonus) {
    uint64_t match = allBeamsMask(W);
    int32_t node = 0;
    acceptedIndices[0] = 0;
    for (int32_t d = 0; d < L; ++d) {
        const int32_t x = draw(node, d);
        if (emitted) emitted[d] = x;
        const uint64_t child = (d + 1 < L) ? acceptChildren(beams, W, L, match, d + 1, x) : 0ull;
        if (child == 0) {
            *numAccepted = d;
            *bestBeam = lowestSetBit(match);
            *bonus = x;
            for (int32_t e = d + 1; e < L; ++e) {
                acceptedIndices[e] = node;
                if (emitted) emitted[e] = -1;
            }
            return;
        }
        int32_t next = unpacker[lowestSetBit(child) * L + d + 1];
        node = (next >= 0 && next < numNodes) ? next : 0;
        acceptedIndices[d + 1] = node;
        match = child;
    }
}

inline size_t acceptWorkspaceBytes(int64_t batch, int64_t numNodes) {
    if (batch < 0 || numNodes < 1) return 0;
    return static_cast<size_t>(batch * numNodes) * sizeof(int32_t);
}

// DRAM bytes one call must move, given the total packed length sum_b P_b.
inline int64_t acceptBytesMoved(int64_t totalPacked, int64_t B, int64_t W, int64_t L, int64_t N, int64_t V,
                                DataType t) {
    return totalPacked * V * static_cast<int64_t>(dataTypeSize(t)) + 4 * B * (2 * W * L + 4 + 2 * L) + 8 * B * N;
}

#if defined(REDRAFTER_EMULATE)
// Emulator-only instrumentation (cpp/tests/emu; nothing of it exists in a GPU build): for each
// job b * N + node of the last draw kernel, the logits elements it loaded from global memory
// and the path that computed its draw (-1: not drawn; 0 greedy, 1 single-pass top-k, 2
// single-pass nucleus, 3 single pass + one tile re-read, 4 multi-pass fallback).
struct AcceptEmuStats {
    std::vector<int64_t> loads;
    std::vector<int32_t> path;
    int64_t current = -1;
    void reset() {
        loads.clear();
        path.clear();
        current = -1;
    }
    void begin(int64_t job, int64_t jobs) {
        if (static_cast<int64_t>(loads.size()) < jobs) {
            loads.resize(static_cast<size_t>(jobs), 0);
            path.resize(static_cast<size_t>(jobs), -1);
        }
        current = job;
    }
};
inline AcceptEmuStats& acceptEmuStats() {
    static AcceptEmuStats s;
    return s;
}
#endif

Status acceptCpu(const AcceptParams& params);
Status invokeAccept(const AcceptParams& params, CUstream_st* stream);

}  // namespace redrafter
