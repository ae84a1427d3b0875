// CUDA beam-search step; the rules, the three-launch design and the bytes per call are in
// redrafter/beam_search.h. The per-element logic (warpedLogit, candidateScore, rankKey,
// orderedKey) is the one the CPU reference runs.
#include "device_utils.cuh"
#include "redrafter/beam_search.h"

namespace redrafter {
namespace {

using device::ReduceScratch;
using device::SelectScratch;

constexpr int kThreads = kBeamChunkThreads;  // 256
constexpr int kItems = kBeamChunkItems;      // 16 logits per thread, thread-contiguous
constexpr int kMergeThreads = 256;
constexpr int kMaxRowCands = 2 * kMaxBeams;  // W kept + W fillers

// Stage 1: one block per (chunk of 4096 logits, beam row). The chunk is read once into registers.
template <class T>
__global__ void __launch_bounds__(kThreads)
    beamChunkTopKKernel(const T* __restrict__ logits, int64_t rows, int64_t vocab, int64_t numChunks, int32_t chunkK,
                        BeamChunkSummary* __restrict__ summaries, BeamCandidate* __restrict__ lists) {
    constexpr int kE = device::Vec16<T>::kElems;
    static_assert(kItems % kE == 0, "items per thread must be whole vectors");
    __shared__ ReduceScratch red;
    __shared__ SelectScratch sel;
    __shared__ uint32_t scanTotals[32];

    const int64_t chunk = blockIdx.x;
    const int64_t start = chunk * kBeamChunk;
    const int32_t len = static_cast<int32_t>(rdMin<int64_t>(kBeamChunk, vocab - start));
    const int32_t base = threadIdx.x * kItems;
    const int32_t nValid = max(0, min(kItems, len - base));

    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* rowPtr = logits + row * vocab;
        const bool vec = device::rowIsAligned16(rowPtr);
        float x[kItems];
#pragma unroll
        for (int v = 0; v < kItems / kE; ++v) {
            float part[kE];
            device::loadLogits<T>(rowPtr, start + base + v * kE, start + len, vec, part);
#pragma unroll
            for (int e = 0; e < kE; ++e) x[v * kE + e] = part[e];
        }
        float localMax = -INFINITY;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
            if (j < nValid) localMax = fmaxf(localMax, x[j]);
        }
        const float chunkMax = device::blockMax(localMax, red);
        double localSum = 0.0;
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
            if (j < nValid) localSum += static_cast<double>(expf(x[j] - chunkMax));
        }
        const double sumExp = device::blockSum(localSum, red);

        BeamCandidate* out = lists + (row * numChunks + chunk) * chunkK;
        int32_t count, missing = 0;
        float tail = -INFINITY;
        if (chunkK >= len) {  // the whole chunk is a candidate
            count = len;
#pragma unroll
            for (int j = 0; j < kItems; ++j) {
                if (j < nValid) out[base + j] = BeamCandidate{x[j], static_cast<int32_t>(start + base + j)};
            }
        } else {
            count = chunkK;
            uint32_t greater, equal;
            const uint32_t kth = device::blockRadixSelect<uint32_t, device::KeyLowBytes<T>::kValue>(
                [&](auto&& f) {
#pragma unroll
                    for (int j = 0; j < kItems; ++j) f(orderedKey(x[j]), j < nValid);
                },
                static_cast<uint32_t>(chunkK), sel, &greater, &equal);
            const uint32_t take = static_cast<uint32_t>(chunkK) - greater;  // tied entries kept, lowest ids first
            uint32_t gt = 0, eq = 0;
#pragma unroll
            for (int j = 0; j < kItems; ++j) {
                if (j < nValid) {
                    const uint32_t key = orderedKey(x[j]);
                    gt += key > kth;
                    eq += key == kth;
                }
            }
            uint32_t total;
            const uint32_t before = device::blockExclusiveScan<uint32_t>(gt | (eq << 16), scanTotals, &total);
            uint32_t eqBefore = before >> 16;
            uint32_t pos = (before & 0xFFFFu) + min(eqBefore, take);
#pragma unroll
            for (int j = 0; j < kItems; ++j) {
                if (j < nValid) {
                    const uint32_t key = orderedKey(x[j]);
                    bool pick = key > kth;
                    if (key == kth) {
                        pick = eqBefore < take;
                        ++eqBefore;
                    }
                    if (pick) out[pos++] = BeamCandidate{x[j], static_cast<int32_t>(start + base + j)};
                }
            }
            tail = keyToFloat(kth);
            missing = static_cast<int32_t>(equal - take);
        }
        if (threadIdx.x == 0) {
            summaries[row * numChunks + chunk] = BeamChunkSummary{sumExp, chunkMax, tail, count, missing};
        }
        __syncthreads();
    }
}

