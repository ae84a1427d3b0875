/* C ABI of the ReDrafter operators (no GPU needed for the *_cpu functions).
 *
 * Each operator is one function taking its params struct by pointer, the same struct for the CPU
 * reference (*_cpu, libredrafter_cpu.so) and the CUDA launcher (*_cuda, libredrafter_cuda.so).
 * The CUDA launchers take device pointers, `stream` (a cudaStream_t; NULL: the default stream)
 * and, where an operator needs one, `workspace`: device memory of the size its
 * *_workspace_bytes query gives for the same struct. The CPU references ignore stream and
 * workspace. Every struct starts with struct_size = sizeof(struct), which the library checks (a
 * binding and a library built from different sources disagree there first).
 *
 * Every operator returns 0 on success or a redrafter::StatusCode (1 invalid argument, 2
 * overflow, 3 invalid data, 4 CUDA error, 5 unsupported) and writes a NUL-terminated message into
 * `msg` (up to msg_len bytes; msg may be NULL). Tensors are dense row-major; shapes are in
 * redrafter/{beam_search,tree_pack,accept,kv_relocate}.h. dtype: 0 float32, 1 float16, 2 bfloat16.
 *
 * Each struct is written once, as a field list F(type, name) that declares it here and that
 * redrafter_params_layout() walks, so a binding can compare its mirror with the library's layout
 * (redrafter_trt/native.py, tests/test_native_abi.py).
 */
#ifndef REDRAFTER_C_API_H
#define REDRAFTER_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define REDRAFTER_ABI_VERSION 3

int32_t redrafter_abi_version(void);

/* The declaration of a params struct from its field list. */
#define REDRAFTER_DECLARE_FIELD(type, name) type name;
#define REDRAFTER_DECLARE_STRUCT(Name, FIELDS) \
    typedef struct Name {                      \
        FIELDS(REDRAFTER_DECLARE_FIELD)        \
    } Name;

/* Every params struct, one line each "Name sizeof field:offset:size:kind ..." (fields in
 * declaration order; kind p pointer, i signed integer, u unsigned integer, f floating point),
 * the structs of redrafter/decoder_cpu.h included. */
const char* redrafter_params_layout(void);

// clang-format off

/* One beam-search step (redrafter/beam_search.h). vocab_map: NULL, or [vocab] int32
 * full-vocabulary ids of the logit columns (a reduced draft vocabulary); token = vocab_map[column]. */
#define REDRAFTER_BEAM_SEARCH_FIELDS(F)                                                      \
    F(int64_t, struct_size)                                                                  \
    F(const void*, logits)        /* [batch, num_beams, vocab] of dtype */                   \
    F(const float*, beam_scores)  /* [batch, num_beams] */                                   \
    F(const int32_t*, vocab_map)  /* [vocab] or NULL */                                      \
    F(float*, new_scores)         /* out [batch, num_beams], descending */                   \
    F(int32_t*, parent)           /* out [batch, num_beams] */                               \
    F(int32_t*, token)            /* out [batch, num_beams] */                               \
    F(void*, workspace)           /* CUDA: redrafter_beam_search_workspace_bytes() bytes */  \
    F(void*, stream)              /* CUDA */                                                 \
    F(int64_t, batch)                                                                        \
    F(int64_t, num_beams)                                                                    \
    F(int64_t, vocab)                                                                        \
    F(int64_t, warp_k)                                                                       \
    F(size_t, workspace_bytes)                                                               \
    F(int32_t, dtype)             /* of logits */
REDRAFTER_DECLARE_STRUCT(RedrafterBeamSearchParams, REDRAFTER_BEAM_SEARCH_FIELDS)

/* The draft tree packed (redrafter/tree_pack.h); N = num_beams * beam_len. */
#define REDRAFTER_TREE_PACK_FIELDS(F)                                                        \
    F(int64_t, struct_size)                                                                  \
    F(const int32_t*, beams)         /* [batch, num_beams, beam_len] */                      \
    F(int32_t*, packed_tokens)       /* out [batch, N] */                                    \
    F(int32_t*, packed_len)          /* out [batch] */                                       \
    F(int32_t*, unpacker)            /* out [batch, num_beams, beam_len] */                  \
    F(int32_t*, position_offsets)    /* out [batch, N] */                                    \
    F(int32_t*, packed_mask)         /* out [batch, N, ceil(N / 32)] */                      \
    F(void*, stream)                 /* CUDA */                                              \
    F(int64_t, batch)                                                                        \
    F(int64_t, num_beams)                                                                    \
    F(int64_t, beam_len)
