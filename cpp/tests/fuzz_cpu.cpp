// Standalone random driver for the CPU references, run under ASan + UBSan in CI
// (build_scripts/build_cpp.sh). Every case goes through the C ABI with random shapes and values
// (NaN, inf, ties, garbage indices) and random bad parameters; it checks that nothing crashes,
// that bad parameters return an error status with a message, and that valid calls return
// outputs in range (parents, tokens, packed indices, lengths).
//
// Usage: redrafter_fuzz [--iterations N] [--seed S]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "redrafter/c_api.h"
#include "redrafter/decoder_cpu.h"

namespace {

std::mt19937_64 rng;
int64_t gCases = 0, gRejected = 0, gFailures = 0;
char gMsg[512];

int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
bool coin(double p = 0.5) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

#define EXPECT(cond, ...)                                                        \
    do {                                                                         \
        if (!(cond)) {                                                           \
            ++gFailures;                                                         \
            std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            std::fprintf(stderr, __VA_ARGS__);                                   \
            std::fprintf(stderr, "\n");                                          \
        }                                                                        \
    } while (0)

// Logit values: normals, a few repeated values (ties), occasionally NaN / inf / huge.
float randomValue(const std::vector<float>& pool) {
    const int64_t r = pick(0, 99);
    if (r < 2) return std::numeric_limits<float>::quiet_NaN();
    if (r < 4) return coin() ? INFINITY : -INFINITY;
    if (r < 6) return coin() ? 3e38f : -3e38f;
    if (r < 40) return pool[static_cast<size_t>(pick(0, static_cast<int64_t>(pool.size()) - 1))];
    return std::normal_distribution<float>(0.0f, 4.0f)(rng);
}

std::vector<uint16_t> randomLogits(int64_t n, int32_t dtype, bool wild) {
    std::vector<float> pool = {0.0f, -0.0f, 1.0f, 2.5f, -3.0f};
    std::vector<uint16_t> buf(static_cast<size_t>(n * (dtype == 0 ? 2 : 1)) + 1);
    for (int64_t i = 0; i < n; ++i) {
        const float v = wild ? randomValue(pool) : std::normal_distribution<float>(0.0f, 2.0f)(rng);
        if (dtype == 0) {
            std::memcpy(reinterpret_cast<float*>(buf.data()) + i, &v, 4);
        } else {
            uint32_t bits;
            std::memcpy(&bits, &v, 4);
            buf[static_cast<size_t>(i)] = static_cast<uint16_t>(dtype == 2 ? bits >> 16 : (pick(0, 65535)));
        }
    }
    return buf;
}

// A params struct of the C ABI (redrafter/c_api.h): zeroed, its size set.
template <class S>
S newParams() {
    S p{};
    p.struct_size = sizeof(S);
    return p;
}

// A copy of params p with edit(copy) applied.
template <class S, class Edit>
S with(S p, Edit edit) {
    edit(p);
    return p;
}

int32_t statusCheck(int32_t status, bool expectError, const char* op) {
    ++gCases;
    if (status != 0) {
        ++gRejected;
        EXPECT(gMsg[0] != '\0', "%s: error status %d without a message", op, status);
    }
    if (expectError) EXPECT(status != 0, "%s: bad parameters were accepted", op);
    return status;
}

void fuzzBeamSearch() {
    int64_t B = pick(0, 3), W = pick(1, 9), V = pick(1, 70), K = pick(0, 80);
    const int32_t dtype = static_cast<int32_t>(pick(0, 2));
    bool bad = false;
    const int64_t mode = pick(0, 9);
    if (mode == 0) {
        W = pick(-2, 0);
        bad = true;
    }
    if (mode == 1) {
        W = V + pick(1, 3);
        bad = true;
    }
    if (mode == 2) {
        K = -pick(1, 5);
        bad = true;
    }
    if (mode == 3) {
        V = (int64_t(1) << 31) + pick(0, 5);
        bad = true;
    }
    if (mode == 4) {
        W = 65;
        bad = true;
    }
    const int64_t n = bad ? 8 : B * W * V;
    auto logits = randomLogits(n, dtype, coin(0.3));
    std::vector<float> scores(static_cast<size_t>(bad ? 8 : B * W) + 1);
    for (auto& s : scores) s = coin(0.2) ? -INFINITY : (coin(0.3) ? 0.0f : std::normal_distribution<float>()(rng));
    std::vector<float> out(scores.size());
    std::vector<int32_t> parent(scores.size()), token(scores.size());
    const bool nullPtr = !bad && coin(0.05);
    if (nullPtr) bad = true;
    // A reduced draft vocabulary: column v of the logits is full id 3v + 1 (tokens land on it).
    const bool mapped = !bad && coin(0.5);
    std::vector<int32_t> vocabMap(mapped ? static_cast<size_t>(V) : 0);
    for (size_t v = 0; v < vocabMap.size(); ++v) vocabMap[v] = static_cast<int32_t>(3 * v + 1);
    auto p = newParams<RedrafterBeamSearchParams>();
    p.logits = nullPtr ? nullptr : logits.data(), p.dtype = dtype, p.beam_scores = scores.data();
    p.vocab_map = mapped ? vocabMap.data() : nullptr;
    p.new_scores = out.data(), p.parent = parent.data(), p.token = token.data();
    p.batch = B, p.num_beams = W, p.vocab = V, p.warp_k = K;
    const int32_t st = redrafter_beam_search_step_cpu(&p, gMsg, sizeof(gMsg));
    if (statusCheck(st, bad, "beam search") == 0) {
        for (int64_t i = 0; i < B * W; ++i) {
            const int64_t column = mapped ? (token[i] - 1) / 3 : token[i];
            EXPECT(parent[i] >= 0 && parent[i] < W && column >= 0 && column < V && (!mapped || token[i] % 3 == 1),
                   "beam search output out of range");
        }
    }
}

void fuzzTreePack() {
    int64_t B = pick(0, 3), W = pick(1, 10), L = pick(1, 10);
    bool bad = false;
    const int64_t mode = pick(0, 9);
    if (mode == 0) {
        L = 65;
        bad = true;
    }
    if (mode == 1) {
        W = pick(-3, 0);
        bad = true;
    }
    if (mode == 2) {
        W = 64;
        L = 64;
        B = pick(0, 1);
    }
    if (mode == 3) {
        B = -1;
        bad = true;
    }
    const int64_t N = W * L, words = (N + 31) / 32;
    const size_t cells = bad ? 8 : static_cast<size_t>(B * N);
    std::vector<int32_t> beams(cells + 1);
    const int alphabet = static_cast<int>(pick(1, 4));
    for (auto& t : beams) t = static_cast<int32_t>(pick(0, alphabet - 1));
    std::vector<int32_t> tokens(cells + 1), len(static_cast<size_t>(bad ? 8 : B) + 1), unp(cells + 1), off(cells + 1),
        mask(bad ? 8 : static_cast<size_t>(B * N * words) + 1);
    auto p = newParams<RedrafterTreePackParams>();
    p.beams = beams.data(), p.batch = B, p.num_beams = W, p.beam_len = L;
    p.packed_tokens = tokens.data(), p.packed_len = len.data(), p.unpacker = unp.data();
    p.position_offsets = off.data(), p.packed_mask = mask.data();
    const int32_t st = redrafter_tree_pack_cpu(&p, gMsg, sizeof(gMsg));
    if (statusCheck(st, bad, "tree pack") == 0) {
        for (int64_t b = 0; b < B; ++b) {
            EXPECT(len[b] >= L && len[b] <= N, "packed length %d out of range", len[b]);
            for (int64_t i = 0; i < N; ++i) {
                const int32_t q = unp[b * N + i];
                EXPECT(q >= 0 && q < len[b] && tokens[b * N + q] == beams[b * N + i], "unpacker does not unpack");
            }
        }
    }
}

void fuzzAccept() {
    int64_t B = pick(0, 3), W = pick(1, 6), L = pick(1, 6), V = pick(1, 40);
    int64_t N = W * L + pick(0, 2);
    const int32_t dtype = static_cast<int32_t>(pick(0, 2));
    bool bad = false, mayReject = false;
    const int64_t mode = pick(0, 11);
    if (mode == 0) {
        L = 65;
        bad = true;
    }
    if (mode == 1) {
        V = 0;
        bad = true;
    }
    if (mode == 2) {
        N = 0;
        bad = true;
    }
    if (mode == 3) {
        B = int64_t(1) << 40;
        N = int64_t(1) << 20;
        V = int64_t(1) << 20;
        bad = true;
    }
    if (mode == 4) mayReject = true;  // garbage unpacker
    const size_t cells = bad ? 8 : static_cast<size_t>(B * W * L);
    std::vector<int32_t> beams(cells + 1), unp(cells + 1);
    for (auto& t : beams) t = static_cast<int32_t>(pick(0, std::max<int64_t>(0, std::min<int64_t>(V, 3) - 1)));
    // A consistent unpacker from the tree pack, or garbage.
    std::vector<int32_t> len(static_cast<size_t>(bad ? 8 : B) + 1, 1);
    if (!bad) {
        std::vector<int32_t> tk(cells + 1), off(cells + 1), mask(cells * ((W * L + 31) / 32) + 1);
        auto tp = newParams<RedrafterTreePackParams>();
        tp.beams = beams.data(), tp.batch = B, tp.num_beams = W, tp.beam_len = L;
        tp.packed_tokens = tk.data(), tp.packed_len = len.data(), tp.unpacker = unp.data();
        tp.position_offsets = off.data(), tp.packed_mask = mask.data();
        redrafter_tree_pack_cpu(&tp, gMsg, sizeof(gMsg));
        if (mayReject) {
            for (auto& q : unp) q = static_cast<int32_t>(pick(-2, N + 2));
        }
    }
    auto logits = randomLogits(bad ? 8 : B * N * V, dtype, coin(0.3));
    const size_t rows = static_cast<size_t>(bad ? 8 : B) + 1;
    std::vector<float> temp(rows), topP(rows), u(static_cast<size_t>(bad ? 8 : B * L) + 1);
    std::vector<int32_t> topK(rows);
    for (size_t i = 0; i < rows; ++i) {
        const float temps[] = {0.0f, -1.0f, 0.5f, 1.0f, 2.0f, 1e-30f, NAN};
        temp[i] = temps[pick(0, 6)];
        topK[i] = static_cast<int32_t>(pick(-2, V + 2));
        const float ps[] = {1.0f, 0.9f, 0.5f, 0.0f, -1.0f, 1.5f, NAN, 1e-9f};
        topP[i] = ps[pick(0, 7)];
    }
    for (auto& x : u) x = coin(0.1) ? 0.0f : static_cast<float>(pick(0, (1 << 24) - 1)) / 16777216.0f;
    std::vector<int32_t> na(rows), best(rows), bonus(rows), path(u.size()), emitted(u.size());
    auto p = newParams<RedrafterAcceptParams>();
    p.logits = logits.data(), p.dtype = dtype, p.batch = B, p.num_nodes = N, p.vocab = V;
    p.beams = beams.data(), p.unpacker = unp.data(), p.num_beams = W, p.beam_len = L;
    p.packed_len = coin() ? len.data() : nullptr;
    p.temperature = temp.data(), p.top_k = topK.data(), p.top_p = topP.data(), p.uniforms = u.data();
    p.num_accepted = na.data(), p.best_beam = best.data(), p.bonus = bonus.data();
    p.accepted_indices = path.data(), p.emitted = emitted.data();
    const int32_t st = redrafter_accept_cpu(&p, gMsg, sizeof(gMsg));
    if (statusCheck(st, bad, "accept") == 0) {
        for (int64_t b = 0; b < B; ++b) {
            EXPECT(na[b] >= 0 && na[b] < L && best[b] >= 0 && best[b] < W && bonus[b] >= 0 && bonus[b] < V,
                   "accept output out of range (n=%d best=%d bonus=%d)", na[b], best[b], bonus[b]);
            for (int64_t d = 0; d < L; ++d) EXPECT(path[b * L + d] >= 0 && path[b * L + d] < N, "path out of range");
        }
    } else {
        EXPECT(bad || mayReject, "accept rejected valid input: %s", gMsg);
    }
}

// The contiguous KV relocation's params over the fuzz cases' row vectors.
RedrafterKvRelocateParams kvParams(void* cache, int64_t elem, int64_t layers, int64_t slots, int64_t heads,
                                   int64_t maxSeq, int64_t headDim, const std::vector<int32_t>& sl,
                                   const std::vector<int32_t>& lens, const std::vector<int32_t>& q,
                                   const std::vector<int32_t>& n, int64_t B, int64_t L, std::vector<int32_t>& out) {
    auto p = newParams<RedrafterKvRelocateParams>();
    p.cache = cache, p.elem_bytes = elem, p.num_layers = layers, p.num_slots = slots, p.num_kv_heads = heads;
    p.max_seq_len = maxSeq, p.head_dim = headDim, p.batch = B, p.beam_len = L;
    p.slots = sl.data(), p.cache_lengths = lens.data(), p.accepted_indices = q.data(), p.num_accepted = n.data();
    p.new_lengths = out.data();
    return p;
}

void fuzzKvRelocate() {
    int64_t layers = pick(1, 3), slots = pick(1, 5), heads = pick(1, 3), maxSeq = pick(1, 40), headDim = pick(1, 9);
    int64_t elem = int64_t(1) << pick(0, 3), B = pick(0, slots), L = pick(1, 6);
    bool bad = false;
    const int64_t mode = pick(0, 9);
    if (mode == 0) {
        elem = 3;
        bad = true;
    }
    if (mode == 1) {
        L = 0;
        bad = true;
    }
    if (mode == 2) {
        maxSeq = int64_t(1) << 40;
        bad = true;
    }
    if (mode == 3) {
        headDim = int64_t(1) << 31;
        bad = true;
    }
    const size_t bytes = bad ? 64 : static_cast<size_t>(layers * 2 * slots * heads * maxSeq * headDim * elem);
    std::vector<uint8_t> cache(bytes + 1);
    for (auto& c : cache) c = static_cast<uint8_t>(rng());
    const size_t rows = static_cast<size_t>(bad ? 8 : B) + 1;
    std::vector<int32_t> sl(rows), lens(rows), n(rows), q(static_cast<size_t>(bad ? 8 : B * L) + 1), out(rows);
    for (size_t b = 0; b < rows; ++b) {
        sl[b] = static_cast<int32_t>(coin(0.9) ? b : pick(-1, slots));
        lens[b] = static_cast<int32_t>(pick(coin(0.05) ? -3 : 0, maxSeq > 40 ? 40 : maxSeq));
        n[b] = static_cast<int32_t>(pick(coin(0.05) ? -1 : 0, L - (coin(0.95) ? 1 : 0)));
    }
    for (size_t i = 0; i < q.size(); ++i)
        q[i] = static_cast<int32_t>(coin(0.9) ? (i % std::max<int64_t>(L, 1)) * pick(1, 2) : pick(-2, 50));
    const auto p = kvParams(cache.data(), elem, layers, slots, heads, maxSeq, headDim, sl, lens, q, n, B, L, out);
    const int32_t st = redrafter_kv_relocate_cpu(&p, gMsg, sizeof(gMsg));
    if (statusCheck(st, bad, "kv relocate") == 0) {
        for (int64_t b = 0; b < B; ++b) EXPECT(out[b] == lens[b] + n[b] + 1 && out[b] <= maxSeq, "new length wrong");
    }
}

// Random blocked, strided layouts (redrafter/kv_relocate.h): TensorRT-LLM's paged pool, or the
// dims (slot, block, token, layer, kv, head) in a random order with random gaps. The buffer holds
// exactly cache_elems elements (ASan sees any access outside it); a valid call must equal the
// contiguous entry point on the same logical cache and leave the gaps untouched.
void fuzzKvRelocateStrided() {
    const int64_t layers = pick(1, 3), slots = pick(1, 4), heads = pick(1, 3), maxSeq = pick(1, 30),
                  headDim = pick(1, 6);
    const int64_t elem = int64_t(1) << pick(0, 3), B = pick(0, slots), L = pick(1, 6);
    int64_t tpb = pick(1, 9);
    const int64_t nBlocks = (maxSeq - 1) / tpb + 1, inBlock = std::min(tpb, maxSeq);
    int64_t st[6] = {0, 0, 0, 0, 0, 0};  // slot, block, token, layer, kv, head
    const int64_t ext[6] = {slots, nBlocks, inBlock, layers, 2, heads};
    int order[6] = {2, 5, 4, 3, 1, 0};  // paged pool: token, head, kv, layer, block, slot
    const bool paged = coin();
    if (!paged) std::shuffle(order, order + 6, rng);
    int64_t extent = headDim;  // elements the dims placed so far reach
    for (int i : order) {
        if (paged && i == 0)
            st[i] = (nBlocks + pick(0, 1)) * st[1];  // slot = max_blocks * block
        else
            st[i] = !paged && ext[i] == 1 && coin(0.3) ? pick(0, 40) : extent + (paged ? 0 : pick(0, 2));
        extent += (ext[i] - 1) * st[i];
    }
    // exact: 1 + the largest offset (a partial last block may not reach (nBlocks-1)*block + (inBlock-1)*token)
    int64_t maxTok = 0;
    for (int64_t t = 0; t < maxSeq; ++t) maxTok = std::max(maxTok, (t / tpb) * st[1] + (t % tpb) * st[2]);
    extent = headDim + maxTok + (slots - 1) * st[0] + (layers - 1) * st[3] + st[4] + (heads - 1) * st[5];
    int64_t cacheElems = (paged ? slots * st[0] : extent) + pick(0, 2);  // paged: the whole pool
    bool bad = false;
    const int64_t mode = pick(0, 11);
    if (mode == 0) {
        st[pick(0, 5)] = -pick(1, 5);
        bad = true;
    }
    if (mode == 1) {
        cacheElems = extent - 1;
        bad = true;
    }
    if (mode == 2) {
        st[4] = inBlock > 1 && coin() ? st[2] : 0;
        bad = true;
    }  // K and V (or tokens) overlap
    if (mode == 3) {
        tpb = coin() ? 0 : -1;
        bad = true;
    }
    if (mode == 4) {
        st[0] = int64_t(1) << 61;
        bad = slots > 1;
        cacheElems = extent;
    }

    // the logical cache, contiguous [layers, 2, slots, heads, maxSeq, headDim], and its strided copy
    const size_t eb = static_cast<size_t>(elem);
    std::vector<uint8_t> ref(static_cast<size_t>(layers * 2 * slots * heads * maxSeq * headDim) * eb);
    for (auto& c : ref) c = static_cast<uint8_t>(rng());
    std::vector<uint8_t> buf(static_cast<size_t>(std::max<int64_t>(cacheElems, 1)) * eb);
    for (auto& c : buf) c = static_cast<uint8_t>(rng());
    auto contiguous = [&](int64_t ly, int64_t kv, int64_t s, int64_t h, int64_t t) {
        return ((((ly * 2 + kv) * slots + s) * heads + h) * maxSeq + t) * headDim;
    };
    auto strided = [&](int64_t ly, int64_t kv, int64_t s, int64_t h, int64_t t) {
        return s * st[0] + (t / tpb) * st[1] + (t % tpb) * st[2] + ly * st[3] + kv * st[4] + h * st[5];
    };
    auto forEachRow = [&](auto&& fn) {
        for (int64_t ly = 0; ly < layers; ++ly)
            for (int64_t kv = 0; kv < 2; ++kv)
                for (int64_t s = 0; s < slots; ++s)
                    for (int64_t h = 0; h < heads; ++h)
                        for (int64_t t = 0; t < maxSeq; ++t) fn(contiguous(ly, kv, s, h, t), strided(ly, kv, s, h, t));
    };
    if (!bad) forEachRow([&](int64_t c, int64_t o) { std::memcpy(&buf[o * eb], &ref[c * eb], headDim * eb); });
    std::vector<uint8_t> before = buf;

    const size_t rows = static_cast<size_t>(B) + 1;
    std::vector<int32_t> sl(rows), lens(rows), n(rows), q(static_cast<size_t>(B * L) + 1), out(rows), outRef(rows);
    for (size_t b = 0; b < rows; ++b) {
        sl[b] = static_cast<int32_t>(coin(0.95) ? b : pick(-1, slots));
        lens[b] = static_cast<int32_t>(pick(coin(0.05) ? -3 : 0, maxSeq));
        n[b] = static_cast<int32_t>(pick(coin(0.05) ? -1 : 0, L - (coin(0.95) ? 1 : 0)));
    }
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int32_t>(coin(0.95) ? (i % L) * pick(1, 2) : pick(-2, 40));
    auto sp = kvParams(buf.data(), elem, layers, slots, heads, maxSeq, headDim, sl, lens, q, n, B, L, out);
    sp.cache_elems = cacheElems, sp.tokens_per_block = tpb;
    sp.stride_slot = st[0], sp.stride_block = st[1], sp.stride_token = st[2];
    sp.stride_layer = st[3], sp.stride_kv = st[4], sp.stride_head = st[5];
    const int32_t got = redrafter_kv_relocate_strided_cpu(&sp, gMsg, sizeof(gMsg));
    const auto rp = kvParams(ref.data(), elem, layers, slots, heads, maxSeq, headDim, sl, lens, q, n, B, L, outRef);
    if (statusCheck(got, bad, "kv relocate strided") != 0 || bad) {
        EXPECT(buf == before, "kv relocate strided: a rejected call changed the cache");
        if (!bad) {  // only row data can be wrong: the contiguous entry must reject it too
            const int32_t want = redrafter_kv_relocate_cpu(&rp, gMsg, sizeof(gMsg));
            EXPECT(want == got, "kv relocate strided: status %d, contiguous entry %d (%s)", got, want, gMsg);
        }
        return;
    }
    const int32_t want = redrafter_kv_relocate_cpu(&rp, gMsg, sizeof(gMsg));
    EXPECT(want == 0, "kv relocate strided accepted what the contiguous entry rejects: %s", gMsg);
    if (want != 0) return;
    forEachRow([&](int64_t c, int64_t o) { std::memcpy(&before[o * eb], &ref[c * eb], headDim * eb); });
    EXPECT(buf == before, "kv relocate strided: cache differs from the contiguous entry's (tpb=%lld paged=%d)",
           (long long)tpb, (int)paged);
    for (int64_t b = 0; b < B; ++b)
        EXPECT(out[b] == outRef[b], "kv relocate strided: new length %d, want %d", out[b], outRef[b]);
}

void fuzzDraw() {
    const int64_t rows = pick(0, 4), V = pick(1, 60);
    const int32_t dtype = static_cast<int32_t>(pick(0, 2));
    auto logits = randomLogits(rows * V, dtype, true);
    std::vector<float> temp(rows + 1), p(rows + 1), u(rows + 1);
    std::vector<int32_t> k(rows + 1), out(rows + 1);
    for (int64_t r = 0; r <= rows; ++r) {
        temp[r] = coin(0.3) ? 0.0f : static_cast<float>(pick(1, 30)) / 10.0f;
        k[r] = static_cast<int32_t>(pick(-1, V + 1));
        p[r] = static_cast<float>(pick(0, 11)) / 10.0f;
        u[r] = static_cast<float>(pick(0, (1 << 24) - 1)) / 16777216.0f;
    }
    auto dp = newParams<RedrafterDrawTokensParams>();
    dp.logits = logits.data(), dp.dtype = dtype, dp.rows = rows, dp.vocab = V;
    dp.temperature = temp.data(), dp.top_k = k.data(), dp.top_p = p.data(), dp.uniforms = u.data();
    dp.tokens = out.data();
    const int32_t st = redrafter_draw_tokens_cpu(&dp, gMsg, sizeof(gMsg));
    if (statusCheck(st, false, "draw tokens") == 0) {
        for (int64_t r = 0; r < rows; ++r)
            EXPECT(out[r] >= 0 && out[r] < V, "drawn token %d outside [0, %lld)", out[r], (long long)V);
    }
}

}  // namespace