// Stage 2: one block per beam row: log-sum-exp and the beam's own top W from the chunk lists.
template <class T>
__global__ void __launch_bounds__(kMergeThreads)
    beamRowMergeKernel(const T* __restrict__ logits, const float* __restrict__ beamScores, int64_t rows,
                       int32_t numBeams, int64_t vocab, int64_t warpK, int64_t numChunks, int32_t chunkK,
                       const BeamChunkSummary* __restrict__ summaries, const BeamCandidate* __restrict__ lists,
                       BeamCandidate* __restrict__ rowCands) {
    __shared__ ReduceScratch red;
    __shared__ SelectScratch sel;
    __shared__ uint32_t scanTotals[32];
    __shared__ uint64_t cand[kMaxRowCands];
    __shared__ float candScore[kMaxRowCands];
    __shared__ uint32_t numCand;

    const bool warpOn = warpEnabled(warpK, vocab);
    const int64_t unionSize = numChunks * chunkK;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const BeamChunkSummary* sum = summaries + row * numChunks;
        const BeamCandidate* list = lists + row * numChunks * chunkK;
        const int32_t w = static_cast<int32_t>(row % numBeams);
        const float bs = beamScores[row];

        float localMax = -INFINITY;
        for (int64_t c = threadIdx.x; c < numChunks; c += blockDim.x) localMax = fmaxf(localMax, sum[c].chunkMax);
        const float m = device::blockMax(localMax, red);
        // Visits every candidate of the union: f(entry, valid), the same number of calls on
        // every thread (padding entries come with valid = false).
        auto forEachEntry = [&](auto&& f) {
            for (int64_t tile = 0; tile < unionSize; tile += blockDim.x) {
                const int64_t i = tile + threadIdx.x;
                const int64_t c = i / chunkK;
                const bool valid = i < unionSize && i - c * chunkK < sum[c].count;
                f(valid ? list[i] : BeamCandidate{0.0f, 0}, valid);
            }
        };

        float kthShifted = 0.0f;
        if (warpOn) {
            uint32_t greater, equal;
            const uint32_t kth = device::blockRadixSelect<uint32_t, 0>(
                [&](auto&& f) {
                    forEachEntry([&](const BeamCandidate& e, bool valid) { f(orderedKey(e.value), valid); });
                },
                static_cast<uint32_t>(warpK), sel, &greater, &equal);
            kthShifted = keyToFloat(kth) - m;
        }
        const float wmax = m - m;  // max of the warped row (0 for a finite row)
        double local = 0.0;
        uint32_t keptLocal = 0, keptUnionLocal = 0;
        if (warpOn) {
            forEachEntry([&](const BeamCandidate& e, bool valid) {
                const float s = e.value - m;
                if (valid && s >= kthShifted) {
                    local += static_cast<double>(expf(warpedLogit(s, kthShifted, true) - wmax));
                    ++keptLocal;
                    ++keptUnionLocal;
                }
            });
            for (int64_t c = threadIdx.x; c < numChunks; c += blockDim.x) {
                const float s = sum[c].tailValue - m;
                if (sum[c].missing > 0 && s >= kthShifted) {
                    local += static_cast<double>(sum[c].missing) * static_cast<double>(expf(s - wmax));
                    keptLocal += static_cast<uint32_t>(sum[c].missing);
                }
            }
        } else {
            for (int64_t c = threadIdx.x; c < numChunks; c += blockDim.x) {
                local += sum[c].sumExp * exp(static_cast<double>(sum[c].chunkMax) - static_cast<double>(m));
            }
            forEachEntry([&](const BeamCandidate&, bool valid) { keptUnionLocal += valid; });
        }
        const double total = device::blockSum(local, red);
        const float logSum = static_cast<float>(log(total));
        const uint32_t keptUnion = device::blockSumU32(keptUnionLocal, red);
        const uint32_t keptAll = warpOn ? device::blockSumU32(keptLocal, red) : static_cast<uint32_t>(vocab);

        auto keyOf = [&](float warped, int64_t id) {
            return rankKey(candidateScore(bs, warped, wmax, logSum), static_cast<uint32_t>(w * vocab + id));
        };
        // The beam's top W among kept union entries (keys are distinct: distinct flat indices).
        if (threadIdx.x == 0) numCand = 0;
        __syncthreads();
        const uint32_t wantKept = rdMin<uint32_t>(keptUnion, static_cast<uint32_t>(numBeams));
        uint64_t cut = 0;
        if (keptUnion > static_cast<uint32_t>(numBeams)) {
            uint32_t greater, equal;
            cut = device::blockRadixSelect<uint64_t, 0>(
                [&](auto&& f) {
                    forEachEntry([&](const BeamCandidate& e, bool valid) {
                        const float s = e.value - m;
                        f(keyOf(s, e.index), valid && (!warpOn || s >= kthShifted));
                    });
                },
                wantKept, sel, &greater, &equal);
        }
        forEachEntry([&](const BeamCandidate& e, bool valid) {
            const float s = e.value - m;
            if (valid && (!warpOn || s >= kthShifted)) {
                const uint64_t key = keyOf(s, e.index);
                if (key >= cut) {
                    const uint32_t slot = atomicAdd(&numCand, 1u);
                    cand[slot] = key;
                    candScore[slot] = candidateScore(bs, s, wmax, logSum);
                }
            }
        });
        __syncthreads();
        // Warped-out tokens (value WARP_FILL, lowest ids first) can reach the top W only when
        // fewer than W tokens are kept or the k-th value is at or below WARP_FILL.
        if (warpOn && (keptAll < static_cast<uint32_t>(numBeams) || !(kthShifted > kWarpFill))) {
            const T* rowPtr = logits + row * vocab;
            uint32_t found = 0;
            for (int64_t tile = 0; tile < vocab && found < static_cast<uint32_t>(numBeams); tile += blockDim.x) {
                const int64_t id = tile + threadIdx.x;
                const bool filler = id < vocab && !(device::toFloat(rowPtr[id]) - m >= kthShifted);
                uint32_t tileTotal;
                const uint32_t before = device::blockExclusiveScan<uint32_t>(filler ? 1u : 0u, scanTotals, &tileTotal);
                if (filler && found + before < static_cast<uint32_t>(numBeams)) {
                    const uint32_t slot = wantKept + found + before;
                    cand[slot] = keyOf(kWarpFill, id);
                    candScore[slot] = candidateScore(bs, kWarpFill, wmax, logSum);
                }
                found += tileTotal;
            }
            if (threadIdx.x == 0) numCand = wantKept + min(found, static_cast<uint32_t>(numBeams));
            __syncthreads();
        }
        // Rank the (at most 2W) candidates; the best W go out in order.
        const uint32_t n = numCand;
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            uint32_t rank = 0;
            for (uint32_t j = 0; j < n; ++j) rank += cand[j] > cand[i];
            if (rank < static_cast<uint32_t>(numBeams)) {
                rowCands[row * numBeams + rank] =
                    BeamCandidate{candScore[i], static_cast<int32_t>(rankKeyIndex(cand[i]))};
            }
        }
        __syncthreads();
    }
}

