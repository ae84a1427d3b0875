// C ABI of the CPU references (libredrafter_cpu.so); see redrafter/c_api.h.
#include <vector>

#include "c_api_params.h"
#include "redrafter/c_api.h"
#include "redrafter/sampling.h"

using namespace redrafter;
using namespace redrafter::capi;

namespace {

Status drawTokens(const RedrafterDrawTokensParams& a) {
    DataType t;
    if (!dtypeFrom(a.dtype, &t)) return badDtype("draw tokens", a.dtype);
    const int64_t rows = a.rows, vocab = a.vocab;
    if (rows < 0 || rows > kInt32Max || vocab < 1 || vocab > kInt32Max)
        return Status::error(StatusCode::kInvalidArgument,
                             "draw tokens: need 0 <= rows < 2^31 and 1 <= vocab < 2^31, got rows=%lld vocab=%lld",
                             (long long)rows, (long long)vocab);
    int64_t total = 0;
    if (!checkedProduct({rows, vocab, 4}, INT64_MAX, &total))
        return Status::error(StatusCode::kOverflow, "draw tokens: rows*vocab bytes overflow int64");
    if (!a.logits || !a.temperature || !a.top_k || !a.top_p || !a.uniforms || !a.tokens)
        return Status::error(StatusCode::kInvalidArgument, "draw tokens: null pointer");
    std::vector<float> row(static_cast<size_t>(vocab));
    SamplingScratch scratch;
    for (int64_t r = 0; r < rows; ++r) {
        logitsToFloat(a.logits, t, r * vocab, vocab, row.data());
        a.tokens[r] = drawTokenCpu(row.data(), vocab, a.temperature[r], a.top_k[r], a.top_p[r], a.uniforms[r], scratch);
    }
    return Status::success();
}

}  // namespace

extern "C" {

int32_t redrafter_abi_version(void) { return REDRAFTER_ABI_VERSION; }

int32_t redrafter_beam_search_step_cpu(const RedrafterBeamSearchParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "beam search", msg, msg_len, [](const RedrafterBeamSearchParams& a) -> Status {
        BeamSearchParams p;
        RD_RETURN_IF_ERROR(beamSearchParams(a, &p));
        return beamSearchStepCpu(p);
    });
}

int32_t redrafter_tree_pack_cpu(const RedrafterTreePackParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "tree pack", msg, msg_len,
                         [](const RedrafterTreePackParams& a) { return treePackCpu(treePackParams(a)); });
}

int32_t redrafter_accept_cpu(const RedrafterAcceptParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "accept", msg, msg_len, [](const RedrafterAcceptParams& a) -> Status {
        AcceptParams p;
        RD_RETURN_IF_ERROR(acceptParams(a, &p));
        return acceptCpu(p);
    });
}

int32_t redrafter_kv_relocate_cpu(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "kv relocate", msg, msg_len,
                         [](const RedrafterKvRelocateParams& a) { return kvRelocateCpu(kvRelocateParams(a)); });
}

int32_t redrafter_kv_relocate_strided_cpu(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "kv relocate", msg, msg_len, [](const RedrafterKvRelocateParams& a) -> Status {
        KvRelocateParams p;
        RD_RETURN_IF_ERROR(kvRelocateStridedParams(a, &p));
        return kvRelocateCpu(p);
    });
}

int32_t redrafter_draw_tokens_cpu(const RedrafterDrawTokensParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "draw tokens", msg, msg_len, drawTokens);
}

}  // extern "C"
