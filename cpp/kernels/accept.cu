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
// On-chip candidate buffer of the single-pass sampling paths: (ordered key, id) of the
// highest-logit tokens, room for the kept entries plus one whole tile of new arrivals.
constexpr int kCandidates = 4096;  // 32 KB
// Per-tile masses of the pure-temperature path (rows of at most kMaxTiles tiles).
constexpr int kMaxTiles = 512;
constexpr uint32_t kNoThreshold = 0xFFFFFFFFu;  // above every ordered key: the buffer overflowed

// How a node's draw was computed (recorded by the emulator build, see accept.h).
enum DrawPath : int32_t {
    kPathGreedy = 0,    // one pass: max and argmax
    kPathTopK = 1,      // one pass; top-k kept set (and top-p) in the candidate buffer
    kPathNucleus = 2,   // one pass; top-k off, the top-p nucleus lies in the candidate buffer
    kPathTile = 3,      // one pass plus the re-read of one tile: top-k and top-p off
    kPathFallback = 4,  // multi-pass (radix selects and scans over the row)
};

struct DrawShared {
    ReduceScratch red;
    SelectScratch sel;
    double scanD[32];
    double tileMass[kMaxTiles];  // kPathTile: mass of tile j relative to tileRef[j]
    int64_t argIdx[32];
    int64_t found;
    float tileRef[kMaxTiles];  // kPathTile: running max after tile j
    uint32_t candKey[kCandidates];
    int32_t candId[kCandidates];
    uint32_t scanU[32];
    float argVal[32];
    float warpMax[32];
    int32_t depth;
    uint32_t pickBin;
    uint32_t pickLast;
    int32_t pickTile;
    uint32_t candCount;
    uint32_t candThr;  // the buffer holds every token seen so far with key >= candThr
};

#if defined(REDRAFTER_EMULATE)
__device__ __forceinline__ void countLoads(int n) {
    AcceptEmuStats& s = acceptEmuStats();
    if (s.current >= 0 && s.current < static_cast<int64_t>(s.loads.size()))
        s.loads[static_cast<size_t>(s.current)] += n;
}
__device__ __forceinline__ void recordPath(int32_t path) {
    AcceptEmuStats& s = acceptEmuStats();
    if (s.current >= 0 && s.current < static_cast<int64_t>(s.path.size()))
        s.path[static_cast<size_t>(s.current)] = path;
}
#else
__device__ __forceinline__ void countLoads(int) {}
__device__ __forceinline__ void recordPath(int32_t) {}
#endif

// Loads the kE logits of thread `threadIdx.x` at id0 (every global logits load goes through
// here, so the emulator can count them); returns how many are valid.
template <class T>
__device__ __forceinline__ int loadTile(const T* row, int64_t id0, int64_t vocab, bool vec,
                                        float (&x)[device::Vec16<T>::kElems]) {
    constexpr int kE = device::Vec16<T>::kElems;
    device::loadLogits<T>(row, id0, vocab, vec, x);
    const int nValid = static_cast<int>(rdMax<int64_t>(0, rdMin<int64_t>(kE, vocab - id0)));
    countLoads(nValid);
    return nValid;
}

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
        const int nValid = loadTile<T>(row, id0, vocab, vec, x);
        f(id0, x, nValid);
    }
}

// Visits the first n candidate-buffer entries: visit(key, id, valid), the same number of calls
// on every thread.
template <class F>
__device__ __forceinline__ void forEachCandidate(const DrawShared& sh, uint32_t n, F&& visit) {
    for (uint32_t base = 0; base < n; base += blockDim.x) {
        const uint32_t i = base + threadIdx.x;
        const bool valid = i < n;
        visit(valid ? sh.candKey[i] : 0u, valid ? sh.candId[i] : 0, valid);
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

// One radix round on the mass of the bins: byte `shift` of the keys that forEach hands to
// visit(key, weight, valid) and that match `prefix` under `mask`, binned by count and mass.
// Thread t < 256 gets bin 255 - t's own count and mass and the inclusive suffix down from bin 255
// (descending key order). Also resets sh.pickBin / sh.pickLast for the caller's pick.
struct BinRound {
    uint32_t inclCount, ownCount;
    double inclMass, ownMass;
};

template <class ForEach>
__device__ __forceinline__ BinRound massRound(ForEach&& forEach, uint32_t prefix, uint32_t mask, int shift,
                                              DrawShared& sh) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        sh.sel.hist[i] = 0;
        sh.sel.mass[i] = 0.0;
    }
    if (threadIdx.x == 0) {
        sh.pickBin = 0xFFFFFFFFu;
        sh.pickLast = 0;
    }
    __syncthreads();
    forEach([&](uint32_t key, float wgt, bool valid) {
        const bool match = valid && (key & mask) == prefix;
        device::histAddMass(sh.sel.hist, sh.sel.mass, match ? ((key >> shift) & 0xFFu) : 256u, wgt);
    });
    __syncthreads();
    BinRound r;
    device::binSuffix(sh.sel.hist, sh.sel.warpCount, &r.inclCount, &r.ownCount);
    device::binSuffixMass(sh.sel.mass, sh.sel.warpMass, &r.inclMass, &r.ownMass);
    return r;
}

