"""``redrafter-build --backend trtllm``: ReDrafter checkpoint -> TensorRT-LLM engine directory.

Engine directory (same ``config.json`` schema as the torch backend's, see
:mod:`redrafter_trt.engine`): ``config.json`` with ``backend: "trtllm"``, ``pretrained_config``
(the checkpoint's) and ``build_config``; ``rank{i}.engine`` per tensor-parallel rank; the
tokenizer files. Base weights keep the checkpoint's dtype (fp16/bf16; FP8 base GEMMs when the
checkpoint's ``quantization.quant_algo`` is ``"FP8"``), the draft head stays fp16/bf16.

Not run on hardware yet (see :mod:`redrafter_trt.trtllm`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import CHECKPOINT_CONFIG, RedrafterCheckpointConfig, copy_tokenizer_files, load_rank_shards
from ..errors import require
from ..models.io import atomic_output_dir
from ..ops.beam_search import DEFAULT_WARP_K
from . import require_trtllm
from .plugins import load_plugin_library

ENGINE_DTYPES = ("float16", "bfloat16")
DEFAULT_TOKENS_PER_BLOCK = 64


def engine_file(rank: int) -> str:
    return f"rank{rank}.engine"


def build_trtllm_engine(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike,
                        cfg: RedrafterCheckpointConfig, *, max_batch_size: int, max_input_len: int,
                        max_seq_len: int, overwrite: bool = False, warp_k: int = DEFAULT_WARP_K,
                        gemm_plugin: str | None = None, gpt_attention_plugin: str | None = None,
                        kv_cache_type: str | None = None, use_paged_context_fmha: str | None = None,
                        max_num_tokens: str | int | None = None, workers: str | int | None = None,
                        tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK, **unknown: Any) -> Path:
    """Build one engine per tensor-parallel rank and write the engine directory atomically."""
    require(not unknown, f"redrafter-build --backend trtllm: unknown build options {sorted(unknown)}")
    trt, trtllm = require_trtllm("redrafter-build --backend trtllm")
    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.plugin import PluginConfig

    from .network import build_model

    ckpt = Path(checkpoint_dir)
    require(cfg.dtype in ENGINE_DTYPES,
            f"{ckpt}: dtype {cfg.dtype!r}; TensorRT-LLM engines are built from float16 or bfloat16 "
            "checkpoints: convert again with --dtype float16 or --dtype bfloat16")
    require(kv_cache_type in (None, "paged"),
            f"--kv_cache_type {kv_cache_type}: the ReDrafter engine uses the paged KV cache layout "
            "(each slot owns a contiguous run of blocks)")
    require(tokens_per_block & (tokens_per_block - 1) == 0, f"tokens_per_block {tokens_per_block}: not a power of 2")
    raw_cfg = json.loads((ckpt / CHECKPOINT_CONFIG).read_text())
    quant = raw_cfg.get("quantization") or {}
    require(quant.get("quant_algo") in (None, "FP8"),
            f"{ckpt}: quantization {quant.get('quant_algo')!r} not supported (None or FP8)")
    load_plugin_library()
    cfg_loaded, shards = load_rank_shards(ckpt)
    tree = cfg.num_beams * (cfg.draft_len + 1)

    plugin_dtype = cfg.dtype
    plugins = PluginConfig()
    plugins.gpt_attention_plugin = (gpt_attention_plugin if gpt_attention_plugin not in (None, "auto")
                                    else plugin_dtype)
    plugins.gemm_plugin = None if gemm_plugin == "disable" else (
        gemm_plugin if gemm_plugin not in (None, "auto") else plugin_dtype)
    plugins.remove_input_padding = True
    plugins.paged_kv_cache = True
    plugins.tokens_per_block = tokens_per_block
    plugins.context_fmha = True
    plugins.use_paged_context_fmha = use_paged_context_fmha != "disable"
    num_tokens = int(max_num_tokens) if max_num_tokens else max_batch_size * max(max_input_len, tree)
    kv_max_seq_len = max_seq_len + tree  # room for the tree verified in the last step
    build_config = BuildConfig(max_batch_size=max_batch_size, max_input_len=max(max_input_len, tree),
                               max_seq_len=kv_max_seq_len, max_beam_width=1, max_num_tokens=num_tokens,
                               max_draft_len=tree - 1, speculative_decoding_mode="explicit_draft_tokens",
                               plugin_config=plugins)

    engines = []
    for rank, shard in enumerate(shards):
        model = build_model(cfg_loaded, rank, warp_k=warp_k,
                            quantization=quant if quant.get("quant_algo") else None)
        model.load(shard)
        engine = build(model, build_config)
        require(engine is not None and engine.engine is not None, f"TensorRT failed to build rank {rank}")
        engines.append(engine.engine)

    record = {
        "max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_seq_len": max_seq_len,
        "warp_k": warp_k, "tokens_per_block": tokens_per_block, "max_num_tokens": num_tokens,
        "kv_max_seq_len": kv_max_seq_len,
        "dtype": cfg.dtype, "gemm_plugin": plugins.gemm_plugin,
        "gpt_attention_plugin": plugins.gpt_attention_plugin, "kv_cache_type": "paged",
        "tensorrt_version": trt.__version__, "tensorrt_llm_version": trtllm.__version__,
        "workers": workers,
    }
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        for rank, buf in enumerate(engines):
            with open(tmp / engine_file(rank), "wb") as f:
                f.write(memoryview(buf))
        (tmp / "config.json").write_text(json.dumps({
            "version": __version__, "backend": "trtllm", "pretrained_config": raw_cfg,
            "build_config": record}, indent=2))
        copy_tokenizer_files(ckpt, tmp)
    return Path(output_dir)