// Linear: random shapes (M 0..64, N and K not multiples of the tiles), dtypes, element-offset
// (unaligned) buffers and thread counts; checks the float64 bound, SIMD == portable bit for bit,
// a row alone == the row among all, threads 1 == threads 3, and that bad parameters are refused.
float bf16Round(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

int32_t linearPacked(const RedrafterLinearParams& p) { return redrafter_linear_packed_cpu(&p, gMsg, sizeof gMsg); }

// y [m, n] float32 = x [m, k] (x_dtype) . w (packed, w_dtype), one thread on the SIMD path.
RedrafterLinearParams linearParams(const void* x, int32_t xDtype, const void* w, int32_t wDtype, const float* bias,
                                   float* y, int64_t m, int64_t n, int64_t k) {
    auto p = newParams<RedrafterLinearParams>();
    p.x = x, p.x_dtype = xDtype, p.w = w, p.w_dtype = wDtype, p.bias = bias, p.y = y, p.y_dtype = 0;
    p.m = m, p.n = n, p.k = k, p.threads = 1, p.force_scalar = 0;
    return p;
}

void fuzzLinear() {
    const int64_t M = pick(0, 64), N = pick(1, 70), K = pick(1, 100);
    const int32_t wd = coin() ? 0 : 2, xd = coin() ? 0 : 2;
    const int64_t off = pick(0, 3);  // elements: 4- or 2-byte aligned starts, not 32
    std::vector<float> xv(static_cast<size_t>(M * K)), wv(static_cast<size_t>(N * K)), bias(static_cast<size_t>(N));
    for (auto& v : xv) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    for (auto& v : wv) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    for (auto& v : bias) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    if (xd == 2)
        for (auto& v : xv) v = bf16Round(v);
    if (wd == 2)
        for (auto& v : wv) v = bf16Round(v);
    auto store = [](const std::vector<float>& src, int32_t dt, int64_t offset) {
        std::vector<uint32_t> buf(src.size() + static_cast<size_t>(offset) + 1);
        if (dt == 0) {
            if (!src.empty()) std::memcpy(buf.data() + offset, src.data(), src.size() * 4);
        } else {
            uint16_t* h = reinterpret_cast<uint16_t*>(buf.data()) + offset;
            for (size_t i = 0; i < src.size(); ++i) {
                uint32_t u;
                std::memcpy(&u, &src[i], 4);
                h[i] = static_cast<uint16_t>(u >> 16);
            }
        }
        return buf;
    };
    auto xb = store(xv, xd, off), wb = store(wv, wd, off);
    const void* xp = xd == 0 ? static_cast<const void*>(xb.data() + off)
                             : static_cast<const void*>(reinterpret_cast<const uint16_t*>(xb.data()) + off);
    const void* wp = wd == 0 ? static_cast<const void*>(wb.data() + off)
                             : static_cast<const void*>(reinterpret_cast<const uint16_t*>(wb.data()) + off);
    const int64_t elems = redrafter_linear_packed_elems(N, K);
    std::vector<uint32_t> packed(static_cast<size_t>(elems) + 1);
    if (statusCheck(redrafter_linear_pack_cpu(wp, wd, packed.data(), N, K, gMsg, sizeof gMsg), false, "linear_pack"))
        return;
    const bool withBias = coin();
    std::vector<float> y(static_cast<size_t>(M * N) + 1), ys(y.size()), y3(y.size());
    const float* bp = withBias ? bias.data() : nullptr;
    const auto lp = linearParams(xp, xd, packed.data(), wd, bp, y.data(), M, N, K);
    statusCheck(linearPacked(lp), false, "linear");
    statusCheck(linearPacked(with(lp, [&](auto& p) { p.y = ys.data(), p.force_scalar = 1; })), false, "linear scalar");
    statusCheck(linearPacked(with(lp, [&](auto& p) { p.y = y3.data(), p.threads = 3; })), false, "linear threads");
    EXPECT(std::memcmp(y.data(), ys.data(), y.size() * 4) == 0, "linear: SIMD != portable (M=%lld N=%lld K=%lld)",
           (long long)M, (long long)N, (long long)K);
    EXPECT(std::memcmp(y.data(), y3.data(), y.size() * 4) == 0, "linear: 3 threads != 1 (M=%lld N=%lld K=%lld)",
           (long long)M, (long long)N, (long long)K);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            double ref = withBias ? bias[static_cast<size_t>(n)] : 0.0, mag = std::fabs(ref);
            for (int64_t k = 0; k < K; ++k) {
                const double p = double(xv[static_cast<size_t>(m * K + k)]) * wv[static_cast<size_t>(n * K + k)];
                ref += p;
                mag += std::fabs(p);
            }
            const double err = std::fabs(y[static_cast<size_t>(m * N + n)] - ref);
            EXPECT(err <= 2.0 * (K + 2) * 6e-8 * mag + 1e-30, "linear: |y - ref| = %g > bound (K=%lld)", err,
                   (long long)K);
        }
    if (M > 1) {  // one row alone, out of the middle of x
        const int64_t r = pick(0, M - 1);
        std::vector<float> one(static_cast<size_t>(N));
        const void* xr = xd == 0 ? static_cast<const void*>(static_cast<const float*>(xp) + r * K)
                                 : static_cast<const void*>(static_cast<const uint16_t*>(xp) + r * K);
        statusCheck(linearPacked(with(lp, [&](auto& p) { p.x = xr, p.y = one.data(), p.m = 1, p.threads = 2; })), false,
                    "linear row");
        EXPECT(std::memcmp(one.data(), y.data() + r * N, static_cast<size_t>(N) * 4) == 0,
               "linear: row %lld alone != among %lld rows", (long long)r, (long long)M);
    }
    // bad parameters
    statusCheck(linearPacked(with(lp, [](auto& p) { p.threads = 0; })), true, "linear threads=0");
    statusCheck(linearPacked(with(lp, [](auto& p) { p.x_dtype = 1; })), true, "linear dtype=1");
    statusCheck(linearPacked(with(lp, [](auto& p) { p.n = 0; })), true, "linear n=0");
    statusCheck(redrafter_linear_pack_cpu(nullptr, wd, packed.data(), N, K, gMsg, sizeof gMsg), true,
                "linear_pack null");
}

