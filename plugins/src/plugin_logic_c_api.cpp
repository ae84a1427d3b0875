// C ABI of the plugins' TensorRT-free logic (for pytest through ctypes).
#include "redrafter_plugins/plugin_logic_c_api.h"

#include <cstring>
#include <exception>

#include "redrafter/c_abi_guard.h"
#include "redrafter_plugins/plugin_logic.h"

namespace {

using namespace redrafter;
using namespace redrafter::plugins;

using redrafter::capi::finish;
using redrafter::capi::guarded;

Status badKind(int32_t kind) {
    return Status::error(StatusCode::kInvalidArgument, "unknown plugin kind %d (0 beam search, 1 tree pack, 2 accept)",
                         kind);
}

// Fields from raw values, range-checked like parseFields.
Status fieldsFrom(int32_t kind, const int32_t* values, PluginFields* f) {
    if (!opKindValid(kind)) return badKind(kind);
    if (values == nullptr) return Status::error(StatusCode::kInvalidArgument, "null field values");
    f->kind = static_cast<OpKind>(kind);
    for (int32_t j = 0; j < opInfo(f->kind).nbFields; ++j) f->values[j] = values[j];
    return checkFields(*f);
}

void dimsFrom(const int64_t* flat, int32_t n, ShapeDims* out) {
    for (int32_t i = 0; i < n; ++i) {
        const int64_t* row = flat + i * (kMaxDims + 1);
        out[i].nbDims = static_cast<int32_t>(row[0] < 0 ? 0 : (row[0] > kMaxDims ? kMaxDims : row[0]));
        for (int32_t d = 0; d < kMaxDims; ++d) out[i].d[d] = row[1 + d];
    }
}

}  // namespace

