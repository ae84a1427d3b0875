// The TensorRT-free half of the ReDrafter IPluginV3 plugins: fields, shapes, types, workspace and
// the launch parameters of each operator that runs inside the engine (docs/design.md section 9).
//
// Nothing here includes a TensorRT header, so it compiles and is unit-tested on any CPU
// (tests/test_plugins_logic.py through the C ABI in plugin_logic_c_api.h). The adapters in
// plugins/src/trt_plugins.cpp only translate TensorRT's types to these and back:
//
//   TensorRT                              here
//   PluginField {name, data, type, len}   FieldView (same members; type = PluginFieldType value)
//   DataType                              TensorType (same numeric values)
//   Dims / DimsExprs (constants only)     ShapeDims (-1 = not known at build time)
//   IExprBuilder output expressions       OutputRule: each dim copies an input dim or is constant
//
// Output shapes never depend on tensor contents: trees are padded to N = W*L nodes and carry
// their lengths, so every output dim is an input dim (the batch) or a field-derived constant.
//
// Plugins (name, version "1", namespace ""):
//   RedrafterBeamSearchStep  fields num_beams W, warp_k
//     in : logits [B, W, K] float32|float16|bfloat16, beam_scores [B, W] float32,
//          vocab_map [K] int32 (full-vocabulary id of each logit column: the head's draft
//          vocabulary, or 0..V-1 for a full-vocabulary head; token = vocab_map[column])
//     out: new_scores [B, W] float32, parent [B, W] int32, token [B, W] int32
//   RedrafterTreePack        fields num_beams W, beam_len L
//     in : beams [B, W, L] int32
//     out: packed_tokens [B, N] int32, packed_len [B] int32, unpacker [B, W, L] int32,
//          position_offsets [B, N] int32, packed_mask [B, N, ceil(N/32)] int32
//   RedrafterAccept          fields num_beams W, beam_len L
//     in : logits [B, N', V] float32|float16|bfloat16 (N' >= 1 logits rows per sequence),
//          beams [B, W, L], unpacker [B, W, L], packed_len [B] int32, temperature [B] float32,
//          top_k [B] int32, top_p [B] float32, uniforms [B, L] float32
//     out: num_accepted [B], best_beam [B], bonus [B], accepted_indices [B, L],
//          emitted [B, L]   all int32
#pragma once

#include <cstddef>
#include <cstdint>

#include "redrafter/accept.h"
#include "redrafter/beam_search.h"
#include "redrafter/common.h"
#include "redrafter/tree_pack.h"

namespace redrafter {
namespace plugins {

// Numeric values of nvinfer1::PluginFieldType / nvinfer1::DataType (the adapters static_assert
// that they agree with the TensorRT headers they are compiled against).
constexpr int32_t kFieldInt32 = 5;  // PluginFieldType::kINT32

enum class TensorType : int32_t {
    kFloat32 = 0,   // DataType::kFLOAT
    kFloat16 = 1,   // DataType::kHALF
    kInt32 = 3,     // DataType::kINT32
    kBFloat16 = 7,  // DataType::kBF16
};

const char* tensorTypeName(TensorType t);
// The operators' logits dtype for a tensor type; false when it is not float32/float16/bfloat16.
bool logitsDataType(TensorType t, DataType* out);

struct FieldView {
    const char* name = nullptr;
    const void* data = nullptr;
    int32_t type = 0;  // PluginFieldType value
    int32_t length = 0;
};

constexpr int32_t kMaxDims = 8;
struct ShapeDims {
    int32_t nbDims = 0;
    int64_t d[kMaxDims] = {};
};

struct DimRule {
    int32_t input = -1;  // >= 0: copy inputs[input].d[dim]; -1: the constant `value`
    int32_t dim = 0;
    int64_t value = 0;
};
struct OutputRule {
    int32_t nbDims = 0;
    DimRule d[4];
};

enum class OpKind : int32_t { kBeamSearch = 0, kTreePack = 1, kAccept = 2 };
constexpr int32_t kNumOps = 3;
constexpr int32_t kMaxFields = 2;
constexpr int32_t kMaxIO = 13;  // inputs + outputs of the largest plugin (accept: 8 + 5)

// Every plugin's fields are int32 scalars; `values` are in the order of fieldNames().
struct PluginFields {
    OpKind kind = OpKind::kBeamSearch;
    int32_t values[kMaxFields] = {};

