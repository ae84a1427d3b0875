// TensorRT IPluginV3 adapters of the ReDrafter operators (docs/design.md section 9) and the library's
// registration entry point.
//
// Each plugin (RedrafterBeamSearchStep, RedrafterTreePack, RedrafterAccept; version "1") is the
// same thin adapter: TensorRT's fields, dims and types are translated to plugin_logic.h, which
// validates, infers the (data-independent) output shapes and types, sizes the workspace and
// builds the launcher's Params; enqueue calls the cpp/ CUDA launcher. No kernel code here.
//
// Loading: TensorRT's plugin registry loads this library with
// `IPluginRegistry::loadLibrary(path)` (Python: `trt.get_plugin_registry().load_library(path)`),
// which calls `setLoggerFinder` and `getCreators` below.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "redrafter_plugins/plugin_logic.h"

namespace redrafter {
namespace plugins {
namespace {

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;

// plugin_logic.h mirrors these TensorRT enumerators by value.
static_assert(static_cast<int32_t>(PluginFieldType::kINT32) == kFieldInt32, "PluginFieldType::kINT32");
static_assert(static_cast<int32_t>(DataType::kFLOAT) == static_cast<int32_t>(TensorType::kFloat32), "kFLOAT");
static_assert(static_cast<int32_t>(DataType::kHALF) == static_cast<int32_t>(TensorType::kFloat16), "kHALF");
static_assert(static_cast<int32_t>(DataType::kINT32) == static_cast<int32_t>(TensorType::kInt32), "kINT32");
static_assert(static_cast<int32_t>(DataType::kBF16) == static_cast<int32_t>(TensorType::kBFloat16), "kBF16");
static_assert(nvinfer1::Dims::MAX_DIMS == kMaxDims, "Dims::MAX_DIMS");

nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

void logError(const char* where, const Status& s) {
    char buf[448];
    std::snprintf(buf, sizeof(buf), "redrafter plugin %s: %s", where, s.message);
    nvinfer1::ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    if (logger) {
        logger->log(nvinfer1::ILogger::Severity::kERROR, buf);
    } else {
        std::fprintf(stderr, "%s\n", buf);
    }
}

// Returns 0 on success, logs and returns -1 otherwise (TensorRT's plugin convention).
int32_t report(const char* where, const Status& s) {
    if (s.ok()) return 0;
    logError(where, s);
    return -1;
}

ShapeDims toShape(const nvinfer1::Dims& d) {
    ShapeDims s;
    s.nbDims = d.nbDims < 0 ? 0 : (d.nbDims > kMaxDims ? kMaxDims : d.nbDims);
    for (int32_t i = 0; i < s.nbDims; ++i) s.d[i] = d.d[i];
    return s;
}

// Constant dims of a symbolic shape; -1 where the dim is only known at run time.
ShapeDims toShape(const nvinfer1::DimsExprs& d) {
    ShapeDims s;
    s.nbDims = d.nbDims < 0 ? 0 : (d.nbDims > kMaxDims ? kMaxDims : d.nbDims);
    for (int32_t i = 0; i < s.nbDims; ++i) s.d[i] = d.d[i]->isConstant() ? d.d[i]->getConstantValue() : -1;
    return s;
}

class RedrafterPlugin final : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime {
public:
    explicit RedrafterPlugin(const PluginFields& fields) : mFields(fields) { buildSerialization(); }
    RedrafterPlugin(const RedrafterPlugin& other) : mFields(other.mFields) { buildSerialization(); }
    RedrafterPlugin& operator=(const RedrafterPlugin&) = delete;
    ~RedrafterPlugin() override = default;

    // ---- IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        switch (type) {
            case nvinfer1::PluginCapabilityType::kCORE:
                return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case nvinfer1::PluginCapabilityType::kBUILD:
                return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case nvinfer1::PluginCapabilityType::kRUNTIME:
                return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    nvinfer1::IPluginV3* clone() noexcept override {
        try {
            return new RedrafterPlugin(*this);
        } catch (...) { return nullptr; }
    }

