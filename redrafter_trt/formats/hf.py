"""Hugging Face base model directories: reading one (its ``config.json`` and weights, in
TensorRT-LLM names) and the ``config.json`` to write one back.

Names are mapped by :mod:`.names`; the ReDrafter checkpoint built from a base is :mod:`.checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import RedrafterError, require
from ..models.base import (
    ARCH_QWEN2,
    HF_ARCHITECTURE,
    HF_ARCHITECTURES,
    HF_MODEL_TYPE,
    HF_MODEL_TYPES,
    BaseConfig,
)
from ..models.io import load_state_dict_file, read_json
from . import fp8
from .names import hf_to_trtllm


def _hf_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from transformers 4.x (``rope_theta``/``rope_scaling``) or 5.x
    (``rope_parameters``) configs; scaling is None for plain RoPE."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = None
    theta = raw.get("rope_theta", 10000.0)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = dict(params)
    legacy = raw.get("rope_scaling")
    if (
        isinstance(legacy, dict)
        and (legacy.get("rope_type") or legacy.get("type", "default")) != "default"
    ):
        scaling = dict(legacy)  # a 4.x scaling entry is never silently dropped
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.pop("type", None) or scaling.get("rope_type") or "default"
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
    return float(theta), scaling


def hf_base_config(model_dir: str | os.PathLike) -> BaseConfig:
    """Parse a Hugging Face ``config.json`` of a Llama-family or Qwen2 model."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path, "base model config")
    archs = raw.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    arch = arch or HF_MODEL_TYPES.get(raw.get("model_type", ""))
    require(
        arch is not None,
        f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
        f"supported: {sorted(HF_ARCHITECTURES)}",
    )
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        require(key in raw, f"{path}: missing key {key!r}")
    heads = raw["num_attention_heads"]
    theta, scaling = _hf_rope(raw)
    eos = raw.get("eos_token_id")
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        eos = read_json(gen_cfg, "generation config").get("eos_token_id", eos)
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
    is_qwen = arch == ARCH_QWEN2
    cfg = BaseConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_size=raw.get("head_dim") or raw["hidden_size"] // heads,
        norm_epsilon=float(raw.get("rms_norm_eps", 1e-6)),
        rotary_base=theta,
        rotary_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        qkv_bias=True if is_qwen else bool(raw.get("attention_bias", False)),
        dense_bias=False if is_qwen else bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=window,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=[int(e) for e in eos_list],
    )
    require(
        raw.get("hidden_act", "silu") == "silu",
        f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported (expected 'silu')",
    )
    try:
        cfg.validate()
    except RedrafterError as e:
        raise RedrafterError(f"{path}: {e}") from e
    return cfg


def _hf_weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            require(f.is_file(), f"{index}: names shard {f.name}, which is missing")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    for name in ("pytorch_model.bin", "model.pt"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise RedrafterError(
        f"{model_dir}: no model.safetensors, sharded safetensors with an index, "
        "or pytorch_model.bin found"
    )


def hf_config_dict(cfg: BaseConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for the base (inverse of :func:`hf_base_config`)."""
    d: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE[cfg.architecture]],
        "model_type": HF_MODEL_TYPE[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": cfg.rotary_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0]
        if len(cfg.eos_token_id) == 1
        else (cfg.eos_token_id or None),
    }
    if cfg.architecture != ARCH_QWEN2:
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    return d


def load_hf_base(model_dir: str | os.PathLike) -> tuple[BaseConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face base model directory: its config and its tensors in TensorRT-LLM names.

    An FP8 checkpoint (see :mod:`redrafter_trt.formats.fp8` for what is accepted) comes back in
    TensorRT-LLM's FP8 convention: float8_e4m3fn linear weights plus their
    ``weights_scaling_factor`` / ``activation_scaling_factor`` tensors."""
    model_dir = Path(model_dir)
    require(model_dir.is_dir(), f"{model_dir}: base model directory not found")
    cfg = hf_base_config(model_dir)
    hf: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(model_dir):
        hf.update(load_state_dict_file(f))
    raw = read_json(model_dir / "config.json", "base model config")
    quantized = fp8.hf_fp8_to_trtllm(cfg, hf, raw, str(model_dir), hf_to_trtllm)
    return cfg, quantized if quantized is not None else hf_to_trtllm(cfg, hf, str(model_dir))


__all__ = ["hf_base_config", "hf_config_dict", "load_hf_base"]