// top-p cut over the tokens forEach hands to visit(key, weight, valid) (valid = kept by top-k):
// the key of the last kept token of the descending order (radix descent on the mass of the
// bins), the mass ranked above that key and the number of tokens tied at it.
struct TopPCut {
    bool none;  // p <= 0: only the first token of the order is kept
    uint32_t key;
    double massAbove;
    uint32_t equal;
};

template <int kLow, class ForEach>
__device__ TopPCut topPDescent(ForEach&& forEach, double pS, DrawShared& sh) {
    uint32_t prefix = 0, mask = 0, equalCount = 0;
    double massAbove = 0.0;
    for (int shift = 24; shift >= 8 * kLow; shift -= 8) {
        const BinRound r = massRound(forEach, prefix, mask, shift, sh);
        // The lowest non-empty bin whose first token still starts below p: thread t <-> bin 255 - t.
        const bool cond =
            threadIdx.x < 256 && r.ownCount > 0 && samplingTopPKeeps(massAbove + (r.inclMass - r.ownMass), pS, false);
        if (cond) atomicMin(&sh.pickBin, 255u - threadIdx.x);
        __syncthreads();
        const uint32_t bin = sh.pickBin;
        if (bin == 0xFFFFFFFFu) return TopPCut{true, 0u, 0.0, 0u};
        if (threadIdx.x == 255u - bin) {
            sh.sel.massAbove = massAbove + (r.inclMass - r.ownMass);
            sh.sel.equal = r.ownCount;
        }
        __syncthreads();
        massAbove = sh.sel.massAbove;
        equalCount = sh.sel.equal;
        prefix |= bin << shift;
        mask |= 0xFFu << shift;
        __syncthreads();
    }
    return TopPCut{false, device::fillLowBytes<uint32_t, kLow>(prefix), massAbove, equalCount};
}

// How many of the `equal` tokens tied at the cut key top-p keeps (lowest ids first).
__device__ __forceinline__ uint32_t topPKeepEqual(const TopPCut& cut, double pS, double cutWeight) {
    if (cutWeight > 0.0) {
        const double r = ceil((pS - cut.massAbove) / cutWeight);
        return static_cast<uint32_t>(rdMin<double>(rdMax<double>(r, 1.0), static_cast<double>(cut.equal)));
    }
    return cut.equal;
}

// Inverse CDF over the (id, weight) entries forEach hands to visit(id, weight, valid), in any
// order: the smallest id whose inclusive cumulative weight in id order exceeds `target`, by a
// radix descent on the ids (byte by byte, on the mass of the bins); `none` when the whole mass
// is <= target. The bins' masses are float64 sums in another order than a left-to-right
// cumsum: results agree unless target lies within a few ulps of a CDF step.
template <class ForEach>
__device__ int64_t idDescent(ForEach&& forEach, double target, int64_t none, DrawShared& sh) {
    uint32_t prefix = 0, mask = 0;  // over the key ~id: descending key = ascending id
    double massAbove = 0.0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const BinRound r = massRound(
            [&](auto&& visit) {
                forEach([&](int32_t id, float wgt, bool valid) {
                    visit(0xFFFFFFFFu - static_cast<uint32_t>(id), wgt, valid);
                });
            },
            prefix, mask, shift, sh);
        const uint32_t t = threadIdx.x;
        if (t < 256 && r.ownCount > 0) {
            if (massAbove + r.inclMass > target) atomicMin(&sh.pickBin, t);
            atomicMax(&sh.pickLast, t + 1);
        }
        __syncthreads();
        uint32_t pick = sh.pickBin;
        if (pick == 0xFFFFFFFFu) {
            if (shift == 24 || sh.pickLast == 0) return none;
            pick = sh.pickLast - 1;  // the sub-bins summed a hair below their parent bin: its last id
        }
        if (t == pick) sh.sel.massAbove = massAbove + (r.inclMass - r.ownMass);
        __syncthreads();
        massAbove = sh.sel.massAbove;
        prefix |= (255u - pick) << shift;
        mask |= 0xFFu << shift;
        __syncthreads();
    }
    return static_cast<int64_t>(0xFFFFFFFFu - prefix);
}

