// The plugins' enqueue target: the cpp/ CUDA launchers (linked from libredrafter_cuda.so).
#include "redrafter_plugins/plugin_logic.h"

namespace redrafter {
namespace plugins {

Status launchCuda(const LaunchParams& p, CUstream_st* stream) {
    switch (p.kind) {
        case OpKind::kBeamSearch:
            return invokeBeamSearchStep(p.beamSearch, stream);
        case OpKind::kTreePack:
            return invokeTreePack(p.treePack, stream);
        case OpKind::kAccept:
            return invokeAccept(p.accept, stream);
    }
    return Status::error(StatusCode::kInvalidArgument, "unknown operator %d", static_cast<int32_t>(p.kind));
}

}  // namespace plugins
}  // namespace redrafter