// Block weights (Q4_1 / Q8_0): random blocks against the float32 path on their expansion
// (w = d * q + m, d * q exact): the same bits, on SIMD and portable paths, any threads, a row
// alone; bad formats and shapes refused.
float halfBitsToFloat(uint16_t h) {  // normals and zero only (what the case draws)
    const int e = (h >> 10) & 0x1f, mt = h & 0x3ff;
    const float v = e == 0 ? 0.0f : std::ldexp(1.0f + mt / 1024.0f, e - 15);
    return (h & 0x8000) ? -v : v;
}

void fuzzLinearBlocks() {
    const int32_t fmt = coin() ? 10 : 11;
    const int64_t M = pick(0, 20), N = pick(1, 70), K = 32 * pick(1, 4), nb = K / 32;
    auto drawHalf = [](bool sign) {
        const int e = static_cast<int>(pick(5, 18)), mt = static_cast<int>(pick(0, 1023));
        return static_cast<uint16_t>(((sign && coin()) ? 0x8000 : 0) | (e << 10) | mt);
    };
    std::vector<uint16_t> d(static_cast<size_t>(N * nb)), mm(d.size());
    for (auto& v : d) v = drawHalf(fmt == 11);
    for (auto& v : mm) v = drawHalf(true);
    std::vector<unsigned char> qs(static_cast<size_t>(fmt == 10 ? N * K / 2 : N * K));
    for (auto& v : qs) v = static_cast<unsigned char>(pick(0, 255));
    std::vector<float> wv(static_cast<size_t>(N * K)), xv(static_cast<size_t>(M * K) + 1), bias(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < nb; ++b) {
            const float dv = halfBitsToFloat(d[n * nb + b]), mv = halfBitsToFloat(mm[n * nb + b]);
            for (int j = 0; j < 32; ++j) {
                float w;
                if (fmt == 10) {
                    const unsigned char byte = qs[n * (K / 2) + b * 16 + (j & 15)];
                    const float prod = dv * static_cast<float>(j < 16 ? (byte & 15) : (byte >> 4));
                    w = prod + mv;
                } else {
                    w = dv * static_cast<float>(static_cast<int8_t>(qs[n * K + b * 32 + j]));
                }
                wv[n * K + b * 32 + j] = w;
            }
        }
    for (auto& v : xv) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    for (auto& v : bias) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    const int64_t bytes = redrafter_linear_blocks_packed_bytes(fmt, N, K);
    std::vector<unsigned char> packed(static_cast<size_t>(bytes));
    if (statusCheck(redrafter_linear_pack_blocks_cpu(qs.data(), d.data(), fmt == 10 ? mm.data() : nullptr, fmt,
                                                     packed.data(), N, K, gMsg, sizeof gMsg),
                    false, "linear_pack_blocks"))
        return;
    std::vector<float> fpacked(static_cast<size_t>(redrafter_linear_packed_elems(N, K)));
    statusCheck(redrafter_linear_pack_cpu(wv.data(), 0, fpacked.data(), N, K, gMsg, sizeof gMsg), false, "linear_pack");
    const float* bp = coin() ? bias.data() : nullptr;
    std::vector<float> ref(static_cast<size_t>(M * N) + 1), y(ref.size()), ys(ref.size()), y3(ref.size());
    const auto lp = linearParams(xv.data(), 0, packed.data(), fmt, bp, y.data(), M, N, K);
    statusCheck(linearPacked(with(lp, [&](auto& p) { p.w = fpacked.data(), p.w_dtype = 0, p.y = ref.data(); })), false,
                "linear f32");
    statusCheck(linearPacked(lp), false, "linear blocks");
    statusCheck(linearPacked(with(lp, [&](auto& p) { p.y = ys.data(), p.force_scalar = 1; })), false,
                "linear blocks scalar");
    statusCheck(linearPacked(with(lp, [&](auto& p) { p.y = y3.data(), p.threads = 3; })), false,
                "linear blocks threads");
    EXPECT(std::memcmp(y.data(), ref.data(), y.size() * 4) == 0,
           "linear blocks: fmt %d != float32 path (M=%lld N=%lld K=%lld)", (int)fmt, (long long)M, (long long)N,
           (long long)K);
    EXPECT(std::memcmp(ys.data(), ref.data(), y.size() * 4) == 0, "linear blocks: portable != float32 path (fmt %d)",
           (int)fmt);
    EXPECT(std::memcmp(y3.data(), ref.data(), y.size() * 4) == 0, "linear blocks: 3 threads != float32 path (fmt %d)",
           (int)fmt);
    if (M > 1) {
        const int64_t r = pick(0, M - 1);
        std::vector<float> one(static_cast<size_t>(N));
        statusCheck(
            linearPacked(with(lp, [&](auto& p) { p.x = xv.data() + r * K, p.y = one.data(), p.m = 1, p.threads = 2; })),
            false, "linear blocks row");
        EXPECT(std::memcmp(one.data(), ref.data() + r * N, static_cast<size_t>(N) * 4) == 0,
               "linear blocks: row %lld alone != among %lld", (long long)r, (long long)M);
    }
    statusCheck(
        redrafter_linear_pack_blocks_cpu(qs.data(), d.data(), mm.data(), 12, packed.data(), N, K, gMsg, sizeof gMsg),
        true, "linear_pack_blocks fmt=12");
    statusCheck(redrafter_linear_pack_blocks_cpu(qs.data(), d.data(), mm.data(), fmt, packed.data(), N, K + 16, gMsg,
                                                 sizeof gMsg),
                true, "linear_pack_blocks k%32");
    statusCheck(linearPacked(with(lp, [&](auto& p) { p.k = K + 16; })), true, "linear blocks k%32");
    const auto unpacked = with(lp, [&](auto& p) { p.w = qs.data(); });
    statusCheck(redrafter_linear_cpu(&unpacked, gMsg, sizeof gMsg), true, "linear unpacked blocks");
}

