// GPU self-test: runs every kernel against its CPU reference on random inputs (float32,
// float16, bfloat16 logits; W in {1, 4, 8, 64}; V in {1000, 32000, 152064}), then times it and
// prints the achieved bandwidth against the bytes the call must move (from the headers).
//
// Exit status: 0 all equal, 1 a mismatch or a CUDA error, 77 no CUDA GPU (nothing was run).
// Usage: redrafter_gpu_check [--quick] [--iters N] [--only KERNEL] [--seed S]
// Built with REDRAFTER_EMULATE (redrafter_emu_check) it runs the same comparisons on the CPU
// emulator with small shapes; its timings mean nothing. Accept compares every node's draw (not
// only the walk's) with drawTokenCpu, and in the emulator also asserts the kernel's global
// logits loads per node (AcceptEmuStats, accept.h) and that every draw path was taken.
// Accept's "must move" is acceptBytesMoved: each packed node's logits once; the one-tile
// re-read of pure-temperature nodes and the row re-reads of fallback nodes are not in it.
#if defined(REDRAFTER_EMULATE)
#include "cuda_emu.h"  // CPU emulation (cpp/tests/emu): the same kernels, small shapes
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "redrafter/accept.h"
#include "redrafter/beam_search.h"
#include "redrafter/kv_relocate.h"
#include "redrafter/sampling.h"
#include "redrafter/tree_pack.h"

using namespace redrafter;

