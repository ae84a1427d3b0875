// CUDA acceptance; the design and the bytes per call are in redrafter/accept.h. The tree walk
// (acceptWalkRow) and the sampling rules (samplingIsGreedy, samplingTopK, argmaxBetter, ...)
// are the functions the CPU reference runs.
#include "device_utils.cuh"
#include "redrafter/accept.h"
#include "redrafter/sampling.h"

namespace redrafter {
namespace {

using device::ReduceScratch;
using device::SelectScratch;

constexpr int kDrawThreads = 256;
constexpr int kWalkThreads = 128;

struct DrawShared {
    ReduceScratch red;
    SelectScratch sel;
    double scanD[32];
    uint32_t scanU[32];
    float argVal[32];
    int64_t argIdx[32];
    int32_t depth;
    int64_t found;
    uint32_t pickBin;
};

// Visits the row in tiles of blockDim * kE logits; thread t holds kE consecutive ids of each
// tile, so the thread order within a tile is the id order. Every thread makes the same number
// of calls f(id0, x[kE], nValid) (warp-synchronous helpers inside f are allowed).
template <class T, class F>
__device__ __forceinline__ void forEachTile(const T* row, int64_t vocab, bool vec, F&& f) {
    constexpr int kE = device::Vec16<T>::kElems;
    const int64_t tileSize = static_cast<int64_t>(blockDim.x) * kE;
    for (int64_t tile = 0; tile < vocab; tile += tileSize) {
        const int64_t id0 = tile + static_cast<int64_t>(threadIdx.x) * kE;
        float x[kE];
        device::loadLogits<T>(row, id0, vocab, vec, x);
        const int nValid = static_cast<int>(rdMax<int64_t>(0, rdMin<int64_t>(kE, vocab - id0)));
        f(id0, x, nValid);
    }
}

__device__ __forceinline__ void blockArgmax(float* v, int64_t* i, DrawShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(device::kFullMask, *v, o);
        const int64_t oi = __shfl_xor_sync(device::kFullMask, *i, o);
        if (argmaxBetter(ov, oi, *v, *i)) {
            *v = ov;
            *i = oi;
        }
    }
    __syncthreads();
    if (lane == 0) {
        sh.argVal[warp] = *v;
        sh.argIdx[warp] = *i;
    }
    __syncthreads();
    for (int w = 0; w < nw; ++w) {
        if (argmaxBetter(sh.argVal[w], sh.argIdx[w], *v, *i)) {
            *v = sh.argVal[w];
            *i = sh.argIdx[w];
        }
    }
}

// The token drawn at one node; all threads of the block call it and get the result.
template <class T>
__device__ int32_t drawAtNode(const T* row, int64_t vocab, float temperature, int64_t topK, float topP, float uniform,
                              DrawShared& sh) {
    constexpr int kE = device::Vec16<T>::kElems;
    constexpr int kLow = device::KeyLowBytes<T>::kValue;
    const bool vec = device::rowIsAligned16(row);

    // Pass 1: max and argmax (all a greedy row needs).
    float bestVal = -INFINITY;
    int64_t bestIdx = vocab;
    forEachTile<T>(row, vocab, vec, [&](int64_t id0, const float (&x)[kE], int nValid) {
#pragma unroll
        for (int e = 0; e < kE; ++e) {
            if (e < nValid && argmaxBetter(x[e], id0 + e, bestVal, bestIdx)) {
                bestVal = x[e];
                bestIdx = id0 + e;
            }
        }
    });
    blockArgmax(&bestVal, &bestIdx, sh);
    if (samplingIsGreedy(temperature)) return static_cast<int32_t>(bestIdx);

    // Sampling. Weights are float32 per element, exp((x - max) / T), summed in float64.
    const float xmax = bestVal;
    const float invT = static_cast<float>(1.0 / static_cast<double>(temperature));
    const int64_t k = samplingTopK(topK, vocab);
    uint32_t kthKey = 0;  // top-k off: every key is >= 0
    if (k < vocab) {
        uint32_t greater, equal;
        kthKey = device::blockRadixSelect<uint32_t, kLow>(
            [&](auto&& visit) {
                forEachTile<T>(row, vocab, vec, [&](int64_t, const float (&x)[kE], int nValid) {
#pragma unroll
                    for (int e = 0; e < kE; ++e) visit(orderedKey(x[e]), e < nValid);
                });
            },
            static_cast<uint32_t>(k), sh.sel, &greater, &equal);
    }
    auto weightOf = [&](float x) { return orderedKey(x) >= kthKey ? expf((x - xmax) * invT) : 0.0f; };

    // Pass: total mass S and the last id with non-zero mass.
    double local = 0.0;
    int32_t lastLocal = -1;
    forEachTile<T>(row, vocab, vec, [&](int64_t id0, const float (&x)[kE], int nValid) {
        float part = 0.0f;
#pragma unroll
        for (int e = 0; e < kE; ++e) {
            const float wgt = e < nValid ? weightOf(x[e]) : 0.0f;
            part += wgt;
            if (wgt > 0.0f) lastLocal = static_cast<int32_t>(id0 + e);
        }
        local += static_cast<double>(part);
    });
    double total = device::blockSum(local, sh.red);
    int32_t lastNonZero = device::blockMaxI32(lastLocal, sh.red);

    // top-p: find the key K* of the last kept token in the descending order (radix descent on
    // the mass of the bins) and how many tokens tied at K* are kept (lowest ids first).
    const bool topPOn = samplingTopPActive(topP);
    uint32_t cutKey = 0;
    uint32_t keepEqual = 0xFFFFFFFFu;
    if (topPOn) {
        const double pS = static_cast<double>(topP) * total;
        uint32_t prefix = 0, mask = 0, equalCount = 0;
        double massAbove = 0.0;
        bool none = false;
        for (int shift = 24; shift >= 8 * kLow; shift -= 8) {
            for (int i = threadIdx.x; i < 256; i += blockDim.x) {
                sh.sel.hist[i] = 0;
                sh.sel.mass[i] = 0.0;
            }
            if (threadIdx.x == 0) sh.pickBin = 0xFFFFFFFFu;
            __syncthreads();
            forEachTile<T>(row, vocab, vec, [&](int64_t, const float (&x)[kE], int nValid) {
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    const uint32_t key = orderedKey(x[e]);
                    const float wgt = e < nValid ? weightOf(x[e]) : 0.0f;
                    const bool match = e < nValid && key >= kthKey && (key & mask) == prefix;
                    device::histAddMass(sh.sel.hist, sh.sel.mass, match ? ((key >> shift) & 0xFFu) : 256u, wgt);
                }
            });
            __syncthreads();
            uint32_t inclCount, ownCount;
            device::binSuffix(sh.sel.hist, sh.sel.warpCount, &inclCount, &ownCount);
            double inclMass, ownMass;
            device::binSuffixMass(sh.sel.mass, sh.sel.warpMass, &inclMass, &ownMass);
            // The lowest non-empty bin whose first token still starts below p: thread t <-> bin 255 - t.
            const bool cond = threadIdx.x < 256 && ownCount > 0 &&
                              samplingTopPKeeps(massAbove + (inclMass - ownMass), pS, false);
            if (cond) atomicMin(&sh.pickBin, 255u - threadIdx.x);
            __syncthreads();
            const uint32_t bin = sh.pickBin;
            if (bin == 0xFFFFFFFFu) {  // p <= 0: only the first token (the argmax) is kept
                none = true;
                break;
            }
            if (threadIdx.x == 255u - bin) {
                sh.sel.massAbove = massAbove + (inclMass - ownMass);
                sh.sel.equal = ownCount;
            }
            __syncthreads();
            massAbove = sh.sel.massAbove;
            equalCount = sh.sel.equal;
            prefix |= bin << shift;
            mask |= 0xFFu << shift;
            __syncthreads();
        }
        if (none) {
            // Only the first token of the order (the argmax, lowest id) is kept: it is the draw.
            return static_cast<int32_t>(bestIdx);
        }
        cutKey = device::fillLowBytes<uint32_t, kLow>(prefix);
        const double cutWeight = static_cast<double>(weightOf(keyToFloat(cutKey)));
        if (cutWeight > 0.0) {
            const double r = ceil((pS - massAbove) / cutWeight);
            keepEqual = static_cast<uint32_t>(rdMin<double>(rdMax<double>(r, 1.0), static_cast<double>(equalCount)));
        } else {
            keepEqual = equalCount;
        }
    }