extern "C" {

const char* redrafter_plugin_name(int32_t kind) {
    return opKindValid(kind) ? opInfo(static_cast<OpKind>(kind)).pluginName : nullptr;
}
int32_t redrafter_plugin_num_fields(int32_t kind) {
    return opKindValid(kind) ? opInfo(static_cast<OpKind>(kind)).nbFields : -1;
}
const char* redrafter_plugin_field_name(int32_t kind, int32_t index) {
    if (!opKindValid(kind)) return nullptr;
    const OpInfo& op = opInfo(static_cast<OpKind>(kind));
    return (index >= 0 && index < op.nbFields) ? op.fieldNames[index] : nullptr;
}
int32_t redrafter_plugin_num_inputs(int32_t kind) {
    return opKindValid(kind) ? opInfo(static_cast<OpKind>(kind)).nbInputs : -1;
}
int32_t redrafter_plugin_num_outputs(int32_t kind) {
    return opKindValid(kind) ? opInfo(static_cast<OpKind>(kind)).nbOutputs : -1;
}

int32_t redrafter_plugin_serialize_fields(int32_t kind, const int32_t* values, const char** namesOut, int32_t* typesOut,
                                          int32_t* lengthsOut, int32_t* dataOut, char* msg, int64_t msgLen) {
    return guarded(msg, msgLen, [&]() -> Status {
        PluginFields f;
        RD_RETURN_IF_ERROR(fieldsFrom(kind, values, &f));
        FieldView views[kMaxFields];
        const int32_t n = serializeFields(f, views, kMaxFields);
        for (int32_t j = 0; j < n; ++j) {
            namesOut[j] = views[j].name;
            typesOut[j] = views[j].type;
            lengthsOut[j] = views[j].length;
            std::memcpy(&dataOut[j], views[j].data, sizeof(int32_t));
        }
        return Status::success();
    });
}

int32_t redrafter_plugin_parse_fields(int32_t kind, const char* const* names, const void* const* data,
                                      const int32_t* types, const int32_t* lengths, int32_t numFields,
                                      int32_t* valuesOut, char* msg, int64_t msgLen) {
    return guarded(msg, msgLen, [&]() -> Status {
        if (!opKindValid(kind)) return badKind(kind);
        if (numFields < 0 || numFields > 64)
            return Status::error(StatusCode::kInvalidArgument, "field count %d outside [0, 64]", numFields);
        FieldView views[64];
        for (int32_t i = 0; i < numFields; ++i) views[i] = FieldView{names[i], data[i], types[i], lengths[i]};
        PluginFields f;
        RD_RETURN_IF_ERROR(parseFields(static_cast<OpKind>(kind), views, numFields, &f));
        for (int32_t j = 0; j < opInfo(f.kind).nbFields; ++j) valuesOut[j] = f.values[j];
        return Status::success();
    });
}

int32_t redrafter_plugin_output_shapes(int32_t kind, const int32_t* values, const int64_t* inputDims, int32_t numInputs,
                                       int64_t* outputDims, int32_t numOutputs, char* msg, int64_t msgLen) {
    return guarded(msg, msgLen, [&]() -> Status {
        PluginFields f;
        RD_RETURN_IF_ERROR(fieldsFrom(kind, values, &f));
        if (numInputs < 0 || numInputs > kMaxIO || numOutputs < 0 || numOutputs > kMaxIO)
            return Status::error(StatusCode::kInvalidArgument, "bad input/output counts %d/%d", numInputs, numOutputs);
        ShapeDims in[kMaxIO], out[kMaxIO];
        dimsFrom(inputDims, numInputs, in);
        RD_RETURN_IF_ERROR(inferOutputShapes(f, in, numInputs, out, numOutputs));
        for (int32_t o = 0; o < numOutputs; ++o) {
            int64_t* row = outputDims + o * (kMaxDims + 1);
            row[0] = out[o].nbDims;
            for (int32_t d = 0; d < kMaxDims; ++d) row[1 + d] = d < out[o].nbDims ? out[o].d[d] : 0;
        }
        return Status::success();
    });
}

int32_t redrafter_plugin_output_rule(int32_t kind, const int32_t* values, int32_t index, int64_t* rulesOut) {
    PluginFields f;
    if (!fieldsFrom(kind, values, &f).ok() || index < 0 || index >= opInfo(f.kind).nbOutputs) return -1;
    const OutputRule r = outputRule(f, index);
    for (int32_t d = 0; d < r.nbDims; ++d) {
        rulesOut[3 * d] = r.d[d].input;
        rulesOut[3 * d + 1] = r.d[d].dim;
        rulesOut[3 * d + 2] = r.d[d].value;
    }
    return r.nbDims;
}

int32_t redrafter_plugin_supports_type(int32_t kind, const int32_t* values, int32_t pos, const int32_t* types,
                                       int32_t numTypes) {
    PluginFields f;
    if (!fieldsFrom(kind, values, &f).ok() || numTypes < 0 || numTypes > kMaxIO) return 0;
    TensorType t[kMaxIO];
    for (int32_t i = 0; i < numTypes; ++i) t[i] = static_cast<TensorType>(types[i]);
    return supportsType(f, pos, t, numTypes) ? 1 : 0;
}

int32_t redrafter_plugin_output_types(int32_t kind, const int32_t* values, const int32_t* inputTypes, int32_t numInputs,
                                      int32_t* outputTypes_, int32_t numOutputs, char* msg, int64_t msgLen) {
    return guarded(msg, msgLen, [&]() -> Status {
        PluginFields f;
        RD_RETURN_IF_ERROR(fieldsFrom(kind, values, &f));
        if (numInputs < 0 || numInputs > kMaxIO || numOutputs < 0 || numOutputs > kMaxIO)
            return Status::error(StatusCode::kInvalidArgument, "bad input/output counts %d/%d", numInputs, numOutputs);
        TensorType in[kMaxIO], out[kMaxIO];
        for (int32_t i = 0; i < numInputs; ++i) in[i] = static_cast<TensorType>(inputTypes[i]);
        RD_RETURN_IF_ERROR(outputTypes(f, in, numInputs, out, numOutputs));
        for (int32_t o = 0; o < numOutputs; ++o) outputTypes_[o] = static_cast<int32_t>(out[o]);
        return Status::success();
    });
}

size_t redrafter_plugin_workspace_bytes(int32_t kind, const int32_t* values, const int64_t* maxInputDims,
                                        int32_t numInputs) {
    PluginFields f;
    if (!fieldsFrom(kind, values, &f).ok() || numInputs < 0 || numInputs > kMaxIO) return 0;
    ShapeDims in[kMaxIO];
    dimsFrom(maxInputDims, numInputs, in);
    return workspaceBytes(f, in, numInputs);
}

int32_t redrafter_plugin_enqueue_cpu(int32_t kind, const int32_t* values, const int64_t* inputDims,
                                     const int32_t* inputTypes, int32_t numInputs, const void* const* inputs,
                                     void* const* outputs, char* msg, int64_t msgLen) {
    return guarded(msg, msgLen, [&]() -> Status {
        PluginFields f;
        RD_RETURN_IF_ERROR(fieldsFrom(kind, values, &f));
        if (numInputs < 0 || numInputs > kMaxIO)
            return Status::error(StatusCode::kInvalidArgument, "bad input count %d", numInputs);
        ShapeDims in[kMaxIO];
        TensorType types[kMaxIO];
        dimsFrom(inputDims, numInputs, in);
        for (int32_t i = 0; i < numInputs; ++i) types[i] = static_cast<TensorType>(inputTypes[i]);
        LaunchParams lp;
        RD_RETURN_IF_ERROR(makeLaunchParams(f, in, types, numInputs, inputs, outputs, nullptr, 0, &lp));
        return launchCpu(lp);
    });
}

}  // extern "C"