// The multi-pass draw (the fallback): re-reads the row for the top-k radix select (2 passes
// for bfloat16, 3 for float16, 4 for float32), the sum, the top-p radix descent and the
// inverse-CDF scan. xmax / bestIdx: the row's max and argmax.
template <class T>
__device__ int32_t drawMultiPass(const T* row, int64_t vocab, bool vec, float temperature, int64_t k, float topP,
                                 float uniform, float xmax, int64_t bestIdx, DrawShared& sh) {
    constexpr int kE = device::Vec16<T>::kElems;
    constexpr int kLow = device::KeyLowBytes<T>::kValue;
    recordPath(kPathFallback);
    const float invT = static_cast<float>(1.0 / static_cast<double>(temperature));
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

    // top-p: the key K* of the last kept token and how many tokens tied at K* are kept.
    const bool topPOn = samplingTopPActive(topP);
    uint32_t cutKey = 0;
    uint32_t keepEqual = 0xFFFFFFFFu;
    if (topPOn) {
        const double pS = static_cast<double>(topP) * total;
        const TopPCut cut = topPDescent<kLow>(
            [&](auto&& visit) {
                forEachTile<T>(row, vocab, vec, [&](int64_t, const float (&x)[kE], int nValid) {
#pragma unroll
                    for (int e = 0; e < kE; ++e) {
                        const uint32_t key = orderedKey(x[e]);
                        visit(key, e < nValid ? weightOf(x[e]) : 0.0f, e < nValid && key >= kthKey);
                    }
                });
            },
            pS, sh);
        // Only the first token of the order (the argmax, lowest id) is kept: it is the draw.
        if (cut.none) return static_cast<int32_t>(bestIdx);
        cutKey = cut.key;
        keepEqual = topPKeepEqual(cut, pS, static_cast<double>(weightOf(keyToFloat(cutKey))));
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
            const int nValid = loadTile<T>(row, id0, vocab, vec, x);
            uint32_t myEqual = 0;
#pragma unroll
            for (int e = 0; e < kE; ++e)
                myEqual += (e < nValid && topPOn && orderedKey(x[e]) == cutKey && cutKey >= kthKey);
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
                            atomicMin(reinterpret_cast<unsigned long long*>(&sh.found),
                                      static_cast<unsigned long long>(id0 + e));
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

// Keeps the buffer's entries with key >= the keepTarget-th largest key (ties included), or,
// when those do not fit and ties may be dropped (top-k off), the entries strictly above it;
// otherwise marks the buffer overflowed (candThr = kNoThreshold). Block-uniform call.
template <int kLow>
__device__ void compactCandidates(uint32_t n, uint32_t keepTarget, uint32_t cap, bool mayDropTies, DrawShared& sh) {
    uint32_t greater, equal;
    const uint32_t kth = device::blockRadixSelect<uint32_t, kLow>(
        [&](auto&& visit) { forEachCandidate(sh, n, [&](uint32_t key, int32_t, bool valid) { visit(key, valid); }); },
        keepTarget, sh.sel, &greater, &equal);
    uint32_t thr = kNoThreshold;
    if (greater + equal <= cap)
        thr = kth;
    else if (mayDropTies && greater > 0)
        thr = kth + 1u;
    uint32_t out = 0;
    for (uint32_t base = 0; base < n; base += blockDim.x) {
        const uint32_t i = base + threadIdx.x;
        uint32_t key = 0;
        int32_t id = 0;
        if (i < n) {
            key = sh.candKey[i];
            id = sh.candId[i];
        }
        const uint32_t keep = (i < n && key >= thr) ? 1u : 0u;
        uint32_t chunk;
        // Every entry of this chunk is in registers once the scan returns; writes land below it.
        const uint32_t rank = device::blockExclusiveScan<uint32_t>(keep, sh.scanU, &chunk);
        if (keep) {
            sh.candKey[out + rank] = key;
            sh.candId[out + rank] = id;
        }
        out += chunk;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        sh.candCount = out;
        sh.candThr = thr;
    }
    __syncthreads();
}

// The float32 weight exp((x - xmax) / T) of the logit with ordered key `key`.
__device__ __forceinline__ float keyWeight(uint32_t key, float xmax, float invT) {
    return expf((keyToFloat(key) - xmax) * invT);
}

// The token drawn at one node; all threads of the block call it and get the result.
template <class T>
__device__ int32_t drawAtNode(const T* row, int64_t vocab, float temperature, int64_t topK, float topP, float uniform,
                              DrawShared& sh) {
    constexpr int kE = device::Vec16<T>::kElems;
    constexpr int kLow = device::KeyLowBytes<T>::kValue;
    const bool vec = device::rowIsAligned16(row);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int64_t tileSize = static_cast<int64_t>(blockDim.x) * kE;
    const int64_t numTiles = (vocab + tileSize - 1) / tileSize;
    const uint32_t cap = static_cast<uint32_t>(kCandidates - tileSize);  // kept entries before a new tile
    const int64_t k = samplingTopK(topK, vocab);
    const bool topPOn = samplingTopPActive(topP);
    const float invT = static_cast<float>(1.0 / static_cast<double>(temperature));

    int32_t mode = kPathFallback;
    if (samplingIsGreedy(temperature)) mode = kPathGreedy;
    // Single-pass top-k while k <= half the kept room, so compactions stay rare (each leaves at
    // least half the room free); a larger k (or more boundary ties than the room) falls back.
    else if (k < vocab)
        mode = k <= static_cast<int64_t>(cap / 2) ? kPathTopK : kPathFallback;
    else if (topPOn)
        mode = kPathNucleus;
    else if (numTiles <= kMaxTiles)
        mode = kPathTile;
    const bool buffered = mode == kPathTopK || mode == kPathNucleus;
    const bool online = mode == kPathNucleus || mode == kPathTile;

    float bestVal = -INFINITY;
    int64_t bestIdx = vocab;
    float runMax = -INFINITY;  // block-uniform running max of the tiles read so far (online)
    double runMass = 0.0;      // this thread's mass relative to runMax (kPathNucleus)
    if (mode == kPathGreedy || mode == kPathFallback) {
        // Max and argmax (all a greedy row needs).
        forEachTile<T>(row, vocab, vec, [&](int64_t id0, const float (&x)[kE], int nValid) {
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                if (e < nValid && argmaxBetter(x[e], id0 + e, bestVal, bestIdx)) {
                    bestVal = x[e];
                    bestIdx = id0 + e;
                }
            }
        });
    } else {
        // The single streaming pass: max/argmax, the candidate buffer (buffered), the online
        // total mass (kPathNucleus) and the per-tile masses (kPathTile).
        if (threadIdx.x == 0) {
            sh.candCount = 0;
            sh.candThr = 0;  // every ordered key is >= 0
        }
        if (mode == kPathTile) {
            for (int i = threadIdx.x; i < kMaxTiles; i += blockDim.x) sh.tileMass[i] = 0.0;
        }
        __syncthreads();
        const uint32_t keepTarget = mode == kPathTopK ? static_cast<uint32_t>(k) : cap / 2;
        int32_t tileIdx = 0;
        for (int64_t tile = 0; tile < vocab; tile += tileSize, ++tileIdx) {
            const int64_t id0 = tile + static_cast<int64_t>(threadIdx.x) * kE;
            float x[kE];
            const int nValid = loadTile<T>(row, id0, vocab, vec, x);
            float tmax = -INFINITY;
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                if (e < nValid) {
                    if (argmaxBetter(x[e], id0 + e, bestVal, bestIdx)) {
                        bestVal = x[e];
                        bestIdx = id0 + e;
                    }
                    tmax = fmaxf(tmax, x[e]);
                }
            }
            if (online) {
                tmax = device::warpMax(tmax);
                if (lane == 0) sh.warpMax[warp] = tmax;
            }
            __syncthreads();
            if (online) {
                float m = runMax;
                for (int w = 0; w < nw; ++w) m = fmaxf(m, sh.warpMax[w]);
                if (m > runMax) {  // the running max rises: rescale this thread's mass (float64)
                    if (runMass != 0.0)
                        runMass *=
                            exp((static_cast<double>(runMax) - static_cast<double>(m)) * static_cast<double>(invT));
                    runMax = m;
                }
                float part = 0.0f;
                if (runMax > -INFINITY) {
#pragma unroll
                    for (int e = 0; e < kE; ++e) part += e < nValid ? expf((x[e] - runMax) * invT) : 0.0f;
                }
                runMass += static_cast<double>(part);
                if (mode == kPathTile) {
                    const double wsum = device::warpSum(static_cast<double>(part));
                    if (lane == 0) atomicAdd(&sh.tileMass[tileIdx], wsum);
                    if (threadIdx.x == 0) sh.tileRef[tileIdx] = runMax;
                }
            }
            if (buffered) {
                // Admission: keys >= the threshold, appended with one shared atomic per warp.
                const uint32_t thr = sh.candThr;
                uint32_t mine = 0;
#pragma unroll
                for (int e = 0; e < kE; ++e) mine += (e < nValid && orderedKey(x[e]) >= thr) ? 1u : 0u;
                uint32_t incl = mine;
#pragma unroll
                for (int o = 1; o < 32; o <<= 1) {
                    const uint32_t y = __shfl_up_sync(device::kFullMask, incl, o);
                    if (lane >= o) incl += y;
                }
                uint32_t base = 0;
                if (lane == 31) base = atomicAdd(&sh.candCount, incl);
                base = __shfl_sync(device::kFullMask, base, 31);
                uint32_t pos = base + incl - mine;
#pragma unroll
                for (int e = 0; e < kE; ++e) {
                    const uint32_t key = orderedKey(x[e]);
                    if (e < nValid && key >= thr) {
                        sh.candKey[pos] = key;
                        sh.candId[pos] = static_cast<int32_t>(id0 + e);
                        ++pos;
                    }
                }
            }
            __syncthreads();
            if (buffered) {
                const uint32_t n = sh.candCount;
                // Keep room for a whole tile: select on-chip, compact and raise the threshold.
                if (n > cap) compactCandidates<kLow>(n, keepTarget, cap, mode == kPathNucleus, sh);
            }
        }
    }
    blockArgmax(&bestVal, &bestIdx, sh);
    if (mode == kPathGreedy) {
        recordPath(kPathGreedy);
        return static_cast<int32_t>(bestIdx);
    }

    // Sampling. Weights are float32 per element, exp((x - max) / T), summed in float64.
    const float xmax = bestVal;
    const bool finite = (xmax - xmax == 0.0f) && (invT - invT == 0.0f);  // else: the multi-pass rules
    if (mode == kPathTile && finite) {
        // Tile masses relative to xmax, then the tile whose cumulative mass crosses u * S (the
        // same block scan three times: S, the tile, its start), then the token inside it (the one
        // tile re-read from global memory).
        for (int j = threadIdx.x; j < numTiles; j += blockDim.x)
            sh.tileMass[j] *=
                exp((static_cast<double>(sh.tileRef[j]) - static_cast<double>(xmax)) * static_cast<double>(invT));
        if (threadIdx.x == 0) {
            sh.pickTile = -1;
            sh.found = vocab;
        }
        __syncthreads();
        // what: 0 = total, 1 = pick the last tile with mass starting at or below target, 2 = its start.
        auto scanTiles = [&](int what, double target, int32_t pick) -> double {
            double running = 0.0;
            for (int64_t base = 0; base < numTiles; base += blockDim.x) {
                const int32_t j = static_cast<int32_t>(base + threadIdx.x);
                const double m = j < numTiles ? sh.tileMass[j] : 0.0;
                double chunk;
                const double before = running + device::blockExclusiveScan<double>(m, sh.scanD, &chunk);
                if (what == 1 && j < numTiles && m > 0.0 && before <= target) atomicMax(&sh.pickTile, j);
                if (what == 2 && j == pick) sh.sel.massAbove = before;
                running += chunk;
            }
            __syncthreads();
            return running;
        };
        const double total = scanTiles(0, 0.0, -1);
        const double target = samplingCdfTarget(uniform, total);
        scanTiles(1, target, -1);
        const int32_t j = sh.pickTile;
        if (j >= 0) {
            scanTiles(2, 0.0, j);
            const double massBefore = sh.sel.massAbove;
            const float ref = sh.tileRef[j];
            const double scale =
                exp((static_cast<double>(ref) - static_cast<double>(xmax)) * static_cast<double>(invT));
            const int64_t id0 = static_cast<int64_t>(j) * tileSize + static_cast<int64_t>(threadIdx.x) * kE;
            float x[kE];
            const int nValid = loadTile<T>(row, id0, vocab, vec, x);
            float wgt[kE];
            double mySum = 0.0;
            int32_t lastLoc = -1;
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                wgt[e] = e < nValid ? expf((x[e] - ref) * invT) : 0.0f;
                mySum += static_cast<double>(wgt[e]);
                if (wgt[e] > 0.0f) lastLoc = static_cast<int32_t>(id0 + e);
            }
            double tileTotal;
            double c = device::blockExclusiveScan<double>(mySum, sh.scanD, &tileTotal);
#pragma unroll
            for (int e = 0; e < kE; ++e) {
                c += static_cast<double>(wgt[e]);
                if (wgt[e] > 0.0f && massBefore + scale * c > target) {
                    atomicMin(reinterpret_cast<unsigned long long*>(&sh.found),
                              static_cast<unsigned long long>(id0 + e));
                    break;
                }
            }
            const int32_t lastInTile = device::blockMaxI32(lastLoc, sh.red);  // contains __syncthreads
            const int64_t tok = sh.found < vocab ? sh.found : static_cast<int64_t>(rdMax<int32_t>(lastInTile, 0));
            __syncthreads();
            recordPath(kPathTile);
            return static_cast<int32_t>(tok);
        }
    }
    if (buffered && finite) {
        const uint32_t n = sh.candCount;
        if (sh.candThr != kNoThreshold) {
            uint32_t kthKey = 0;
            if (mode == kPathTopK) {  // every token with key >= the k-th largest is in the buffer
                uint32_t greater, equal;
                kthKey = device::blockRadixSelect<uint32_t, kLow>(
                    [&](auto&& visit) {
                        forEachCandidate(sh, n, [&](uint32_t key, int32_t, bool valid) { visit(key, valid); });
                    },
                    static_cast<uint32_t>(k), sh.sel, &greater, &equal);
            }
            // Mass of the buffer's (top-k) kept entries, and their last id with non-zero weight.
            double local = 0.0;
            int32_t lastLoc = -1;
            forEachCandidate(sh, n, [&](uint32_t key, int32_t id, bool valid) {
                if (valid && key >= kthKey) {
                    const float w = keyWeight(key, xmax, invT);
                    local += static_cast<double>(w);
                    if (w > 0.0f) lastLoc = rdMax<int32_t>(lastLoc, id);
                }
            });
            double keptTotal = device::blockSum(local, sh.red);
            int32_t lastKept = device::blockMaxI32(lastLoc, sh.red);
            const double rowTotal = mode == kPathTopK ? keptTotal : device::blockSum(runMass, sh.red);
            uint32_t cutKey = 0, tieIdMax = 0x7FFFFFFFu;
            bool inBuffer = true;
            if (topPOn) {
                const double pS = static_cast<double>(topP) * rowTotal;
                // top-k off: the nucleus is a prefix of the descending order; it lies in the
                // buffer (every token with key >= candThr) iff the buffer's mass reaches p * S.
                inBuffer = mode == kPathTopK || keptTotal >= pS;
                if (inBuffer) {
                    const TopPCut cut = topPDescent<kLow>(
                        [&](auto&& visit) {
                            forEachCandidate(sh, n, [&](uint32_t key, int32_t, bool valid) {
                                visit(key, valid ? keyWeight(key, xmax, invT) : 0.0f, valid && key >= kthKey);
                            });
                        },
                        pS, sh);
                    if (cut.none) {
                        recordPath(mode);
                        return static_cast<int32_t>(bestIdx);
                    }
                    cutKey = cut.key;
                    const uint32_t keepEqual =
                        topPKeepEqual(cut, pS, static_cast<double>(keyWeight(cutKey, xmax, invT)));
                    if (keepEqual < cut.equal) {  // the keepEqual lowest ids among the tied tokens
                        uint32_t greater, equal;
                        const uint32_t idKey = device::blockRadixSelect<uint32_t, 0>(
                            [&](auto&& visit) {
                                forEachCandidate(sh, n, [&](uint32_t key, int32_t id, bool valid) {
                                    visit(0xFFFFFFFFu - static_cast<uint32_t>(id), valid && key == cutKey);
                                });
                            },
                            keepEqual, sh.sel, &greater, &equal);
                        tieIdMax = 0xFFFFFFFFu - idKey;
                    }
                    local = 0.0;
                    lastLoc = -1;
                    forEachCandidate(sh, n, [&](uint32_t key, int32_t id, bool valid) {
                        if (valid && key >= kthKey &&
                            (key > cutKey || (key == cutKey && static_cast<uint32_t>(id) <= tieIdMax))) {
                            const float w = keyWeight(key, xmax, invT);
                            local += static_cast<double>(w);
                            if (w > 0.0f) lastLoc = rdMax<int32_t>(lastLoc, id);
                        }
                    });
                    keptTotal = device::blockSum(local, sh.red);
                    lastKept = device::blockMaxI32(lastLoc, sh.red);
                }
            }
            if (inBuffer) {
                auto keptEntries = [&](auto&& visit) {
                    forEachCandidate(sh, n, [&](uint32_t key, int32_t id, bool valid) {
                        const bool kept =
                            valid && key >= kthKey &&
                            (!topPOn || key > cutKey || (key == cutKey && static_cast<uint32_t>(id) <= tieIdMax));
                        visit(id, kept ? keyWeight(key, xmax, invT) : 0.0f, kept);
                    });
                };
                const int64_t tok = idDescent(keptEntries, samplingCdfTarget(uniform, keptTotal), vocab, sh);
                recordPath(mode);
                return static_cast<int32_t>(rdMin<int64_t>(tok, rdMax<int32_t>(lastKept, 0)));
            }
        }
    }
    return drawMultiPass<T>(row, vocab, vec, temperature, k, topP, uniform, xmax, bestIdx, sh);
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
#if defined(REDRAFTER_EMULATE)
        acceptEmuStats().begin(job, total);  // every thread of the block has left the previous job
