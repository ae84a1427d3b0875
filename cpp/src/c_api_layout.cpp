// redrafter_params_layout() (redrafter/c_api.h): every params struct's size and fields, walked
// from the field lists that declare the structs, for the bindings' layout test.
#include <cstddef>
#include <string>
#include <type_traits>

#include "redrafter/c_api.h"
#include "redrafter/decoder_cpu.h"

namespace {

template <class T>
char kindOf() {
    if (std::is_pointer<T>::value) return 'p';
    if (std::is_floating_point<T>::value) return 'f';
    return std::is_signed<T>::value ? 'i' : 'u';
}

std::string layouts() {
    std::string out;
    auto add = [&out](const char* name, size_t offset, size_t size, char kind) {
        out += ' ';
        out += name;
        out += ':' + std::to_string(offset) + ':' + std::to_string(size) + ':' + kind;
    };
#define RD_FIELD(type, name) add(#name, offsetof(S, name), sizeof(type), kindOf<type>());
#define RD_STRUCT(Name, FIELDS)                       \
    {                                                 \
        using S = Name;                               \
        out += #Name " " + std::to_string(sizeof(S)); \
        FIELDS(RD_FIELD)                              \
        out += '\n';                                  \
    }
    RD_STRUCT(RedrafterBeamSearchParams, REDRAFTER_BEAM_SEARCH_FIELDS)
    RD_STRUCT(RedrafterTreePackParams, REDRAFTER_TREE_PACK_FIELDS)
    RD_STRUCT(RedrafterAcceptParams, REDRAFTER_ACCEPT_FIELDS)
    RD_STRUCT(RedrafterKvRelocateParams, REDRAFTER_KV_RELOCATE_FIELDS)
    RD_STRUCT(RedrafterDrawTokensParams, REDRAFTER_DRAW_TOKENS_FIELDS)
    RD_STRUCT(RedrafterLinearParams, REDRAFTER_LINEAR_FIELDS)
    RD_STRUCT(RedrafterAttentionParams, REDRAFTER_ATTENTION_FIELDS)
    RD_STRUCT(RedrafterEmbedBlocksParams, REDRAFTER_EMBED_BLOCKS_FIELDS)
    RD_STRUCT(RedrafterDecoderParams, REDRAFTER_DECODER_PARAMS_FIELDS)
    RD_STRUCT(RedrafterDecoderLayer, REDRAFTER_DECODER_LAYER_FIELDS)
#undef RD_STRUCT
#undef RD_FIELD
    return out;
}

}  // namespace

extern "C" const char* redrafter_params_layout(void) {
    static const std::string text = layouts();  // built once (thread-safe), kept for the process
    return text.c_str();
}
