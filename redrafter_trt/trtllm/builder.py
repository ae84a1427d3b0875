"""``redrafter-build --backend trtllm``: ReDrafter checkpoint -> TensorRT-LLM engine directory.

Engine directory (same ``config.json`` schema as the torch backend's, see
:mod:`redrafter_trt.runtime.engine`): ``config.json`` with ``backend: "trtllm"``, ``pretrained_config``
(the checkpoint's) and ``build_config``; ``rank{i}.engine`` per tensor-parallel rank; the
tokenizer files. Base weights keep the checkpoint's dtype (fp16/bf16; FP8 base GEMMs when the
checkpoint's ``quantization.quant_algo`` is ``"FP8"``), the draft head stays fp16/bf16.

Not run on hardware yet (see :mod:`redrafter_trt.trtllm`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import require
from ..formats.checkpoint import (
    CHECKPOINT_CONFIG,
    ENGINE_CONFIG,
    RedrafterCheckpointConfig,
    copy_tokenizer_files,
    load_rank_shards,
)
from ..models.io import atomic_output_dir
from ..ops.beam_search import DEFAULT_WARP_K
from ..ops.kv_cache import blocks_per_slot
from . import require_trtllm
from .plugins import load_plugin_library

ENGINE_DTYPES = ("float16", "bfloat16")
DEFAULT_TOKENS_PER_BLOCK = 64
#: ``BuildConfig.speculative_decoding_mode`` member the engine is built with (an ``IntFlag`` of
#: ``tensorrt_llm.models.modeling_utils.SpeculativeDecodingMode``; BuildConfig is a pydantic model
#: and rejects the member's name as a string).
SPEC_DECODING_MODE = "EXPLICIT_DRAFT_TOKENS"

# What the GPT attention plugin's speculative-decoding generation phase can run: it has no
# fallback when no XQA kernel fits ("No available XQA kernels are found for speculative decoding
# mode", gptAttentionCommon.cpp), and the XQA kernels take (kernelUtils.cpp, supportConfigHMMA /
# supportConfigQGMMA, decoderXQAImplJIT): fp16/bf16 activations and KV cache, head size a multiple
# of 16 in 16..256, at most 32 query heads per KV head, paged blocks of 16/32/64/128 tokens, RoPE
# (GPT-NeoX), no attention sinks, SM >= 80. The tree size W*L is not limited by those checks; the
# multi-query-token kernels tile it by 16 or 32 query rows (any length).
XQA_DTYPES = ("float16", "bfloat16")
XQA_HEAD_SIZE_RANGE = (16, 256)
XQA_HEAD_SIZE_MULTIPLE = 16
XQA_MAX_HEAD_GROUP = 32
XQA_TOKENS_PER_BLOCK = (16, 32, 64, 128)
XQA_MIN_SM = (8, 0)


def xqa_support_problems(
    *,
    dtype: str,
    head_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    tokens_per_block: int,
    sm: tuple[int, int] | None = None,
) -> list[str]:
    """Why TensorRT-LLM's spec-decoding attention would find no XQA kernel for this engine (empty:
    supported). ``sm`` (compute capability) is checked when given."""
    bad = []
    if dtype not in XQA_DTYPES:
        bad.append(f"dtype {dtype} (XQA: {' or '.join(XQA_DTYPES)})")
    lo, hi = XQA_HEAD_SIZE_RANGE
    if head_size % XQA_HEAD_SIZE_MULTIPLE or not lo <= head_size <= hi:
        bad.append(
            f"head_dim {head_size} (XQA: a multiple of {XQA_HEAD_SIZE_MULTIPLE} in {lo}..{hi})"
        )
    if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads:
        bad.append(
            f"{num_attention_heads} query heads over {num_key_value_heads} KV heads (not a multiple)"
        )
    elif num_attention_heads // num_key_value_heads > XQA_MAX_HEAD_GROUP:
        bad.append(
            f"{num_attention_heads // num_key_value_heads} query heads per KV head (XQA: at most "
            f"{XQA_MAX_HEAD_GROUP})"
        )
    if tokens_per_block not in XQA_TOKENS_PER_BLOCK:
        bad.append(f"tokens_per_block {tokens_per_block} (XQA: one of {XQA_TOKENS_PER_BLOCK})")
    if sm is not None and tuple(sm) < XQA_MIN_SM:
        bad.append(
            f"GPU compute capability {sm[0]}.{sm[1]} (XQA: {XQA_MIN_SM[0]}.{XQA_MIN_SM[1]} or newer)"
        )
    return bad


def check_xqa_support(
    cfg: RedrafterCheckpointConfig,
    tokens_per_block: int,
    sm: tuple[int, int] | None = None,
    where: str = "redrafter-build --backend trtllm",
) -> None:
    """Refuse, at build time, an engine whose generation calls TensorRT-LLM could not run."""
    b = cfg.base
    bad = xqa_support_problems(
        dtype=cfg.dtype,
        head_size=b.head_size,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        tokens_per_block=tokens_per_block,
        sm=sm,
    )
    require(
        not bad,
        f"{where}: TensorRT-LLM's speculative-decoding attention has no kernel for this engine "
        f"(W x L = {cfg.num_beams} x {cfg.draft_len + 1}): "
        + "; ".join(bad)
        + "; use --backend torch for this model",
    )


def check_rope_positions(
    cfg: RedrafterCheckpointConfig,
    max_seq_len: int,
    where: str = "redrafter-build --backend trtllm",
) -> None:
    """Refuse an engine whose RoPE tables would be read past their end.

    TensorRT-LLM sizes the tables by ``max_position_embeddings`` (layers/attention.py:585-722,
    ``create_sinusoidal_positions_for_attention_plugin(max_position_embeddings, ...)``), and the
    attention kernels index them by position unchecked (unfusedAttentionKernels_2_template.h:
    430-436: a tree node's position is its slot's cached length plus its depth). A slot holds up to
    ``max_seq_len`` tokens and a tree reaches depth L - 1 beyond them, so positions reach
    ``max_seq_len + L - 1``: the tables need ``max_seq_len + L`` rows."""
    limit = cfg.base.max_position_embeddings
    beam_len = cfg.draft_len + 1
    require(
        max_seq_len + beam_len <= limit,
        f"{where}: --max_seq_len {max_seq_len} with beams of L = {beam_len} tokens reaches position "
        f"{max_seq_len + beam_len - 1}, past the model's max_position_embeddings {limit} (the "
        f"RoPE tables TensorRT-LLM builds have {limit} rows, read unchecked): use --max_seq_len "
        f"<= {limit - beam_len}",
    )


def build_config_kwargs(
    spec_mode_enum: Any,
    *,
    max_batch_size: int,
    max_input_len: int,
    max_seq_len: int,
    tree_size: int,
    timing_cache: str | os.PathLike,
    max_num_tokens: str | int | None = None,
) -> dict[str, Any]:
    """``tensorrt_llm.builder.BuildConfig`` keyword arguments (without ``plugin_config``).

    ``spec_mode_enum`` is ``SpeculativeDecodingMode``; the mode is passed as its member. With a
    mode other than NONE, TensorRT-LLM's ``build()`` adds ``max_draft_len`` to ``max_seq_len``
    before ``prepare_inputs`` (builder.py), so the engine's KV positions per slot are read back
    from the built engine (:func:`kv_block_dims`), never recomputed from these values.
    ``max_seq_len`` here is the KV positions a slot needs: the user's max_seq_len plus one tree.

    ``timing_cache``: where ``build()`` writes its timing cache (``output_timing_cache``; its
    default ``model.cache`` is relative, i.e. the current directory, and ``build()`` asserts when it
    cannot write it: builder.py:523-524, :1271-1274). The caller passes a path under the build's
    own temporary directory."""
    t_in = max(max_input_len, tree_size)
    return dict(
        max_batch_size=max_batch_size,
        max_input_len=t_in,
        max_seq_len=max_seq_len + tree_size,
        max_beam_width=1,
        max_num_tokens=int(max_num_tokens) if max_num_tokens else max_batch_size * t_in,
        max_draft_len=tree_size - 1,
        speculative_decoding_mode=getattr(spec_mode_enum, SPEC_DECODING_MODE),
        output_timing_cache=str(timing_cache),
    )


def kv_block_dims(build_record: dict[str, Any]) -> tuple[int, int]:
    """``(kv_len, max_blocks)`` of an engine from its ``config.json`` ``build_config`` record:
    ``kv_len`` = the ``max_seq_len`` the engine's ``prepare_inputs`` saw (``engine_max_seq_len``,
    read from the built engine's ``config.build_config``), ``max_blocks`` = the fixed last
    dimension of ``kv_cache_block_offsets`` = ceil(kv_len / tokens_per_block)."""
    require(
        "engine_max_seq_len" in build_record,
        "engine config.json: build_config has no engine_max_seq_len (built by an older redrafter-build, "
        "whose KV block dimension may not match the engine); rebuild the engine",
    )
    kv_len = int(build_record["engine_max_seq_len"])
    tpb = int(build_record.get("tokens_per_block", DEFAULT_TOKENS_PER_BLOCK))
    require(
        kv_len >= 1 and tpb >= 1,
        f"engine config.json: engine_max_seq_len {kv_len}, tokens_per_block {tpb}",
    )
    return kv_len, blocks_per_slot(kv_len, tpb)


def engine_file(rank: int) -> str:
    return f"rank{rank}.engine"


def build_trtllm_engine(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: RedrafterCheckpointConfig,
    *,
    max_batch_size: int,
    max_input_len: int,
    max_seq_len: int,
    overwrite: bool = False,
    warp_k: int = DEFAULT_WARP_K,
    gemm_plugin: str | None = None,
    gpt_attention_plugin: str | None = None,
    kv_cache_type: str | None = None,
    use_paged_context_fmha: str | None = None,
    max_num_tokens: str | int | None = None,
    workers: str | int | None = None,
    tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK,
    **unknown: Any,
) -> Path:
    """Build one engine per tensor-parallel rank and write the engine directory atomically."""
    require(
        not unknown, f"redrafter-build --backend trtllm: unknown build options {sorted(unknown)}"
    )
    check_rope_positions(cfg, max_seq_len)
    trt, trtllm = require_trtllm("redrafter-build --backend trtllm")
    from tensorrt_llm.builder import BuildConfig
    from tensorrt_llm.models.modeling_utils import SpeculativeDecodingMode
    from tensorrt_llm.plugin import PluginConfig

    ckpt = Path(checkpoint_dir)
    require(
        cfg.dtype in ENGINE_DTYPES,
        f"{ckpt}: dtype {cfg.dtype!r}; TensorRT-LLM engines are built from float16 or bfloat16 "
        "checkpoints: convert again with --dtype float16 or --dtype bfloat16",
    )
    require(
        kv_cache_type in (None, "paged"),
        f"--kv_cache_type {kv_cache_type}: the ReDrafter engine uses the paged KV cache layout "
        "(each slot owns a contiguous run of blocks)",
    )
    require(
        tokens_per_block & (tokens_per_block - 1) == 0,
        f"tokens_per_block {tokens_per_block}: not a power of 2",
    )
    raw_cfg = json.loads((ckpt / CHECKPOINT_CONFIG).read_text())
    quant = raw_cfg.get("quantization") or {}
    require(
        quant.get("quant_algo") in (None, "FP8"),
        f"{ckpt}: quantization {quant.get('quant_algo')!r} not supported (None or FP8)",
    )
    sm = None
    try:
        import torch

        if torch.cuda.is_available():
            sm = torch.cuda.get_device_capability()
    except Exception:  # noqa: BLE001 - the capability is only an extra check
        sm = None
    check_xqa_support(cfg, tokens_per_block, sm)
    load_plugin_library()
    cfg_loaded, shards = load_rank_shards(ckpt)
    tree = cfg.num_beams * (cfg.draft_len + 1)

    plugin_dtype = cfg.dtype
    plugins = PluginConfig()
    plugins.gpt_attention_plugin = (
        gpt_attention_plugin if gpt_attention_plugin not in (None, "auto") else plugin_dtype
    )
    plugins.gemm_plugin = (
        None
        if gemm_plugin == "disable"
        else (gemm_plugin if gemm_plugin not in (None, "auto") else plugin_dtype)
    )
    plugins.remove_input_padding = True
    plugins.paged_kv_cache = True
    plugins.tokens_per_block = tokens_per_block
    plugins.context_fmha = True
    plugins.use_paged_context_fmha = use_paged_context_fmha != "disable"
    with tempfile.TemporaryDirectory(prefix="redrafter-build-") as work:
        kwargs = build_config_kwargs(
            SpeculativeDecodingMode,
            max_batch_size=max_batch_size,
            max_input_len=max_input_len,
            max_seq_len=max_seq_len,
            tree_size=tree,
            timing_cache=Path(work) / "model.cache",
            max_num_tokens=max_num_tokens,
        )
        build_config = BuildConfig(**kwargs, plugin_config=plugins)
        engines, built = _build_ranks(build_config, kwargs, cfg_loaded, shards, warp_k, quant)
    record = {
        "max_batch_size": max_batch_size,
        "max_input_len": max_input_len,
        "max_seq_len": max_seq_len,
        "warp_k": warp_k,
        "tokens_per_block": tokens_per_block,
        "max_num_tokens": built["max_num_tokens"],
        "kv_max_seq_len": kwargs["max_seq_len"],
        "engine_max_seq_len": built["max_seq_len"],
        "speculative_decoding_mode": SPEC_DECODING_MODE,
        "dtype": cfg.dtype,
        "gemm_plugin": plugins.gemm_plugin,
        "gpt_attention_plugin": plugins.gpt_attention_plugin,
        "kv_cache_type": "paged",
        # the built engine's value: build() switches paged context FMHA off in some configurations
        # (builder.py:1061-1111), whatever was requested
        "use_paged_context_fmha": built["use_paged_context_fmha"],
        "tensorrt_version": trt.__version__,
        "tensorrt_llm_version": trtllm.__version__,
        "workers": workers,
    }
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        for rank, buf in enumerate(engines):
            with open(tmp / engine_file(rank), "wb") as f:
                f.write(memoryview(buf))
        (tmp / ENGINE_CONFIG).write_text(
            json.dumps(
                {
                    "version": __version__,
                    "backend": "trtllm",
                    "pretrained_config": raw_cfg,
                    "build_config": record,
                },
                indent=2,
            )
        )
        copy_tokenizer_files(ckpt, tmp)
    return Path(output_dir)


def _build_ranks(build_config, kwargs, cfg_loaded, shards, warp_k, quant):
    """Build every rank's engine; return the serialized engines and the values rank 0 was built
    with (``build()`` works on a deep copy of ``build_config``, builder.py:980, and may change it:
    ``max_seq_len`` (+ max_draft_len), ``max_num_tokens``, ``use_paged_context_fmha``)."""
    from tensorrt_llm.builder import build

    from .network import build_model

    engines = []
    built: dict[str, Any] = {}
    for rank, shard in enumerate(shards):
        model = build_model(
            cfg_loaded, rank, warp_k=warp_k, quantization=quant if quant.get("quant_algo") else None
        )
        model.load(shard)
        engine = build(model, build_config)  # works on a deep copy of build_config (builder.py)
        require(
            engine is not None and engine.engine is not None,
            f"TensorRT failed to build rank {rank}",
        )
        used = engine.config.build_config
        # build() clips max_input_len to max_seq_len (builder.py, _init_max_seq_len): refuse rather
        # than record input limits the engine's profiles do not have
        built_in = int(used.max_input_len)
        require(
            built_in == kwargs["max_input_len"],
            f"TensorRT-LLM built rank {rank} with max_input_len {built_in}, "
            f"not {kwargs['max_input_len']}: use --max_input_len <= --max_seq_len",
        )
        values = {
            # the max_seq_len prepare_inputs saw (build() adds max_draft_len in spec-decoding modes)
            "max_seq_len": int(used.max_seq_len),
            "max_num_tokens": int(used.max_num_tokens),
            "use_paged_context_fmha": bool(used.plugin_config.use_paged_context_fmha),
        }
        for k, v in built.items():
            require(values[k] == v, f"rank {rank}: {k} {values[k]} differs from rank 0's {v}")
        built = values
        engines.append(engine.engine)
    return engines, built