    int32_t numBeams() const { return values[0]; }
    int32_t warpK() const { return values[1]; }       // beam search
    int32_t beamLength() const { return values[1]; }  // tree pack, accept
};

struct OpInfo {
    const char* pluginName;
    int32_t nbFields;
    const char* fieldNames[kMaxFields];
    int32_t nbInputs;
    int32_t nbOutputs;
    const char* ioNames[kMaxIO];  // inputs then outputs
};
const OpInfo& opInfo(OpKind kind);
bool opKindValid(int32_t kind);
constexpr const char* kPluginVersion = "1";
constexpr const char* kPluginNamespace = "";

// ---- fields --------------------------------------------------------------------------------
// Range and cross-field checks (W in [1, 64], L in [1, 64], warp_k >= 0).
Status checkFields(const PluginFields& f);
// Parses TensorRT's field list: every field exactly once, int32, length 1, in range; unknown
// names are rejected (a misspelt field must not be silently ignored).
Status parseFields(OpKind kind, const FieldView* fields, int32_t nbFields, PluginFields* out);
// The field list getFieldsToSerialize() hands TensorRT; views point into `f` (keep it alive).
int32_t serializeFields(const PluginFields& f, FieldView* out, int32_t capacity);

// ---- shapes, types, formats, workspace -----------------------------------------------------
// Checks the ranks and every dim known at this point (-1 = dynamic) against the fields.
Status checkInputShapes(const PluginFields& f, const ShapeDims* inputs, int32_t nbInputs);
// Output `index` as rules over the inputs (what getOutputShapes builds with IExprBuilder).
OutputRule outputRule(const PluginFields& f, int32_t index);
// Concrete output dims from concrete (or -1) input dims by the same rules.
Status inferOutputShapes(const PluginFields& f, const ShapeDims* inputs, int32_t nbInputs, ShapeDims* outputs,
                         int32_t nbOutputs);
// supportsFormatCombination's type rule for position `pos` of inputs+outputs, given the types
// of positions 0..pos (TensorRT asks position by position).
bool supportsType(const PluginFields& f, int32_t pos, const TensorType* types, int32_t nbTypes);
Status outputTypes(const PluginFields& f, const TensorType* inputTypes, int32_t nbInputs, TensorType* outTypes,
                   int32_t nbOutputs);
// Device workspace for the largest shapes the engine allows (the inputs' max dims).
size_t workspaceBytes(const PluginFields& f, const ShapeDims* maxInputs, int32_t nbInputs);

// ---- launch --------------------------------------------------------------------------------
// What enqueue runs: the operator's Params from fields, concrete input dims, types and buffers.
struct LaunchParams {
    OpKind kind = OpKind::kBeamSearch;
    BeamSearchParams beamSearch;
    TreePackParams treePack;
    AcceptParams accept;
};
Status makeLaunchParams(const PluginFields& f, const ShapeDims* inputs, const TensorType* inputTypes, int32_t nbInputs,
                        const void* const* inputPtrs, void* const* outputPtrs, void* workspace, size_t workspaceBytes,
                        LaunchParams* out);
// Runs the C++ CPU reference of the operator (tests; the plugins call launchCuda).
Status launchCpu(const LaunchParams& p);
// Runs the CUDA launcher (defined only in the plugin library, which links the kernels).
Status launchCuda(const LaunchParams& p, CUstream_st* stream);

}  // namespace plugins
}  // namespace redrafter
