// C ABI of the CUDA launchers (libredrafter_cuda.so); see redrafter/c_api.h. Device pointers,
// the stream as void* (a cudaStream_t), and the same Params validation as the CPU entry points.
#include "c_api_params.h"
#include "redrafter/c_api.h"

using namespace redrafter;
using namespace redrafter::capi;

extern "C" {

size_t redrafter_beam_search_workspace_bytes(int64_t batch, int64_t num_beams, int64_t vocab, int64_t warp_k) {
    return beamSearchWorkspaceBytes(batch, num_beams, vocab, warp_k);
}

size_t redrafter_accept_workspace_bytes(int64_t batch, int64_t num_nodes) {
    return acceptWorkspaceBytes(batch, num_nodes);
}

int32_t redrafter_beam_search_step_cuda(const void* logits, int32_t dtype, const float* beam_scores, int64_t batch,
                                        int64_t num_beams, int64_t vocab, int64_t warp_k, const int32_t* vocab_map,
                                        float* new_scores, int32_t* parent, int32_t* token, void* workspace,
                                        size_t workspace_bytes, void* stream, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        DataType t;
        if (!dtypeFrom(dtype, &t)) return badDtype("beam search", dtype);
        BeamSearchParams p = beamSearchParams(logits, t, beam_scores, batch, num_beams, vocab, warp_k, vocab_map,
                                              new_scores, parent, token);
        p.workspace = workspace;
        p.workspaceBytes = workspace_bytes;
        return invokeBeamSearchStep(p, static_cast<CUstream_st*>(stream));
    });
}

int32_t redrafter_tree_pack_cuda(const int32_t* beams, int64_t batch, int64_t num_beams, int64_t beam_len,
                                 int32_t* packed_tokens, int32_t* packed_len, int32_t* unpacker,
                                 int32_t* position_offsets, int32_t* packed_mask, void* stream, char* msg,
                                 int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        return invokeTreePack(treePackParams(beams, batch, num_beams, beam_len, packed_tokens, packed_len, unpacker,
                                             position_offsets, packed_mask),
                              static_cast<CUstream_st*>(stream));
    });
}

int32_t redrafter_accept_cuda(const void* logits, int32_t dtype, int64_t batch, int64_t num_nodes, int64_t vocab,
                              const int32_t* beams, const int32_t* unpacker, int64_t num_beams, int64_t beam_len,
                              const int32_t* packed_len, const float* temperature, const int32_t* top_k,
                              const float* top_p, const float* uniforms, int32_t* num_accepted, int32_t* best_beam,
                              int32_t* bonus, int32_t* accepted_indices, int32_t* emitted, void* workspace,
                              size_t workspace_bytes, void* stream, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        DataType t;
        if (!dtypeFrom(dtype, &t)) return badDtype("accept", dtype);
        AcceptParams p = acceptParams(logits, t, batch, num_nodes, vocab, beams, unpacker, num_beams, beam_len,
                                      packed_len, temperature, top_k, top_p, uniforms, num_accepted, best_beam, bonus,
                                      accepted_indices, emitted);
        p.workspace = workspace;
        p.workspaceBytes = workspace_bytes;
        return invokeAccept(p, static_cast<CUstream_st*>(stream));
    });
}

int32_t redrafter_kv_relocate_cuda(void* cache, int64_t elem_bytes, int64_t num_layers, int64_t num_slots,
                                   int64_t num_kv_heads, int64_t max_seq_len, int64_t head_dim, const int32_t* slots,
                                   const int32_t* cache_lengths, const int32_t* accepted_indices,
                                   const int32_t* num_accepted, int64_t batch, int64_t beam_len, int32_t* new_lengths,
                                   void* stream, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        return invokeKvRelocate(
            kvRelocateParams(cache, elem_bytes, num_layers, num_slots, num_kv_heads, max_seq_len, head_dim, slots,
                             cache_lengths, accepted_indices, num_accepted, batch, beam_len, new_lengths),
            static_cast<CUstream_st*>(stream));
    });
}

int32_t redrafter_kv_relocate_strided_cuda(void* cache, int64_t cache_elems, int64_t elem_bytes, int64_t num_layers,
                                           int64_t num_slots, int64_t num_kv_heads, int64_t max_seq_len,
                                           int64_t head_dim, int64_t tokens_per_block, int64_t stride_slot,
                                           int64_t stride_block, int64_t stride_token, int64_t stride_layer,
                                           int64_t stride_kv, int64_t stride_head, const int32_t* slots,
                                           const int32_t* cache_lengths, const int32_t* accepted_indices,
                                           const int32_t* num_accepted, int64_t batch, int64_t beam_len,
                                           int32_t* new_lengths, void* stream, char* msg, int64_t msg_len) {
    return guarded(msg, msg_len, [&] {
        KvRelocateParams p;
        RD_RETURN_IF_ERROR(kvRelocateStridedParams(
            cache, cache_elems, elem_bytes, num_layers, num_slots, num_kv_heads, max_seq_len, head_dim,
            tokens_per_block, stride_slot, stride_block, stride_token, stride_layer, stride_kv, stride_head, slots,
            cache_lengths, accepted_indices, num_accepted, batch, beam_len, new_lengths, &p));
        return invokeKvRelocate(p, static_cast<CUstream_st*>(stream));
    });
}

}  // extern "C"