REDRAFTER_DECLARE_STRUCT(RedrafterTreePackParams, REDRAFTER_TREE_PACK_FIELDS)

/* Acceptance of the verified tree (redrafter/accept.h). */
#define REDRAFTER_ACCEPT_FIELDS(F)                                                           \
    F(int64_t, struct_size)                                                                  \
    F(const void*, logits)            /* [batch, num_nodes, vocab] of dtype */               \
    F(const int32_t*, beams)          /* [batch, num_beams, beam_len] */                     \
    F(const int32_t*, unpacker)       /* [batch, num_beams, beam_len] */                     \
    F(const int32_t*, packed_len)     /* [batch] or NULL (checked against the unpacker) */   \
    F(const float*, temperature)      /* [batch] */                                          \
    F(const int32_t*, top_k)          /* [batch] */                                          \
    F(const float*, top_p)            /* [batch] */                                          \
    F(const float*, uniforms)         /* [batch, beam_len] */                                \
    F(int32_t*, num_accepted)         /* out [batch] */                                      \
    F(int32_t*, best_beam)            /* out [batch] */                                      \
    F(int32_t*, bonus)                /* out [batch] */                                      \
    F(int32_t*, accepted_indices)     /* out [batch, beam_len] */                            \
    F(int32_t*, emitted)              /* out [batch, beam_len] */                            \
    F(void*, workspace)               /* CUDA: redrafter_accept_workspace_bytes() bytes */   \
    F(void*, stream)                  /* CUDA */                                             \
    F(int64_t, batch)                                                                        \
    F(int64_t, num_nodes)                                                                    \
    F(int64_t, vocab)                                                                        \
    F(int64_t, num_beams)                                                                    \
    F(int64_t, beam_len)                                                                     \
    F(size_t, workspace_bytes)                                                               \
    F(int32_t, dtype)                 /* of logits */
REDRAFTER_DECLARE_STRUCT(RedrafterAcceptParams, REDRAFTER_ACCEPT_FIELDS)

/* KV relocation (redrafter/kv_relocate.h). redrafter_kv_relocate_* take the contiguous cache
 * [num_layers, 2, num_slots, num_kv_heads, max_seq_len, head_dim] (elem_bytes each) and ignore
 * the fields from cache_elems on. redrafter_kv_relocate_strided_* take a blocked, strided
 * layout: element (layer, kv, slot, head, t, e) lives at element offset
 *   slot*stride_slot + (t / tokens_per_block)*stride_block + (t % tokens_per_block)*stride_token
 *   + layer*stride_layer + kv*stride_kv + head*stride_head + e
 * from cache (strides in elements, >= 0; tokens_per_block >= 1; the dims must not overlap and
 * the largest offset must be < cache_elems, the elements the caller allocated from cache). The
 * contiguous layout and TensorRT-LLM's paged pool are both of this form (see the header). */
#define REDRAFTER_KV_RELOCATE_FIELDS(F)                                                      \
    F(int64_t, struct_size)                                                                  \
    F(void*, cache)                                                                          \
    F(const int32_t*, slots)              /* [batch] */                                      \
    F(const int32_t*, cache_lengths)      /* [batch] */                                      \
    F(const int32_t*, accepted_indices)   /* [batch, beam_len] */                            \
    F(const int32_t*, num_accepted)       /* [batch] */                                      \
    F(int32_t*, new_lengths)              /* out [batch] */                                  \
    F(void*, stream)                      /* CUDA */                                         \
    F(int64_t, elem_bytes)                                                                   \
    F(int64_t, num_layers)                                                                   \
    F(int64_t, num_slots)                                                                    \
    F(int64_t, num_kv_heads)                                                                 \
    F(int64_t, max_seq_len)                                                                  \
    F(int64_t, head_dim)                                                                     \
    F(int64_t, batch)                                                                        \
    F(int64_t, beam_len)                                                                     \
    F(int64_t, cache_elems)               /* strided forms only, from here on */             \
    F(int64_t, tokens_per_block)                                                             \
    F(int64_t, stride_slot)                                                                  \
    F(int64_t, stride_block)                                                                 \
    F(int64_t, stride_token)                                                                 \
    F(int64_t, stride_layer)                                                                 \
    F(int64_t, stride_kv)                                                                    \
    F(int64_t, stride_head)
