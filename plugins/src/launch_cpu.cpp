// The CPU-test enqueue target: the cpp/ C++ CPU references (linked from libredrafter_cpu.so).
#include "redrafter_plugins/plugin_logic.h"

namespace redrafter {
namespace plugins {

Status launchCpu(const LaunchParams& p) {
    switch (p.kind) {
        case OpKind::kBeamSearch:
            return beamSearchStepCpu(p.beamSearch);
        case OpKind::kTreePack:
            return treePackCpu(p.treePack);
        case OpKind::kAccept:
            return acceptCpu(p.accept);
    }
    return Status::error(StatusCode::kInvalidArgument, "unknown operator %d", static_cast<int32_t>(p.kind));
}

}  // namespace plugins
}  // namespace redrafter