#endif
        __syncthreads();
        if (depth >= L) {
            if (threadIdx.x == 0) draws[job] = -1;
            continue;
        }
        const T* row = static_cast<const T*>(p.logits) + job * V;
        const int32_t tok =
            drawAtNode<T>(row, V, p.temperature[b], p.topK[b], p.topP[b], p.uniforms[b * L + depth], sh);
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
        return Status::error(StatusCode::kInvalidArgument,
                             "accept: workspace of %zu bytes needed (acceptWorkspaceBytes), got %zu at %p", need,
                             p.workspaceBytes, p.workspace);
    int32_t* draws = static_cast<int32_t*>(p.workspace);
    const unsigned grid1 = static_cast<unsigned>(rdMin<int64_t>(p.batchSize * p.numNodes, 1 << 30));
    switch (p.logitsType) {
        case DataType::kFloat32:
            RD_LAUNCH(acceptDrawKernel<float>, grid1, kDrawThreads, 0, stream, p, draws);
            break;
        case DataType::kFloat16:
            RD_LAUNCH(acceptDrawKernel<__half>, grid1, kDrawThreads, 0, stream, p, draws);
            break;
        case DataType::kBFloat16:
            RD_LAUNCH(acceptDrawKernel<__nv_bfloat16>, grid1, kDrawThreads, 0, stream, p, draws);
            break;
    }
    const unsigned grid2 =
        static_cast<unsigned>(rdMin<int64_t>((p.batchSize + kWalkThreads - 1) / kWalkThreads, 1 << 30));
    RD_LAUNCH(acceptWalkKernel, grid2, kWalkThreads, 0, stream, p, draws);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return Status::error(StatusCode::kCudaError, "accept: kernel launch failed: %s", cudaGetErrorString(err));
    return Status::success();
}

}  // namespace redrafter