// Stage 3: one block per batch row: top W of the W*W union, best first.
__global__ void __launch_bounds__(kMergeThreads)
    beamMergeKernel(const BeamCandidate* __restrict__ rowCands, int64_t batch, int32_t numBeams, int64_t vocab,
                    const int32_t* __restrict__ vocabMap, float* __restrict__ newScores, int32_t* __restrict__ parent,
                    int32_t* __restrict__ token) {
    __shared__ SelectScratch sel;
    __shared__ uint64_t top[kMaxBeams];
    __shared__ uint32_t numTop;
    const int32_t n = numBeams * numBeams;
    for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
        const BeamCandidate* c = rowCands + b * n;
        auto forEachKey = [&](auto&& f) {
            for (int32_t tile = 0; tile < n; tile += blockDim.x) {
                const int32_t i = tile + threadIdx.x;
                f(i < n ? rankKey(c[i].value, static_cast<uint32_t>(c[i].index)) : 0ull, i < n);
            }
        };
        uint32_t greater, equal;
        const uint64_t cut =
            device::blockRadixSelect<uint64_t, 0>(forEachKey, static_cast<uint32_t>(numBeams), sel, &greater, &equal);
        if (threadIdx.x == 0) numTop = 0;
        __syncthreads();
        forEachKey([&](uint64_t key, bool valid) {
            if (valid && key >= cut) top[atomicAdd(&numTop, 1u)] = key;
        });
        __syncthreads();
        for (int32_t i = threadIdx.x; i < numBeams; i += blockDim.x) {
            int32_t rank = 0;
            for (int32_t j = 0; j < numBeams; ++j) rank += top[j] > top[i];
            const uint32_t flat = rankKeyIndex(top[i]);
            newScores[b * numBeams + rank] = rankKeyValue(top[i]);
            parent[b * numBeams + rank] = static_cast<int32_t>(flat / vocab);
            token[b * numBeams + rank] = mappedToken(vocabMap, static_cast<uint32_t>(flat % vocab));
        }
        __syncthreads();
    }
}

