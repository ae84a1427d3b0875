// CPU reference of the beam-search step; see redrafter/beam_search.h for the rules.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "redrafter/beam_search.h"

namespace redrafter {
namespace {

// torch.amax semantics: NaN if any element is NaN.
float nanPropagatingMax(const float* x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) {
        if (std::isnan(x[i])) return x[i];
        if (x[i] > m) m = x[i];
    }
    return m;
}

}  // namespace

Status beamSearchStepCpu(const BeamSearchParams& p) {
    RD_RETURN_IF_ERROR(p.checkParams());
    const int64_t B = p.batchSize, W = p.numBeams, V = p.vocabSize;
    const bool warpOn = warpEnabled(p.warpK, V);
    std::vector<float> x(static_cast<size_t>(V)), tmp;
    std::vector<uint64_t> keys(static_cast<size_t>(V));
    std::vector<uint64_t> cand(static_cast<size_t>(W * W));
    const auto byKeyDesc = [](float a, float b) { return orderedKey(a) > orderedKey(b); };

    for (int64_t b = 0; b < B; ++b) {
        for (int64_t w = 0; w < W; ++w) {
            const int64_t row = b * W + w;
            logitsToFloat(p.logits, p.logitsType, row * V, V, x.data());
            const float m = nanPropagatingMax(x.data(), V);
            for (int64_t i = 0; i < V; ++i) x[i] = x[i] - m;
            float kth = 0.0f;
            if (warpOn) {
                tmp = x;
                std::nth_element(tmp.begin(), tmp.begin() + (p.warpK - 1), tmp.end(), byKeyDesc);
                kth = tmp[static_cast<size_t>(p.warpK - 1)];
            }
            for (int64_t i = 0; i < V; ++i) x[i] = warpedLogit(x[i], kth, warpOn);
            const float wmax = nanPropagatingMax(x.data(), V);
            double sum = 0.0;
            for (int64_t i = 0; i < V; ++i) sum += static_cast<double>(std::exp(x[i] - wmax));
            const float logSum = static_cast<float>(std::log(sum));
            const float bs = p.beamScores[row];
            for (int64_t i = 0; i < V; ++i) {
                keys[i] = rankKey(candidateScore(bs, x[i], wmax, logSum), static_cast<uint32_t>(w * V + i));
            }
            // The beam's own top W (stage 1 of the kernel), in any order.
            std::nth_element(keys.begin(), keys.begin() + (W - 1), keys.end(), std::greater<uint64_t>());
            std::copy(keys.begin(), keys.begin() + W, cand.begin() + w * W);
        }
        // Top W of the W*W union, best first (stage 2).
        std::partial_sort(cand.begin(), cand.begin() + W, cand.end(), std::greater<uint64_t>());
        for (int64_t j = 0; j < W; ++j) {
            const uint32_t flat = rankKeyIndex(cand[j]);
            p.newScores[b * W + j] = rankKeyValue(cand[j]);
            p.parent[b * W + j] = static_cast<int32_t>(flat / V);
            p.token[b * W + j] = mappedToken(p.vocabMap, static_cast<uint32_t>(flat % V));
        }
    }
    return Status::success();
}

}  // namespace redrafter
