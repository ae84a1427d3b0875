// CPU reference of acceptance; see redrafter/accept.h and redrafter/sampling.h for the rules.
#include <vector>

#include "redrafter/accept.h"
#include "redrafter/sampling.h"

namespace redrafter {

Status acceptCpu(const AcceptParams& p) {
    RD_RETURN_IF_ERROR(p.checkParams());
    const int32_t W = static_cast<int32_t>(p.numBeams), L = static_cast<int32_t>(p.beamLength);
    const int64_t N = p.numNodes, V = p.vocabSize;
    // Data checks first: nothing is written unless every row is valid.
    for (int64_t b = 0; b < p.batchSize; ++b) {
        int64_t limit = N;
        if (p.packedLen) {
            const int32_t len = p.packedLen[b];
            if (len < 1 || len > N)
                return Status::error(StatusCode::kInvalidData, "accept: packed_len[%lld] = %d is outside [1, N=%lld]",
                                     (long long)b, len, (long long)N);
            limit = len;
        }
        for (int32_t i = 0; i < W * L; ++i) {
            const int32_t q = p.unpacker[b * W * L + i];
            if (q < 0 || q >= limit)
                return Status::error(StatusCode::kInvalidData,
                                     "accept: unpacker[%lld, %d, %d] = %d is outside [0, %lld) (packed length)",
                                     (long long)b, i / L, i % L, q, (long long)limit);
        }
    }
    std::vector<float> row(static_cast<size_t>(V));
    SamplingScratch scratch;
    for (int64_t b = 0; b < p.batchSize; ++b) {
        const float temperature = p.temperature[b], topP = p.topP[b];
        const int64_t topK = p.topK[b];
        auto draw = [&](int32_t node, int32_t depth) {
            logitsToFloat(p.logits, p.logitsType, (b * N + node) * V, V, row.data());
            return drawTokenCpu(row.data(), V, temperature, topK, topP, p.uniforms[b * L + depth], scratch);
        };
        acceptWalkRow(p.beams + b * W * L, p.unpacker + b * W * L, W, L, static_cast<int32_t>(N), draw,
                      p.acceptedIndices + b * L, p.emitted ? p.emitted + b * L : nullptr, p.numAccepted + b,
                      p.bestBeam + b, p.bonus + b);
    }
    return Status::success();
}

}  // namespace redrafter