// Embedding rows of a block table (Q4_1 / Q8_0): each row equals an independent decode bit for
// bit and the weight the block linear kernel multiplies by (x = a one-hot row picks it out);
// ids outside the table, bad formats and shapes refused with nothing written.
void fuzzEmbedBlocks() {
    const int32_t fmt = coin() ? 10 : 11;
    const int64_t V = pick(1, 40), K = 32 * pick(1, 3), nb = K / 32, count = pick(0, 12);
    auto drawHalf = [](bool sign) {
        const int e = static_cast<int>(pick(5, 18)), mt = static_cast<int>(pick(0, 1023));
        return static_cast<uint16_t>(((sign && coin()) ? 0x8000 : 0) | (e << 10) | mt);
    };
    std::vector<uint16_t> d(static_cast<size_t>(V * nb)), mm(d.size());
    for (auto& v : d) v = drawHalf(true);
    for (auto& v : mm) v = drawHalf(true);
    std::vector<unsigned char> qs(static_cast<size_t>(fmt == 10 ? V * K / 2 : V * K));
    for (auto& v : qs) v = static_cast<unsigned char>(pick(0, 255));
    std::vector<int64_t> ids(static_cast<size_t>(count) + 1);
    for (auto& v : ids) v = pick(0, V - 1);
    const float sentinel = -12345.0f;
    std::vector<float> out(static_cast<size_t>(count * K) + 1, sentinel);
    const uint16_t* mp = fmt == 10 ? mm.data() : nullptr;
    auto ep = newParams<RedrafterEmbedBlocksParams>();
    ep.qs = qs.data(), ep.d = d.data(), ep.m = mp, ep.fmt = fmt, ep.rows = V, ep.k = K;
    ep.ids = ids.data(), ep.count = count, ep.out = out.data();
    auto embed = [](const RedrafterEmbedBlocksParams& p) { return redrafter_embed_blocks_cpu(&p, gMsg, sizeof gMsg); };
    if (statusCheck(embed(ep), false, "embed_blocks")) return;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t r = ids[static_cast<size_t>(i)];
        for (int64_t b = 0; b < nb; ++b) {
            const float dv = halfBitsToFloat(d[r * nb + b]), mv = halfBitsToFloat(mm[r * nb + b]);
            for (int j = 0; j < 32; ++j) {
                float w;
                if (fmt == 10) {
                    const unsigned char byte = qs[r * (K / 2) + b * 16 + (j & 15)];
                    const float prod = dv * static_cast<float>(j < 16 ? (byte & 15) : (byte >> 4));
                    w = prod + mv;
                } else {
                    w = dv * static_cast<float>(static_cast<int8_t>(qs[r * K + b * 32 + j]));
                }
                const float got = out[static_cast<size_t>(i * K + b * 32 + j)];
                EXPECT(std::memcmp(&got, &w, 4) == 0, "embed_blocks: fmt %d row %lld col %lld: %g != decode %g",
                       (int)fmt, (long long)r, (long long)(b * 32 + j), (double)got, (double)w);
            }
        }
    }
    EXPECT(out[static_cast<size_t>(count * K)] == sentinel, "embed_blocks wrote past its output");
    if (count > 0) {  // the row the linear kernel multiplies by: y[n] = W[n, :] . e_c = W[n, c]
        const int64_t c = pick(0, K - 1);
        std::vector<float> onehot(static_cast<size_t>(K), 0.0f), y(static_cast<size_t>(V));
        onehot[static_cast<size_t>(c)] = 1.0f;
        std::vector<unsigned char> packed(static_cast<size_t>(redrafter_linear_blocks_packed_bytes(fmt, V, K)));
        if (!statusCheck(
                redrafter_linear_pack_blocks_cpu(qs.data(), d.data(), mp, fmt, packed.data(), V, K, gMsg, sizeof gMsg),
                false, "embed vs linear pack") &&
            !statusCheck(linearPacked(linearParams(onehot.data(), 0, packed.data(), fmt, nullptr, y.data(), 1, V, K)),
                         false, "embed vs linear")) {
            const int64_t r = ids[0];
            EXPECT(y[static_cast<size_t>(r)] == out[static_cast<size_t>(c)],
                   "embed_blocks row %lld col %lld = %g, the linear kernel's weight %g", (long long)r, (long long)c,
                   (double)out[static_cast<size_t>(c)], (double)y[static_cast<size_t>(r)]);
        }
    }
    // bad parameters: an error with a message, nothing written
    std::vector<float> untouched(static_cast<size_t>(K) + 1, sentinel);
    std::vector<int64_t> bad = {coin() ? V + pick(0, 3) : -pick(1, 3)};
    const auto one = with(ep, [&](auto& p) { p.count = 1, p.out = untouched.data(); });
    statusCheck(embed(with(one, [&](auto& p) { p.ids = bad.data(); })), true, "embed_blocks id out of range");
    statusCheck(embed(with(one, [](auto& p) { p.fmt = 12; })), true, "embed_blocks fmt=12");
    statusCheck(embed(with(one, [&](auto& p) { p.k = K + 16; })), true, "embed_blocks k%32");
    statusCheck(embed(with(one, [](auto& p) { p.m = nullptr, p.fmt = 10; })), true, "embed_blocks q4_1 without m");
    for (float v : untouched) EXPECT(v == sentinel, "embed_blocks wrote output on a refused call");
}