    // ---- IPluginV3OneCore
    const char* getPluginName() const noexcept override { return opInfo(mFields.kind).pluginName; }
    const char* getPluginVersion() const noexcept override { return kPluginVersion; }
    const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // ---- IPluginV3OneBuild
    int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nbInputs,
                            const nvinfer1::DynamicPluginTensorDesc* /*out*/, int32_t /*nbOutputs*/) noexcept override {
        ShapeDims dims[kMaxIO];
        if (nbInputs != info().nbInputs) return report(getPluginName(), wrongCount("inputs", nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i) dims[i] = toShape(in[i].desc.dims);
        return report(getPluginName(), checkInputShapes(mFields, dims, nbInputs));
    }

    int32_t getOutputDataTypes(DataType* outTypes, int32_t nbOutputs, const DataType* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (nbInputs != info().nbInputs || nbOutputs != info().nbOutputs)
            return report(getPluginName(), wrongCount("inputs/outputs", nbInputs));
        TensorType in[kMaxIO], out[kMaxIO];
        for (int32_t i = 0; i < nbInputs; ++i) in[i] = static_cast<TensorType>(inputTypes[i]);
        const Status s = outputTypes(mFields, in, nbInputs, out, nbOutputs);
        if (!s.ok()) return report(getPluginName(), s);
        for (int32_t o = 0; o < nbOutputs; ++o) outTypes[o] = static_cast<DataType>(out[o]);
        return 0;
    }

    int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nbInputs,
                            const nvinfer1::DimsExprs* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override {
        if (nbInputs != info().nbInputs || nbOutputs != info().nbOutputs)
            return report(getPluginName(), wrongCount("inputs/outputs", nbInputs));
        ShapeDims dims[kMaxIO];
        for (int32_t i = 0; i < nbInputs; ++i) dims[i] = toShape(inputs[i]);
        const Status s = checkInputShapes(mFields, dims, nbInputs);
        if (!s.ok()) return report(getPluginName(), s);
        for (int32_t o = 0; o < nbOutputs; ++o) {
            const OutputRule r = outputRule(mFields, o);
            outputs[o].nbDims = r.nbDims;
            for (int32_t d = 0; d < r.nbDims; ++d) {
                outputs[o].d[d] =
                    r.d[d].input >= 0 ? inputs[r.d[d].input].d[r.d[d].dim] : exprBuilder.constant(r.d[d].value);
            }
        }
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (pos < 0 || pos >= nbInputs + nbOutputs || nbInputs + nbOutputs > kMaxIO) return false;
        if (inOut[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        TensorType types[kMaxIO];
        for (int32_t i = 0; i <= pos; ++i) types[i] = static_cast<TensorType>(inOut[i].desc.type);
        return supportsType(mFields, pos, types, pos + 1);
    }

    int32_t getNbOutputs() const noexcept override { return info().nbOutputs; }

    size_t getWorkspaceSize(const nvinfer1::DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                            const nvinfer1::DynamicPluginTensorDesc* /*outputs*/,
                            int32_t /*nbOutputs*/) const noexcept override {
        if (nbInputs != info().nbInputs) return 0;
        ShapeDims maxDims[kMaxIO];
        for (int32_t i = 0; i < nbInputs; ++i) maxDims[i] = toShape(inputs[i].max);
        return workspaceBytes(mFields, maxDims, nbInputs);
    }

    // ---- IPluginV3OneRuntime
    int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nbInputs,
                          const nvinfer1::PluginTensorDesc* /*out*/, int32_t /*nbOutputs*/) noexcept override {
        if (nbInputs != info().nbInputs) return report(getPluginName(), wrongCount("inputs", nbInputs));
        ShapeDims dims[kMaxIO];
        for (int32_t i = 0; i < nbInputs; ++i) dims[i] = toShape(in[i].dims);
        return report(getPluginName(), checkInputShapes(mFields, dims, nbInputs));
    }

    int32_t enqueue(const nvinfer1::PluginTensorDesc* inputDesc, const nvinfer1::PluginTensorDesc* /*outputDesc*/,
                    const void* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override {
        const int32_t n = info().nbInputs;
        ShapeDims dims[kMaxIO];
        TensorType types[kMaxIO];
        for (int32_t i = 0; i < n; ++i) {
            dims[i] = toShape(inputDesc[i].dims);
            types[i] = static_cast<TensorType>(inputDesc[i].type);
        }
        // TensorRT allocated getWorkspaceSize() for the max shapes; these shapes need no more.
        LaunchParams lp;
        Status s = makeLaunchParams(mFields, dims, types, n, inputs, outputs, workspace,
                                    workspaceBytes(mFields, dims, n), &lp);
        if (s.ok()) s = launchCuda(lp, stream);
        return report(getPluginName(), s);
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
        return clone();
    }

    const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override { return &mCollection; }

private:
    const OpInfo& info() const { return opInfo(mFields.kind); }

    Status wrongCount(const char* what, int32_t got) const {
        return Status::error(StatusCode::kInvalidArgument, "expected %d inputs and %d outputs (%s), got %d",
                             info().nbInputs, info().nbOutputs, what, got);
    }

    void buildSerialization() {
        FieldView views[kMaxFields];
        const int32_t n = serializeFields(mFields, views, kMaxFields);
        mSerialized.clear();
        for (int32_t j = 0; j < n; ++j) {
            mSerialized.emplace_back(views[j].name, views[j].data, static_cast<PluginFieldType>(views[j].type),
                                     views[j].length);
        }
        mCollection.nbFields = static_cast<int32_t>(mSerialized.size());
        mCollection.fields = mSerialized.data();
    }

    PluginFields mFields;
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mCollection{};
};

class RedrafterPluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    explicit RedrafterPluginCreator(OpKind kind) : mKind(kind) {
        const OpInfo& op = opInfo(kind);
        for (int32_t j = 0; j < op.nbFields; ++j) {
            mFieldNames.emplace_back(op.fieldNames[j], nullptr, PluginFieldType::kINT32, 1);
        }
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    nvinfer1::IPluginV3* createPlugin(const char* /*name*/, const nvinfer1::PluginFieldCollection* fc,
                                      nvinfer1::TensorRTPhase /*phase*/) noexcept override {
        try {
            std::vector<FieldView> views;
            if (fc != nullptr) {
                for (int32_t i = 0; i < fc->nbFields; ++i) {
                    const nvinfer1::PluginField& f = fc->fields[i];
                    views.push_back(FieldView{f.name, f.data, static_cast<int32_t>(f.type), f.length});
                }
            }
            PluginFields fields;
            const Status s = parseFields(mKind, views.data(), static_cast<int32_t>(views.size()), &fields);
            if (!s.ok()) {
                report(getPluginName(), s);
                return nullptr;
            }
            return new RedrafterPlugin(fields);
        } catch (...) { return nullptr; }
    }

    const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override { return &mCollection; }
    const char* getPluginName() const noexcept override { return opInfo(mKind).pluginName; }
    const char* getPluginVersion() const noexcept override { return kPluginVersion; }
    const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    OpKind mKind;
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mCollection{};
};

}  // namespace
}  // namespace plugins
}  // namespace redrafter

// ---- registration entry points (found by IPluginRegistry::loadLibrary) ---------------------------

extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    redrafter::plugins::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    using redrafter::plugins::OpKind;
    using redrafter::plugins::RedrafterPluginCreator;
    static RedrafterPluginCreator beamSearch(OpKind::kBeamSearch);
    static RedrafterPluginCreator treePack(OpKind::kTreePack);
    static RedrafterPluginCreator accept(OpKind::kAccept);
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&beamSearch, &treePack, &accept};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

}  // extern "C"
