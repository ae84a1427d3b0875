// Status -> C ABI return code + message, and the guard that keeps C++ exceptions from crossing
// a C ABI. Shared by the operators' C ABI (cpp/src) and the plugins' logic C ABI (plugins/src).
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>

#include "redrafter/common.h"

namespace redrafter {
namespace capi {

// Writes the status message (or "ok") into the caller's buffer; returns the status code.
inline int32_t finish(const Status& s, char* msg, int64_t msgLen) {
    if (msg && msgLen > 0) {
        std::strncpy(msg, s.ok() ? "ok" : s.message, static_cast<size_t>(msgLen) - 1);
        msg[msgLen - 1] = '\0';
    }
    return static_cast<int32_t>(s.code);
}

// Runs `fn` (returning Status); no C++ exception crosses the C ABI.
template <class Fn>
int32_t guarded(char* msg, int64_t msgLen, Fn fn) {
    try {
        return finish(fn(), msg, msgLen);
    } catch (const std::exception& e) {
        return finish(Status::error(StatusCode::kInvalidArgument, "internal error: %s", e.what()), msg, msgLen);
    } catch (...) { return finish(Status::error(StatusCode::kInvalidArgument, "internal error"), msg, msgLen); }
}

}  // namespace capi
}  // namespace redrafter
