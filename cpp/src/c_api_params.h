// Builds the operators' Params structs from the C ABI's params structs (redrafter/c_api.h),
// shared by the CPU and the CUDA entry points, so both validate the same way.
#pragma once

#include "redrafter/accept.h"
#include "redrafter/beam_search.h"
#include "redrafter/c_abi_guard.h"
#include "redrafter/c_api.h"
#include "redrafter/kv_relocate.h"
#include "redrafter/tree_pack.h"

namespace redrafter {
namespace capi {

inline bool dtypeFrom(int32_t dtype, DataType* out) {
    if (!dataTypeValid(dtype)) return false;
    *out = static_cast<DataType>(dtype);
    return true;
}

inline Status badDtype(const char* op, int32_t dtype) {
    return Status::error(StatusCode::kInvalidArgument,
                         "%s: logits dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got %d", op, dtype);
}

inline Status beamSearchParams(const RedrafterBeamSearchParams& a, BeamSearchParams* out) {
    BeamSearchParams p;
    if (!dtypeFrom(a.dtype, &p.logitsType)) return badDtype("beam search", a.dtype);
    p.vocabMap = a.vocab_map;
    p.logits = a.logits;
    p.beamScores = a.beam_scores;
    p.newScores = a.new_scores;
    p.parent = a.parent;
    p.token = a.token;
    p.batchSize = a.batch;
    p.numBeams = a.num_beams;
    p.vocabSize = a.vocab;
    p.warpK = a.warp_k;
    p.workspace = a.workspace;
    p.workspaceBytes = a.workspace_bytes;
    *out = p;
    return Status::success();
}

inline TreePackParams treePackParams(const RedrafterTreePackParams& a) {
    TreePackParams p;
    p.beams = a.beams;
    p.batchSize = a.batch;
    p.numBeams = a.num_beams;
    p.beamLength = a.beam_len;
    p.packedTokens = a.packed_tokens;
    p.packedLen = a.packed_len;
    p.unpacker = a.unpacker;
    p.positionOffsets = a.position_offsets;
    p.packedMask = a.packed_mask;
    return p;
}

inline Status acceptParams(const RedrafterAcceptParams& a, AcceptParams* out) {
    AcceptParams p;
    if (!dtypeFrom(a.dtype, &p.logitsType)) return badDtype("accept", a.dtype);
    p.logits = a.logits;
    p.batchSize = a.batch;
    p.numNodes = a.num_nodes;
    p.vocabSize = a.vocab;
    p.beams = a.beams;
    p.unpacker = a.unpacker;
    p.numBeams = a.num_beams;
    p.beamLength = a.beam_len;
    p.packedLen = a.packed_len;
    p.temperature = a.temperature;
    p.topK = a.top_k;
    p.topP = a.top_p;
    p.uniforms = a.uniforms;
    p.numAccepted = a.num_accepted;
    p.bestBeam = a.best_beam;
    p.bonus = a.bonus;
    p.acceptedIndices = a.accepted_indices;
    p.emitted = a.emitted;
    p.workspace = a.workspace;
    p.workspaceBytes = a.workspace_bytes;
    *out = p;
    return Status::success();
}

// The contiguous entry points: the default layout of the dims (the strided fields unread).
inline KvRelocateParams kvRelocateParams(const RedrafterKvRelocateParams& a) {
    KvRelocateParams p;
    p.cache = a.cache;
    p.elemBytes = a.elem_bytes;
    p.numLayers = a.num_layers;
    p.numSlots = a.num_slots;
    p.numKvHeads = a.num_kv_heads;
    p.maxSeqLen = a.max_seq_len;
    p.headDim = a.head_dim;
    p.slots = a.slots;
    p.cacheLengths = a.cache_lengths;
    p.acceptedIndices = a.accepted_indices;
    p.numAccepted = a.num_accepted;
    p.batchSize = a.batch;
    p.beamLength = a.beam_len;
    p.newLengths = a.new_lengths;
    return p;
}

// The strided entry points: every layout field is explicit (tokens_per_block >= 1; 0 would
// select the default layout in KvRelocateParams).
inline Status kvRelocateStridedParams(const RedrafterKvRelocateParams& a, KvRelocateParams* out) {
    if (a.tokens_per_block < 1 || a.tokens_per_block > kInt32Max)
        return Status::error(StatusCode::kInvalidArgument,
                             "kv relocate: tokens_per_block must be in [1, 2^31), got %lld",
                             (long long)a.tokens_per_block);
    if (a.cache_elems < 1)
        return Status::error(
            StatusCode::kInvalidArgument,
            "kv relocate: cache_elems (elements addressable from the cache pointer) must be >= 1, got %lld",
            (long long)a.cache_elems);
    KvRelocateParams p = kvRelocateParams(a);
    p.cacheElems = a.cache_elems;
    p.layout.tokensPerBlock = a.tokens_per_block;
    p.layout.strideSlot = a.stride_slot;
    p.layout.strideBlock = a.stride_block;
    p.layout.strideToken = a.stride_token;
    p.layout.strideLayer = a.stride_layer;
    p.layout.strideKv = a.stride_kv;
    p.layout.strideHead = a.stride_head;
    *out = p;
    return Status::success();
}

}  // namespace capi
}  // namespace redrafter
