// Status -> C ABI return code + message, and the guards that keep C++ exceptions from crossing
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

// The entry point of an operator taking its params struct S by pointer (redrafter/c_api.h): a
// null pointer or a struct of another size (a binding built from other sources) is an error
// naming `op`; else fn(*params) runs behind guarded().
template <class S, class Fn>
int32_t guardedParams(const S* params, const char* op, char* msg, int64_t msgLen, Fn fn) {
    return guarded(msg, msgLen, [&]() -> Status {
        if (!params) return Status::error(StatusCode::kInvalidArgument, "%s: null params", op);
        if (params->struct_size != static_cast<int64_t>(sizeof(S)))
            return Status::error(StatusCode::kInvalidArgument,
                                 "%s: params struct of %lld bytes, this library expects %lld (rebuild the library "
                                 "or the binding)",
                                 op, static_cast<long long>(params->struct_size), static_cast<long long>(sizeof(S)));
        return fn(*params);
    });
}

}  // namespace capi
}  // namespace redrafter