    // Inverse CDF in id order (and, with top-p, the kept total first). Tokens tied at the top-p
    // cut are ranked by id with a block scan per tile.
    auto scanPass = [&](bool findToken, double target, double* keptTotal, int32_t* lastKept) -> int64_t {
        double running = 0.0;
        uint32_t equalSeen = 0;
        double totalLocal = 0.0;
        int32_t lastLoc = -1;
        if (threadIdx.x == 0) sh.found = vocab;
        __syncthreads();
        const int64_t tileSize = static_cast<int64_t>(blockDim.x) * kE;
        for (int64_t tile = 0; tile < vocab; tile += tileSize) {
            const int64_t id0 = tile + static_cast<int64_t>(threadIdx.x) * kE;
            float x[kE];
            device::loadLogits<T>(row, id0, vocab, vec, x);
            const int nValid = static_cast<int>(rdMax<int64_t>(0, rdMin<int64_t>(kE, vocab - id0)));
            uint32_t myEqual = 0;
#pragma unroll
            for (int e = 0; e < kE; ++e) myEqual += (e < nValid && topPOn && orderedKey(x[e]) == cutKey && cutKey >= kthKey);
            uint32_t tileEqual;
            uint32_t eqRank = equalSeen + device::blockExclusiveScan<uint32_t>(myEqual, sh.scanU, &tileEqual);
            float wgt[kE];
            double mySum = 0.0;
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                wgt[e] = 0.0f;
                if (e < nValid) {
                    const uint32_t key = orderedKey(x[e]);
                    float wv = weightOf(x[e]);
                    if (topPOn && wv > 0.0f) {
                        if (key < cutKey) wv = 0.0f;
                        if (key == cutKey) wv = (eqRank++ < keepEqual) ? wv : 0.0f;
                    }
                    wgt[e] = wv;
                    mySum += static_cast<double>(wv);
                    if (wv > 0.0f) lastLoc = static_cast<int32_t>(id0 + e);
                }
            }
            totalLocal += mySum;
            if (findToken) {
                double tileTotal;
                const double before = running + device::blockExclusiveScan<double>(mySum, sh.scanD, &tileTotal);
                if (before + mySum > target) {
                    double c = before;
#pragma unroll
                    for (int e = 0; e < kE; ++e) {
                        c += static_cast<double>(wgt[e]);
                        if (e < nValid && c > target) {
                            atomicMin(reinterpret_cast<unsigned long long*>(&sh.found), static_cast<unsigned long long>(id0 + e));
                            break;
                        }
                    }
                }
                running += tileTotal;
                __syncthreads();
                if (sh.found < vocab) break;
            }
            equalSeen += tileEqual;
        }
        if (!findToken) {
            *keptTotal = device::blockSum(totalLocal, sh.red);
            *lastKept = device::blockMaxI32(lastLoc, sh.red);
        }
        __syncthreads();
        return sh.found;
    };
    if (topPOn) scanPass(false, 0.0, &total, &lastNonZero);
    const int64_t tok = scanPass(true, samplingCdfTarget(uniform, total), nullptr, nullptr);
    return static_cast<int32_t>(rdMin<int64_t>(tok, rdMax<int32_t>(lastNonZero, 0)));
}

