// C ABI of the fused CPU decoder forward (cpp/src/decoder_cpu.cpp): one call runs every decoder
// layer of the torch backend's CPU step. Its arguments are one params struct passed by pointer,
// mirrored once in Python (redrafter_trt/native.py); redrafter_decoder_params_layout() exports
// the struct's size and field offsets so the binding's test can compare them.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One decoder layer's weights as the CPU kernels take them: each projection packed (a float32 /
// bf16 panel buffer, or block panels) with its format code (0 float32, 2 bf16, 10 q4_1, 11 q8_0)
// and an optional float32 bias. gate_up is gate_proj|up_proj fused ([2I, H]); when it is null,
// gate and up are streamed separately. The norms' weights are float32 [H].
typedef struct RedrafterDecoderLayer {
    const void* qkv;
    const float* qkv_bias;
    const void* dense;
    const float* dense_bias;
    const void* gate_up;
    const float* gate_up_bias;
    const void* gate;
    const float* gate_bias;
    const void* up;
    const float* up_bias;
    const void* down;
    const float* down_bias;
    const float* input_norm;
    const float* post_norm;
    int32_t qkv_fmt;
    int32_t dense_fmt;
    int32_t gate_up_fmt;
    int32_t gate_fmt;
    int32_t up_fmt;
    int32_t down_fmt;
} RedrafterDecoderLayer;

// x [b * t, hidden] float32: the embeddings in, the last layer's output (before the final norm)
// out. cos / sin [b * t, head_size / 2] float32. cache [layers, 2, num_slots, kv_heads, cap,
// head_size] (cache_dtype 0 float32 / 2 bf16): token (i, j) is written at write_pos[i, j] of slot
// slots[i]; query (i, j) attends to key positions p < s where mask[i, j, p] (uint8) is 1.
typedef struct RedrafterDecoderParams {
    int64_t struct_size;  // sizeof(RedrafterDecoderParams), checked against the library's
    float* x;
    const float* cos;
    const float* sin;
    void* cache;
    const int64_t* slots;
    const int64_t* write_pos;
    const uint8_t* mask;
    const RedrafterDecoderLayer* layers;
    int64_t num_layers;
    int64_t b;
    int64_t t;
    int64_t s;
    int64_t cap;
    int64_t num_slots;
    int64_t hidden;
    int64_t heads;
    int64_t kv_heads;
    int64_t head_size;
    int64_t intermediate;
    float eps;
    float scale;
    int32_t cache_dtype;
    int32_t threads;
} RedrafterDecoderParams;

// The fields in declaration order, for the layout export (and nothing else).
// clang-format off
#define REDRAFTER_DECODER_PARAMS_FIELDS(F)  \
    F(RedrafterDecoderParams, struct_size)  \
    F(RedrafterDecoderParams, x)            \
    F(RedrafterDecoderParams, cos)          \
    F(RedrafterDecoderParams, sin)          \
    F(RedrafterDecoderParams, cache)        \
    F(RedrafterDecoderParams, slots)        \
    F(RedrafterDecoderParams, write_pos)    \
    F(RedrafterDecoderParams, mask)         \
    F(RedrafterDecoderParams, layers)       \
    F(RedrafterDecoderParams, num_layers)   \
    F(RedrafterDecoderParams, b)            \
    F(RedrafterDecoderParams, t)            \
    F(RedrafterDecoderParams, s)            \
    F(RedrafterDecoderParams, cap)          \
    F(RedrafterDecoderParams, num_slots)    \
    F(RedrafterDecoderParams, hidden)       \
    F(RedrafterDecoderParams, heads)        \
    F(RedrafterDecoderParams, kv_heads)     \
    F(RedrafterDecoderParams, head_size)    \
    F(RedrafterDecoderParams, intermediate) \
    F(RedrafterDecoderParams, eps)          \
    F(RedrafterDecoderParams, scale)        \
    F(RedrafterDecoderParams, cache_dtype)  \
    F(RedrafterDecoderParams, threads)
#define REDRAFTER_DECODER_LAYER_FIELDS(F)  \
    F(RedrafterDecoderLayer, qkv)          \
    F(RedrafterDecoderLayer, qkv_bias)     \
    F(RedrafterDecoderLayer, dense)        \
    F(RedrafterDecoderLayer, dense_bias)   \
    F(RedrafterDecoderLayer, gate_up)      \
    F(RedrafterDecoderLayer, gate_up_bias) \
    F(RedrafterDecoderLayer, gate)         \
    F(RedrafterDecoderLayer, gate_bias)    \
    F(RedrafterDecoderLayer, up)           \
    F(RedrafterDecoderLayer, up_bias)      \
    F(RedrafterDecoderLayer, down)         \
    F(RedrafterDecoderLayer, down_bias)    \
    F(RedrafterDecoderLayer, input_norm)   \
    F(RedrafterDecoderLayer, post_norm)    \
    F(RedrafterDecoderLayer, qkv_fmt)      \
    F(RedrafterDecoderLayer, dense_fmt)    \
    F(RedrafterDecoderLayer, gate_up_fmt)  \
    F(RedrafterDecoderLayer, gate_fmt)     \
    F(RedrafterDecoderLayer, up_fmt)       \
    F(RedrafterDecoderLayer, down_fmt)
// clang-format on

// Runs every layer (see the struct); returns 0 or a status code with the message in msg.
int32_t redrafter_decoder_forward_cpu(const RedrafterDecoderParams* params, char* msg, int64_t msg_len);

// Writes sizeof(RedrafterDecoderParams), sizeof(RedrafterDecoderLayer), then every field's offset
// (params fields, then layer fields, in declaration order) into out[0 .. n); returns the count.
int64_t redrafter_decoder_params_layout(int64_t* out, int64_t n);

#ifdef __cplusplus
}
#endif
