/* C ABI of the ReDrafter operators (no GPU needed for the *_cpu functions).
 *
 * Every function returns 0 on success or a redrafter::StatusCode (1 invalid argument, 2 overflow,
 * 3 invalid data, 4 CUDA error, 5 unsupported) and writes a NUL-terminated message into `msg`
 * (up to msg_len bytes; msg may be NULL). Tensors are dense row-major; shapes are in
 * redrafter/{beam_search,tree_pack,accept,kv_relocate}.h. dtype: 0 float32, 1 float16, 2 bfloat16.
 * The *_cuda functions (libredrafter_cuda.so) take device pointers and a cudaStream_t as void*.
 */
#ifndef REDRAFTER_C_API_H
#define REDRAFTER_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define REDRAFTER_ABI_VERSION 2

int32_t redrafter_abi_version(void);

/* vocab_map: NULL, or [vocab] int32 full-vocabulary ids of the logit columns (a reduced draft
 * vocabulary); token = vocab_map[column]. */
int32_t redrafter_beam_search_step_cpu(const void* logits, int32_t dtype, const float* beam_scores, int64_t batch,
                                       int64_t num_beams, int64_t vocab, int64_t warp_k, const int32_t* vocab_map,
                                       float* new_scores, int32_t* parent, int32_t* token, char* msg, int64_t msg_len);

int32_t redrafter_tree_pack_cpu(const int32_t* beams, int64_t batch, int64_t num_beams, int64_t beam_len,
                                int32_t* packed_tokens, int32_t* packed_len, int32_t* unpacker,
                                int32_t* position_offsets, int32_t* packed_mask, char* msg, int64_t msg_len);

int32_t redrafter_accept_cpu(const void* logits, int32_t dtype, int64_t batch, int64_t num_nodes, int64_t vocab,
                             const int32_t* beams, const int32_t* unpacker, int64_t num_beams, int64_t beam_len,
                             const int32_t* packed_len, const float* temperature, const int32_t* top_k,
                             const float* top_p, const float* uniforms, int32_t* num_accepted, int32_t* best_beam,
                             int32_t* bonus, int32_t* accepted_indices, int32_t* emitted, char* msg, int64_t msg_len);

int32_t redrafter_kv_relocate_cpu(void* cache, int64_t elem_bytes, int64_t num_layers, int64_t num_slots,
                                  int64_t num_kv_heads, int64_t max_seq_len, int64_t head_dim, const int32_t* slots,
                                  const int32_t* cache_lengths, const int32_t* accepted_indices,
                                  const int32_t* num_accepted, int64_t batch, int64_t beam_len, int32_t* new_lengths,
                                  char* msg, int64_t msg_len);

/* KV relocation in a blocked, strided cache layout (redrafter/kv_relocate.h): element
 * (layer, kv, slot, head, t, e) lives cache_elems-bounded at element offset
 *   slot*stride_slot + (t / tokens_per_block)*stride_block + (t % tokens_per_block)*stride_token
 *   + layer*stride_layer + kv*stride_kv + head*stride_head + e
 * from cache (strides in elements, >= 0; tokens_per_block >= 1; the dims must not overlap and
 * the largest offset must be < cache_elems, the elements the caller allocated from cache).
 * The contiguous layout of redrafter_kv_relocate_cpu and TensorRT-LLM's paged pool are both
 * of this form (see the header). */
int32_t redrafter_kv_relocate_strided_cpu(void* cache, int64_t cache_elems, int64_t elem_bytes, int64_t num_layers,
                                          int64_t num_slots, int64_t num_kv_heads, int64_t max_seq_len,
                                          int64_t head_dim, int64_t tokens_per_block, int64_t stride_slot,
                                          int64_t stride_block, int64_t stride_token, int64_t stride_layer,
                                          int64_t stride_kv, int64_t stride_head, const int32_t* slots,
                                          const int32_t* cache_lengths, const int32_t* accepted_indices,
                                          const int32_t* num_accepted, int64_t batch, int64_t beam_len,
                                          int32_t* new_lengths, char* msg, int64_t msg_len);

/* One token per row of logits [rows, vocab] by the rules of redrafter/sampling.h. */
int32_t redrafter_draw_tokens_cpu(const void* logits, int32_t dtype, int64_t rows, int64_t vocab,
                                  const float* temperature, const int32_t* top_k, const float* top_p,
                                  const float* uniforms, int32_t* tokens, char* msg, int64_t msg_len);

/* ---- CUDA launchers (libredrafter_cuda.so only) ---- */
size_t redrafter_beam_search_workspace_bytes(int64_t batch, int64_t num_beams, int64_t vocab, int64_t warp_k);
size_t redrafter_accept_workspace_bytes(int64_t batch, int64_t num_nodes);

int32_t redrafter_beam_search_step_cuda(const void* logits, int32_t dtype, const float* beam_scores, int64_t batch,
                                        int64_t num_beams, int64_t vocab, int64_t warp_k, const int32_t* vocab_map,
                                        float* new_scores, int32_t* parent, int32_t* token, void* workspace,
                                        size_t workspace_bytes, void* stream, char* msg, int64_t msg_len);

int32_t redrafter_tree_pack_cuda(const int32_t* beams, int64_t batch, int64_t num_beams, int64_t beam_len,
                                 int32_t* packed_tokens, int32_t* packed_len, int32_t* unpacker,
                                 int32_t* position_offsets, int32_t* packed_mask, void* stream, char* msg,
                                 int64_t msg_len);

