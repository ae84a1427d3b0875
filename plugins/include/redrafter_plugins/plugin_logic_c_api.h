/* C ABI over plugin_logic.h, so pytest tests the plugins' TensorRT-free logic on any CPU
 * (libredrafter_plugin_logic.so; tests/test_plugins_logic.py).
 *
 * kind: 0 beam-search step, 1 tree pack, 2 accept. Fields are int32 values in the order of
 * redrafter_plugin_field_name(kind, i). Dims are passed as int64 [n][9] = {nbDims, d0..d7};
 * types as nvinfer1::DataType values (0 float32, 1 float16, 3 int32, 7 bfloat16).
 * Functions returning int32_t return 0 or a redrafter::StatusCode and write a message to msg.
 */
#ifndef REDRAFTER_PLUGIN_LOGIC_C_API_H
#define REDRAFTER_PLUGIN_LOGIC_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char* redrafter_plugin_name(int32_t kind);
int32_t redrafter_plugin_num_fields(int32_t kind);
const char* redrafter_plugin_field_name(int32_t kind, int32_t index);
int32_t redrafter_plugin_num_inputs(int32_t kind);
int32_t redrafter_plugin_num_outputs(int32_t kind);

/* Serializes `values` as getFieldsToSerialize() would: names, types, lengths and the int32
 * payloads (copied into data_out) of num_fields fields. */
int32_t redrafter_plugin_serialize_fields(int32_t kind, const int32_t* values, const char** names_out,
                                          int32_t* types_out, int32_t* lengths_out, int32_t* data_out, char* msg,
                                          int64_t msg_len);

/* Parses a field list as createPlugin() does; fields[i] = (names[i], data[i], types[i],
 * lengths[i]); values_out gets the canonical field values. */
int32_t redrafter_plugin_parse_fields(int32_t kind, const char* const* names, const void* const* data,
                                      const int32_t* types, const int32_t* lengths, int32_t num_fields,
                                      int32_t* values_out, char* msg, int64_t msg_len);

int32_t redrafter_plugin_output_shapes(int32_t kind, const int32_t* values, const int64_t* input_dims,
                                       int32_t num_inputs, int64_t* output_dims, int32_t num_outputs, char* msg,
                                       int64_t msg_len);

/* Output rule r of output `index`: rules_out [nbDims][3] = {input, dim, value}; returns nbDims. */
int32_t redrafter_plugin_output_rule(int32_t kind, const int32_t* values, int32_t index, int64_t* rules_out);

int32_t redrafter_plugin_supports_type(int32_t kind, const int32_t* values, int32_t pos, const int32_t* types,
                                       int32_t num_types);

int32_t redrafter_plugin_output_types(int32_t kind, const int32_t* values, const int32_t* input_types,
                                      int32_t num_inputs, int32_t* output_types, int32_t num_outputs, char* msg,
                                      int64_t msg_len);

size_t redrafter_plugin_workspace_bytes(int32_t kind, const int32_t* values, const int64_t* max_input_dims,
                                        int32_t num_inputs);

/* enqueue() on the CPU: builds the launch parameters exactly as the plugin does and runs the
 * operator's C++ CPU reference on host buffers. */
int32_t redrafter_plugin_enqueue_cpu(int32_t kind, const int32_t* values, const int64_t* input_dims,
                                     const int32_t* input_types, int32_t num_inputs, const void* const* inputs,
                                     void* const* outputs, char* msg, int64_t msg_len);

#ifdef __cplusplus
}
#endif

#endif /* REDRAFTER_PLUGIN_LOGIC_C_API_H */