// Kernel 1: one block per packed node; draws[b, node] = the token drawn there (-1: never read).
template <class T>
__global__ void __launch_bounds__(kDrawThreads, 2) acceptDrawKernel(AcceptParams p, int32_t* __restrict__ draws) {
    __shared__ DrawShared sh;
    const int64_t N = p.numNodes, V = p.vocabSize;
    const int32_t W = static_cast<int32_t>(p.numBeams), L = static_cast<int32_t>(p.beamLength);
    const int64_t total = p.batchSize * N;
    for (int64_t job = blockIdx.x; job < total; job += gridDim.x) {
        const int64_t b = job / N;
        const int32_t node = static_cast<int32_t>(job - b * N);
        if (p.packedLen && node >= p.packedLen[b]) {
            if (threadIdx.x == 0) draws[job] = -1;
            continue;
        }
        // Depth of the node: the root is depth 0; others from the unpacker (lowest match).
        if (threadIdx.x == 0) sh.depth = node == 0 ? 0 : L;
        __syncthreads();
        if (node != 0) {
            for (int32_t i = threadIdx.x; i < W * L; i += blockDim.x) {
                if (p.unpacker[b * W * L + i] == node) atomicMin(&sh.depth, i % L);
            }
        }
        __syncthreads();
        const int32_t depth = sh.depth;
        __syncthreads();
        if (depth >= L) {
            if (threadIdx.x == 0) draws[job] = -1;
            continue;
        }
        const T* row = static_cast<const T*>(p.logits) + job * V;
        const int32_t tok = drawAtNode<T>(row, V, p.temperature[b], p.topK[b], p.topP[b], p.uniforms[b * L + depth], sh);
        if (threadIdx.x == 0) draws[job] = tok;
    }
}