namespace {

int gFailures = 0;
int gPasses = 0;
int gIters = 20;

#define CHECK_CUDA(expr)                                                                                             \
    do {                                                                                                             \
        cudaError_t _e = (expr);                                                                                     \
        if (_e != cudaSuccess) {                                                                                     \
            std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(_e), __FILE__, __LINE__, #expr); \
            std::exit(1);                                                                                            \
        }                                                                                                            \
    } while (0)

void checkStatus(const Status& s, const char* what) {
    if (!s.ok()) {
        std::fprintf(stderr, "%s failed: %s\n", what, s.message);
        std::exit(1);
    }
}

struct DevBuf {
    void* p = nullptr;
    size_t bytes = 0;
    explicit DevBuf(size_t n) : bytes(n) { CHECK_CUDA(cudaMalloc(&p, n > 0 ? n : 1)); }
    ~DevBuf() { cudaFree(p); }
    DevBuf(DevBuf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
    DevBuf(const DevBuf&) = delete;
    DevBuf& operator=(const DevBuf&) = delete;
    DevBuf& operator=(DevBuf&&) = delete;
    template <class T>
    T* as() const {
        return static_cast<T*>(p);
    }
};

template <class T>
DevBuf upload(const std::vector<T>& v) {
    DevBuf d(v.size() * sizeof(T));
    CHECK_CUDA(cudaMemcpy(d.p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

template <class T>
std::vector<T> download(const DevBuf& d, size_t n) {
    std::vector<T> v(n);
    CHECK_CUDA(cudaMemcpy(v.data(), d.p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
}

// Random logits stored as `t` (raw bits for 16-bit types), plus their float values.
std::vector<uint16_t> toBits(const std::vector<float>& x, DataType t) {
    std::vector<uint16_t> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        if (t == DataType::kFloat16) {
            const __half h = __float2half_rn(x[i]);
            std::memcpy(&out[i], &h, 2);
        } else {
            const __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
            std::memcpy(&out[i], &h, 2);
        }
    }
    return out;
}

DevBuf uploadLogits(const std::vector<float>& x, DataType t) {
    if (t == DataType::kFloat32) return upload(x);
    return upload(toBits(x, t));
}

// A host copy in the same storage (for the CPU reference).
std::vector<char> hostLogits(const std::vector<float>& x, DataType t) {
    std::vector<char> out(x.size() * dataTypeSize(t));
    if (t == DataType::kFloat32) {
        std::memcpy(out.data(), x.data(), out.size());
    } else {
        const auto bits = toBits(x, t);
        std::memcpy(out.data(), bits.data(), out.size());
    }
    return out;
}

template <class F>
double timeUs(F&& launch) {
#if defined(REDRAFTER_EMULATE)
    (void)launch;  // emulated timings mean nothing
    return 0.0;
#endif
    launch();
    CHECK_CUDA(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
    CHECK_CUDA(cudaEventRecord(a));
    for (int i = 0; i < gIters; ++i) launch();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    CHECK_CUDA(cudaEventDestroy(a));
    CHECK_CUDA(cudaEventDestroy(b));
    return 1000.0 * ms / gIters;
}

void report(const char* op, const std::string& cfg, bool ok, int nearTies, double us, int64_t bytes) {
    std::printf("%-12s %-44s %-4s %8.1f us %10.3f MB %8.1f GB/s%s\n", op, cfg.c_str(), ok ? "ok" : "FAIL", us,
                bytes / 1e6, us > 0 ? bytes / (us * 1e3) : 0.0, nearTies ? "  (near-tie differences tolerated)" : "");
    if (ok)
        ++gPasses;
    else
        ++gFailures;
}

// ---- beam search ----------------------------------------------------------------------------

// mapped: a reduced draft vocabulary, logit column v is full id vocabMap[v] (a shuffled sparse
// set), so a token the kernel takes from the wrong column, or leaves unmapped, differs.
void checkBeamSearch(std::mt19937_64& rng, DataType t, int64_t W, int64_t V, int64_t warpK, bool mapped = false) {
    const int64_t B = 2;
    std::normal_distribution<float> nd(0.0f, 3.0f);
    std::vector<float> x(static_cast<size_t>(B * W * V));
    for (auto& v : x) v = nd(rng);
    if (W > 1) std::copy(x.begin(), x.begin() + V, x.begin() + V);  // duplicated beam rows: ties
    std::vector<float> scores(static_cast<size_t>(B * W));
    for (auto& s : scores) s = nd(rng);
    scores[1 % scores.size()] = scores[0];
    for (int64_t w = 1; w < W; ++w) scores[static_cast<size_t>(W + w)] = -INFINITY;  // row 1: first step

    const auto hostX = hostLogits(x, t);
    std::vector<float> cpuScores(B * W);
    std::vector<int32_t> cpuParent(B * W), cpuToken(B * W);
    std::vector<int32_t> vocabMap;
    if (mapped) {
        vocabMap.resize(static_cast<size_t>(V));
        for (int64_t v = 0; v < V; ++v) vocabMap[v] = static_cast<int32_t>(7 * v + 3);
        std::shuffle(vocabMap.begin(), vocabMap.end(), rng);
    }
    BeamSearchParams p;
    p.logits = hostX.data();
    p.logitsType = t;
    p.vocabMap = mapped ? vocabMap.data() : nullptr;
    p.beamScores = scores.data();
    p.newScores = cpuScores.data();
    p.parent = cpuParent.data();
    p.token = cpuToken.data();
    p.batchSize = B;
    p.numBeams = W;
    p.vocabSize = V;
    p.warpK = warpK;
    checkStatus(beamSearchStepCpu(p), "beamSearchStepCpu");

    DevBuf dx = uploadLogits(x, t), ds = upload(scores), dOut(B * W * 4), dPar(B * W * 4), dTok(B * W * 4);
    DevBuf ws(beamSearchWorkspaceBytes(B, W, V, warpK));
    DevBuf dMap = mapped ? upload(vocabMap) : DevBuf(4);
    BeamSearchParams g = p;
    g.vocabMap = mapped ? dMap.as<int32_t>() : nullptr;
    g.logits = dx.p;
    g.beamScores = ds.as<float>();
    g.newScores = dOut.as<float>();
    g.parent = dPar.as<int32_t>();
    g.token = dTok.as<int32_t>();
    g.workspace = ws.p;
    g.workspaceBytes = ws.bytes;
    checkStatus(invokeBeamSearchStep(g, nullptr), "invokeBeamSearchStep");
    CHECK_CUDA(cudaDeviceSynchronize());
    const auto gs = download<float>(dOut, B * W);
    const auto gp = download<int32_t>(dPar, B * W);
    const auto gt = download<int32_t>(dTok, B * W);
    bool ok = true;
    int nearTies = 0;
    for (int64_t i = 0; i < B * W; ++i) {
        const float tol = 1e-4f * std::max(1.0f, std::fabs(cpuScores[i]));
        const bool scoreOk = std::fabs(gs[i] - cpuScores[i]) <= tol || (std::isinf(gs[i]) && gs[i] == cpuScores[i]);
        if (!scoreOk) ok = false;
        if (gp[i] != cpuParent[i] || gt[i] != cpuToken[i]) {
            if (scoreOk)
                ++nearTies;  // equal scores up to rounding: a different but tied choice
            else
                ok = false;
        }
    }
    const double us = timeUs([&] { invokeBeamSearchStep(g, nullptr); });
    char cfg[128];
    std::snprintf(cfg, sizeof(cfg), "%s B=%lld W=%lld V=%lld warp_k=%lld%s", dataTypeName(t), (long long)B,
                  (long long)W, (long long)V, (long long)warpK, mapped ? " mapped" : "");
    report("beam_search", cfg, ok, nearTies, us, beamSearchBytesMoved(B, W, V, t));
}

// ---- tree pack ------------------------------------------------------------------------------

std::vector<int32_t> randomBeams(std::mt19937_64& rng, int64_t B, int64_t W, int64_t L, int alphabet) {
    std::uniform_int_distribution<int> tok(0, alphabet - 1);
    std::vector<int32_t> beams(static_cast<size_t>(B * W * L));
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t w = 0; w < W; ++w) {
            for (int64_t d = 0; d < L; ++d) beams[(b * W + w) * L + d] = d == 0 ? 7 : tok(rng);
        }
        if (W > 2) std::copy_n(&beams[b * W * L], L, &beams[(b * W + 2) * L]);  // a duplicated beam
    }
    return beams;
}

void checkTreePack(std::mt19937_64& rng, int64_t W, int64_t L) {
    const int64_t B = 16, N = W * L, words = maskWords(N);
    const auto beams = randomBeams(rng, B, W, L, 3);
    std::vector<int32_t> tok(B * N), len(B), unp(B * N), off(B * N), mask(B * N * words);
    TreePackParams p;
    p.beams = beams.data();
    p.packedTokens = tok.data();
    p.packedLen = len.data();
    p.unpacker = unp.data();
    p.positionOffsets = off.data();
    p.packedMask = mask.data();
    p.batchSize = B;
    p.numBeams = W;
    p.beamLength = L;
    checkStatus(treePackCpu(p), "treePackCpu");
    DevBuf db = upload(beams), dt(tok.size() * 4), dl(len.size() * 4), du(unp.size() * 4), doff(off.size() * 4),
           dm(mask.size() * 4);
    TreePackParams g = p;
    g.beams = db.as<int32_t>();
    g.packedTokens = dt.as<int32_t>();
    g.packedLen = dl.as<int32_t>();
    g.unpacker = du.as<int32_t>();
    g.positionOffsets = doff.as<int32_t>();
    g.packedMask = dm.as<int32_t>();
    checkStatus(invokeTreePack(g, nullptr), "invokeTreePack");
    CHECK_CUDA(cudaDeviceSynchronize());
    const bool ok = download<int32_t>(dt, tok.size()) == tok && download<int32_t>(dl, len.size()) == len &&
                    download<int32_t>(du, unp.size()) == unp && download<int32_t>(doff, off.size()) == off &&
                    download<int32_t>(dm, mask.size()) == mask;
    const double us = timeUs([&] { invokeTreePack(g, nullptr); });
    char cfg[128];
    std::snprintf(cfg, sizeof(cfg), "B=%lld W=%lld L=%lld", (long long)B, (long long)W, (long long)L);
    report("tree_pack", cfg, ok, 0, us, treePackBytesMoved(B, W, L));
}

// ---- accept ---------------------------------------------------------------------------------

#if defined(REDRAFTER_EMULATE)
// Draw paths of the accept kernel seen per logits dtype (bit = path, see AcceptEmuStats).
unsigned gAcceptPaths[3] = {0, 0, 0};
#endif

// variant 0: the standard mix (greedy, or four sampling rows). Variants 1 and 2 aim at the
// sampling paths of the kernel (accept.h): 1 = single-pass top-k, nucleus in the buffer, pure
// temperature, and a nucleus too large for the buffer; 2 = boundary ties beyond the buffer,
// k beyond the buffer, and ties at the top-p cut with and without top-k.
void checkAccept(std::mt19937_64& rng, DataType t, int64_t W, int64_t V, bool sampling, int variant = 0) {
    const int64_t B = 4, L = 5, N = W * L, words = maskWords(N);
    std::uniform_int_distribution<int> tokDist(0, static_cast<int>(std::min<int64_t>(V, 50)) - 1);
    std::vector<int32_t> beams(B * W * L);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t w = 0; w < W; ++w)
            for (int64_t d = 0; d < L; ++d)
                beams[(b * W + w) * L + d] = d == 0 ? 1 : (w % 3 == 0 ? 2 + d : tokDist(rng));
    std::vector<int32_t> tok(B * N), len(B), unp(B * N), off(B * N), mask(B * N * words);
    TreePackParams tp;
    tp.beams = beams.data();
    tp.packedTokens = tok.data();
    tp.packedLen = len.data();
    tp.unpacker = unp.data();
    tp.positionOffsets = off.data();
    tp.packedMask = mask.data();
    tp.batchSize = B;
    tp.numBeams = W;
    tp.beamLength = L;
    checkStatus(treePackCpu(tp), "treePackCpu");
    // Logits: noise, plus a strong vote for the next token of beam 0 so greedy walks go deep.
    std::normal_distribution<float> nd(0.0f, 2.0f);
    std::vector<float> x(static_cast<size_t>(B * N * V));
    for (auto& v : x) v = nd(rng);
    int64_t totalPacked = 0;
    for (int64_t b = 0; b < B; ++b) {
        totalPacked += len[b];
        for (int64_t d = 0; d + 1 < L; ++d) {
            const int32_t node = unp[(b * W + 0) * L + d];
            x[(b * N + node) * V + beams[(b * W + 0) * L + d + 1]] += 8.0f;
        }
        x[(b * N + 0) * V + 3] = x[(b * N + 0) * V + 4];  // a tie
        const bool coarse = variant == 0 ? b == 3 : (variant == 2 && b >= 2);
        if (coarse) {  // coarse logits: many exact ties at the top-k and top-p cuts
            for (int64_t i = b * N * V; i < (b + 1) * N * V; ++i) x[i] = std::round(x[i] * 2.0f) * 0.5f;
        }
        if (variant == 1 && b == 3) {  // nearly flat: the top-p nucleus holds most of the row
            for (int64_t i = b * N * V; i < (b + 1) * N * V; ++i) x[i] = 0.01f * x[i];
        }
        if (variant == 2 && b == 0) {  // all tied but three: the top-k boundary ties fill the row
            for (int64_t i = b * N * V; i < (b + 1) * N * V; ++i) x[i] = (i % 997 == 5) ? 1.0f : 0.0f;
        }
    }
    std::vector<float> temperature(B), topP(B), uniforms(B * L);
    std::vector<int32_t> topK(B);
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    // Rows: plain sampling; top-k + top-p; top-p alone; top-k alone on tied logits.
    const float temps[3][4] = {{1.0f, 0.8f, 1.3f, 0.7f}, {0.9f, 0.6f, 1.0f, 1.0f}, {1.0f, 1.0f, 1.0f, 0.8f}};
    const float ps[3][4] = {{1.0f, 0.9f, 0.5f, 1.0f}, {0.8f, 0.7f, 1.0f, 0.95f}, {1.0f, 0.9f, 0.6f, 0.5f}};
    const int32_t ks[3][4] = {{0, 50, 0, 5}, {40, 0, 0, 0}, {5, 3500, 0, 300}};
    for (int64_t b = 0; b < B; ++b) {
        temperature[b] = sampling ? temps[variant][b % 4] : 0.0f;
        topK[b] = sampling ? ks[variant][b % 4] : 0;
        topP[b] = sampling ? ps[variant][b % 4] : 1.0f;
    }
    for (auto& u : uniforms) u = std::floor(ud(rng) * 16777216.0f) / 16777216.0f;
    const auto hostX = hostLogits(x, t);
    std::vector<int32_t> na(B), best(B), bonus(B), path(B * L), emitted(B * L);
    AcceptParams p;
    p.logits = hostX.data();
    p.logitsType = t;
    p.beams = beams.data();
    p.unpacker = unp.data();
    p.packedLen = len.data();
    p.temperature = temperature.data();
    p.topK = topK.data();
    p.topP = topP.data();
    p.uniforms = uniforms.data();
    p.numAccepted = na.data();
    p.bestBeam = best.data();
    p.bonus = bonus.data();
    p.acceptedIndices = path.data();
    p.emitted = emitted.data();
    p.batchSize = B;
    p.numNodes = N;
    p.vocabSize = V;
    p.numBeams = W;
    p.beamLength = L;
    checkStatus(acceptCpu(p), "acceptCpu");

    DevBuf dx = uploadLogits(x, t), db = upload(beams), du = upload(unp), dl = upload(len), dT = upload(temperature),
           dK = upload(topK), dP = upload(topP), dU = upload(uniforms), dna(B * 4), dbest(B * 4), dbonus(B * 4),
           dpath(B * L * 4), dem(B * L * 4), ws(acceptWorkspaceBytes(B, N));
    AcceptParams g = p;
    g.logits = dx.p;
    g.beams = db.as<int32_t>();
    g.unpacker = du.as<int32_t>();
    g.packedLen = dl.as<int32_t>();
    g.temperature = dT.as<float>();
    g.topK = dK.as<int32_t>();
    g.topP = dP.as<float>();
    g.uniforms = dU.as<float>();
    g.numAccepted = dna.as<int32_t>();
    g.bestBeam = dbest.as<int32_t>();
    g.bonus = dbonus.as<int32_t>();
    g.acceptedIndices = dpath.as<int32_t>();
    g.emitted = dem.as<int32_t>();
    g.workspace = ws.p;
    g.workspaceBytes = ws.bytes;
#if defined(REDRAFTER_EMULATE)
    acceptEmuStats().reset();
#endif
    checkStatus(invokeAccept(g, nullptr), "invokeAccept");
    CHECK_CUDA(cudaDeviceSynchronize());
    const bool same = download<int32_t>(dna, B) == na && download<int32_t>(dbest, B) == best &&
                      download<int32_t>(dbonus, B) == bonus && download<int32_t>(dpath, B * L) == path &&
                      download<int32_t>(dem, B * L) == emitted;
    // Every node's draw (the workspace holds them), not only those the walk visits, against
    // drawTokenCpu with the uniform of the node's depth.
    const auto draws = download<int32_t>(ws, B * N);
    int drawDiffs = 0;
    std::vector<float> rowF(static_cast<size_t>(V));
    SamplingScratch scratch;
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t node = 0; node < N; ++node) {
            int64_t depth = node == 0 ? 0 : L;
            for (int64_t i = 0; i < W * L; ++i)
                if (unp[b * W * L + i] == node) depth = std::min<int64_t>(depth, i % L);
            const bool drawn = node < len[b] && depth < L;
            int32_t want = -1;
            if (drawn) {
                logitsToFloat(hostX.data(), t, (b * N + node) * V, V, rowF.data());
                want = drawTokenCpu(rowF.data(), V, temperature[b], topK[b], topP[b], uniforms[b * L + depth], scratch);
            }
            if (draws[b * N + node] != want) {
                if (drawDiffs++ < 4)
                    std::printf("  accept: row %lld node %lld (depth %lld): kernel drew %d, reference %d\n",
                                (long long)b, (long long)node, (long long)depth, draws[b * N + node], want);
            }
        }
    }
    // Sampling draws use float32 probabilities on the GPU and float64 on the CPU: only a uniform
    // within ~1e-6 of a CDF step could pick a different token, so any difference is reported.
    bool ok = same && drawDiffs == 0;
#if defined(REDRAFTER_EMULATE)
    // Global logits loads per node: greedy and single-pass rows read their row exactly once,
    // pure-temperature rows once plus at most one tile; the multi-pass fallback may read more.
    {
        const AcceptEmuStats& st = acceptEmuStats();
        const int64_t tileElems = 256 * static_cast<int64_t>(16 / dataTypeSize(t));
        int loadErrors = 0;
        int pathCount[5] = {0, 0, 0, 0, 0};
        for (int64_t j = 0; j < B * N; ++j) {
            const int32_t pth = j < static_cast<int64_t>(st.path.size()) ? st.path[j] : -1;
            const int64_t loads = j < static_cast<int64_t>(st.loads.size()) ? st.loads[j] : 0;
            bool good = true;
            if (pth < 0)
                good = loads == 0 && draws[j] < 0;
            else if (pth <= 2)
                good = loads == V;
            else if (pth == 3)
                good = loads > V && loads <= V + tileElems;
            else
                good = loads >= V;
            if (pth >= 0 && pth < 5) {
                ++pathCount[pth];
                gAcceptPaths[static_cast<int>(t)] |= 1u << pth;
            }
            if (!good && loadErrors++ < 4)
                std::printf("  accept: job %lld path %d loaded %lld logits (V = %lld)\n", (long long)j, pth,
                            (long long)loads, (long long)V);
        }
        if (loadErrors) ok = false;
        std::printf("  accept paths (greedy/top-k/nucleus/tile/fallback): %d/%d/%d/%d/%d nodes, loads checked\n",
                    pathCount[0], pathCount[1], pathCount[2], pathCount[3], pathCount[4]);
    }
#endif
    const double us = timeUs([&] { invokeAccept(g, nullptr); });
    char cfg[128];
    std::snprintf(cfg, sizeof(cfg), "%s%s %s B=%lld W=%lld L=%lld V=%lld", sampling ? "sample" : "greedy",
                  variant ? (variant == 1 ? "/paths" : "/ties") : "", dataTypeName(t), (long long)B, (long long)W,
                  (long long)L, (long long)V);
    report("accept", cfg, ok, 0, us, acceptBytesMoved(totalPacked, B, W, L, N, V, t));
}

// ---- kv relocate ----------------------------------------------------------------------------

// tokensPerBlock == 0: the contiguous layout [layers, 2, slots, heads, maxSeq, headDim];
// otherwise TensorRT-LLM's paged pool (kvPagedLayout) with ceil(maxSeq / tokensPerBlock) blocks per
// slot, each block followed by blockPad unused elements (a pool view with wider blocks: the vector
// width must follow the strides' alignment, not only the head row's).
struct KvShape {
    int64_t layers, slots, heads, maxSeq, headDim, tokensPerBlock, blockPad;
};

void checkKvRelocate(std::mt19937_64& rng, int64_t elemBytes, int64_t W, const KvShape& s) {
    const int64_t layers = s.layers, slots = s.slots, heads = s.heads, maxSeq = s.maxSeq, headDim = s.headDim, B = 8,
                  L = 5;
    KvCacheLayout layout;  // default: contiguous
    int64_t elems = layers * 2 * slots * heads * maxSeq * headDim;
    if (s.tokensPerBlock > 0) {
        const int64_t maxBlocks = (maxSeq + s.tokensPerBlock - 1) / s.tokensPerBlock;
        layout = kvPagedLayout(layers, heads, s.tokensPerBlock, headDim, maxBlocks);
        layout.strideBlock += s.blockPad;
        layout.strideSlot = maxBlocks * layout.strideBlock;
        elems = slots * layout.strideSlot;
    }
    const int64_t bytes = elems * elemBytes;
    std::vector<uint8_t> cache(static_cast<size_t>(bytes));
    for (auto& c : cache) c = static_cast<uint8_t>(rng());
    std::vector<int32_t> slot(B), lens(B), q(B * L), n(B);
    for (int64_t b = 0; b < B; ++b) {
        slot[b] = static_cast<int32_t>((b * 5) % slots);
        lens[b] = static_cast<int32_t>(rng() % 300);
        n[b] = static_cast<int32_t>(rng() % L);
        int32_t prev = 0;
        q[b * L] = 0;
        for (int64_t k = 1; k < L; ++k) {
            prev += 1 + static_cast<int32_t>(rng() % std::max<int64_t>(1, W));
            q[b * L + k] = prev;
        }
    }
    int64_t moved = 0;
    for (int64_t b = 0; b < B; ++b) moved += n[b];
    DevBuf dc = upload(cache), ds = upload(slot), dl = upload(lens), dq = upload(q), dn = upload(n), dout(B * 4);
    std::vector<int32_t> out(B);
    KvRelocateParams p;
    p.cache = cache.data();
    p.elemBytes = elemBytes;
    p.numLayers = layers;
    p.numSlots = slots;
    p.numKvHeads = heads;
    p.maxSeqLen = maxSeq;
    p.headDim = headDim;
    p.layout = layout;
    p.cacheElems = s.tokensPerBlock > 0 ? elems : 0;
    p.slots = slot.data();
    p.cacheLengths = lens.data();
    p.acceptedIndices = q.data();
    p.numAccepted = n.data();
    p.newLengths = out.data();
    p.batchSize = B;
    p.beamLength = L;
    checkStatus(kvRelocateCpu(p), "kvRelocateCpu");
    KvRelocateParams g = p;
    g.cache = dc.p;
    g.slots = ds.as<int32_t>();
    g.cacheLengths = dl.as<int32_t>();
    g.acceptedIndices = dq.as<int32_t>();
    g.numAccepted = dn.as<int32_t>();
    g.newLengths = dout.as<int32_t>();
    checkStatus(invokeKvRelocate(g, nullptr), "invokeKvRelocate");
    CHECK_CUDA(cudaDeviceSynchronize());
    const bool ok = download<uint8_t>(dc, cache.size()) == cache && download<int32_t>(dout, B) == out;
    const double us = timeUs([&] { invokeKvRelocate(g, nullptr); });
    char cfg[128];
    if (s.tokensPerBlock > 0)
        std::snprintf(cfg, sizeof(cfg), "paged tpb=%lld%s elem=%lldB layers=%lld heads=%lld hd=%lld",
                      (long long)s.tokensPerBlock, s.blockPad ? "+pad" : "", (long long)elemBytes, (long long)layers,
                      (long long)heads, (long long)headDim);
    else
        std::snprintf(cfg, sizeof(cfg), "elem=%lldB B=%lld layers=%lld heads=%lld head_dim=%lld", (long long)elemBytes,
                      (long long)B, (long long)layers, (long long)heads, (long long)headDim);
    report("kv_relocate", cfg, ok, 0, us, kvRelocateBytesMoved(moved, layers, heads, headDim, elemBytes, B, L));
}

}  // namespace

int main(int argc, char** argv) {
    bool quick = false;
    std::string only;
    unsigned long long seed = 1234;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--quick")) quick = true;
        if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) gIters = std::max(1, std::atoi(argv[++i]));
        if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    }
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    auto want = [&](const char* op) { return only.empty() || only == op; };
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        std::printf("no CUDA GPU present (%s): the kernels are built but were not run\n",
                    e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 77;
    }
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    std::printf("device 0: %s, sm_%d%d, %d SMs, %.1f GB\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                prop.totalGlobalMem / 1e9);
    std::printf("%-12s %-44s %-4s %11s %13s %13s\n", "kernel", "config", "", "time", "must move", "achieved");
    std::mt19937_64 rng(seed);
    const DataType types[] = {DataType::kFloat32, DataType::kFloat16, DataType::kBFloat16};
#if defined(REDRAFTER_EMULATE)
    // The emulator runs every thread as a fiber: small shapes, and V = 4500 spans two chunks.
    gIters = 1;
    const std::vector<int64_t> beams = quick ? std::vector<int64_t>{1, 8} : std::vector<int64_t>{1, 4, 8};
    const std::vector<int64_t> vocabs = {1000, 4500};
#else
    const std::vector<int64_t> beams = {1, 4, 8, 64};
    const std::vector<int64_t> vocabs = {1000, 32000, 152064};
#endif
    for (DataType t : types) {
        for (int64_t W : beams) {
            for (int64_t V : vocabs) {
                if (quick && V > 32000) continue;
                if (want("beam_search")) {
                    checkBeamSearch(rng, t, W, V, 50);
                    if (W == 8) checkBeamSearch(rng, t, W, V, 0);
                    if (W == 8) checkBeamSearch(rng, t, W, V, 50, true);
                }
                if (want("accept")) {
                    checkAccept(rng, t, W, V, false);
                    checkAccept(rng, t, W, V, true);
                }
            }
        }
    }
    if (want("accept")) {
        // The kernel's sampling paths, V not a multiple of the tile and V > the candidate buffer.
        for (DataType t : types) {
            for (int64_t V : {1000, 4500, 9000}) {
                checkAccept(rng, t, 2, V, true, 1);
                checkAccept(rng, t, 2, V, true, 2);
            }
        }
#if defined(REDRAFTER_EMULATE)
        for (DataType t : types) {
            char cfg[128];
            std::snprintf(cfg, sizeof(cfg), "%s: every draw path exercised (mask 0x%x)", dataTypeName(t),
                          gAcceptPaths[static_cast<int>(t)]);
            report("accept", cfg, gAcceptPaths[static_cast<int>(t)] == 0x1Fu, 0, 0.0, 0);
        }
#endif
    }
    for (int64_t W : beams) {
        if (!want("tree_pack")) break;
        checkTreePack(rng, W, 5);
        checkTreePack(rng, W, 64);
    }
#if defined(REDRAFTER_EMULATE)  // paged: small dims; tpb 5 makes moves cross blocks and leaves a partial last block
    const KvShape kvPaged[] = {{2, 8, 2, 512, 64, 16, 0}, {2, 8, 3, 512, 36, 5, 0}, {1, 8, 2, 512, 64, 16, 3}};
#else
    const KvShape kvPaged[] = {{8, 8, 8, 512, 128, 64, 0}, {4, 8, 4, 512, 72, 5, 0}, {4, 8, 4, 512, 128, 16, 3}};
#endif
    for (int64_t elem : {2, 4}) {
        if (!want("kv_relocate")) break;
        for (int64_t W : beams) {
            checkKvRelocate(rng, elem, W, KvShape{8, 8, 8, 512, 128, 0, 0});
            for (const KvShape& s : kvPaged) checkKvRelocate(rng, elem, W, s);
        }
    }
    std::printf("%d passed, %d failed\n", gPasses, gFailures);
    return gFailures ? 1 : 0;
}