int32_t attention(const RedrafterAttentionParams& p) { return redrafter_attention_cpu(&p, gMsg, sizeof gMsg); }

// Attention of q over the layer cache, one thread on the SIMD path.
RedrafterAttentionParams attentionParams(const float* q, const void* cache, int32_t cacheDtype, const int64_t* slots,
                                         const uint8_t* mask, float* out, int64_t b, int64_t t, int64_t nh, int64_t nkv,
                                         int64_t hd, int64_t s, int64_t cap, int64_t numSlots, float scale) {
    auto p = newParams<RedrafterAttentionParams>();
    p.q = q, p.cache = cache, p.cache_dtype = cacheDtype, p.slots = slots, p.mask = mask, p.out = out;
    p.b = b, p.t = t, p.nh = nh, p.nkv = nkv, p.hd = hd, p.s = s, p.cap = cap, p.num_slots = numSlots;
    p.scale = scale, p.threads = 1, p.force_scalar = 0;
    return p;
}

// Attention: random cache, slots, masks; float64 bound, SIMD == portable, one query alone ==
// among all, bad slots refused.
void fuzzAttention() {
    const int64_t nkv = pick(1, 3), groups = pick(1, 3), nh = nkv * groups, hd = pick(1, 20);
    const int64_t slots = pick(1, 4), cap = pick(1, 24), S = pick(1, cap), B = pick(0, slots), T = pick(1, 5);
    const int32_t cd = coin() ? 0 : 2;
    std::vector<float> cache(static_cast<size_t>(2 * slots * nkv * cap * hd));
    for (auto& v : cache) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    if (cd == 2)
        for (auto& v : cache) v = bf16Round(v);
    std::vector<uint16_t> cache16(cache.size());
    for (size_t i = 0; i < cache.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &cache[i], 4);
        cache16[i] = static_cast<uint16_t>(u >> 16);
    }
    const void* cp = cd == 0 ? static_cast<const void*>(cache.data()) : static_cast<const void*>(cache16.data());
    std::vector<float> q(static_cast<size_t>(B * T * nh * hd) + 1);
    for (auto& v : q) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    std::vector<int64_t> sl(static_cast<size_t>(B) + 1);
    for (int64_t b = 0; b < B; ++b) sl[static_cast<size_t>(b)] = pick(0, slots - 1);
    std::vector<uint8_t> mask(static_cast<size_t>(B * T * S) + 1);
    for (auto& m : mask) m = coin(0.7) ? 1 : 0;
    std::vector<float> out(q.size()), outs(q.size());
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const auto ap =
        attentionParams(q.data(), cp, cd, sl.data(), mask.data(), out.data(), B, T, nh, nkv, hd, S, cap, slots, scale);
    statusCheck(attention(with(ap, [](auto& p) { p.threads = 2; })), false, "attention");
    statusCheck(attention(with(ap, [&](auto& p) { p.out = outs.data(), p.force_scalar = 1; })), false,
                "attention scalar");
    EXPECT(std::memcmp(out.data(), outs.data(), out.size() * 4) == 0, "attention: SIMD != portable");
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < nh; ++h) {
                const int64_t kvh = h / groups;
                const float* qr = q.data() + ((b * T + t) * nh + h) * hd;
                const uint8_t* m = mask.data() + (b * T + t) * S;
                std::vector<double> sc(static_cast<size_t>(S));
                double mx = -INFINITY;
                for (int64_t j = 0; j < S; ++j) {
                    if (!m[j]) continue;
                    double d = 0;
                    for (int64_t e = 0; e < hd; ++e)
                        d += double(qr[e]) * cache[static_cast<size_t>(((sl[b] * nkv + kvh) * cap + j) * hd + e)];
                    sc[static_cast<size_t>(j)] = d * scale;
                    mx = std::max(mx, sc[static_cast<size_t>(j)]);
                }
                for (int64_t e = 0; e < hd; ++e) {
                    double num = 0, den = 0;
                    for (int64_t j = 0; j < S; ++j) {
                        if (!m[j]) continue;
                        const double p = std::exp(sc[static_cast<size_t>(j)] - mx);
                        den += p;
                        num += p * cache[static_cast<size_t>((((slots + sl[b]) * nkv + kvh) * cap + j) * hd + e)];
                    }
                    const double ref = den > 0 ? num / den : 0.0;
                    const float got = out[static_cast<size_t>(((b * T + t) * nh + h) * hd + e)];
                    EXPECT(std::fabs(got - ref) <= 1e-4 * (1 + std::fabs(ref)) * std::sqrt(double(S * hd)),
                           "attention: |out - ref| = %g (S=%lld hd=%lld)", std::fabs(got - ref), (long long)S,
                           (long long)hd);
                }
            }
    if (B > 0 && T > 1) {  // one query row alone: the same bits
        const int64_t b = pick(0, B - 1), t = pick(0, T - 1);
        std::vector<float> one(static_cast<size_t>(nh * hd));
        statusCheck(attention(with(ap,
                                   [&](auto& p) {
                                       p.q = q.data() + (b * T + t) * nh * hd, p.slots = sl.data() + b;
                                       p.mask = mask.data() + (b * T + t) * S, p.out = one.data(), p.b = 1, p.t = 1;
                                   })),
                    false, "attention row");
        EXPECT(std::memcmp(one.data(), out.data() + (b * T + t) * nh * hd, one.size() * 4) == 0,
               "attention: a query alone != among all");
    }
    if (B > 0) {
        std::vector<int64_t> badSlots(sl);
        badSlots[0] = slots;
        statusCheck(attention(with(ap, [&](auto& p) { p.slots = badSlots.data(); })), true, "attention bad slot");
    }
    statusCheck(attention(with(ap, [&](auto& p) { p.s = cap + 1; })), true, "attention S > cap");
}

