// C ABI of the CPU references (libredrafter_cpu.so); see redrafter/c_api.h.
#include <vector>

#include "c_api_params.h"
#include "redrafter/c_api.h"
#include "redrafter/sampling.h"

using namespace redrafter;
using namespace redrafter::capi;

extern "C" {

int32_t redrafter_abi_version(void) { return REDRAFTER_ABI_VERSION; }

int32_t redrafter_beam_search_step_cpu(const void* logits, int32_t dtype, const float* beam_scores, int64_t batch,
                                       int64_t num_beams, int64_t vocab, int64_t warp_k, const int32_t* vocab_map,
                                       float* new_scores, int32_t* parent, int32_t* token, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        DataType t;
        if (!dtypeFrom(dtype, &t)) return badDtype("beam search", dtype);
        return beamSearchStepCpu(beamSearchParams(logits, t, beam_scores, batch, num_beams, vocab, warp_k, vocab_map,
                                                  new_scores, parent, token));
    });
}

int32_t redrafter_tree_pack_cpu(const int32_t* beams, int64_t batch, int64_t num_beams, int64_t beam_len,
                                int32_t* packed_tokens, int32_t* packed_len, int32_t* unpacker,
                                int32_t* position_offsets, int32_t* packed_mask, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        return treePackCpu(treePackParams(beams, batch, num_beams, beam_len, packed_tokens, packed_len, unpacker,
                                          position_offsets, packed_mask));
    });
}

int32_t redrafter_accept_cpu(const void* logits, int32_t dtype, int64_t batch, int64_t num_nodes, int64_t vocab,
                             const int32_t* beams, const int32_t* unpacker, int64_t num_beams, int64_t beam_len,
                             const int32_t* packed_len, const float* temperature, const int32_t* top_k,
                             const float* top_p, const float* uniforms, int32_t* num_accepted, int32_t* best_beam,
                             int32_t* bonus, int32_t* accepted_indices, int32_t* emitted, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        DataType t;
        if (!dtypeFrom(dtype, &t)) return badDtype("accept", dtype);
        return acceptCpu(acceptParams(logits, t, batch, num_nodes, vocab, beams, unpacker, num_beams, beam_len,
                                      packed_len, temperature, top_k, top_p, uniforms, num_accepted, best_beam, bonus,
                                      accepted_indices, emitted));
    });
}

int32_t redrafter_kv_relocate_cpu(void* cache, int64_t elem_bytes, int64_t num_layers, int64_t num_slots,
                                  int64_t num_kv_heads, int64_t max_seq_len, int64_t head_dim, const int32_t* slots,
                                  const int32_t* cache_lengths, const int32_t* accepted_indices,
                                  const int32_t* num_accepted, int64_t batch, int64_t beam_len, int32_t* new_lengths,
                                  char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        return kvRelocateCpu(kvRelocateParams(cache, elem_bytes, num_layers, num_slots, num_kv_heads, max_seq_len,
                                              head_dim, slots, cache_lengths, accepted_indices, num_accepted, batch,
                                              beam_len, new_lengths));
    });
}

int32_t redrafter_kv_relocate_strided_cpu(void* cache, int64_t cache_elems, int64_t elem_bytes, int64_t num_layers,
                                          int64_t num_slots, int64_t num_kv_heads, int64_t max_seq_len,
                                          int64_t head_dim, int64_t tokens_per_block, int64_t stride_slot,
                                          int64_t stride_block, int64_t stride_token, int64_t stride_layer,
                                          int64_t stride_kv, int64_t stride_head, const int32_t* slots,
                                          const int32_t* cache_lengths, const int32_t* accepted_indices,
                                          const int32_t* num_accepted, int64_t batch, int64_t beam_len,
                                          int32_t* new_lengths, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        KvRelocateParams p;
        RD_RETURN_IF_ERROR(kvRelocateStridedParams(
            cache, cache_elems, elem_bytes, num_layers, num_slots, num_kv_heads, max_seq_len, head_dim,
            tokens_per_block, stride_slot, stride_block, stride_token, stride_layer, stride_kv, stride_head, slots,
            cache_lengths, accepted_indices, num_accepted, batch, beam_len, new_lengths, &p));
        return kvRelocateCpu(p);
    });
}

int32_t redrafter_draw_tokens_cpu(const void* logits, int32_t dtype, int64_t rows, int64_t vocab,
                                  const float* temperature, const int32_t* top_k, const float* top_p,
                                  const float* uniforms, int32_t* tokens, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        DataType t;
        if (!dtypeFrom(dtype, &t)) return badDtype("draw tokens", dtype);
        if (rows < 0 || rows > kInt32Max || vocab < 1 || vocab > kInt32Max)
            return Status::error(StatusCode::kInvalidArgument,
                                 "draw tokens: need 0 <= rows < 2^31 and 1 <= vocab < 2^31, got rows=%lld vocab=%lld",
                                 (long long)rows, (long long)vocab);
        int64_t total = 0;
        if (!checkedProduct({rows, vocab, 4}, INT64_MAX, &total))
            return Status::error(StatusCode::kOverflow, "draw tokens: rows*vocab bytes overflow int64");
        if (!logits || !temperature || !top_k || !top_p || !uniforms || !tokens)
            return Status::error(StatusCode::kInvalidArgument, "draw tokens: null pointer");
        std::vector<float> row(static_cast<size_t>(vocab));
        SamplingScratch scratch;
        for (int64_t r = 0; r < rows; ++r) {
            logitsToFloat(logits, t, r * vocab, vocab, row.data());
            tokens[r] = drawTokenCpu(row.data(), vocab, temperature[r], top_k[r], top_p[r], uniforms[r], scratch);
        }
        return Status::success();
    });
}

}  // extern "C"