struct DrawsLookup {
    const int32_t* draws;
    __device__ int32_t operator()(int32_t node, int32_t) const { return draws[node]; }
};

// Kernel 2: one thread per row walks the tree over the draws.
__global__ void __launch_bounds__(kWalkThreads) acceptWalkKernel(AcceptParams p, const int32_t* __restrict__ draws) {
    const int32_t W = static_cast<int32_t>(p.numBeams), L = static_cast<int32_t>(p.beamLength);
    const int32_t N = static_cast<int32_t>(p.numNodes);
    for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < p.batchSize;
         b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        DrawsLookup lookup{draws + b * N};
        acceptWalkRow(p.beams + b * W * L, p.unpacker + b * W * L, W, L, N, lookup, p.acceptedIndices + b * L,
                      p.emitted ? p.emitted + b * L : nullptr, p.numAccepted + b, p.bestBeam + b, p.bonus + b);
    }
}

}  // namespace

Status invokeAccept(const AcceptParams& p, CUstream_st* stream) {
    RD_RETURN_IF_ERROR(p.checkParams());
    if (p.batchSize == 0) return Status::success();
    const size_t need = acceptWorkspaceBytes(p.batchSize, p.numNodes);
    if (!p.workspace || p.workspaceBytes < need)
        return Status::error(StatusCode::kInvalidArgument, "accept: workspace of %zu bytes needed (acceptWorkspaceBytes), got %zu at %p",
                             need, p.workspaceBytes, p.workspace);
    int32_t* draws = static_cast<int32_t*>(p.workspace);
    const unsigned grid1 = static_cast<unsigned>(rdMin<int64_t>(p.batchSize * p.numNodes, 1 << 30));
    switch (p.logitsType) {
        case DataType::kFloat32: RD_LAUNCH(acceptDrawKernel<float>, grid1, kDrawThreads, 0, stream, p, draws); break;
        case DataType::kFloat16: RD_LAUNCH(acceptDrawKernel<__half>, grid1, kDrawThreads, 0, stream, p, draws); break;
        case DataType::kBFloat16: RD_LAUNCH(acceptDrawKernel<__nv_bfloat16>, grid1, kDrawThreads, 0, stream, p, draws); break;
    }
    const unsigned grid2 = static_cast<unsigned>(rdMin<int64_t>((p.batchSize + kWalkThreads - 1) / kWalkThreads, 1 << 30));
    RD_LAUNCH(acceptWalkKernel, grid2, kWalkThreads, 0, stream, p, draws);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return Status::error(StatusCode::kCudaError, "accept: kernel launch failed: %s", cudaGetErrorString(err));
    return Status::success();
}

}  // namespace redrafter