// The fused decoder forward: random small models (float32 or Q8_0 weights, biases or not, GQA),
// rows in random slots after random cached lengths, random masks, float32 or bf16 caches; the
// hidden states and the cache it writes must have the bits of the same layers composed from the
// per-op C functions; bad slots, positions and a struct of another size are refused.
void fuzzDecoder() {
    const int64_t L = pick(1, 3), nkv = pick(1, 2), nh = nkv * pick(1, 2), hd = 2 * pick(1, 6);
    const bool q8 = coin(0.3);
    const int64_t H = q8 ? 32 * pick(1, 2) : pick(1, 24), I = q8 ? 32 * pick(1, 2) : pick(1, 30);
    const int64_t slots = pick(1, 3), cap = pick(2, 12), B = pick(1, slots), T = pick(1, 3);
    const int32_t cd = coin() ? 0 : 2, wfmt = q8 ? 11 : 0;
    const int64_t qkvN = (nh + 2 * nkv) * hd, nq = nh * hd;
    auto normal = [](std::vector<float>& v, float sd) {
        for (auto& e : v) e = std::normal_distribution<float>(0.0f, sd)(rng);
    };
    // weights: [L] x {qkv, dense, gate_up, down} packed, biases, norms
    struct Lin {
        std::vector<unsigned char> packed;
        std::vector<float> bias;
        int64_t n, k;
    };
    auto makeLin = [&](int64_t n, int64_t k) {
        Lin l{{}, {}, n, k};
        std::vector<float> w(static_cast<size_t>(n * k));
        normal(w, 0.3f);
        if (q8) {
            std::vector<int8_t> qs(w.size());
            for (auto& v : qs) v = static_cast<int8_t>(pick(-127, 127));
            std::vector<uint16_t> d(static_cast<size_t>(n * k / 32), 0x2000);  // float16 2^-7
            l.packed.resize(static_cast<size_t>(redrafter_linear_blocks_packed_bytes(11, n, k)));
            redrafter_linear_pack_blocks_cpu(qs.data(), d.data(), nullptr, 11, l.packed.data(), n, k, gMsg,
                                             sizeof gMsg);
        } else {
            l.packed.resize(static_cast<size_t>(redrafter_linear_packed_elems(n, k)) * 4);
            redrafter_linear_pack_cpu(w.data(), 0, l.packed.data(), n, k, gMsg, sizeof gMsg);
        }
        if (coin()) {
            l.bias.resize(static_cast<size_t>(n));
            normal(l.bias, 0.1f);
        }
        return l;
    };
    std::vector<Lin> lins;
    std::vector<std::vector<float>> norms;
    std::vector<RedrafterDecoderLayer> layers(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) {
        lins.push_back(makeLin(qkvN, H));
        lins.push_back(makeLin(H, nq));
        lins.push_back(makeLin(2 * I, H));
        lins.push_back(makeLin(H, I));
        for (int i = 0; i < 2; ++i) {
            norms.emplace_back(static_cast<size_t>(H));
            for (auto& v : norms.back()) v = 1.0f + std::normal_distribution<float>(0.0f, 0.1f)(rng);
        }
    }
    auto bp = [](const Lin& l) { return l.bias.empty() ? nullptr : l.bias.data(); };
    for (int64_t l = 0; l < L; ++l) {
        RedrafterDecoderLayer& w = layers[static_cast<size_t>(l)];
        std::memset(&w, 0, sizeof w);
        const Lin* f = &lins[static_cast<size_t>(4 * l)];
        w.qkv = f[0].packed.data(), w.qkv_bias = bp(f[0]), w.dense = f[1].packed.data(), w.dense_bias = bp(f[1]);
        w.gate_up = f[2].packed.data(), w.gate_up_bias = bp(f[2]), w.down = f[3].packed.data(), w.down_bias = bp(f[3]);
        w.input_norm = norms[static_cast<size_t>(2 * l)].data();
        w.post_norm = norms[static_cast<size_t>(2 * l + 1)].data();
        w.qkv_fmt = w.dense_fmt = w.gate_up_fmt = w.down_fmt = wfmt;
    }
    const int64_t rows = B * T, layerElems = 2 * slots * nkv * cap * hd, esz = cd == 0 ? 4 : 2;
    std::vector<unsigned char> cache(static_cast<size_t>(L * layerElems * esz));
    for (auto& c : cache) c = static_cast<unsigned char>(pick(0, 63));  // small finite values
    std::vector<unsigned char> cacheRef(cache);
    std::vector<float> x(static_cast<size_t>(rows * H)), cos(static_cast<size_t>(rows * hd / 2)), sin(cos.size());
    normal(x, 1.0f);
    for (size_t i = 0; i < cos.size(); ++i) {
        const float a = std::uniform_real_distribution<float>(0.0f, 6.0f)(rng);
        cos[i] = std::cos(a), sin[i] = std::sin(a);
    }
    std::vector<int64_t> sl(static_cast<size_t>(B)), wp(static_cast<size_t>(rows));
    for (int64_t b = 0; b < B; ++b) {
        sl[static_cast<size_t>(b)] = pick(0, slots - 1);
        const int64_t len = pick(0, cap - T);
        for (int64_t t = 0; t < T; ++t) wp[static_cast<size_t>(b * T + t)] = len + t;
    }
    const int64_t S = pick(1, cap);
    std::vector<uint8_t> mask(static_cast<size_t>(rows * S));
    for (auto& m : mask) m = coin(0.7) ? 1 : 0;
    std::vector<float> xRef(x);
    auto p = newParams<RedrafterDecoderParams>();
    p.x = x.data(), p.cos = cos.data(), p.sin = sin.data(), p.cache = cache.data();
    p.slots = sl.data(), p.write_pos = wp.data(), p.mask = mask.data(), p.layers = layers.data();
    p.num_layers = L, p.b = B, p.t = T, p.s = S, p.cap = cap, p.num_slots = slots, p.hidden = H, p.heads = nh;
    p.kv_heads = nkv, p.head_size = hd, p.intermediate = I, p.eps = 1e-5f, p.scale = 1.0f / std::sqrt(float(hd));
    p.cache_dtype = cd, p.threads = static_cast<int32_t>(pick(1, 3));
    if (statusCheck(redrafter_decoder_forward_cpu(&p, gMsg, sizeof gMsg), false, "decoder")) return;
    // the same layers from the per-op functions
    std::vector<float> h(static_cast<size_t>(rows * H)), qkv(static_cast<size_t>(rows * qkvN)),
        q(static_cast<size_t>(rows * nq)), att(q.size()), ab(static_cast<size_t>(rows * 2 * I)),
        act(static_cast<size_t>(rows * I)), tmp(h.size());
    for (int64_t l = 0; l < L; ++l) {
        const Lin* f = &lins[static_cast<size_t>(4 * l)];
        unsigned char* lc = cacheRef.data() + l * layerElems * esz;
        redrafter_rmsnorm_cpu(xRef.data(), norms[static_cast<size_t>(2 * l)].data(), h.data(), 0, rows, H, 1e-5f, gMsg,
                              sizeof gMsg);
        linearPacked(linearParams(h.data(), 0, f[0].packed.data(), wfmt, bp(f[0]), qkv.data(), rows, qkvN, H));
        redrafter_rope_cpu(qkv.data(), 0, rows, nh, hd, qkvN, cos.data(), sin.data(), gMsg, sizeof gMsg);
        redrafter_rope_cpu(qkv.data() + nq, 0, rows, nkv, hd, qkvN, cos.data(), sin.data(), gMsg, sizeof gMsg);
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t b = r / T;
            for (int64_t kvh = 0; kvh < nkv; ++kvh)
                for (int kv = 0; kv < 2; ++kv)
                    for (int64_t e = 0; e < hd; ++e) {
                        const float v = qkv[static_cast<size_t>(r * qkvN + nq + kv * nkv * hd + kvh * hd + e)];
                        const int64_t at =
                            kv * slots * nkv * cap * hd +
                            ((sl[static_cast<size_t>(b)] * nkv + kvh) * cap + wp[static_cast<size_t>(r)]) * hd + e;
                        if (cd == 0) {
                            std::memcpy(lc + at * 4, &v, 4);
                        } else {
                            const float rv = std::isnan(v) ? v : bf16Round(v);
                            uint32_t u;
                            std::memcpy(&u, &rv, 4);
                            const uint16_t hb = static_cast<uint16_t>(u >> 16);
                            std::memcpy(lc + at * 2, &hb, 2);
                        }
                    }
            std::memcpy(q.data() + r * nq, qkv.data() + r * qkvN, static_cast<size_t>(nq) * 4);
        }
        attention(attentionParams(q.data(), lc, cd, sl.data(), mask.data(), att.data(), B, T, nh, nkv, hd, S, cap,
                                  slots, 1.0f / std::sqrt(float(hd))));
        linearPacked(linearParams(att.data(), 0, f[1].packed.data(), wfmt, bp(f[1]), tmp.data(), rows, H, nq));
        for (size_t i = 0; i < xRef.size(); ++i) xRef[i] += tmp[i];
        redrafter_rmsnorm_cpu(xRef.data(), norms[static_cast<size_t>(2 * l + 1)].data(), h.data(), 0, rows, H, 1e-5f,
                              gMsg, sizeof gMsg);
        linearPacked(linearParams(h.data(), 0, f[2].packed.data(), wfmt, bp(f[2]), ab.data(), rows, 2 * I, H));
        redrafter_silu_mul_cpu(ab.data(), act.data(), 0, rows, I, gMsg, sizeof gMsg);
        linearPacked(linearParams(act.data(), 0, f[3].packed.data(), wfmt, bp(f[3]), tmp.data(), rows, H, I));
        for (size_t i = 0; i < xRef.size(); ++i) xRef[i] += tmp[i];
    }
    EXPECT(std::memcmp(x.data(), xRef.data(), x.size() * 4) == 0, "decoder: fused != per-op hidden states");
    EXPECT(std::memcmp(cache.data(), cacheRef.data(), cache.size()) == 0, "decoder: fused != per-op cache");
    // bad parameters
    RedrafterDecoderParams bad = p;
    bad.struct_size = sizeof p - 8;
    statusCheck(redrafter_decoder_forward_cpu(&bad, gMsg, sizeof gMsg), true, "decoder struct size");
    bad = p;
    std::vector<int64_t> badSl(sl);
    badSl[0] = slots;
    bad.slots = badSl.data();
    statusCheck(redrafter_decoder_forward_cpu(&bad, gMsg, sizeof gMsg), true, "decoder bad slot");
    bad = p;
    std::vector<int64_t> badWp(wp);
    badWp[static_cast<size_t>(pick(0, rows - 1))] = cap;
    bad.write_pos = badWp.data();
    statusCheck(redrafter_decoder_forward_cpu(&bad, gMsg, sizeof gMsg), true, "decoder bad write_pos");
    bad = p;
    bad.s = cap + 1;
    statusCheck(redrafter_decoder_forward_cpu(&bad, gMsg, sizeof gMsg), true, "decoder S > cap");
}

