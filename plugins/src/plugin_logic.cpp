// Fields, shapes, types, workspace and launch parameters of the ReDrafter plugins (no TensorRT).
#include "redrafter_plugins/plugin_logic.h"

#include <cstring>

namespace redrafter {
namespace plugins {
namespace {

constexpr OpInfo kOps[kNumOps] = {
    {"RedrafterBeamSearchStep",
     2,
     {"num_beams", "warp_k"},
     3,
     3,
     {"logits", "beam_scores", "vocab_map", "new_scores", "parent", "token"}},
    {"RedrafterTreePack",
     2,
     {"num_beams", "beam_len"},
     1,
     5,
     {"beams", "packed_tokens", "packed_len", "unpacker", "position_offsets", "packed_mask"}},
    {"RedrafterAccept",
     2,
     {"num_beams", "beam_len"},
     8,
     5,
     {"logits", "beams", "unpacker", "packed_len", "temperature", "top_k", "top_p", "uniforms", "num_accepted",
      "best_beam", "bonus", "accepted_indices", "emitted"}},
};

DimRule copyDim(int32_t input, int32_t dim) { return DimRule{input, dim, 0}; }
DimRule constDim(int64_t value) { return DimRule{-1, 0, value}; }

OutputRule rule(std::initializer_list<DimRule> dims) {
    OutputRule r;
    for (const DimRule& d : dims) r.d[r.nbDims++] = d;
    return r;
}

// Expected input ranks and the dims each input must agree on: (input, dim) == value or == the
// batch dim of input 0 (value -2), or free (value -1).
struct DimCheck {
    int32_t input, dim;
    int64_t value;  // >= 0: this constant; -2: equal to inputs[0].d[0] (the batch); -1: any >= 1
    const char* what;
};
constexpr int64_t kBatch = -2, kAny = -1;

bool isFloatLogits(TensorType t) {
    return t == TensorType::kFloat32 || t == TensorType::kFloat16 || t == TensorType::kBFloat16;
}

// The fixed type of position `pos`, or false for the logits (any float type).
bool fixedType(OpKind kind, int32_t pos, TensorType* t) {
    switch (kind) {
        case OpKind::kBeamSearch: {
            static constexpr TensorType types[] = {TensorType::kFloat32, TensorType::kFloat32, TensorType::kInt32,
                                                   TensorType::kFloat32, TensorType::kInt32,   TensorType::kInt32};
            if (pos == 0) return false;
            *t = types[pos];
            return true;
        }
        case OpKind::kTreePack:
            *t = TensorType::kInt32;
            return true;
        case OpKind::kAccept: {
            static constexpr TensorType types[] = {TensorType::kFloat32, TensorType::kInt32,   TensorType::kInt32,
                                                   TensorType::kInt32,   TensorType::kFloat32, TensorType::kInt32,
                                                   TensorType::kFloat32, TensorType::kFloat32, TensorType::kInt32,
                                                   TensorType::kInt32,   TensorType::kInt32,   TensorType::kInt32,
                                                   TensorType::kInt32};
            if (pos == 0) return false;
            *t = types[pos];
            return true;
        }
    }
    return false;
}

}  // namespace

const char* tensorTypeName(TensorType t) {
    switch (t) {
        case TensorType::kFloat32:
            return "float32";
        case TensorType::kFloat16:
            return "float16";
        case TensorType::kInt32:
            return "int32";
        case TensorType::kBFloat16:
            return "bfloat16";
    }
    return "unsupported";
}

bool logitsDataType(TensorType t, DataType* out) {
    switch (t) {
        case TensorType::kFloat32:
            *out = DataType::kFloat32;
            return true;
        case TensorType::kFloat16:
            *out = DataType::kFloat16;
            return true;
        case TensorType::kBFloat16:
            *out = DataType::kBFloat16;
            return true;
        default:
            return false;
    }
}

bool opKindValid(int32_t kind) { return kind >= 0 && kind < kNumOps; }
const OpInfo& opInfo(OpKind kind) { return kOps[static_cast<int32_t>(kind)]; }

// ---- fields ------------------------------------------------------------------------------------

Status checkFields(const PluginFields& f) {
    const char* name = opInfo(f.kind).pluginName;
    if (f.numBeams() < 1 || f.numBeams() > kMaxBeams)
        return Status::error(StatusCode::kInvalidArgument, "%s: field num_beams must be in [1, %lld], got %d", name,
                             (long long)kMaxBeams, f.numBeams());
    if (f.kind == OpKind::kBeamSearch) {
        if (f.warpK() < 0)
            return Status::error(StatusCode::kInvalidArgument, "%s: field warp_k must be >= 0 (0 = off), got %d", name,
                                 f.warpK());
    } else if (f.beamLength() < 1 || f.beamLength() > kMaxBeamLength) {
        return Status::error(StatusCode::kInvalidArgument,
                             "%s: field beam_len (L = D + 1) must be in [1, %lld], got %d", name,
                             (long long)kMaxBeamLength, f.beamLength());
    }
    return Status::success();
}

Status parseFields(OpKind kind, const FieldView* fields, int32_t nbFields, PluginFields* out) {
    const OpInfo& op = opInfo(kind);
    if (nbFields < 0 || (nbFields > 0 && fields == nullptr))
        return Status::error(StatusCode::kInvalidArgument, "%s: bad field list (%d fields at %p)", op.pluginName,
                             nbFields, (const void*)fields);
    PluginFields f;
    f.kind = kind;
    bool seen[kMaxFields] = {};
    for (int32_t i = 0; i < nbFields; ++i) {
        const FieldView& v = fields[i];
        if (v.name == nullptr)
            return Status::error(StatusCode::kInvalidArgument, "%s: field %d has no name", op.pluginName, i);
        int32_t slot = -1;
        for (int32_t j = 0; j < op.nbFields; ++j) {
            if (std::strcmp(v.name, op.fieldNames[j]) == 0) slot = j;
        }
        if (slot < 0)
            return Status::error(StatusCode::kInvalidArgument, "%s: unknown field '%.64s' (expected %s, %s)",
                                 op.pluginName, v.name, op.fieldNames[0], op.fieldNames[1]);
        if (seen[slot])
            return Status::error(StatusCode::kInvalidArgument, "%s: field %s given twice", op.pluginName, v.name);
        if (v.type != kFieldInt32 || v.length != 1 || v.data == nullptr)
            return Status::error(StatusCode::kInvalidArgument,
                                 "%s: field %s must be one int32 (PluginFieldType::kINT32, length 1), got type %d, "
                                 "length %d, data %p",
                                 op.pluginName, v.name, v.type, v.length, v.data);
        std::memcpy(&f.values[slot], v.data, sizeof(int32_t));
        seen[slot] = true;
    }
    for (int32_t j = 0; j < op.nbFields; ++j) {
        if (!seen[j])
            return Status::error(StatusCode::kInvalidArgument, "%s: missing field %s", op.pluginName, op.fieldNames[j]);
    }
    RD_RETURN_IF_ERROR(checkFields(f));
    *out = f;
    return Status::success();
}

int32_t serializeFields(const PluginFields& f, FieldView* out, int32_t capacity) {
    const OpInfo& op = opInfo(f.kind);
    if (capacity < op.nbFields) return -1;
    for (int32_t j = 0; j < op.nbFields; ++j) { out[j] = FieldView{op.fieldNames[j], &f.values[j], kFieldInt32, 1}; }
    return op.nbFields;
}

// ---- shapes ------------------------------------------------------------------------------------

Status checkInputShapes(const PluginFields& f, const ShapeDims* in, int32_t nbInputs) {
    const OpInfo& op = opInfo(f.kind);
    if (nbInputs != op.nbInputs || in == nullptr)
        return Status::error(StatusCode::kInvalidArgument, "%s: expected %d inputs, got %d", op.pluginName, op.nbInputs,
                             nbInputs);
    const int64_t W = f.numBeams(), L = f.beamLength();
    static const int32_t kRanks[kNumOps][8] = {{3, 2, 1}, {3}, {3, 3, 3, 1, 1, 1, 1, 2}};
    for (int32_t i = 0; i < nbInputs; ++i) {
        const int32_t want = kRanks[static_cast<int32_t>(f.kind)][i];
        if (in[i].nbDims != want)
            return Status::error(StatusCode::kInvalidArgument, "%s: input %s must have rank %d, got %d", op.pluginName,
                                 op.ioNames[i], want, in[i].nbDims);
    }
    DimCheck checks[16];
    int32_t n = 0;
    switch (f.kind) {
        case OpKind::kBeamSearch:
            checks[n++] = {0, 1, W, "logits dim 1 (W)"};
            checks[n++] = {0, 2, W, "logits dim 2 (V >= W)"};  // lower bound, handled below
            checks[n++] = {1, 0, kBatch, "beam_scores dim 0 (B)"};
            checks[n++] = {1, 1, W, "beam_scores dim 1 (W)"};
            break;
        case OpKind::kTreePack:
            checks[n++] = {0, 1, W, "beams dim 1 (W)"};
            checks[n++] = {0, 2, L, "beams dim 2 (L)"};
            break;
        case OpKind::kAccept:
            checks[n++] = {0, 1, kAny, "logits dim 1 (nodes)"};
            checks[n++] = {0, 2, kAny, "logits dim 2 (V)"};
            for (int32_t i = 1; i <= 2; ++i) {
                checks[n++] = {i, 0, kBatch, i == 1 ? "beams dim 0 (B)" : "unpacker dim 0 (B)"};
                checks[n++] = {i, 1, W, i == 1 ? "beams dim 1 (W)" : "unpacker dim 1 (W)"};
                checks[n++] = {i, 2, L, i == 1 ? "beams dim 2 (L)" : "unpacker dim 2 (L)"};
            }
            checks[n++] = {3, 0, kBatch, "packed_len dim 0 (B)"};
            checks[n++] = {4, 0, kBatch, "temperature dim 0 (B)"};
            checks[n++] = {5, 0, kBatch, "top_k dim 0 (B)"};
            checks[n++] = {6, 0, kBatch, "top_p dim 0 (B)"};
            checks[n++] = {7, 0, kBatch, "uniforms dim 0 (B)"};
            checks[n++] = {7, 1, L, "uniforms dim 1 (L)"};
            break;
    }
    const int64_t batch = in[0].d[0];
    for (int32_t c = 0; c < n; ++c) {
        const DimCheck& k = checks[c];
        const int64_t got = in[k.input].d[k.dim];
        if (got < 0) continue;  // dynamic: checked again at enqueue
        const bool vocabBound = f.kind == OpKind::kBeamSearch && k.input == 0 && k.dim == 2;
        bool ok = true;
        if (vocabBound)
            ok = got >= W;
        else if (k.value == kBatch)
            ok = batch < 0 || got == batch;
        else if (k.value == kAny)
            ok = got >= 1;
        else
            ok = got == k.value;
        if (!ok) {
            const long long want = k.value == kBatch ? (long long)batch : k.value == kAny ? 1LL : (long long)k.value;
            return Status::error(StatusCode::kInvalidArgument,
                                 "%s: %s is %lld, expected %s%lld (fields num_beams=%d, %s=%d)", op.pluginName, k.what,
                                 (long long)got, (vocabBound || k.value == kAny) ? ">= " : "", want, f.numBeams(),
                                 op.fieldNames[1], f.values[1]);
        }
    }
    if (f.kind == OpKind::kBeamSearch && in[0].d[2] >= 0 && in[2].d[0] >= 0 && in[2].d[0] != in[0].d[2])
        return Status::error(StatusCode::kInvalidArgument,
                             "%s: vocab_map dim 0 is %lld, expected logits dim 2 (the head's draft vocabulary K) %lld",
                             op.pluginName, (long long)in[2].d[0], (long long)in[0].d[2]);
    if (batch > kInt32Max)
        return Status::error(StatusCode::kOverflow, "%s: batch %lld exceeds int32", op.pluginName, (long long)batch);
    return Status::success();
}

OutputRule outputRule(const PluginFields& f, int32_t index) {
    const int64_t W = f.numBeams(), L = f.beamLength(), N = W * L;
    switch (f.kind) {
        case OpKind::kBeamSearch:
            return rule({copyDim(0, 0), constDim(W)});
        case OpKind::kTreePack:
            switch (index) {
                case 0:
                    return rule({copyDim(0, 0), constDim(N)});
                case 1:
                    return rule({copyDim(0, 0)});
                case 2:
                    return rule({copyDim(0, 0), constDim(W), constDim(L)});
                case 3:
                    return rule({copyDim(0, 0), constDim(N)});
                default:
                    return rule({copyDim(0, 0), constDim(N), constDim(maskWords(N))});
            }
        case OpKind::kAccept:
            return index <= 2 ? rule({copyDim(0, 0)}) : rule({copyDim(0, 0), constDim(L)});
    }
    return OutputRule{};
}

Status inferOutputShapes(const PluginFields& f, const ShapeDims* in, int32_t nbInputs, ShapeDims* out,
                         int32_t nbOutputs) {
    const OpInfo& op = opInfo(f.kind);
    RD_RETURN_IF_ERROR(checkInputShapes(f, in, nbInputs));
    if (nbOutputs != op.nbOutputs || out == nullptr)
        return Status::error(StatusCode::kInvalidArgument, "%s: expected %d outputs, got %d", op.pluginName,
                             op.nbOutputs, nbOutputs);
    for (int32_t o = 0; o < nbOutputs; ++o) {
        const OutputRule r = outputRule(f, o);
        out[o].nbDims = r.nbDims;
        for (int32_t d = 0; d < r.nbDims; ++d) {
            out[o].d[d] = r.d[d].input >= 0 ? in[r.d[d].input].d[r.d[d].dim] : r.d[d].value;
        }
    }
    return Status::success();
}

// ---- types -------------------------------------------------------------------------------------

bool supportsType(const PluginFields& f, int32_t pos, const TensorType* types, int32_t nbTypes) {
    const OpInfo& op = opInfo(f.kind);
    if (pos < 0 || pos >= op.nbInputs + op.nbOutputs || types == nullptr || nbTypes <= pos) return false;
    TensorType want;
    if (!fixedType(f.kind, pos, &want)) return isFloatLogits(types[pos]);
    return types[pos] == want;
}

Status outputTypes(const PluginFields& f, const TensorType* inputTypes, int32_t nbInputs, TensorType* outTypes,
                   int32_t nbOutputs) {
    const OpInfo& op = opInfo(f.kind);
    if (nbInputs != op.nbInputs || nbOutputs != op.nbOutputs || inputTypes == nullptr || outTypes == nullptr)
        return Status::error(StatusCode::kInvalidArgument, "%s: expected %d inputs and %d outputs, got %d and %d",
                             op.pluginName, op.nbInputs, op.nbOutputs, nbInputs, nbOutputs);
    for (int32_t i = 0; i < nbInputs; ++i) {
        if (!supportsType(f, i, inputTypes, nbInputs))
            return Status::error(StatusCode::kInvalidArgument,
                                 "%s: input %s has type %s (%d), which it does not accept", op.pluginName,
                                 op.ioNames[i], tensorTypeName(inputTypes[i]), static_cast<int32_t>(inputTypes[i]));
    }
    for (int32_t o = 0; o < nbOutputs; ++o) fixedType(f.kind, nbInputs + o, &outTypes[o]);
    return Status::success();
}

size_t workspaceBytes(const PluginFields& f, const ShapeDims* maxIn, int32_t nbInputs) {
    if (maxIn == nullptr || nbInputs != opInfo(f.kind).nbInputs) return 0;
    switch (f.kind) {
        case OpKind::kBeamSearch:
            return beamSearchWorkspaceBytes(maxIn[0].d[0], f.numBeams(), maxIn[0].d[2], f.warpK());
        case OpKind::kAccept:
            return acceptWorkspaceBytes(maxIn[0].d[0], maxIn[0].d[1]);
        case OpKind::kTreePack:
            return 0;
    }
    return 0;
}

// ---- launch ------------------------------------------------------------------------------------

Status makeLaunchParams(const PluginFields& f, const ShapeDims* in, const TensorType* inTypes, int32_t nbInputs,
                        const void* const* inputs, void* const* outputs, void* workspace, size_t wsBytes,
                        LaunchParams* out) {
    const OpInfo& op = opInfo(f.kind);
    RD_RETURN_IF_ERROR(checkFields(f));
    RD_RETURN_IF_ERROR(checkInputShapes(f, in, nbInputs));
    for (int32_t i = 0; i < nbInputs; ++i) {
        for (int32_t d = 0; d < in[i].nbDims; ++d) {
            if (in[i].d[d] < 0)
                return Status::error(StatusCode::kInvalidArgument, "%s: input %s dim %d is unknown (%lld) at launch",
                                     op.pluginName, op.ioNames[i], d, (long long)in[i].d[d]);
        }
    }
    TensorType outT[kMaxIO];
    RD_RETURN_IF_ERROR(outputTypes(f, inTypes, nbInputs, outT, op.nbOutputs));
    if (inputs == nullptr || outputs == nullptr)
        return Status::error(StatusCode::kInvalidArgument, "%s: null input or output pointer array", op.pluginName);
    LaunchParams lp;
    lp.kind = f.kind;
    const int64_t B = in[0].d[0];
    switch (f.kind) {
        case OpKind::kBeamSearch: {
            BeamSearchParams& p = lp.beamSearch;
            logitsDataType(inTypes[0], &p.logitsType);
            p.logits = inputs[0];
            p.beamScores = static_cast<const float*>(inputs[1]);
            p.vocabMap = static_cast<const int32_t*>(inputs[2]);
            p.newScores = static_cast<float*>(outputs[0]);
            p.parent = static_cast<int32_t*>(outputs[1]);
            p.token = static_cast<int32_t*>(outputs[2]);
            p.batchSize = B;
            p.numBeams = f.numBeams();
            p.vocabSize = in[0].d[2];
            p.warpK = f.warpK();
            p.workspace = workspace;
            p.workspaceBytes = wsBytes;
            RD_RETURN_IF_ERROR(p.checkParams());
            break;
        }
        case OpKind::kTreePack: {
            TreePackParams& p = lp.treePack;
            p.beams = static_cast<const int32_t*>(inputs[0]);
            p.packedTokens = static_cast<int32_t*>(outputs[0]);
            p.packedLen = static_cast<int32_t*>(outputs[1]);
            p.unpacker = static_cast<int32_t*>(outputs[2]);
            p.positionOffsets = static_cast<int32_t*>(outputs[3]);
            p.packedMask = static_cast<int32_t*>(outputs[4]);
            p.batchSize = B;
            p.numBeams = f.numBeams();
            p.beamLength = f.beamLength();
            RD_RETURN_IF_ERROR(p.checkParams());
            break;
        }
        case OpKind::kAccept: {
            AcceptParams& p = lp.accept;
            logitsDataType(inTypes[0], &p.logitsType);
            p.logits = inputs[0];
            p.beams = static_cast<const int32_t*>(inputs[1]);
            p.unpacker = static_cast<const int32_t*>(inputs[2]);
            p.packedLen = static_cast<const int32_t*>(inputs[3]);
            p.temperature = static_cast<const float*>(inputs[4]);
            p.topK = static_cast<const int32_t*>(inputs[5]);
            p.topP = static_cast<const float*>(inputs[6]);
            p.uniforms = static_cast<const float*>(inputs[7]);
            p.numAccepted = static_cast<int32_t*>(outputs[0]);
            p.bestBeam = static_cast<int32_t*>(outputs[1]);
            p.bonus = static_cast<int32_t*>(outputs[2]);
            p.acceptedIndices = static_cast<int32_t*>(outputs[3]);
            p.emitted = static_cast<int32_t*>(outputs[4]);
            p.batchSize = B;
            p.numNodes = in[0].d[1];
            p.vocabSize = in[0].d[2];
            p.numBeams = f.numBeams();
            p.beamLength = f.beamLength();
            p.workspace = workspace;
            p.workspaceBytes = wsBytes;
            RD_RETURN_IF_ERROR(p.checkParams());
            break;
        }
    }
    *out = lp;
    return Status::success();
}

}  // namespace plugins
}  // namespace redrafter
