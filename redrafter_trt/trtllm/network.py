"""The ReDrafter step as one TensorRT-LLM network (docs/design.md sections 4-8).

One engine call, per row of the batch (all rows of a call are context rows, or all are
generation rows; the runtime never mixes them):

1. base forward over ``input_ids`` [B, T] (prompt, or the packed tree of the previous call),
   flattened to TensorRT-LLM's packed token layout ``[B*T]`` (every row carries T tokens; tree
   padding and prompt padding are written to cache slots past the row's length and overwritten
   by later calls). GPT attention plugin, paged KV cache with each slot owning a contiguous run
   of blocks; generation rows use spec decoding: ``spec_decoding_packed_mask`` =
   ``packed_mask``, ``spec_decoding_position_offsets`` = ``position_offsets``,
   ``spec_decoding_generation_lengths`` = T.
2. logits at the first ``min(T, W*L)`` nodes (node 0 of a context row is its prompt's last token)
   -> **RedrafterAccept** plugin -> num_accepted, best beam, emitted tokens, accepted path.
3. the context hidden state at the last accepted node; **D unrolled draft steps**: embedding
   (shared with the base) -> RNN state -> draft head -> **RedrafterBeamSearchStep** plugin ->
   reorder beams by parent.
4. **RedrafterTreePack** plugin on the new beams -> the next call's packed tree.

Engine inputs/outputs are the names of :mod:`redrafter_trt.contract` (imported, never retyped)
plus TensorRT-LLM's attention plumbing and :data:`~redrafter_trt.trtllm.ACCEPTED_INDICES`.
``num_draft_steps`` stays a runtime input of the contract, but the engine always drafts D steps;
the runtime replaces the drafted tree by the root for plain decoding.

Not run on hardware yet: written against TensorRT-LLM 1.2's functional API and layers
(``tensorrt_llm.functional``, ``tensorrt_llm.layers``, ``tensorrt_llm.models.LLaMAForCausalLM``
/ ``QWenForCausalLM``); build_scripts/gpu_selftest.sh checks its greedy output against the
PyTorch backend inside the container.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from .. import contract as C
from ..errors import require
from ..formats.checkpoint import RedrafterCheckpointConfig
from ..formats.sharding import padded_vocab_size
from ..ops.beam_search import DEFAULT_WARP_K
from ..ops.kv_cache import blocks_per_slot
from ..ops.tree import mask_words
from . import ACCEPTED_INDICES, require_trtllm
from . import Plumbing as P
from .plugins import ACCEPT, BEAM_SEARCH, TREE_PACK, add_plugin

#: ``PretrainedConfig.architecture`` of the step engine (not in TensorRT-LLM's ``MODEL_MAP``, so its
#: config is constructed directly, never through ``PretrainedConfig.from_dict``).
ENGINE_ARCHITECTURE = "ReDrafterStepEngine"


#: ``seq_length`` of a Qwen2 config: QWenConfig.from_hugging_face's default (qwen/config.py:132) and
#: Attention's ``max_seqlen_for_logn_scaling`` default (layers/attention.py:404).
QWEN_SEQ_LENGTH = 8192


def trtllm_base_config(cfg: RedrafterCheckpointConfig, mapping_rank: int = 0) -> dict[str, Any]:
    """The base model's TensorRT-LLM ``PretrainedConfig`` keyword arguments (LLaMA or QWen).

    Biases: TensorRT-LLM's ``LLaMAConfig`` / ``QWenConfig`` read one ``attn_bias``. Llama's
    attention applies it to qkv and dense alike (``Attention(bias=attn_bias)``, dense_bias
    defaulting to it); Qwen2's to qkv only (``dense_bias=False``). So the checkpoint's
    ``qkv_bias``/``dense_bias`` pair must be (b, b) for Llama and (b, False) for Qwen2."""
    from ..models.base import ARCH_QWEN2, HF_ARCHITECTURE

    b = cfg.base
    if b.architecture == ARCH_QWEN2:
        require(
            not b.dense_bias,
            "Qwen2 checkpoint with an attention output (dense) bias: TensorRT-LLM's "
            "QWenForCausalLM has none (dense_bias=False)",
        )
    else:
        require(
            b.qkv_bias == b.dense_bias,
            f"Llama checkpoint with qkv_bias={b.qkv_bias} but dense_bias="
            f"{b.dense_bias}: TensorRT-LLM's LLaMAForCausalLM uses one attn_bias for both",
        )
    d: dict[str, Any] = {
        "architecture": HF_ARCHITECTURE[b.architecture],
        "dtype": cfg.dtype,
        "logits_dtype": "float32",
        "vocab_size": b.vocab_size,
        "hidden_size": b.hidden_size,
        "intermediate_size": b.intermediate_size,
        "num_hidden_layers": b.num_hidden_layers,
        "num_attention_heads": b.num_attention_heads,
        "num_key_value_heads": b.num_key_value_heads,
        "head_size": b.head_size,
        "hidden_act": "silu",
        "norm_epsilon": b.norm_epsilon,
        "rotary_base": b.rotary_base,
        "rotary_scaling": b.rotary_scaling,
        "max_position_embeddings": b.max_position_embeddings,
        "position_embedding_type": "rope_gpt_neox",
        "attn_bias": b.qkv_bias,
        "mlp_bias": b.mlp_bias,
        "share_embedding_table": False,
        "tie_word_embeddings": b.tie_word_embeddings,
        "mapping": {
            "world_size": cfg.tp_size,
            "tp_size": cfg.tp_size,
            "pp_size": 1,
            "rank": mapping_rank,
        },
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if b.architecture == ARCH_QWEN2:
        # QWenDecoderLayer reads config.qwen_type and config.seq_length (qwen/model.py:60, :68);
        # QWenConfig defines neither: they are stored from **kwargs, as QWenConfig.from_hugging_face
        # passes them (qwen/config.py:197-199; seq_length defaults to 8192 there, :132, and only
        # feeds logn scaling, which Qwen2 leaves off: use_logn_attn False)
        d["qwen_type"] = "qwen2"
        d["seq_length"] = QWEN_SEQ_LENGTH
    return d


#: what a missing TensorRT-LLM stops (every builder below needs it)
BUILDING = "building a ReDrafter TensorRT-LLM engine"


def build_model(
    cfg: RedrafterCheckpointConfig,
    rank: int,
    warp_k: int = DEFAULT_WARP_K,
    quantization: dict[str, Any] | None = None,
):
    """The TensorRT-LLM module of one tensor-parallel rank (weights not loaded yet): the base
    model's transformer and ``lm_head`` (TensorRT-LLM's LLaMA or QWen classes), the draft head
    (:func:`draft_head_class`), and the step of the module docstring in ``forward``."""
    trt, _ = require_trtllm(BUILDING)
    from tensorrt_llm import functional as F
    from tensorrt_llm.layers.attention import Attention, AttentionParams
    from tensorrt_llm.models import LLaMAForCausalLM, QWenForCausalLM
    from tensorrt_llm.models.modeling_utils import PretrainedModel

    from ..models.base import ARCH_QWEN2

    base_dict = trtllm_base_config(cfg, rank)
    if quantization:
        base_dict["quantization"] = quantization
    base_cls = QWenForCausalLM if cfg.base.architecture == ARCH_QWEN2 else LLaMAForCausalLM
    # constructed directly: PretrainedConfig.from_dict looks config["architecture"] up in MODEL_MAP
    config_cls = base_cls.config_class
    base_config = config_cls(**base_dict)
    DraftHead = draft_head_class(cfg, rank)
    W, D = cfg.num_beams, cfg.draft_len
    N = W * (D + 1)
    H = cfg.base.hidden_size

    class ReDrafterEngine(PretrainedModel):
        def __init__(self, config):
            super().__init__(config)
            base = base_cls(
                base_config
            )  # not registered itself: its parts keep the checkpoint's names
            self.transformer = base.transformer  # transformer.*
            self.lm_head = base.lm_head  # lm_head.weight
            self.drafter = DraftHead()  # drafter.*
            # RoPE tables: registered on, and filled from, the top-level model, as
            # DecoderModelForCausalLM does (the base's copies are not part of this module tree)
            Attention.create_attention_const_params(self, config)
            self.position_embedding_type = config.position_embedding_type

        def __post_init__(self):
            # PostInitCaller calls this once per constructed PretrainedModel. The base's own
            # __post_init__ already quantized its layers (FP8 bases) with the checkpoint's config;
            # quantizing again would re-wrap those FP8 linears (FP8Linear is a ColumnLinear) and
            # reach the draft head, which stays in the checkpoint's float dtype.
            self.quant_mode = self.config.quantization.quant_mode

        def prepare_inputs(
            self, max_batch_size: int, max_input_len: int, max_seq_len: int, **_ignored
        ):
            """The engine's inputs (:func:`engine_inputs`)."""
            return engine_inputs(
                cfg, self.config.num_hidden_layers, max_batch_size, max_input_len, max_seq_len
            )

        def forward(self, step: dict, attention: dict, max_input_len: int, tokens_per_block: int):
            x, a = step, attention
            ids = x[C.INPUT_IDS]
            b, t = F.shape(ids, 0), F.shape(ids, 1)
            flat_ids = F.view(
                ids, F.concat([b * t])
            )  # TensorRT-LLM's packed tokens: every row T long
            spec, kv = tree_attention_params(x, a, self.config.num_hidden_layers, N)
            attn = AttentionParams(
                sequence_length=a[P.SEQUENCE_LENGTH],
                context_lengths=a[P.CONTEXT_LENGTHS],
                host_context_lengths=a[P.HOST_CONTEXT_LENGTHS],
                max_context_length=max_input_len,
                host_request_types=a[P.HOST_REQUEST_TYPES],
                host_runtime_perf_knobs=a[P.HOST_RUNTIME_PERF_KNOBS],
                host_context_progress=a[P.HOST_CONTEXT_PROGRESS],
            )
            attn = Attention.fill_attention_params(
                self, attn
            )  # rotary_inv_freq, embed_positions_for_gpt_attention
            hidden = self.transformer(
                flat_ids,
                position_ids=None,
                use_cache=True,
                spec_decoding_params=spec,
                kv_cache_params=kv,
                attention_params=attn,
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            hidden = F.view(hidden, F.concat([b, t, H]))  # [B, T, H] after ln_f
            n_acc, best, bonus, path, emitted, node_hidden = accept_tree(
                cfg, x, hidden, self.lm_head
            )
            # a context row's cache_lengths: prompt tokens prefilled by earlier chunks (0 for a first)
            new_len = F.where(
                x[C.REQUEST_TYPES] == C.CONTEXT,
                x[C.CACHE_LENGTHS] + x[C.INPUT_LENGTHS],
                x[C.CACHE_LENGTHS] + n_acc + 1,
            )
            # ---- drafting context: hidden state at the last accepted node
            last_node = rows_gather(path, F.unsqueeze(n_acc, 1))  # [B, 1]
            context = F.view(rows_gather(node_hidden, last_node), F.concat([b, H]))
            beams = draft_beams(
                cfg, context, bonus, self.transformer.vocab_embedding, self.drafter, warp_k
            )
            flat, plen_next, unpacker, offsets, mask = plugin(
                TREE_PACK, [beams], {"num_beams": W, "beam_len": D + 1}, 5
            )
            outputs = {
                C.NUM_ACCEPTED_TOKENS: n_acc,
                C.ACCEPTED_BEAM_INDEX: best,
                C.OUTPUT_TOKENS: emitted,
                C.NUM_OUTPUT_TOKENS: n_acc + 1,
                C.NEW_CACHE_LENGTHS: new_len,
                C.NEXT_DRAFT_TOKENS: beams,
                C.NEXT_DRAFT_INDICES: unpacker,
                C.NEXT_FLAT_TOKENS: flat,
                C.NEXT_PACKED_LENGTHS: plen_next,
                C.NEXT_POSITION_OFFSETS: offsets,
                C.NEXT_PACKED_MASK: mask,
                ACCEPTED_INDICES: path,
            }
            for name, tensor in outputs.items():
                tensor.mark_output(name, trt.int32)
            return outputs

    engine_config = config_cls(**{**base_dict, "architecture": ENGINE_ARCHITECTURE})
    return ReDrafterEngine(engine_config)


def draft_head_class(cfg: RedrafterCheckpointConfig, rank: int):
    """The draft head's TensorRT-LLM module class (docs/design.md section 3); its parameter names
    are the checkpoint's ``drafter.*`` names, its linears TensorRT-LLM's ReDrafter layout
    (column-parallel with gathered output)."""
    require_trtllm(BUILDING)
    from tensorrt_llm import functional as F
    from tensorrt_llm.layers import ColumnLinear
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.module import Module, ModuleList
    from tensorrt_llm.parameter import Parameter

    mapping = Mapping(world_size=cfg.tp_size, rank=rank, tp_size=cfg.tp_size)
    dtype = cfg.dtype
    H = cfg.base.hidden_size
    dc = cfg.drafter
    K = dc.head_vocab_size  # draft-logit columns: the head's draft vocabulary, or V

    def col(i, o, bias):  # ColumnLinear with gathered output: TensorRT-LLM's ReDrafter layout
        return ColumnLinear(
            i,
            o,
            bias=bias,
            dtype=dtype,
            tp_group=mapping.tp_group,
            tp_size=mapping.tp_size,
            gather_output=True,
        )

    class ResBlock(Module):
        def __init__(self):
            super().__init__()
            self.linear = col(dc.exit_dim, dc.exit_dim, True)

        def forward(self, x):
            return x + F.silu(self.linear(x))

    class DraftHead(Module):
        """docs/design.md section 3; parameter names = the checkpoint's ``drafter.*`` names."""

        def __init__(self):
            super().__init__()
            self.input_proj = col(2 * H, dc.exit_dim, True) if dc.exit_dim != 2 * H else None
            self.layers = ModuleList([ResBlock() for _ in range(dc.num_draft_layers)])
            self.lm_head = col(dc.exit_dim, padded_vocab_size(K, cfg.tp_size), False)
            if (
                dc.draft_vocab_size is not None
            ):  # drafter.draft_vocab [K] int32: full id of each column
                self.draft_vocab = Parameter(shape=(K,), dtype="int32")
            if dc.rnn:
                self.rnn_u = col(H, H, True)
                self.rnn_w = col(H, H, False)

        def state(self, emb, prev):
            if dc.rnn:
                return F.silu(self.rnn_w(emb) + self.rnn_u(prev))
            return prev + emb

        def forward(self, context, state):
            x = F.concat([context, state], dim=-1)
            if self.input_proj is not None:
                x = self.input_proj(x)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(x)

    return DraftHead


# ---------------------------------------------------------------------------- graph helpers
# Slices below: static starts (a list of ints, the ISliceLayer's start parameter) with dynamic
# sizes (an int64 shape tensor from F.shape/F.concat, set as input 2), the pattern TensorRT-LLM's
# own ReDrafter uses (models/redrafter/redrafter_helper.py): no int32 start tensor is paired
# with int64 sizes.


def plugin(name: str, inputs: list, fields: dict[str, int], n_out: int) -> list:
    """Add the ReDrafter plugin ``name`` to the network being built; its ``n_out`` outputs."""
    from tensorrt_llm import functional as F
    from tensorrt_llm._common import default_net

    layer = add_plugin(default_net().trt_network, name, [t.trt_tensor for t in inputs], fields)
    return [F._create_tensor(layer.get_output(i), layer) for i in range(n_out)]


def rows_gather(x, index):
    """x [B, M, ...] gathered along dim 1 by index [B, K] -> [B, K, ...]."""
    from tensorrt_llm import functional as F

    idx = index
    for _ in range(x.ndim() - 2):
        idx = F.unsqueeze(idx, -1)
    target = F.concat(
        [F.shape(index, 0), F.shape(index, 1)] + [F.shape(x, i) for i in range(2, x.ndim())]
    )
    return F.gather(x, 1, F.expand(idx, target))


# ---------------------------------------------------------------------------- the step's parts
def tree_attention_params(x: dict, a: dict, num_layers: int, tree_size: int) -> tuple:
    """The GPT attention plugin's speculative-decoding and paged-KV parameters for a call of
    ``x`` (the contract's inputs) and ``a`` (the attention plumbing): generation rows attend
    through the packed tree mask at the given position offsets, at most ``tree_size`` tokens."""
    from tensorrt_llm import functional as F
    from tensorrt_llm.layers.attention import KeyValueCacheParams, SpecDecodingParams

    ids = x[C.INPUT_IDS]
    b, t = F.shape(ids, 0), F.shape(ids, 1)
    spec = SpecDecodingParams(
        spec_decoding_is_generation_length_variable=True,
        spec_decoding_max_generation_length=tree_size,
        spec_decoding_generation_lengths=a[P.SPEC_DECODING_GENERATION_LENGTHS],
        spec_decoding_position_offsets=x[C.POSITION_OFFSETS],
        spec_decoding_packed_mask=F.view(
            x[C.PACKED_MASK], F.concat([b * t, F.shape(x[C.PACKED_MASK], 2)])
        ),
        spec_decoding_use=a[P.SPEC_DECODING_USE],
    )
    kv = KeyValueCacheParams(
        past_key_value=[None] * num_layers,
        host_past_key_value_lengths=a[P.HOST_PAST_KEY_VALUE_LENGTHS],
        host_max_attention_window_sizes=a[P.HOST_MAX_ATTENTION_WINDOW_SIZES],
        host_sink_token_length=a[P.HOST_SINK_TOKEN_LENGTH],
        kv_cache_block_offsets=a[P.KV_CACHE_BLOCK_OFFSETS],
        host_kv_cache_block_offsets=a[P.HOST_KV_CACHE_BLOCK_OFFSETS],
        host_kv_cache_pool_pointers=a[P.HOST_KV_CACHE_POOL_POINTERS],
        host_kv_cache_pool_mapping=a[P.HOST_KV_CACHE_POOL_MAPPING],
        cache_indirection=a[P.CACHE_INDIRECTION],
    )
    return spec, kv


def accept_tree(cfg: RedrafterCheckpointConfig, x: dict, hidden, lm_head) -> tuple:
    """Acceptance (docs/design.md section 6) from the base's ``hidden`` [B, T, H]: logits at the
    first ``min(T, N)`` nodes (node 0 of a context row: its prompt's last token) through
    ``lm_head`` into the RedrafterAccept plugin. Returns (num_accepted [B], best beam [B], bonus
    token [B], accepted path [B, L], emitted tokens [B, L], the nodes' hidden states [B, N', H])."""
    from tensorrt_llm import functional as F

    W, L = cfg.num_beams, cfg.draft_len + 1
    N, V, H = W * L, cfg.base.vocab_size, cfg.base.hidden_size
    b, t = F.shape(hidden, 0), F.shape(hidden, 1)
    is_ctx = F.unsqueeze(F.unsqueeze(x[C.REQUEST_TYPES] == C.CONTEXT, 1), 2)  # [B, 1, 1]
    last = rows_gather(hidden, F.unsqueeze(x[C.INPUT_LENGTHS] - 1, 1))  # [B, 1, H]
    nodes = F.slice(hidden, starts=[0, 0, 0], sizes=F.concat([b, F.minimum(t, N), H]))  # [B, N', H]
    first = F.where(is_ctx, last, F.slice(nodes, [0, 0, 0], F.concat([b, 1, H])))
    rest = F.slice(nodes, [0, 1, 0], F.concat([b, F.minimum(t, N) - 1, H]))
    node_hidden = F.concat([first, rest], dim=1)
    logits = lm_head(node_hidden)  # [B, N', Vpad]
    logits = F.slice(logits, [0, 0, 0], F.concat([b, F.shape(logits, 1), V]))
    logits = F.cast(logits, "float32")

    ctx_rows = F.unsqueeze(F.unsqueeze(x[C.REQUEST_TYPES] == C.CONTEXT, 1), 2)
    beams_in = F.where(ctx_rows, F.constant(F.int32_array([-1])), x[C.DRAFT_TOKENS])
    unpack_in = F.where(ctx_rows, F.constant(F.int32_array([0])), x[C.DRAFT_INDICES])
    plen = F.where(
        x[C.REQUEST_TYPES] == C.CONTEXT, F.constant(F.int32_array([1])), x[C.INPUT_LENGTHS]
    )
    n_acc, best, bonus, path, emitted = plugin(
        ACCEPT,
        [
            logits,
            beams_in,
            unpack_in,
            plen,
            x[C.TEMPERATURE],
            x[C.TOP_K],
            x[C.TOP_P],
            x[C.UNIFORMS],
        ],
        {"num_beams": W, "beam_len": L},
        5,
    )
    return n_acc, best, bonus, path, emitted, node_hidden


def draft_beams(cfg: RedrafterCheckpointConfig, context, bonus, embedding, drafter, warp_k: int):
    """The D unrolled beam-search steps (docs/design.md section 4) from the drafting ``context``
    [B, H] and the ``bonus`` token [B] (depth 0 of every beam): ``embedding`` (the base's token
    embedding) and the draft head ``drafter`` per step, then the RedrafterBeamSearchStep plugin,
    beams reordered by parent. Returns the beams [B, W, L] int32 (full-vocabulary ids)."""
    from tensorrt_llm import functional as F

    W, D, H, V = cfg.num_beams, cfg.draft_len, cfg.base.hidden_size, cfg.base.vocab_size
    K = cfg.drafter.head_vocab_size
    b = F.shape(context, 0)
    ctx_bw = F.view(F.expand(F.unsqueeze(context, 1), F.concat([b, W, H])), F.concat([b * W, H]))
    state = F.cast(
        F.expand(F.constant(np.zeros([1, H], dtype=np.float32)), F.concat([b * W, H])),
        cfg.dtype,
    )  # s_0 = 0
    neg_inf = F.constant(np.array([[0.0] + [-np.inf] * (W - 1)], dtype=np.float32))
    scores = F.expand(neg_inf, F.concat([b, W]))
    tokens = [F.expand(F.unsqueeze(bonus, 1), F.concat([b, W]))]  # depth 0 = bonus
    vocab_map = (
        drafter.draft_vocab.value
        if cfg.drafter.draft_vocab_size is not None
        else F.constant(np.arange(V, dtype=np.int32))
    )  # [K] full ids
    for _ in range(D):
        emb = embedding(F.view(tokens[-1], F.concat([b * W])))
        state = drafter.state(emb, state)
        draft_logits = drafter(ctx_bw, state)  # [B*W, Kpad]
        draft_logits = F.view(
            F.slice(draft_logits, [0, 0], F.concat([b * W, K])), F.concat([b, W, K])
        )
        # token = vocab_map[column]: full ids, for the next step's embedding and the tree
        scores, parent, token = plugin(
            BEAM_SEARCH,
            [draft_logits, scores, vocab_map],
            {"num_beams": W, "warp_k": warp_k},
            3,
        )
        tokens = [rows_gather(tk, parent) for tk in tokens] + [token]
        state = F.view(
            rows_gather(F.view(state, F.concat([b, W, H])), parent), F.concat([b * W, H])
        )
    return F.stack([F.cast(tk, "int32") for tk in tokens], dim=2)  # [B, W, L]


# ---------------------------------------------------------------------------- the engine's inputs
def engine_inputs(
    cfg: RedrafterCheckpointConfig,
    num_layers: int,
    max_batch_size: int,
    max_input_len: int,
    max_seq_len: int,
) -> dict[str, Any]:
    """The engine's inputs, ``forward``'s keyword arguments: the contract's tensors
    (:func:`step_inputs`), TensorRT-LLM's attention plumbing (:func:`attention_inputs`), the
    longest call and the plugin config's ``tokens_per_block``. ``max_seq_len`` is the KV
    positions per slot (the build's max_seq_len plus one tree)."""
    from tensorrt_llm._common import default_net

    n = cfg.num_beams * (cfg.draft_len + 1)
    tokens_per_block = default_net().plugin_config.tokens_per_block
    bs = [1, (max_batch_size + 1) // 2, max_batch_size]
    return {
        "step": step_inputs(cfg, bs, [1, min(n, max_input_len), max(max_input_len, n)]),
        "attention": attention_inputs(
            bs, num_layers, max_seq_len, blocks_per_slot(max_seq_len, tokens_per_block)
        ),
        "max_input_len": max(max_input_len, n),
        "tokens_per_block": tokens_per_block,
    }


def network_input(name: str, dtype, shape: list[int], dims: list[tuple[str, list]]):
    """One engine input: ``shape`` with -1 for the dims given (min, opt, max) ranges in ``dims``."""
    from tensorrt_llm.functional import Tensor

    return Tensor(name=name, dtype=dtype, shape=shape, dim_range=OrderedDict(dims))


def step_inputs(cfg: RedrafterCheckpointConfig, bs: list[int], t_range: list[int]) -> dict:
    """The contract's inputs for batch sizes ``bs`` and tokens per row ``t_range`` (min, opt,
    max), declared from its table (:data:`redrafter_trt.contract.SPECS`): B, T and the mask
    words dynamic, W and L fixed."""
    trt, _ = require_trtllm(BUILDING)
    W, L = cfg.num_beams, cfg.draft_len + 1
    dtypes = {C.I32: trt.int32, C.F32: trt.float32}
    ranges = {
        "B": ("batch", bs),
        "T": ("tokens", t_range),
        "ceil(T/32)": ("mask_words", [1, mask_words(t_range[1]), mask_words(t_range[2])]),
        "W": ("W", [W] * 3),
        "L": ("L", [L] * 3),
    }
    dynamic = ("B", "T", "ceil(T/32)")
    return {
        s.name: network_input(
            s.name,
            dtypes[s.dtype],
            [-1 if d in dynamic else ranges[d][1][0] for d in s.dims],
            [(ranges[d][0], [ranges[d][1]]) for d in s.dims],
        )
        for s in map(C.SPECS.get, C.ENGINE_INPUTS)
    }


def attention_inputs(bs: list[int], layers: int, max_seq_len: int, max_blocks: int) -> dict:
    """TensorRT-LLM's attention plumbing (its names; paged cache, one pool, slot-contiguous
    blocks, ``max_blocks`` per slot) for batch sizes ``bs``."""
    trt, _ = require_trtllm(BUILDING)
    inp = network_input
    i32 = trt.int32
    block_offsets = [
        ("pools", [[1] * 3]),
        ("batch", [bs]),
        ("kv", [[2] * 3]),
        ("blocks", [[max_blocks] * 3]),
    ]
    return {
        P.SEQUENCE_LENGTH: inp(P.SEQUENCE_LENGTH, i32, [-1], [("batch", [bs])]),
        P.HOST_PAST_KEY_VALUE_LENGTHS: inp(
            P.HOST_PAST_KEY_VALUE_LENGTHS, i32, [-1], [("batch", [bs])]
        ),
        P.HOST_MAX_ATTENTION_WINDOW_SIZES: inp(
            P.HOST_MAX_ATTENTION_WINDOW_SIZES, i32, [layers], [("layers", [[layers] * 3])]
        ),
        P.HOST_SINK_TOKEN_LENGTH: inp(P.HOST_SINK_TOKEN_LENGTH, i32, [1], [("one", [[1] * 3])]),
        P.CONTEXT_LENGTHS: inp(P.CONTEXT_LENGTHS, i32, [-1], [("batch", [bs])]),
        P.HOST_CONTEXT_LENGTHS: inp(P.HOST_CONTEXT_LENGTHS, i32, [-1], [("batch", [bs])]),
        P.HOST_REQUEST_TYPES: inp(P.HOST_REQUEST_TYPES, i32, [-1], [("batch", [bs])]),
        P.KV_CACHE_BLOCK_OFFSETS: inp(
            P.KV_CACHE_BLOCK_OFFSETS, i32, [1, -1, 2, max_blocks], block_offsets
        ),
        P.HOST_KV_CACHE_BLOCK_OFFSETS: inp(
            P.HOST_KV_CACHE_BLOCK_OFFSETS, i32, [1, -1, 2, max_blocks], block_offsets
        ),
        P.HOST_KV_CACHE_POOL_POINTERS: inp(
            P.HOST_KV_CACHE_POOL_POINTERS,
            trt.int64,
            [1, 2],
            [("pools", [[1] * 3]), ("two", [[2] * 3])],
        ),
        P.HOST_KV_CACHE_POOL_MAPPING: inp(
            P.HOST_KV_CACHE_POOL_MAPPING,
            i32,
            [layers, 2],
            [("layers", [[layers] * 3]), ("two", [[2] * 3])],
        ),
        P.CACHE_INDIRECTION: inp(
            P.CACHE_INDIRECTION,
            i32,
            [-1, 1, -1],
            [
                ("batch", [bs]),
                ("beam", [[1] * 3]),
                ("max_seq", [[1, max_seq_len // 2 or 1, max_seq_len]]),
            ],
        ),
        P.HOST_RUNTIME_PERF_KNOBS: inp(
            P.HOST_RUNTIME_PERF_KNOBS, trt.int64, [16], [("knobs", [[16] * 3])]
        ),
        P.HOST_CONTEXT_PROGRESS: inp(P.HOST_CONTEXT_PROGRESS, trt.int64, [1], [("one", [[1] * 3])]),
        P.SPEC_DECODING_GENERATION_LENGTHS: inp(
            P.SPEC_DECODING_GENERATION_LENGTHS, i32, [-1], [("batch", [bs])]
        ),
        P.SPEC_DECODING_USE: inp(P.SPEC_DECODING_USE, i32, [1], [("one", [[1] * 3])]),
    }