// Every entry point taking a params struct refuses a null one and one of another size (a binding
// built from other sources), with a message saying so.
template <class S>
void guardCase(int32_t (*fn)(const S*, char*, int64_t), const char* op) {
    statusCheck(fn(nullptr, gMsg, sizeof gMsg), true, op);
    EXPECT(std::strstr(gMsg, "null params") != nullptr, "%s: null params: %s", op, gMsg);
    S p = newParams<S>();
    p.struct_size -= 8;
    statusCheck(fn(&p, gMsg, sizeof gMsg), true, op);
    EXPECT(std::strstr(gMsg, "params struct of") != nullptr, "%s: struct size: %s", op, gMsg);
}

void checkParamsGuards() {
    guardCase(redrafter_beam_search_step_cpu, "beam search");
    guardCase(redrafter_tree_pack_cpu, "tree pack");
    guardCase(redrafter_accept_cpu, "accept");
    guardCase(redrafter_kv_relocate_cpu, "kv relocate");
    guardCase(redrafter_kv_relocate_strided_cpu, "kv relocate strided");
    guardCase(redrafter_draw_tokens_cpu, "draw tokens");
    guardCase(redrafter_linear_packed_cpu, "linear packed");
    guardCase(redrafter_linear_cpu, "linear");
    guardCase(redrafter_attention_cpu, "attention");
    guardCase(redrafter_embed_blocks_cpu, "embed blocks");
    guardCase(redrafter_decoder_forward_cpu, "decoder");
}

int main(int argc, char** argv) {
    int64_t iterations = 3000;
    uint64_t seed = 20261122;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--iterations")) iterations = std::atoll(argv[i + 1]);
        if (!std::strcmp(argv[i], "--seed")) seed = std::strtoull(argv[i + 1], nullptr, 10);
    }
    rng.seed(seed);
    checkParamsGuards();
    for (int64_t it = 0; it < iterations; ++it) {
        switch (pick(0, 6)) {
            case 0:
                fuzzBeamSearch();
                break;
            case 1:
                fuzzTreePack();
                break;
            case 2:
                fuzzAccept();
                break;
            case 3:
                fuzzKvRelocate();
                fuzzKvRelocateStrided();
                break;
            case 4:
                fuzzLinear();
                fuzzLinearBlocks();
                fuzzEmbedBlocks();
                break;
            case 5:
                fuzzAttention();
                fuzzDecoder();
                break;
            default:
                fuzzDraw();
                break;
        }
    }
    std::printf("fuzz: %lld cases (seed %llu), %lld rejected with a message, %lld failures\n", (long long)gCases,
                (unsigned long long)seed, (long long)gRejected, (long long)gFailures);
    return gFailures ? 1 : 0;
}
