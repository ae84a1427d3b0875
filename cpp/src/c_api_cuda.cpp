// C ABI of the CUDA launchers (libredrafter_cuda.so); see redrafter/c_api.h. Device pointers,
// the stream as void* (a cudaStream_t) in the params struct, and the same Params validation as
// the CPU entry points.
#include "c_api_params.h"
#include "redrafter/c_api.h"

using namespace redrafter;
using namespace redrafter::capi;

extern "C" {

int32_t redrafter_cuda_abi_version(void) { return REDRAFTER_ABI_VERSION; }

size_t redrafter_beam_search_workspace_bytes(const RedrafterBeamSearchParams* params) {
    if (!params || params->struct_size != static_cast<int64_t>(sizeof(RedrafterBeamSearchParams))) return 0;
    return beamSearchWorkspaceBytes(params->batch, params->num_beams, params->vocab, params->warp_k);
}

size_t redrafter_accept_workspace_bytes(const RedrafterAcceptParams* params) {
    if (!params || params->struct_size != static_cast<int64_t>(sizeof(RedrafterAcceptParams))) return 0;
    return acceptWorkspaceBytes(params->batch, params->num_nodes);
}

int32_t redrafter_beam_search_step_cuda(const RedrafterBeamSearchParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "beam search", msg, msg_len, [](const RedrafterBeamSearchParams& a) -> Status {
        BeamSearchParams p;
        RD_RETURN_IF_ERROR(beamSearchParams(a, &p));
        return invokeBeamSearchStep(p, static_cast<CUstream_st*>(a.stream));
    });
}

int32_t redrafter_tree_pack_cuda(const RedrafterTreePackParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "tree pack", msg, msg_len, [](const RedrafterTreePackParams& a) {
        return invokeTreePack(treePackParams(a), static_cast<CUstream_st*>(a.stream));
    });
}

int32_t redrafter_accept_cuda(const RedrafterAcceptParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "accept", msg, msg_len, [](const RedrafterAcceptParams& a) -> Status {
        AcceptParams p;
        RD_RETURN_IF_ERROR(acceptParams(a, &p));
        return invokeAccept(p, static_cast<CUstream_st*>(a.stream));
    });
}

int32_t redrafter_kv_relocate_cuda(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "kv relocate", msg, msg_len, [](const RedrafterKvRelocateParams& a) {
        return invokeKvRelocate(kvRelocateParams(a), static_cast<CUstream_st*>(a.stream));
    });
}

int32_t redrafter_kv_relocate_strided_cuda(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len) {
    return guardedParams(params, "kv relocate", msg, msg_len, [](const RedrafterKvRelocateParams& a) -> Status {
        KvRelocateParams p;
        RD_RETURN_IF_ERROR(kvRelocateStridedParams(a, &p));
        return invokeKvRelocate(p, static_cast<CUstream_st*>(a.stream));
    });
}

}  // extern "C"
