// C ABI of the fused CPU decoder forward (cpp/src/decoder_cpu.cpp): one call runs every decoder
// layer of the torch backend's CPU step. Its arguments are one params struct passed by pointer,
// mirrored once in Python (redrafter_trt/native.py); redrafter_params_layout() (redrafter/c_api.h)
// exports the structs' sizes and fields so the binding's test can compare them.
#pragma once

#include <stdint.h>

#include "redrafter/c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

// clang-format off

// One decoder layer's weights as the CPU kernels take them: each projection packed (a float32 /
// bf16 panel buffer, or block panels) with its format code (0 float32, 2 bf16, 10 q4_1, 11 q8_0)
// and an optional float32 bias. gate_up is gate_proj|up_proj fused ([2I, H]); when it is null,
// gate and up are streamed separately. The norms' weights are float32 [H].
#define REDRAFTER_DECODER_LAYER_FIELDS(F) \
    F(const void*, qkv)                   \
    F(const float*, qkv_bias)             \
    F(const void*, dense)                 \
    F(const float*, dense_bias)           \
    F(const void*, gate_up)               \
    F(const float*, gate_up_bias)         \
    F(const void*, gate)                  \
    F(const float*, gate_bias)            \
    F(const void*, up)                    \
    F(const float*, up_bias)              \
    F(const void*, down)                  \
    F(const float*, down_bias)            \
    F(const float*, input_norm)           \
    F(const float*, post_norm)            \
    F(int32_t, qkv_fmt)                   \
    F(int32_t, dense_fmt)                 \
    F(int32_t, gate_up_fmt)               \
    F(int32_t, gate_fmt)                  \
    F(int32_t, up_fmt)                    \
    F(int32_t, down_fmt)
REDRAFTER_DECLARE_STRUCT(RedrafterDecoderLayer, REDRAFTER_DECODER_LAYER_FIELDS)

// x [b * t, hidden] float32: the embeddings in, the last layer's output (before the final norm)
// out. cos / sin [b * t, head_size / 2] float32. cache [layers, 2, num_slots, kv_heads, cap,
// head_size] (cache_dtype 0 float32 / 2 bf16): token (i, j) is written at write_pos[i, j] of slot
// slots[i]; query (i, j) attends to key positions p < s where mask[i, j, p] (uint8) is 1.
#define REDRAFTER_DECODER_PARAMS_FIELDS(F)                                                \
    F(int64_t, struct_size)  /* sizeof(RedrafterDecoderParams), checked by the library */      \
    F(float*, x)                                                                          \
    F(const float*, cos)                                                                  \
    F(const float*, sin)                                                                  \
    F(void*, cache)                                                                       \
    F(const int64_t*, slots)                                                              \
    F(const int64_t*, write_pos)                                                          \
    F(const uint8_t*, mask)                                                               \
    F(const RedrafterDecoderLayer*, layers)                                               \
    F(int64_t, num_layers)                                                                \
    F(int64_t, b)                                                                         \
    F(int64_t, t)                                                                         \
    F(int64_t, s)                                                                         \
    F(int64_t, cap)                                                                       \
    F(int64_t, num_slots)                                                                 \
    F(int64_t, hidden)                                                                    \
    F(int64_t, heads)                                                                     \
    F(int64_t, kv_heads)                                                                  \
    F(int64_t, head_size)                                                                 \
    F(int64_t, intermediate)                                                              \
    F(float, eps)                                                                         \
    F(float, scale)                                                                       \
    F(int32_t, cache_dtype)                                                               \
    F(int32_t, threads)
REDRAFTER_DECLARE_STRUCT(RedrafterDecoderParams, REDRAFTER_DECODER_PARAMS_FIELDS)

// clang-format on

// Runs every layer (see the struct); returns 0 or a status code with the message in msg.
int32_t redrafter_decoder_forward_cpu(const RedrafterDecoderParams* params, char* msg, int64_t msg_len);

#ifdef __cplusplus
}
#endif
