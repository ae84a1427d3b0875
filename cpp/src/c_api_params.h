// Builds the operators' Params structs from the C ABI's arguments (shared by the CPU and the
// CUDA entry points, so both validate the same way).
#pragma once

#include <cstring>
#include <exception>

#include "redrafter/accept.h"
#include "redrafter/beam_search.h"
#include "redrafter/c_abi_guard.h"
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

inline BeamSearchParams beamSearchParams(const void* logits, DataType t, const float* beamScores, int64_t batch,
                                         int64_t beams, int64_t vocab, int64_t warpK, const int32_t* vocabMap,
                                         float* newScores, int32_t* parent, int32_t* token) {
    BeamSearchParams p;
    p.vocabMap = vocabMap;
    p.logits = logits;
    p.logitsType = t;
    p.beamScores = beamScores;
    p.newScores = newScores;
    p.parent = parent;
    p.token = token;
    p.batchSize = batch;
    p.numBeams = beams;
    p.vocabSize = vocab;
    p.warpK = warpK;
    return p;
}

inline TreePackParams treePackParams(const int32_t* beams, int64_t batch, int64_t numBeams, int64_t beamLen,
                                     int32_t* tokens, int32_t* len, int32_t* unpacker, int32_t* offsets,
                                     int32_t* mask) {
    TreePackParams p;
    p.beams = beams;
    p.batchSize = batch;
    p.numBeams = numBeams;
    p.beamLength = beamLen;
    p.packedTokens = tokens;
    p.packedLen = len;
    p.unpacker = unpacker;
    p.positionOffsets = offsets;
    p.packedMask = mask;
    return p;
}

inline AcceptParams acceptParams(const void* logits, DataType t, int64_t batch, int64_t numNodes, int64_t vocab,
                                 const int32_t* beams, const int32_t* unpacker, int64_t numBeams, int64_t beamLen,
                                 const int32_t* packedLen, const float* temperature, const int32_t* topK,
                                 const float* topP, const float* uniforms, int32_t* numAccepted, int32_t* bestBeam,
                                 int32_t* bonus, int32_t* acceptedIndices, int32_t* emitted) {
    AcceptParams p;
    p.logits = logits;
    p.logitsType = t;
    p.batchSize = batch;
    p.numNodes = numNodes;
    p.vocabSize = vocab;
    p.beams = beams;
    p.unpacker = unpacker;
    p.numBeams = numBeams;
    p.beamLength = beamLen;
    p.packedLen = packedLen;
    p.temperature = temperature;
    p.topK = topK;
    p.topP = topP;
    p.uniforms = uniforms;
    p.numAccepted = numAccepted;
    p.bestBeam = bestBeam;
    p.bonus = bonus;
    p.acceptedIndices = acceptedIndices;
    p.emitted = emitted;
    return p;
}

inline KvRelocateParams kvRelocateParams(void* cache, int64_t elemBytes, int64_t layers, int64_t numSlots,
                                         int64_t heads, int64_t maxSeq, int64_t headDim, const int32_t* slots,
                                         const int32_t* lengths, const int32_t* accepted, const int32_t* numAccepted,
                                         int64_t batch, int64_t beamLen, int32_t* newLengths) {
    KvRelocateParams p;
    p.cache = cache;
    p.elemBytes = elemBytes;
    p.numLayers = layers;
    p.numSlots = numSlots;
    p.numKvHeads = heads;
    p.maxSeqLen = maxSeq;
    p.headDim = headDim;
    p.slots = slots;
    p.cacheLengths = lengths;
    p.acceptedIndices = accepted;
    p.numAccepted = numAccepted;
    p.batchSize = batch;
    p.beamLength = beamLen;
    p.newLengths = newLengths;
    return p;
}

// The strided entry points: every layout argument is explicit (tokens_per_block >= 1; 0 would
// select the default layout in KvRelocateParams).
inline Status kvRelocateStridedParams(void* cache, int64_t cacheElems, int64_t elemBytes, int64_t layers,
                                      int64_t numSlots, int64_t heads, int64_t maxSeq, int64_t headDim,
                                      int64_t tokensPerBlock, int64_t strideSlot, int64_t strideBlock,
                                      int64_t strideToken, int64_t strideLayer, int64_t strideKv, int64_t strideHead,
                                      const int32_t* slots, const int32_t* lengths, const int32_t* accepted,
                                      const int32_t* numAccepted, int64_t batch, int64_t beamLen, int32_t* newLengths,
                                      KvRelocateParams* out) {
    if (tokensPerBlock < 1 || tokensPerBlock > kInt32Max)
        return Status::error(StatusCode::kInvalidArgument,
                             "kv relocate: tokens_per_block must be in [1, 2^31), got %lld", (long long)tokensPerBlock);
    if (cacheElems < 1)
        return Status::error(
            StatusCode::kInvalidArgument,
            "kv relocate: cache_elems (elements addressable from the cache pointer) must be >= 1, got %lld",
            (long long)cacheElems);
    KvRelocateParams p = kvRelocateParams(cache, elemBytes, layers, numSlots, heads, maxSeq, headDim, slots, lengths,
                                          accepted, numAccepted, batch, beamLen, newLengths);
    p.cacheElems = cacheElems;
    p.layout.tokensPerBlock = tokensPerBlock;
    p.layout.strideSlot = strideSlot;
    p.layout.strideBlock = strideBlock;
    p.layout.strideToken = strideToken;
    p.layout.strideLayer = strideLayer;
    p.layout.strideKv = strideKv;
    p.layout.strideHead = strideHead;
    *out = p;
    return Status::success();
}

}  // namespace capi
}  // namespace redrafter
