// Target distributions and inverse-CDF draws (docs/design.md section 6), shared by the accept kernel and
// the CPU reference. The rules are those of redrafter_trt/ops/sampling.py:
//
//   temperature <= 0 (or NaN)  -> greedy: argmax, ties to the lowest token id (NaN is largest).
//   otherwise, in float64:  z = logit / temperature;
//   top-k (0 < k < V): keep every token with z >= the k-th largest z (boundary ties kept);
//   softmax;  top-p (p < 1): sort kept tokens by probability, descending, ties by lower id; keep
//   a token iff (inclusive running sum - its probability) < p, the first always; renormalise;
//   inverse CDF over token ids in id order: the smallest id whose inclusive cumulative
//   probability exceeds u * total, clamped to the last id with non-zero probability.
//
// The CPU reference (drawTokenCpu below) follows torch's operation order (exp(z - max), then
// times 1/sum; cumsum-based exclusive sums; renormalisation by division) so integer outputs
// agree with the PyTorch reference except when u * total lands within an ulp of a CDF step.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "redrafter/common.h"

namespace redrafter {

// ---- per-element logic shared by the kernel and the CPU reference -------------------------

RD_HD bool samplingIsGreedy(float temperature) {
    return !(temperature > 0.0f);
}

// Effective top-k: 0, negative or > V means off (= V).
RD_HD int64_t samplingTopK(int64_t topK, int64_t vocab) {
    return (topK <= 0 || topK > vocab) ? vocab : topK;
}

RD_HD bool samplingTopPActive(float topP) { return topP < 1.0f; }

RD_HD double samplingScaled(float logit, float temperature) {
    return static_cast<double>(logit) / static_cast<double>(temperature);
}

// top-k filter on scaled logits: masked iff z < kth (so NaN is kept, as torch's masked_fill).
RD_HD bool samplingTopKKeeps(double z, double kthZ) {
    return !(z < kthZ);
}

// top-p filter on one token of the descending order: `exclusive` = mass ranked before it.
RD_HD bool samplingTopPKeeps(double exclusive, double topP, bool first) {
    return first || exclusive < topP;
}

RD_HD double samplingCdfTarget(float uniform, double total) { return static_cast<double>(uniform) * total; }

// Is (a, ia) a better argmax than (b, ib)? NaN beats numbers; ties go to the lower id.
RD_HD bool argmaxBetter(float a, int64_t ia, float b, int64_t ib) {
    const bool an = a != a, bn = b != b;
    if (an != bn) return an;
    if (an || a == b) return ia < ib;
    return a > b;
}

// ---- CPU reference ------------------------------------------------------------------------

struct SamplingScratch {
    std::vector<double> z, p, tmp;
    std::vector<int32_t> order;
};

// One token from a row of `vocab` float32 logits (float16/bfloat16 rows are widened first,
// exactly). Always returns an id in [0, vocab).
inline int32_t drawTokenCpu(const float* x, int64_t vocab, float temperature, int64_t topK, float topP, float uniform,
                            SamplingScratch& s) {
    if (samplingIsGreedy(temperature)) {
        int64_t best = 0;
        for (int64_t i = 1; i < vocab; ++i) {
            if (argmaxBetter(x[i], i, x[best], best)) best = i;
        }
        return static_cast<int32_t>(best);
    }
    const size_t V = static_cast<size_t>(vocab);
    s.z.resize(V);
    s.p.resize(V);
    for (size_t i = 0; i < V; ++i) s.z[i] = samplingScaled(x[i], temperature);

    const int64_t k = samplingTopK(topK, vocab);
    if (k < vocab) {
        s.tmp = s.z;
        std::nth_element(s.tmp.begin(), s.tmp.begin() + (k - 1), s.tmp.end(),
                         [](double a, double b) { return orderedKey64(a) > orderedKey64(b); });
        const double kth = s.tmp[static_cast<size_t>(k - 1)];
        for (size_t i = 0; i < V; ++i) {
            if (!samplingTopKKeeps(s.z[i], kth)) s.z[i] = -std::numeric_limits<double>::infinity();
        }
    }
    // softmax as torch: m = max (NaN propagates), e = exp(z - m), p = e * (1 / sum e).
    double m = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < V; ++i) {
        if (std::isnan(s.z[i])) {
            m = s.z[i];
            break;
        }
        if (s.z[i] > m) m = s.z[i];
    }
    double sum = 0.0;
    for (size_t i = 0; i < V; ++i) {
        s.p[i] = std::exp(s.z[i] - m);
        sum += s.p[i];
    }
    const double inv = 1.0 / sum;
    for (size_t i = 0; i < V; ++i) s.p[i] *= inv;

    if (samplingTopPActive(topP)) {
        // Zero-probability tokens sort last and cannot change any kept probability: skip them.
        s.order.clear();
        for (size_t i = 0; i < V; ++i) {
            if (!(s.p[i] == 0.0)) s.order.push_back(static_cast<int32_t>(i));
        }
        std::stable_sort(s.order.begin(), s.order.end(),
                         [&](int32_t a, int32_t b) { return orderedKey64(s.p[a]) > orderedKey64(s.p[b]); });
        double running = 0.0;
        s.tmp.assign(V, 0.0);  // keep flags as 0/1
        for (size_t r = 0; r < s.order.size(); ++r) {
            const double pr = s.p[s.order[r]];
            running += pr;
            const double exclusive = running - pr;
            s.tmp[s.order[r]] = samplingTopPKeeps(exclusive, static_cast<double>(topP), r == 0) ? 1.0 : 0.0;
        }
        double kept = 0.0;
        for (size_t i = 0; i < V; ++i) {
            s.p[i] *= s.tmp[i];
            kept += s.p[i];
        }
        for (size_t i = 0; i < V; ++i) s.p[i] /= kept;
    }
    // Inverse CDF in id order.
    double total = 0.0;
    int64_t lastNonZero = 0;
    for (size_t i = 0; i < V; ++i) {
        total += s.p[i];
        if (s.p[i] > 0.0) lastNonZero = static_cast<int64_t>(i);
    }
    const double target = samplingCdfTarget(uniform, total);
    double cdf = 0.0;
    int64_t tok = vocab;
    for (size_t i = 0; i < V; ++i) {
        cdf += s.p[i];
        if (cdf > target) {
            tok = static_cast<int64_t>(i);
            break;
        }
    }
    return static_cast<int32_t>(std::min(tok, lastNonZero));
}

}  // namespace redrafter
