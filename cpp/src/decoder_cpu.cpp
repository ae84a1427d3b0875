// The torch backend's CPU step through every decoder layer in one call (Llama / Qwen2 layers:
// RMSNorm, fused qkv, RoPE, the KV write, attention, output projection, residual, RMSNorm,
// gate|up, silu * up, down projection, residual).
//
// Each stage is the kernel the per-layer path calls (cpu_kernels.h), in the same order on the same
// float32 values, and the residual adds are single float32 additions like torch's, so the result
// has the bits of the per-layer path (models/base.py DecoderLayer on the kernels), which the tests
// compare. What the one call saves is the Python and torch dispatch around the ~10 kernel calls of
// every layer: at one token per row that dispatch cost as much as the weights' streaming.
//
// Activations are float32; weights any format the linear kernel takes (float32 / bf16 panels,
// Q4_1 / Q8_0 block panels); the cache float32 or bf16 (k and v rounded to it once when written).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_numeric.h"
#include "redrafter/c_abi_guard.h"
#include "redrafter/common.h"
#include "redrafter/decoder_cpu.h"

namespace redrafter {
namespace {

using cpu::f32ToBf16;
using cpu::kBF16;
using cpu::kF32;

Status bad(const char* what) { return Status::error(StatusCode::kInvalidArgument, "decoder forward: %s", what); }

Status checkParams(const RedrafterDecoderParams& p) {
    if (p.num_layers < 1 || p.b < 0 || p.t < 0 || p.hidden < 1 || p.heads < 1 || p.kv_heads < 1 || p.head_size < 2 ||
        p.head_size % 2 || p.intermediate < 1 || p.heads % p.kv_heads != 0 || p.s < 1 || p.cap < p.s || p.num_slots < 1)
        return Status::error(
            StatusCode::kInvalidArgument,
            "decoder forward: bad shape layers=%lld b=%lld t=%lld H=%lld nh=%lld nkv=%lld hd=%lld "
            "I=%lld S=%lld cap=%lld slots=%lld (need positive sizes, even hd, nh %% nkv == 0, "
            "1 <= S <= cap)",
            static_cast<long long>(p.num_layers), static_cast<long long>(p.b), static_cast<long long>(p.t),
            static_cast<long long>(p.hidden), static_cast<long long>(p.heads), static_cast<long long>(p.kv_heads),
            static_cast<long long>(p.head_size), static_cast<long long>(p.intermediate), static_cast<long long>(p.s),
            static_cast<long long>(p.cap), static_cast<long long>(p.num_slots));
    if (p.cache_dtype != kF32 && p.cache_dtype != kBF16)
        return Status::error(StatusCode::kInvalidArgument,
                             "decoder forward: cache dtype must be 0 (float32) or 2 (bfloat16), got %d",
                             static_cast<int>(p.cache_dtype));
    if (!p.x || !p.cos || !p.sin || !p.cache || !p.slots || !p.write_pos || !p.mask || !p.layers)
        return bad("null pointer argument");
    for (int64_t i = 0; i < p.b; ++i) {
        if (p.slots[i] < 0 || p.slots[i] >= p.num_slots)
            return Status::error(StatusCode::kInvalidArgument, "decoder forward: slots[%lld] = %lld outside [0, %lld)",
                                 static_cast<long long>(i), static_cast<long long>(p.slots[i]),
                                 static_cast<long long>(p.num_slots));
        for (int64_t j = 0; j < p.t; ++j) {
            const int64_t pos = p.write_pos[i * p.t + j];
            if (pos < 0 || pos >= p.cap)
                return Status::error(StatusCode::kInvalidArgument,
                                     "decoder forward: write_pos[%lld, %lld] = %lld outside the cache [0, %lld)",
                                     static_cast<long long>(i), static_cast<long long>(j), static_cast<long long>(pos),
                                     static_cast<long long>(p.cap));
        }
    }
    for (int64_t l = 0; l < p.num_layers; ++l) {
        const RedrafterDecoderLayer& w = p.layers[l];
        const bool fused = w.gate_up != nullptr;
        if (!w.qkv || !w.dense || !w.down || !w.input_norm || !w.post_norm || (!fused && (!w.gate || !w.up)))
            return Status::error(StatusCode::kInvalidArgument, "decoder forward: layer %lld has a null weight",
                                 static_cast<long long>(l));
    }
    return Status::success();
}

// Writes k and v of every new token (rows of the roped qkv buffer) into one layer's cache.
void writeKv(const RedrafterDecoderParams& p, const float* qkv, int64_t qkvN, void* layerCache) {
    const int64_t hd = p.head_size, nkv = p.kv_heads, nq = p.heads * hd;
    const int64_t plane = p.num_slots * nkv * p.cap * hd;  // K -> V
    for (int64_t i = 0; i < p.b; ++i)
        for (int64_t j = 0; j < p.t; ++j) {
            const float* row = qkv + (i * p.t + j) * qkvN + nq;
            const int64_t pos = p.write_pos[i * p.t + j];
            for (int64_t h = 0; h < nkv; ++h) {
                const int64_t at = ((p.slots[i] * nkv + h) * p.cap + pos) * hd;
                for (int kv = 0; kv < 2; ++kv) {
                    const float* src = row + kv * nkv * hd + h * hd;
                    const int64_t dst = at + kv * plane;
                    if (p.cache_dtype == kF32)
                        std::memcpy(static_cast<float*>(layerCache) + dst, src, static_cast<size_t>(hd) * 4);
                    else
                        for (int64_t d = 0; d < hd; ++d)
                            static_cast<uint16_t*>(layerCache)[dst + d] = f32ToBf16(src[d]);
                }
            }
        }
}

void addInto(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

#define RD_TRY(expr)               \
    do {                           \
        const Status st_ = (expr); \
        if (!st_.ok()) return st_; \
    } while (0)

Status decoderForward(const RedrafterDecoderParams& p) {
    RD_TRY(checkParams(p));
    const int64_t rows = p.b * p.t;
    if (rows == 0) return Status::success();
    const int64_t H = p.hidden, hd = p.head_size, nq = p.heads * hd, nk = p.kv_heads * hd, I = p.intermediate;
    const int64_t qkvN = nq + 2 * nk;
    const int32_t th = p.threads;
    // scratch, reused across calls on this thread
    thread_local std::vector<float> hbuf, qkv, q, attn, ab, act, tmp;
    hbuf.resize(static_cast<size_t>(rows * H));
    qkv.resize(static_cast<size_t>(rows * qkvN));
    q.resize(static_cast<size_t>(rows * nq));
    attn.resize(static_cast<size_t>(rows * nq));
    ab.resize(static_cast<size_t>(rows * 2 * I));
    act.resize(static_cast<size_t>(rows * I));
    tmp.resize(static_cast<size_t>(rows * H));
    const size_t cacheEsz = p.cache_dtype == kF32 ? 4 : 2;
    const int64_t layerElems = 2 * p.num_slots * p.kv_heads * p.cap * hd;
    for (int64_t l = 0; l < p.num_layers; ++l) {
        const RedrafterDecoderLayer& w = p.layers[l];
        void* layerCache = static_cast<char*>(p.cache) + static_cast<size_t>(l * layerElems) * cacheEsz;
        // attention block
        RD_TRY(cpu::rmsnorm(p.x, w.input_norm, hbuf.data(), kF32, rows, H, p.eps));
        RD_TRY(
            cpu::linearPacked(hbuf.data(), kF32, w.qkv, w.qkv_fmt, w.qkv_bias, qkv.data(), kF32, rows, qkvN, H, th, 0));
        RD_TRY(cpu::rope(qkv.data(), kF32, rows, p.heads, hd, qkvN, p.cos, p.sin));
        RD_TRY(cpu::rope(qkv.data() + nq, kF32, rows, p.kv_heads, hd, qkvN, p.cos, p.sin));
        writeKv(p, qkv.data(), qkvN, layerCache);
        for (int64_t r = 0; r < rows; ++r)
            std::memcpy(q.data() + r * nq, qkv.data() + r * qkvN, static_cast<size_t>(nq) * 4);
        RD_TRY(cpu::attention(q.data(), layerCache, p.cache_dtype, p.slots, p.mask, attn.data(), p.b, p.t, p.heads,
                              p.kv_heads, hd, p.s, p.cap, p.num_slots, p.scale, th, 0));
        RD_TRY(cpu::linearPacked(attn.data(), kF32, w.dense, w.dense_fmt, w.dense_bias, tmp.data(), kF32, rows, H, nq,
                                 th, 0));
        addInto(p.x, tmp.data(), rows * H);
        // MLP block
        RD_TRY(cpu::rmsnorm(p.x, w.post_norm, hbuf.data(), kF32, rows, H, p.eps));
        if (w.gate_up) {
            RD_TRY(cpu::linearPacked(hbuf.data(), kF32, w.gate_up, w.gate_up_fmt, w.gate_up_bias, ab.data(), kF32, rows,
                                     2 * I, H, th, 0));
            RD_TRY(cpu::siluMul(ab.data(), 2 * I, ab.data() + I, 2 * I, act.data(), kF32, rows, I));
        } else {  // gate_proj and up_proj streamed separately (block weights): the same bits
            float* g = ab.data();
            float* u = ab.data() + rows * I;
            RD_TRY(cpu::linearPacked(hbuf.data(), kF32, w.gate, w.gate_fmt, w.gate_bias, g, kF32, rows, I, H, th, 0));
            RD_TRY(cpu::linearPacked(hbuf.data(), kF32, w.up, w.up_fmt, w.up_bias, u, kF32, rows, I, H, th, 0));
            RD_TRY(cpu::siluMul(g, I, u, I, act.data(), kF32, rows, I));
        }
        RD_TRY(
            cpu::linearPacked(act.data(), kF32, w.down, w.down_fmt, w.down_bias, tmp.data(), kF32, rows, H, I, th, 0));
        addInto(p.x, tmp.data(), rows * H);
    }
    return Status::success();
}

}  // namespace
}  // namespace redrafter

extern "C" {

int32_t redrafter_decoder_forward_cpu(const RedrafterDecoderParams* params, char* msg, int64_t msg_len) {
    return redrafter::capi::guardedParams(params, "decoder forward", msg, msg_len, redrafter::decoderForward);
}

}  // extern "C"
