// CUDA in-place KV-cache relocation; layout and design in redrafter/kv_relocate.h. The row
// checks (kvCheckRow) and the index math (kvElemOffset) are the CPU reference's.
#include "device_utils.cuh"
#include "redrafter/kv_relocate.h"

namespace redrafter {
namespace {

constexpr int kThreads = 256;

// One thread per (row, layer, kv, head, vector of head_dim); loops k = 1..n ascending.
// p.layout is resolved (the launcher fills the default); offsets are kvElemOffset's.
template <class Vec>
__global__ void __launch_bounds__(kThreads) kvRelocateKernel(KvRelocateParams p, int64_t vecsPerRow, int64_t units) {
    __shared__ int32_t q[kMaxBeamLength];
    __shared__ int32_t rowError;
    const int32_t L = static_cast<int32_t>(p.beamLength);
    Vec* cache = static_cast<Vec*>(p.cache);
    const int64_t elemsPerVec = static_cast<int64_t>(sizeof(Vec)) / p.elemBytes;
    for (int64_t b = blockIdx.y; b < p.batchSize; b += gridDim.y) {
        for (int32_t i = threadIdx.x; i < L; i += blockDim.x) q[i] = p.acceptedIndices[b * L + i];
        __syncthreads();
        const int32_t slot = p.slots[b], len = p.cacheLengths[b], n = p.numAccepted[b];
        if (threadIdx.x == 0) rowError = kvCheckRow(slot, len, n, q, L, p.numSlots, p.maxSeqLen);
        __syncthreads();
        const bool ok = rowError == kKvRowOk;
        if (blockIdx.x == 0 && threadIdx.x == 0) p.newLengths[b] = ok ? len + n + 1 : -1;
        if (ok) {
            // units = layers*2*heads*vecsPerRow fits int32 (checkParams bounds the bytes per position).
            const int32_t vpr = static_cast<int32_t>(vecsPerRow), heads = static_cast<int32_t>(p.numKvHeads);
            for (int32_t u = blockIdx.x * blockDim.x + threadIdx.x; u < static_cast<int32_t>(units);
                 u += gridDim.x * blockDim.x) {
                const int32_t v = u % vpr;
                const int32_t rest = u / vpr;
                const int32_t head = rest % heads;
                const int32_t lk = rest / heads;  // layer * 2 + kv
                for (int32_t k = 1; k <= n; ++k) {
                    // every stride and the cache address are multiples of the vector (launcher)
                    const int64_t src = kvElemOffset(p.layout, lk >> 1, lk & 1, slot, head, len + q[k]);
                    const int64_t dst = kvElemOffset(p.layout, lk >> 1, lk & 1, slot, head, len + k);
                    if (src != dst) cache[dst / elemsPerVec + v] = cache[src / elemsPerVec + v];
                }
            }
        }
        __syncthreads();
    }
}

template <class Vec>
Status launch(const KvRelocateParams& p, cudaStream_t stream) {
    const int64_t rowBytes = p.headDim * p.elemBytes;
    const int64_t vecsPerRow = rowBytes / static_cast<int64_t>(sizeof(Vec));
    const int64_t units = p.numLayers * 2 * p.numKvHeads * vecsPerRow;
    const dim3 grid(static_cast<unsigned>(rdMin<int64_t>((units + kThreads - 1) / kThreads, 1 << 20)),
                    static_cast<unsigned>(rdMin<int64_t>(p.batchSize, 65535)));
    RD_LAUNCH(kvRelocateKernel<Vec>, grid, kThreads, 0, stream, p, vecsPerRow, units);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return Status::error(StatusCode::kCudaError, "kv relocate: kernel launch failed: %s", cudaGetErrorString(err));
    return Status::success();
}

}  // namespace

Status invokeKvRelocate(const KvRelocateParams& params, CUstream_st* stream) {
    RD_RETURN_IF_ERROR(params.checkParams());
    if (params.batchSize == 0) return Status::success();
    KvRelocateParams p = params;
    p.layout = params.resolvedLayout();
    // Widest vector that divides a head row, the cache's address and every stride (in bytes), so
    // each element offset of a row start is a whole number of vectors.
    const KvCacheLayout& l = p.layout;
    const uint64_t eb = static_cast<uint64_t>(p.elemBytes);
    const uint64_t align = reinterpret_cast<uintptr_t>(p.cache) | static_cast<uint64_t>(p.headDim) * eb |
                           static_cast<uint64_t>(l.strideSlot) * eb | static_cast<uint64_t>(l.strideBlock) * eb |
                           static_cast<uint64_t>(l.strideToken) * eb | static_cast<uint64_t>(l.strideLayer) * eb |
                           static_cast<uint64_t>(l.strideKv) * eb | static_cast<uint64_t>(l.strideHead) * eb;
    auto fits = [&](uint64_t w) { return align % w == 0 && w >= eb; };
    if (fits(16)) return launch<uint4>(p, stream);
    if (fits(8)) return launch<uint2>(p, stream);
    if (fits(4)) return launch<uint32_t>(p, stream);
    if (fits(2)) return launch<uint16_t>(p, stream);
    return launch<uint8_t>(p, stream);
}

}  // namespace redrafter