int32_t redrafter_accept_cuda(const void* logits, int32_t dtype, int64_t batch, int64_t num_nodes, int64_t vocab,
                              const int32_t* beams, const int32_t* unpacker, int64_t num_beams, int64_t beam_len,
                              const int32_t* packed_len, const float* temperature, const int32_t* top_k,
                              const float* top_p, const float* uniforms, int32_t* num_accepted, int32_t* best_beam,
                              int32_t* bonus, int32_t* accepted_indices, int32_t* emitted, void* workspace,
                              size_t workspace_bytes, void* stream, char* msg, int64_t msg_len);

int32_t redrafter_kv_relocate_cuda(void* cache, int64_t elem_bytes, int64_t num_layers, int64_t num_slots,
                                   int64_t num_kv_heads, int64_t max_seq_len, int64_t head_dim, const int32_t* slots,
                                   const int32_t* cache_lengths, const int32_t* accepted_indices,
                                   const int32_t* num_accepted, int64_t batch, int64_t beam_len, int32_t* new_lengths,
                                   void* stream, char* msg, int64_t msg_len);

/* redrafter_kv_relocate_strided_cpu's arguments on device pointers and a stream. */
int32_t redrafter_kv_relocate_strided_cuda(void* cache, int64_t cache_elems, int64_t elem_bytes, int64_t num_layers,
                                           int64_t num_slots, int64_t num_kv_heads, int64_t max_seq_len,
                                           int64_t head_dim, int64_t tokens_per_block, int64_t stride_slot,
                                           int64_t stride_block, int64_t stride_token, int64_t stride_layer,
                                           int64_t stride_kv, int64_t stride_head, const int32_t* slots,
                                           const int32_t* cache_lengths, const int32_t* accepted_indices,
                                           const int32_t* num_accepted, int64_t batch, int64_t beam_len,
                                           int32_t* new_lengths, void* stream, char* msg, int64_t msg_len);

/* ---- CPU model kernels (cpp/src/linear_cpu.cpp, cpp/src/attention_cpu.cpp): batch-invariant,
 * dtypes 0 = float32, 2 = bfloat16; threads on the library's pool (1..256). ---- */
int64_t redrafter_linear_packed_elems(int64_t n, int64_t k);
int32_t redrafter_linear_pack_cpu(const void* w, int32_t w_dtype, void* packed, int64_t n, int64_t k, char* msg,
                                  int64_t msg_len);
int32_t redrafter_linear_packed_cpu(const void* x, int32_t x_dtype, const void* packed, int32_t w_dtype,
                                    const float* bias, void* y, int32_t y_dtype, int64_t m, int64_t n, int64_t k,
                                    int32_t threads, int32_t force_scalar, char* msg, int64_t msg_len);
int32_t redrafter_linear_cpu(const void* x, int32_t x_dtype, const void* w, int32_t w_dtype, const float* bias, void* y,
                             int32_t y_dtype, int64_t m, int64_t n, int64_t k, int32_t force_scalar, char* msg,
                             int64_t msg_len);
int32_t redrafter_linear_simd_cpu(void);
/* GGUF block weights (w_dtype 10 = q4_1, 11 = q8_0 in redrafter_linear_packed_cpu; k a multiple of
 * 32): qs, float16 d and m (null for q8_0) in the stored layout (redrafter_trt/models/blocks.py). */
int64_t redrafter_linear_blocks_packed_bytes(int32_t fmt, int64_t n, int64_t k);
int32_t redrafter_linear_pack_blocks_cpu(const void* qs, const uint16_t* d, const uint16_t* m, int32_t fmt,
                                         void* packed, int64_t n, int64_t k, char* msg, int64_t msg_len);
/* Embedding rows of a GGUF block table (cpp/src/embed_cpu.cpp): out [count, k] float32 = rows ids
 * [count] (int64, each in [0, rows)) of the q4_1 (10) / q8_0 (11) table [rows, k], decoded exactly
 * as redrafter_trt/models/blocks.py decode(). */
int32_t redrafter_embed_blocks_cpu(const void* qs, const uint16_t* d, const uint16_t* m, int32_t fmt, int64_t rows,
                                   int64_t k, const int64_t* ids, int64_t count, float* out, char* msg,
                                   int64_t msg_len);
int32_t redrafter_attention_cpu(const float* q, const void* cache, int32_t cache_dtype, const int64_t* slots,
                                const uint8_t* mask, float* out, int64_t b, int64_t t, int64_t nh, int64_t nkv,
                                int64_t hd, int64_t s, int64_t cap, int64_t num_slots, float scale, int32_t threads,
                                int32_t force_scalar, char* msg, int64_t msg_len);
/* The per-layer ops (cpp/src/layer_ops_cpu.cpp) and the fused decoder forward
 * (redrafter/decoder_cpu.h). */
int32_t redrafter_rmsnorm_cpu(const void* x, const void* w, void* y, int32_t dtype, int64_t rows, int64_t h, float eps,
                              char* msg, int64_t msg_len);
int32_t redrafter_rope_cpu(void* x, int32_t dtype, int64_t rows, int64_t heads, int64_t hd, int64_t row_stride,
                           const float* cos, const float* sin, char* msg, int64_t msg_len);
int32_t redrafter_silu_mul_cpu(const void* ab, void* y, int32_t dtype, int64_t rows, int64_t n, char* msg,
                               int64_t msg_len);

#ifdef __cplusplus
}
#endif

#endif /* REDRAFTER_C_API_H */