REDRAFTER_DECLARE_STRUCT(RedrafterKvRelocateParams, REDRAFTER_KV_RELOCATE_FIELDS)

/* One token per row of logits by the rules of redrafter/sampling.h (CPU only). */
#define REDRAFTER_DRAW_TOKENS_FIELDS(F)                                                      \
    F(int64_t, struct_size)                                                                  \
    F(const void*, logits)          /* [rows, vocab] of dtype */                             \
    F(const float*, temperature)    /* [rows] */                                             \
    F(const int32_t*, top_k)        /* [rows] */                                             \
    F(const float*, top_p)          /* [rows] */                                             \
    F(const float*, uniforms)       /* [rows] */                                             \
    F(int32_t*, tokens)             /* out [rows] */                                         \
    F(int64_t, rows)                                                                         \
    F(int64_t, vocab)                                                                        \
    F(int32_t, dtype)               /* of logits */
REDRAFTER_DECLARE_STRUCT(RedrafterDrawTokensParams, REDRAFTER_DRAW_TOKENS_FIELDS)

/* The CPU linear kernel (cpp/src/linear_cpu.cpp): y = x . w^T (+ bias) with dtypes 0 float32,
 * 2 bfloat16 (w_dtype also 10 q4_1, 11 q8_0 block panels); `threads` workers over the panels
 * (1..256); force_scalar = 1 takes the portable path (tests). */
#define REDRAFTER_LINEAR_FIELDS(F)                                                           \
    F(int64_t, struct_size)                                                                  \
    F(const void*, x)               /* [m, k] of x_dtype */                                  \
    F(const void*, w)               /* packed, or [n, k] (redrafter_linear_cpu) */           \
    F(const float*, bias)           /* [n] or NULL */                                        \
    F(void*, y)                     /* out [m, n] of y_dtype */                              \
    F(int64_t, m)                                                                            \
    F(int64_t, n)                                                                            \
    F(int64_t, k)                                                                            \
    F(int32_t, x_dtype)                                                                      \
    F(int32_t, w_dtype)                                                                      \
    F(int32_t, y_dtype)                                                                      \
    F(int32_t, threads)                                                                      \
    F(int32_t, force_scalar)
REDRAFTER_DECLARE_STRUCT(RedrafterLinearParams, REDRAFTER_LINEAR_FIELDS)

/* The CPU attention kernel (cpp/src/attention_cpu.cpp): out = attention of q over one layer's
 * cache rows `slots`, keys j < s that mask allows (1), scores times `scale`; cache_dtype 0
 * float32, 2 bfloat16; threads and force_scalar as for the linear kernel. */
#define REDRAFTER_ATTENTION_FIELDS(F)                                                        \
    F(int64_t, struct_size)                                                                  \
    F(const float*, q)              /* [b, t, nh, hd] */                                     \
    F(const void*, cache)           /* [2, num_slots, nkv, cap, hd] of cache_dtype */        \
    F(const int64_t*, slots)        /* [b] */                                                \
    F(const uint8_t*, mask)         /* [b, t, s] */                                          \
    F(float*, out)                  /* out [b, t, nh, hd] */                                 \
    F(int64_t, b)                                                                            \
    F(int64_t, t)                                                                            \
    F(int64_t, nh)                                                                           \
    F(int64_t, nkv)                                                                          \
    F(int64_t, hd)                                                                           \
    F(int64_t, s)                                                                            \
    F(int64_t, cap)                                                                          \
    F(int64_t, num_slots)                                                                    \
    F(float, scale)                                                                          \
    F(int32_t, cache_dtype)                                                                  \
    F(int32_t, threads)                                                                      \
    F(int32_t, force_scalar)
REDRAFTER_DECLARE_STRUCT(RedrafterAttentionParams, REDRAFTER_ATTENTION_FIELDS)

/* Embedding rows of a GGUF block table (cpp/src/embed_cpu.cpp): out = rows `ids` (each in
 * [0, rows)) of the q4_1 (fmt 10) / q8_0 (fmt 11) table [rows, k] (qs, float16 d and m, m NULL
 * for q8_0, in the stored layout of redrafter_trt/models/blocks.py), decoded exactly as its
 * decode(); an id out of range is an error and nothing is written. */