template <class T>
Status launch(const BeamSearchParams& p, cudaStream_t stream) {
    const BeamSearchWorkspace ws = beamSearchWorkspaceLayout(p.batchSize, p.numBeams, p.vocabSize, p.warpK);
    char* base = static_cast<char*>(p.workspace);
    auto* summaries = reinterpret_cast<BeamChunkSummary*>(base + ws.summaryOffset);
    auto* lists = reinterpret_cast<BeamCandidate*>(base + ws.listOffset);
    auto* rowCands = reinterpret_cast<BeamCandidate*>(base + ws.rowCandOffset);
    const T* logits = static_cast<const T*>(p.logits);
    const int64_t rows = p.batchSize * p.numBeams;
    const dim3 grid1(static_cast<unsigned>(ws.numChunks), static_cast<unsigned>(rdMin<int64_t>(rows, 65535)));
    RD_LAUNCH(beamChunkTopKKernel<T>, grid1, kThreads, 0, stream, logits, rows, p.vocabSize, ws.numChunks,
              static_cast<int32_t>(ws.chunkK), summaries, lists);
    RD_LAUNCH(beamRowMergeKernel<T>, static_cast<unsigned>(rdMin<int64_t>(rows, 1 << 30)), kMergeThreads, 0, stream,
              logits, p.beamScores, rows, static_cast<int32_t>(p.numBeams), p.vocabSize, p.warpK, ws.numChunks,
              static_cast<int32_t>(ws.chunkK), summaries, lists, rowCands);
    RD_LAUNCH(beamMergeKernel, static_cast<unsigned>(rdMin<int64_t>(p.batchSize, 1 << 30)), kMergeThreads, 0, stream,
              rowCands, p.batchSize, static_cast<int32_t>(p.numBeams), p.vocabSize, p.vocabMap, p.newScores, p.parent,
              p.token);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return Status::error(StatusCode::kCudaError, "beam search: kernel launch failed: %s", cudaGetErrorString(err));
    return Status::success();
}

}  // namespace

Status invokeBeamSearchStep(const BeamSearchParams& p, CUstream_st* stream) {
    RD_RETURN_IF_ERROR(p.checkParams());
    if (p.batchSize == 0) return Status::success();
    const int64_t numChunks = (p.vocabSize + kBeamChunk - 1) / kBeamChunk;
    if (numChunks > 2147483647)
        return Status::error(StatusCode::kUnsupported, "beam search: V=%lld needs too many chunks",
                             (long long)p.vocabSize);
    const size_t need = beamSearchWorkspaceBytes(p.batchSize, p.numBeams, p.vocabSize, p.warpK);
    if (!p.workspace || p.workspaceBytes < need)
        return Status::error(StatusCode::kInvalidArgument,
                             "beam search: workspace of %zu bytes needed (beamSearchWorkspaceBytes), got %zu at %p",
                             need, p.workspaceBytes, p.workspace);
    switch (p.logitsType) {
        case DataType::kFloat32:
            return launch<float>(p, stream);
        case DataType::kFloat16:
            return launch<__half>(p, stream);
        case DataType::kBFloat16:
            return launch<__nv_bfloat16>(p, stream);
    }
    return Status::error(StatusCode::kInvalidArgument, "beam search: bad dtype");
}

}  // namespace redrafter
