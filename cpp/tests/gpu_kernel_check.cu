// GPU self-test: runs every kernel against its CPU reference on random inputs (float32,
// float16, bfloat16 logits; W in {1, 4, 8, 64}; V in {1000, 32000, 152064}), then times it and
// prints the achieved bandwidth against the bytes the call must move (from the headers).
//
// Exit status: 0 all equal, 1 a mismatch or a CUDA error, 77 no CUDA GPU (nothing was run).
// Usage: redrafter_gpu_check [--quick] [--iters N]
// Built with REDRAFTER_EMULATE (redrafter_emu_check) it runs the same comparisons on the CPU
// emulator with small shapes; its timings mean nothing.
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
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "redrafter/accept.h"
#include "redrafter/beam_search.h"
#include "redrafter/kv_relocate.h"
#include "redrafter/tree_pack.h"

using namespace redrafter;

namespace {

int gFailures = 0;
int gPasses = 0;
int gIters = 20;

#define CHECK_CUDA(expr)                                                                              \
    do {                                                                                              \
        cudaError_t _e = (expr);                                                                      \
        if (_e != cudaSuccess) {                                                                      \
            std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(_e), __FILE__, __LINE__, #expr); \
            std::exit(1);                                                                             \
        }                                                                                             \
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
    T* as() const { return static_cast<T*>(p); }
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
    if (ok) ++gPasses;
    else ++gFailures;
}

// ---- beam search ----------------------------------------------------------------------------

void checkBeamSearch(std::mt19937_64& rng, DataType t, int64_t W, int64_t V, int64_t warpK) {
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
    BeamSearchParams p;
    p.logits = hostX.data();
    p.logitsType = t;
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
    BeamSearchParams g = p;
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
            if (scoreOk) ++nearTies;  // equal scores up to rounding: a different but tied choice
            else ok = false;
        }
    }
    const double us = timeUs([&] { invokeBeamSearchStep(g, nullptr); });
    char cfg[128];
    std::snprintf(cfg, sizeof(cfg), "%s B=%lld W=%lld V=%lld warp_k=%lld", dataTypeName(t), (long long)B, (long long)W,
                  (long long)V, (long long)warpK);
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
    DevBuf db = upload(beams), dt(tok.size() * 4), dl(len.size() * 4), du(unp.size() * 4), doff(off.size() * 4), dm(mask.size() * 4);
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

void checkAccept(std::mt19937_64& rng, DataType t, int64_t W, int64_t V, bool sampling) {
    const int64_t B = 4, L = 5, N = W * L, words = maskWords(N);
    std::uniform_int_distribution<int> tokDist(0, static_cast<int>(std::min<int64_t>(V, 50)) - 1);
    std::vector<int32_t> beams(B * W * L);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t w = 0; w < W; ++w)
            for (int64_t d = 0; d < L; ++d) beams[(b * W + w) * L + d] = d == 0 ? 1 : (w % 3 == 0 ? 2 + d : tokDist(rng));
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
        if (b == 3) {  // coarse logits: many exact ties at the top-k and top-p cuts
            for (int64_t i = b * N * V; i < (b + 1) * N * V; ++i) x[i] = std::round(x[i] * 2.0f) * 0.5f;
        }
    }
    std::vector<float> temperature(B), topP(B), uniforms(B * L);
    std::vector<int32_t> topK(B);
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    // Rows: plain sampling; top-k + top-p; top-p alone; top-k alone on tied logits.
    const float temps[4] = {1.0f, 0.8f, 1.3f, 0.7f}, ps[4] = {1.0f, 0.9f, 0.5f, 1.0f};
    const int32_t ks[4] = {0, 50, 0, 5};
    for (int64_t b = 0; b < B; ++b) {
        temperature[b] = sampling ? temps[b % 4] : 0.0f;
        topK[b] = sampling ? ks[b % 4] : 0;
        topP[b] = sampling ? ps[b % 4] : 1.0f;
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
    checkStatus(invokeAccept(g, nullptr), "invokeAccept");
    CHECK_CUDA(cudaDeviceSynchronize());
    const bool same = download<int32_t>(dna, B) == na && download<int32_t>(dbest, B) == best &&
                      download<int32_t>(dbonus, B) == bonus && download<int32_t>(dpath, B * L) == path &&
                      download<int32_t>(dem, B * L) == emitted;
    // Sampling draws use float32 probabilities on the GPU and float64 on the CPU: only a uniform
    // within ~1e-6 of a CDF step could pick a different token, so any difference is reported.
    const bool ok = same;
    const double us = timeUs([&] { invokeAccept(g, nullptr); });
    char cfg[128];
    std::snprintf(cfg, sizeof(cfg), "%s %s B=%lld W=%lld L=%lld V=%lld", sampling ? "sample" : "greedy", dataTypeName(t),
                  (long long)B, (long long)W, (long long)L, (long long)V);
    report("accept", cfg, ok, 0, us, acceptBytesMoved(totalPacked, B, W, L, N, V, t));
}

// ---- kv relocate ----------------------------------------------------------------------------

void checkKvRelocate(std::mt19937_64& rng, int64_t elemBytes, int64_t W) {
    const int64_t layers = 8, slots = 8, heads = 8, maxSeq = 512, headDim = 128, B = 8, L = 5;
    const int64_t bytes = layers * 2 * slots * heads * maxSeq * headDim * elemBytes;
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
    std::snprintf(cfg, sizeof(cfg), "elem=%lldB B=%lld layers=%lld heads=%lld head_dim=%lld", (long long)elemBytes,
                  (long long)B, (long long)layers, (long long)heads, (long long)headDim);
    report("kv_relocate", cfg, ok, 0, us, kvRelocateBytesMoved(moved, layers, heads, headDim, elemBytes, B, L));
}

}  // namespace

int main(int argc, char** argv) {
    bool quick = false;
    std::string only;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--quick")) quick = true;
        if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) gIters = std::max(1, std::atoi(argv[++i]));
        if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
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
    std::mt19937_64 rng(1234);
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
                }
                if (want("accept")) {
                    checkAccept(rng, t, W, V, false);
                    checkAccept(rng, t, W, V, true);
                }
            }
        }
    }
    for (int64_t W : beams) {
        if (!want("tree_pack")) break;
        checkTreePack(rng, W, 5);
        checkTreePack(rng, W, 64);
    }
    for (int64_t elem : {2, 4}) {
        if (!want("kv_relocate")) break;
        for (int64_t W : beams) checkKvRelocate(rng, elem, W);
    }
    std::printf("%d passed, %d failed\n", gPasses, gFailures);
    return gFailures ? 1 : 0;
}