#define REDRAFTER_EMBED_BLOCKS_FIELDS(F)                                                     \
    F(int64_t, struct_size)                                                                  \
    F(const void*, qs)                                                                       \
    F(const uint16_t*, d)                                                                    \
    F(const uint16_t*, m)                                                                    \
    F(const int64_t*, ids)          /* [count] */                                            \
    F(float*, out)                  /* out [count, k] */                                     \
    F(int64_t, rows)                                                                         \
    F(int64_t, k)                                                                            \
    F(int64_t, count)                                                                        \
    F(int32_t, fmt)
REDRAFTER_DECLARE_STRUCT(RedrafterEmbedBlocksParams, REDRAFTER_EMBED_BLOCKS_FIELDS)

// clang-format on

/* ---- the operators: CPU references (libredrafter_cpu.so) ---- */
int32_t redrafter_beam_search_step_cpu(const RedrafterBeamSearchParams* params, char* msg, int64_t msg_len);
int32_t redrafter_tree_pack_cpu(const RedrafterTreePackParams* params, char* msg, int64_t msg_len);
int32_t redrafter_accept_cpu(const RedrafterAcceptParams* params, char* msg, int64_t msg_len);
int32_t redrafter_kv_relocate_cpu(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len);
int32_t redrafter_kv_relocate_strided_cpu(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len);
int32_t redrafter_draw_tokens_cpu(const RedrafterDrawTokensParams* params, char* msg, int64_t msg_len);

/* ---- the same operators' CUDA launchers (libredrafter_cuda.so only) ---- */
int32_t redrafter_cuda_abi_version(void);
/* Bytes of device workspace the launcher needs for these params (0 for bad sizes, which the
 * launcher reports). */
size_t redrafter_beam_search_workspace_bytes(const RedrafterBeamSearchParams* params);
size_t redrafter_accept_workspace_bytes(const RedrafterAcceptParams* params);

int32_t redrafter_beam_search_step_cuda(const RedrafterBeamSearchParams* params, char* msg, int64_t msg_len);
int32_t redrafter_tree_pack_cuda(const RedrafterTreePackParams* params, char* msg, int64_t msg_len);
int32_t redrafter_accept_cuda(const RedrafterAcceptParams* params, char* msg, int64_t msg_len);
int32_t redrafter_kv_relocate_cuda(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len);
int32_t redrafter_kv_relocate_strided_cuda(const RedrafterKvRelocateParams* params, char* msg, int64_t msg_len);

/* ---- CPU model kernels (cpp/src/linear_cpu.cpp, attention_cpu.cpp, embed_cpu.cpp,
 * layer_ops_cpu.cpp): batch-invariant, dtypes 0 = float32, 2 = bfloat16; threads on the library's
 * pool (1..256). The small ones take their few arguments directly. ---- */
int64_t redrafter_linear_packed_elems(int64_t n, int64_t k);
int32_t redrafter_linear_pack_cpu(const void* w, int32_t w_dtype, void* packed, int64_t n, int64_t k, char* msg,
                                  int64_t msg_len);
/* w packed by redrafter_linear_pack_cpu / redrafter_linear_pack_blocks_cpu. */
int32_t redrafter_linear_packed_cpu(const RedrafterLinearParams* params, char* msg, int64_t msg_len);
/* The same product with an unpacked float32 / bf16 w [n, k]: packs into a temporary first (tests,
 * one-off calls). */
int32_t redrafter_linear_cpu(const RedrafterLinearParams* params, char* msg, int64_t msg_len);
int32_t redrafter_linear_simd_cpu(void);
/* GGUF block weights (w_dtype 10 = q4_1, 11 = q8_0 in redrafter_linear_packed_cpu; k a multiple of
 * 32): qs, float16 d and m (null for q8_0) in the stored layout (redrafter_trt/models/blocks.py). */
int64_t redrafter_linear_blocks_packed_bytes(int32_t fmt, int64_t n, int64_t k);
int32_t redrafter_linear_pack_blocks_cpu(const void* qs, const uint16_t* d, const uint16_t* m, int32_t fmt,
                                         void* packed, int64_t n, int64_t k, char* msg, int64_t msg_len);
int32_t redrafter_embed_blocks_cpu(const RedrafterEmbedBlocksParams* params, char* msg, int64_t msg_len);
int32_t redrafter_attention_cpu(const RedrafterAttentionParams* params, char* msg, int64_t msg_len);
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
