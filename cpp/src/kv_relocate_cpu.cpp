// CPU reference of the in-place KV-cache relocation; see redrafter/kv_relocate.h.
#include <algorithm>
#include <cstring>
#include <vector>

#include "redrafter/kv_relocate.h"

namespace redrafter {

Status kvRelocateCpu(const KvRelocateParams& p) {
    RD_RETURN_IF_ERROR(p.checkParams());
    const int32_t L = static_cast<int32_t>(p.beamLength);
    static const char* const kReasons[] = {"ok",
                                           "slot outside [0, num_slots)",
                                           "negative cache length",
                                           "num_accepted outside [0, L)",
                                           "accepted indices q_1..q_n not strictly increasing from q_0 = 0",
                                           "cache_length + accepted index or new length exceeds max_seq"};
    for (int64_t b = 0; b < p.batchSize; ++b) {
        const int32_t err = kvCheckRow(p.slots[b], p.cacheLengths[b], p.numAccepted[b], p.acceptedIndices + b * L, L,
                                       p.numSlots, p.maxSeqLen);
        if (err != kKvRowOk)
            return Status::error(StatusCode::kInvalidData,
                                 "kv relocate: row %lld: %s (slot=%d cache_length=%d num_accepted=%d)", (long long)b,
                                 kReasons[err], p.slots[b], p.cacheLengths[b], p.numAccepted[b]);
    }
    std::vector<int32_t> used(p.slots, p.slots + p.batchSize);
    std::sort(used.begin(), used.end());
    if (std::adjacent_find(used.begin(), used.end()) != used.end())
        return Status::error(StatusCode::kInvalidData,
                             "kv relocate: two rows use the same cache slot %d; every row needs its own slot",
                             *std::adjacent_find(used.begin(), used.end()));

    // checkParams bounds every offset of the layout inside [0, cacheElems), so no write leaves the cache.
    const KvCacheLayout layout = p.resolvedLayout();
    const size_t rowBytes = static_cast<size_t>(p.headDim * p.elemBytes);
    char* cache = static_cast<char*>(p.cache);
    for (int64_t b = 0; b < p.batchSize; ++b) {
        const int32_t n = p.numAccepted[b], len = p.cacheLengths[b];
        const int32_t* q = p.acceptedIndices + b * L;
        for (int64_t layer = 0; layer < p.numLayers; ++layer) {
            for (int64_t kv = 0; kv < 2; ++kv) {
                for (int64_t h = 0; h < p.numKvHeads; ++h) {
                    for (int32_t k = 1; k <= n; ++k) {  // ascending: q_k >= k, so sources are intact
                        const int64_t src = kvElemOffset(layout, layer, kv, p.slots[b], h, len + q[k]);
                        const int64_t dst = kvElemOffset(layout, layer, kv, p.slots[b], h, len + k);
                        if (src != dst) std::memmove(cache + dst * p.elemBytes, cache + src * p.elemBytes, rowBytes);
                    }
                }
            }
        }
        p.newLengths[b] = len + n + 1;
    }
    return Status::success();
}

}  // namespace redrafter
