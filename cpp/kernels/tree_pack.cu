// CUDA tree packing; layout and design in redrafter/tree_pack.h. The per-node logic
// (treeCommonPrefix, treeFirstUnshared, treeOwner, treePackedIndex, treeMaskWord) is the one the
// CPU reference runs.
#include "device_utils.cuh"
#include "redrafter/tree_pack.h"

namespace redrafter {
namespace {

constexpr int kThreads = 256;

// Dynamic shared memory: beams [N] int32, unpacker [N] int32, node of packed index [N] int16,
// lcp [W*W] uint8, first [W] int32, base [W+1] int32.
inline size_t treeSharedBytes(int32_t W, int32_t L) {
    const size_t n = static_cast<size_t>(W) * L;
    return n * 4 * 2 + ((n * 2 + 3) & ~size_t(3)) + ((static_cast<size_t>(W) * W + 3) & ~size_t(3)) + 4 * (2 * W + 1);
}

__global__ void __launch_bounds__(kThreads) treePackKernel(TreePackParams p) {
    RD_DYNAMIC_SHARED(int32_t, smem);
    const int32_t W = static_cast<int32_t>(p.numBeams), L = static_cast<int32_t>(p.beamLength);
    const int32_t N = W * L;
    const int32_t words = static_cast<int32_t>(maskWords(N));
    int32_t* beams = smem;
    int32_t* unpacker = beams + N;
    int16_t* node = reinterpret_cast<int16_t*>(unpacker + N);
    uint8_t* lcp = reinterpret_cast<uint8_t*>(node) + ((N * 2 + 3) & ~3);
    int32_t* first = reinterpret_cast<int32_t*>(lcp + ((W * W + 3) & ~3));
    int32_t* base = first + W;

    for (int64_t b = blockIdx.x; b < p.batchSize; b += gridDim.x) {
        for (int32_t i = threadIdx.x; i < N; i += blockDim.x) beams[i] = p.beams[b * N + i];
        __syncthreads();
        for (int32_t i = threadIdx.x; i < W * W; i += blockDim.x) {
            const int32_t o = i / W, w = i % W;
            lcp[i] = static_cast<uint8_t>(treeCommonPrefix(beams + o * L, beams + w * L, L));
        }
        __syncthreads();
        for (int32_t w = threadIdx.x; w < W; w += blockDim.x) first[w] = treeFirstUnshared(lcp, W, w);
        __syncthreads();
        if (threadIdx.x == 0) {
            base[0] = 0;
            for (int32_t w = 0; w < W; ++w) base[w + 1] = base[w] + (L - first[w]);
            p.packedLen[b] = base[W];
        }
        __syncthreads();
        const int32_t P = base[W];
        int32_t* tokens = p.packedTokens + b * N;
        int32_t* offsets = p.positionOffsets + b * N;
        for (int32_t i = threadIdx.x; i < N; i += blockDim.x) {
            const int32_t w = i / L, d = i % L;
            const int32_t owner = treeOwner(lcp, W, w, d);
            const int32_t idx = treePackedIndex(first, base, owner, d);
            unpacker[i] = idx;
            p.unpacker[b * N + i] = idx;
            if (owner == w) {
                node[idx] = static_cast<int16_t>(i);
                tokens[idx] = beams[i];
                offsets[idx] = d;
            }
            if (i >= P) {  // padding
                tokens[i] = kPadToken;
                offsets[i] = 0;
            }
        }
        __syncthreads();
        int32_t* mask = p.packedMask + b * static_cast<int64_t>(N) * words;
        for (int32_t t = threadIdx.x; t < N * words; t += blockDim.x) {
            const int32_t i = t / words, j = t % words;
            uint32_t bits = 0;
            if (i < P) {
                const int32_t nd = node[i];
                bits = treeMaskWord(unpacker + (nd / L) * L, nd % L, j);
            }
            mask[t] = static_cast<int32_t>(bits);
        }
        __syncthreads();
    }
}

}  // namespace

Status invokeTreePack(const TreePackParams& p, CUstream_st* stream) {
    RD_RETURN_IF_ERROR(p.checkParams());
    if (p.batchSize == 0) return Status::success();
    const int32_t W = static_cast<int32_t>(p.numBeams), L = static_cast<int32_t>(p.beamLength);
    const size_t smem = treeSharedBytes(W, L);  // <= 45 KB for W = L = 64
    const unsigned grid = static_cast<unsigned>(rdMin<int64_t>(p.batchSize, 1 << 30));
    RD_LAUNCH(treePackKernel, grid, kThreads, smem, stream, p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return Status::error(StatusCode::kCudaError, "tree pack: kernel launch failed: %s", cudaGetErrorString(err));
    return Status::success();
}

}  // namespace redrafter
