// CPU reference of tree packing; see redrafter/tree_pack.h for the layout.
#include <vector>

#include "redrafter/tree_pack.h"

namespace redrafter {

Status treePackCpu(const TreePackParams& p) {
    RD_RETURN_IF_ERROR(p.checkParams());
    const int32_t W = static_cast<int32_t>(p.numBeams), L = static_cast<int32_t>(p.beamLength);
    const int32_t N = W * L;
    const int32_t words = static_cast<int32_t>(maskWords(N));
    std::vector<uint8_t> lcp(static_cast<size_t>(W * W));
    std::vector<int32_t> first(W), base(W + 1), node(N);  // node: packed index -> w * L + d

    for (int64_t b = 0; b < p.batchSize; ++b) {
        const int32_t* beams = p.beams + b * N;
        int32_t* unpacker = p.unpacker + b * N;
        for (int32_t o = 0; o < W; ++o) {
            for (int32_t w = 0; w < W; ++w) {
                lcp[o * W + w] = static_cast<uint8_t>(treeCommonPrefix(beams + o * L, beams + w * L, L));
            }
        }
        base[0] = 0;
        for (int32_t w = 0; w < W; ++w) {
            first[w] = treeFirstUnshared(lcp.data(), W, w);
            base[w + 1] = base[w] + (L - first[w]);
        }
        const int32_t P = base[W];
        p.packedLen[b] = P;
        int32_t* tokens = p.packedTokens + b * N;
        int32_t* offsets = p.positionOffsets + b * N;
        for (int32_t i = 0; i < N; ++i) {
            tokens[i] = kPadToken;
            offsets[i] = 0;
        }
        for (int32_t w = 0; w < W; ++w) {
            for (int32_t d = 0; d < L; ++d) {
                const int32_t owner = treeOwner(lcp.data(), W, w, d);
                const int32_t idx = treePackedIndex(first.data(), base.data(), owner, d);
                unpacker[w * L + d] = idx;
                if (owner == w) {
                    tokens[idx] = beams[w * L + d];
                    offsets[idx] = d;
                    node[idx] = w * L + d;
                }
            }
        }
        int32_t* mask = p.packedMask + b * static_cast<int64_t>(N) * words;
        for (int32_t i = 0; i < N; ++i) {
            for (int32_t j = 0; j < words; ++j) {
                uint32_t bits = 0;
                if (i < P) bits = treeMaskWord(unpacker + (node[i] / L) * L, node[i] % L, j);
                mask[i * words + j] = static_cast<int32_t>(bits);
            }
        }
    }
    return Status::success();
}

}  // namespace redrafter
