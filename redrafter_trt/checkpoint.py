"""Hugging Face base + drafter -> TensorRT-LLM style ReDrafter checkpoint, and back.

The one place that knows tensor names: Hugging Face names of the base, TensorRT-LLM names of the
checkpoint (which are also :class:`~redrafter_trt.models.base.BaseModel`'s own parameter names),
and the drafter's Apple names vs. its ``drafter.*`` checkpoint names.

Checkpoint directory (SPEC section 10): ``config.json`` + ``rank{i}.safetensors`` + the base's
tokenizer files when it has them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import fp8
from .contract import check_num_beams
from .errors import RedrafterError, require
from .models.base import (ARCH_LLAMA, ARCH_QWEN2, HF_ARCHITECTURE, HF_ARCHITECTURES, HF_MODEL_TYPE, HF_MODEL_TYPES,
                          BaseConfig, BaseModel)
from .models.drafter import (DRAFT_VOCAB, Drafter, DrafterConfig, check_draft_vocab, expected_drafter_shapes,
                             load_checked, load_drafter_state,
                             validate_against_base)
from .models.io import atomic_output_dir, load_state_dict_file, read_json, save_safetensors

CHECKPOINT_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REDRAFTER_ARCHITECTURES = {ARCH_LLAMA: "ReDrafterForLLaMALM", ARCH_QWEN2: "ReDrafterForQWenLM"}
#: Base config fields written at the top level of the checkpoint config (TensorRT-LLM names).
_BASE_KEYS = [f for f in BaseConfig.__dataclass_fields__ if f != "architecture"]


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


# --------------------------------------------------------------------------- Hugging Face base
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
    if isinstance(legacy, dict) and (legacy.get("rope_type") or legacy.get("type", "default")) != "default":
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
    require(arch is not None, f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {sorted(HF_ARCHITECTURES)}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
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
    require(raw.get("hidden_act", "silu") == "silu",
            f"{path}: hidden_act {raw.get('hidden_act')!r} is not supported (expected 'silu')")
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
    raise RedrafterError(f"{model_dir}: no model.safetensors, sharded safetensors with an index, "
                         "or pytorch_model.bin found")


def hf_to_trtllm(cfg: BaseConfig, hf: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) Hugging Face base tensors to TensorRT-LLM names."""
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        require(name in hf, f"{where}: missing tensor {name}")
        return hf[name]

    out["transformer.vocab_embedding.weight"] = take("model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "attention.qkv.weight"] = torch.cat(
            [take(src + f"self_attn.{p}_proj.weight") for p in "qkv"], 0)
        if cfg.qkv_bias:
            out[dst + "attention.qkv.bias"] = torch.cat(
                [take(src + f"self_attn.{p}_proj.bias") for p in "qkv"], 0)
        out[dst + "attention.dense.weight"] = take(src + "self_attn.o_proj.weight")
        if cfg.dense_bias:
            out[dst + "attention.dense.bias"] = take(src + "self_attn.o_proj.bias")
        for hf_name, trt_name in (("gate_proj", "fc"), ("up_proj", "gate"), ("down_proj", "proj")):
            out[dst + f"mlp.{trt_name}.weight"] = take(src + f"mlp.{hf_name}.weight")
            if cfg.mlp_bias:
                out[dst + f"mlp.{trt_name}.bias"] = take(src + f"mlp.{hf_name}.bias")
    out["transformer.ln_f.weight"] = take("model.norm.weight")
    if "lm_head.weight" in hf and not cfg.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    else:
        require(cfg.tie_word_embeddings or "lm_head.weight" in hf, f"{where}: missing lm_head.weight")
        out["lm_head.weight"] = out["transformer.vocab_embedding.weight"]
    return out


def trtllm_to_hf(cfg: BaseConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TensorRT-LLM names -> Hugging Face names (inverse of :func:`hf_to_trtllm`)."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    out = {"model.embed_tokens.weight": sd["transformer.vocab_embedding.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"transformer.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "post_layernorm.weight"]
        for kind in ("weight", "bias"):
            if src + f"attention.qkv.{kind}" in sd:
                q, k, v = sd[src + f"attention.qkv.{kind}"].split([nh * hd, nkv * hd, nkv * hd], 0)
                for p, t in zip("qkv", (q, k, v)):
                    out[dst + f"self_attn.{p}_proj.{kind}"] = t
            if src + f"attention.dense.{kind}" in sd:
                out[dst + f"self_attn.o_proj.{kind}"] = sd[src + f"attention.dense.{kind}"]
            for hf_name, trt_name in (("gate_proj", "fc"), ("up_proj", "gate"), ("down_proj", "proj")):
                if src + f"mlp.{trt_name}.{kind}" in sd:
                    out[dst + f"mlp.{hf_name}.{kind}"] = sd[src + f"mlp.{trt_name}.{kind}"]
    return out


def hf_config_dict(cfg: BaseConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for the base (inverse of :func:`hf_base_config`)."""
    d: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE[cfg.architecture]],
        "model_type": HF_MODEL_TYPE[cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_size,
        "rms_norm_eps": cfg.norm_epsilon, "rope_theta": cfg.rotary_base,
        "rope_scaling": cfg.rotary_scaling, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else (cfg.eos_token_id or None),
    }
    if cfg.architecture != ARCH_QWEN2:
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    return d


def load_hf_base(model_dir: str | os.PathLike) -> tuple[BaseConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face base model directory: its config and its tensors in TensorRT-LLM names.

    An FP8 checkpoint (see :mod:`redrafter_trt.fp8` for what is accepted) comes back in
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


# --------------------------------------------------------------------------- drafter names
#: Checkpoint config key of the draft head's reduced vocabulary K (absent: K = V).
REDRAFTER_DRAFT_VOCAB_SIZE = "redrafter_draft_vocab_size"
#: Checkpoint name of the head's [K] int32 id map (Apple name :data:`DRAFT_VOCAB`).
CKPT_DRAFT_VOCAB = "drafter." + DRAFT_VOCAB


def drafter_to_checkpoint_names(cfg: DrafterConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apple names -> ``drafter.*`` TensorRT-LLM ReDrafter names."""
    out = {}
    n = cfg.num_draft_layers
    for k, v in sd.items():
        if k == f"lm_head.{n}.weight":
            out["drafter.lm_head.weight"] = v
        elif k.startswith("lm_head."):
            out["drafter.layers." + k[len("lm_head."):]] = v
        else:
            out["drafter." + k] = v
    return out


def drafter_from_checkpoint_names(cfg: DrafterConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``drafter.*`` names -> Apple names (inverse of :func:`drafter_to_checkpoint_names`)."""
    out = {}
    for k, v in sd.items():
        k = k[len("drafter."):]
        if k == "lm_head.weight":
            out[f"lm_head.{cfg.num_draft_layers}.weight"] = v
        elif k.startswith("layers."):
            out["lm_head." + k[len("layers."):]] = v
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- checkpoint
@dataclass
class RedrafterCheckpointConfig:
    base: BaseConfig
    drafter: DrafterConfig
    num_beams: int
    draft_len: int
    greedy_search: bool
    dtype: str
    tp_size: int = 1
    random_drafter: bool = False
    #: None, or "FP8": base linears in float8_e4m3fn with per-tensor scales (:mod:`.fp8`)
    quant_algo: str | None = None

    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict()
        hf_arch = HF_ARCHITECTURE[self.base.architecture]
        return {
            "architecture": REDRAFTER_ARCHITECTURES[self.base.architecture],
            "base_model_architecture": hf_arch,
            "dtype": self.dtype,
            "logits_dtype": "float32",
            "hidden_act": "silu",
            "position_embedding_type": "rope_gpt_neox",
            **{k: base[k] for k in _BASE_KEYS},
            **({"qwen_type": "qwen2"} if self.base.architecture == ARCH_QWEN2 else {}),
            "redrafter_num_beams": self.num_beams,
            "redrafter_draft_len_per_beam": self.draft_len,
            "redrafter_greedy_search": self.greedy_search,
            "redrafter_num_layers": self.drafter.num_draft_layers,
            "redrafter_hidden_size": self.drafter.hidden_size,
            "redrafter_exit_dim": self.drafter.exit_dim,
            "redrafter_is_rnn": self.drafter.rnn,
            **({REDRAFTER_DRAFT_VOCAB_SIZE: self.drafter.draft_vocab_size}
               if self.drafter.draft_vocab_size is not None else {}),
            "redrafter_random_init": self.random_drafter,
            "mapping": {"world_size": self.tp_size, "tp_size": self.tp_size, "pp_size": 1},
            "quantization": fp8.quantization_config(self.quant_algo),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "RedrafterCheckpointConfig":
        try:
            require(d.get("architecture") in REDRAFTER_ARCHITECTURES.values(),
                    f"architecture {d.get('architecture')!r} is not a ReDrafter checkpoint "
                    f"({sorted(REDRAFTER_ARCHITECTURES.values())})")
            base_arch = HF_ARCHITECTURES.get(d.get("base_model_architecture", ""))
            require(base_arch is not None, f"unsupported base_model_architecture "
                    f"{d.get('base_model_architecture')!r}")
            base = BaseConfig.from_dict({**{k: d[k] for k in _BASE_KEYS if k in d},
                                         "architecture": base_arch})
            for key in ("redrafter_num_beams", "redrafter_draft_len_per_beam", "redrafter_num_layers",
                        "redrafter_exit_dim", "dtype"):
                require(key in d, f"missing key {key!r}")
            drafter = DrafterConfig(vocab_size=base.vocab_size,
                                    hidden_size=d.get("redrafter_hidden_size", base.hidden_size),
                                    exit_dim=d["redrafter_exit_dim"],
                                    num_draft_layers=d["redrafter_num_layers"],
                                    rnn=bool(d.get("redrafter_is_rnn", True)),
                                    draft_vocab_size=d.get(REDRAFTER_DRAFT_VOCAB_SIZE))
            drafter.validate()
            cfg = cls(base=base, drafter=drafter, num_beams=d["redrafter_num_beams"],
                      draft_len=d["redrafter_draft_len_per_beam"],
                      greedy_search=bool(d.get("redrafter_greedy_search", True)),
                      dtype=d["dtype"], tp_size=int(d.get("mapping", {}).get("tp_size", 1)),
                      random_drafter=bool(d.get("redrafter_random_init", False)),
                      quant_algo=(d.get("quantization") or {}).get("quant_algo"))
            cfg.validate()
        except RedrafterError as e:
            raise RedrafterError(f"{where}: {e}") from e
        return cfg

    def validate(self) -> None:
        require(isinstance(self.num_beams, int) and self.num_beams >= 1,
                f"redrafter_num_beams (--redrafter_num_beams) must be >= 1, got {self.num_beams}")
        require(isinstance(self.draft_len, int) and self.draft_len >= 1,
                f"redrafter_draft_len_per_beam (--redrafter_draft_len_per_beam) must be >= 1, "
                f"got {self.draft_len}")
        check_num_beams(self.num_beams, self.base.vocab_size, "redrafter_num_beams")
        require(self.num_beams <= self.drafter.head_vocab_size,
                f"redrafter_num_beams {self.num_beams} exceeds the draft head's vocabulary "
                f"(draft_vocab_size {self.drafter.head_vocab_size})")
        require(self.draft_len + 1 <= 64, f"beam length D+1 = {self.draft_len + 1} exceeds 64")
        require(self.dtype in DTYPES, f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
        require(self.quant_algo in (None, fp8.QUANT_ALGO),
                f"quantization.quant_algo {self.quant_algo!r} not supported (None or {fp8.QUANT_ALGO!r})")
        check_tp_size(self.base, self.drafter, self.tp_size)
        validate_against_base(self.drafter, self.base.hidden_size, self.base.vocab_size,
                              (self.base.vocab_size, self.base.hidden_size), "checkpoint")


def convert_checkpoint(base_cfg: BaseConfig, base_sd: dict[str, torch.Tensor], drafter: Drafter,
                       output_dir: str | os.PathLike, *, dtype: str = "float32", num_beams: int = 4,
                       draft_len: int = 4, greedy_search: bool = True, tp_size: int = 1,
                       tokenizer_dir: str | os.PathLike | None = None, random_drafter: bool = False,
                       overwrite: bool = False, quantize: str | None = None,
                       calibration: list[list[int]] | None = None) -> Path:
    """Write the ReDrafter checkpoint directory atomically; returns its path.

    ``base_sd`` in TensorRT-LLM's FP8 convention (FP8 Hugging Face checkpoints read by
    :func:`load_hf_base`) writes an FP8 checkpoint; ``quantize="fp8"`` quantizes a float base's
    linears to FP8 per-tensor (weight scale = amax / 448). Either way every FP8 linear needs a
    static activation scale: the base's own, or measured on ``calibration`` (token-id rows)."""
    require(quantize in (None, "fp8"), f"--quantize {quantize!r}: expected fp8")
    quantized = fp8.is_quantized_state_dict(base_sd)
    require(not (quantize and quantized),
            "--quantize fp8: the base model is already FP8; convert it without --quantize")
    quant_algo = fp8.QUANT_ALGO if (quantize or quantized) else None
    cfg = RedrafterCheckpointConfig(base=base_cfg, drafter=drafter.config, num_beams=num_beams,
                                    draft_len=draft_len, greedy_search=greedy_search, dtype=dtype,
                                    tp_size=tp_size, random_drafter=random_drafter,
                                    quant_algo=quant_algo)
    cfg.validate()
    # Base tensors must be exactly what the modeling expects, and finite.
    expected = {k: tuple(v.shape) for k, v in _meta_base(base_cfg).state_dict().items()}
    for name, shape in expected.items():
        require(name in base_sd, f"base model: missing tensor {name}")
        require(tuple(base_sd[name].shape) == shape,
                f"base model: tensor {name} has shape {tuple(base_sd[name].shape)}, expected {shape}")
    for name, t in base_sd.items():
        require(fp8.all_finite(t), f"base model: tensor {name} has non-finite values")
    require(calibration is None or quant_algo,
            "--calib_input_ids_file: calibration is for --quantize fp8 or an FP8 base only")
    if quant_algo:
        linears = fp8.fp8_linear_names(base_cfg.num_hidden_layers)
        has_act = all(f"{n}.{fp8.ACT_SCALE}" in base_sd for n in linears)
        require(calibration is None or quantize or not has_act,
                "--calib_input_ids_file: the FP8 base already has static input scales "
                "(input_scale), which are used; drop --calib_input_ids_file")
        if quantize or not has_act:
            if calibration is None:
                raise RedrafterError(
                    ("--quantize fp8" if quantize else "base model: FP8 without static input "
                     "scales (input_scale)") + ": no activation scales. " + fp8.NEEDS_ACT_SCALES)
            scales = fp8.calibrate_activation_scales(base_cfg, base_sd, calibration)
            if quantize:
                base_sd = fp8.quantize_state_dict(base_cfg.num_hidden_layers, base_sd, scales)
            else:
                base_sd = {**base_sd, **{f"{n}.{fp8.ACT_SCALE}": s for n, s in scales.items()}}
        fp8.check_trtllm_fp8(base_cfg.num_hidden_layers, base_sd, "base model")
        expected.update({k: tuple(v.shape) for k, v in base_sd.items()
                         if k.endswith((fp8.WEIGHT_SCALE, fp8.ACT_SCALE))})
    torch_dtype = DTYPES[dtype]
    tensors = {k: base_sd[k].contiguous().clone() if fp8.is_fp8(base_sd[k])
               or k.endswith((fp8.WEIGHT_SCALE, fp8.ACT_SCALE))
               else base_sd[k].to(torch_dtype).contiguous().clone() for k in expected}
    if drafter.vocab_map is not None:
        check_draft_vocab(drafter.vocab_map, drafter.config, "drafter")
    for k, v in drafter_to_checkpoint_names(drafter.config, drafter.state_dict()).items():
        require(bool(torch.isfinite(v).all()), f"drafter: tensor {k} has non-finite values")
        # The id map stays int32; weights take the checkpoint dtype.
        tensors[k] = (v.detach().to(torch_dtype) if v.is_floating_point() else v.detach()).contiguous().clone()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        for rank in range(tp_size):
            save_safetensors(tp_shard(tensors, cfg, rank), tmp / rank_file(rank),
                             metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(output_dir)


# --------------------------------------------------------------------------- tensor parallelism
# TensorRT-LLM's layouts (its Llama/Qwen checkpoints and its ReDrafter drafter): column-parallel
# weights split along dim 0 (qkv per q/k/v head group, mlp.fc, mlp.gate, lm_head, every drafter
# linear: ColumnLinear with gather_output), row-parallel weights along dim 1 (attention.dense,
# mlp.proj; their biases are replicated), everything else replicated (embedding, norms).
# Vocabulary-sized weights are zero-padded to a multiple of tp_size first (TensorRT-LLM's
# vocab_size_padded); :func:`tp_merge` trims the padding again.
_COLUMN, _ROW, _QKV, _VOCAB, _REPLICATED = "column", "row", "qkv", "vocab", "replicated"


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """TensorRT-LLM's ``vocab_size_padded``: the vocabulary rounded up to a multiple of tp_size."""
    return -(-vocab_size // tp_size) * tp_size


def check_tp_size(base: BaseConfig, drafter: DrafterConfig, tp_size: int) -> None:
    """Raise unless every split dimension divides by ``tp_size`` (``--tp_size``)."""
    require(isinstance(tp_size, int) and tp_size >= 1, f"tp_size (--tp_size) must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    nkv = base.num_key_value_heads
    for what, size in (("num_attention_heads", base.num_attention_heads),
                       ("intermediate_size", base.intermediate_size),
                       ("hidden_size", base.hidden_size), ("redrafter_exit_dim", drafter.exit_dim)):
        require(size % tp_size == 0, f"--tp_size {tp_size} does not divide the {what} {size}: "
                "choose a tp_size that divides the model's head count and widths")
    require(nkv % tp_size == 0 or tp_size % nkv == 0,
            f"--tp_size {tp_size}: num_key_value_heads {nkv} must be a multiple or a divisor of it "
            "(fewer KV heads than ranks are replicated, as in TensorRT-LLM)")


def _tp_rule(name: str, ndim: int) -> str:
    if name.endswith("_scaling_factor") or name == CKPT_DRAFT_VOCAB:  # FP8 scales; the [K] id map
        return _REPLICATED
    if name in ("lm_head.weight", "drafter.lm_head.weight"):
        return _VOCAB
    if name.startswith("drafter."):
        return _COLUMN
    if ".attention.qkv." in name:
        return _QKV
    if name.endswith((".attention.dense.weight", ".mlp.proj.weight")) and ndim == 2:
        return _ROW
    if ".mlp.fc." in name or ".mlp.gate." in name:
        return _COLUMN
    return _REPLICATED


def _kv_heads_of_rank(base: BaseConfig, tp_size: int, rank: int) -> tuple[int, int]:
    """(first KV head, number of KV heads) of ``rank``; ranks share a head when tp_size > heads."""
    nkv = base.num_key_value_heads
    if nkv >= tp_size:
        return rank * (nkv // tp_size), nkv // tp_size
    return rank // (tp_size // nkv), 1


def tp_shard(tensors: dict[str, torch.Tensor], cfg: "RedrafterCheckpointConfig",
             rank: int) -> dict[str, torch.Tensor]:
    """The tensors of tensor-parallel ``rank`` (a copy of all of them for tp_size 1)."""
    tp, base = cfg.tp_size, cfg.base
    require(0 <= rank < tp, f"rank {rank} outside [0, {tp})")
    if tp == 1:
        return dict(tensors)
    hd = base.head_size
    q_size, kv_size = base.num_attention_heads * hd, base.num_key_value_heads * hd
    out = {}
    for name, t in tensors.items():
        rule = _tp_rule(name, t.dim())
        if rule == _ROW:
            t = t.chunk(tp, 1)[rank]
        elif rule == _COLUMN:
            t = t.chunk(tp, 0)[rank]
        elif rule == _VOCAB:
            pad = padded_vocab_size(t.shape[0], tp) - t.shape[0]
            if pad:
                t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], 0)
            t = t.chunk(tp, 0)[rank]
        elif rule == _QKV:
            q, k, v = t.split([q_size, kv_size, kv_size], 0)
            first, count = _kv_heads_of_rank(base, tp, rank)
            kv = slice(first * hd, (first + count) * hd)
            t = torch.cat([q.chunk(tp, 0)[rank], k[kv], v[kv]], 0)
        out[name] = t.contiguous().clone()
    return out


def tp_merge(shards: list[dict[str, torch.Tensor]], cfg: "RedrafterCheckpointConfig") -> dict[str, torch.Tensor]:
    """Inverse of :func:`tp_shard`: the full tensors from every rank's tensors (rank order)."""
    tp, base = cfg.tp_size, cfg.base
    require(len(shards) == tp, f"expected {tp} rank shards, got {len(shards)}")
    hd, nkv = base.head_size, base.num_key_value_heads
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        rule = _tp_rule(name, parts[0].dim()) if tp > 1 else _REPLICATED
        if rule == _REPLICATED:
            out[name] = parts[0]
        elif rule == _ROW:
            out[name] = torch.cat(parts, 1)
        elif rule == _COLUMN:
            out[name] = torch.cat(parts, 0)
        elif rule == _VOCAB:
            rows = cfg.drafter.head_vocab_size if name == "drafter.lm_head.weight" else base.vocab_size
            out[name] = torch.cat(parts, 0)[:rows]
        else:  # _QKV: q from every rank, each KV head once
            qs, ks, vs = [], [], []
            for rank, p in enumerate(parts):
                _, count = _kv_heads_of_rank(base, tp, rank)
                q, k, v = p.split([p.shape[0] - 2 * count * hd, count * hd, count * hd], 0)
                qs.append(q)
                if nkv >= tp or rank % (tp // nkv) == 0:
                    ks.append(k)
                    vs.append(v)
            out[name] = torch.cat([*qs, *ks, *vs], 0)
    return out


def load_rank_shards(ckpt_dir: str | os.PathLike) -> tuple["RedrafterCheckpointConfig", list[dict[str, torch.Tensor]]]:
    """The config and every rank's tensors of a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    cfg = read_checkpoint_config(ckpt_dir)
    shards = []
    for rank in range(cfg.tp_size):
        f = ckpt_dir / rank_file(rank)
        require(f.is_file(), f"{ckpt_dir}: missing {rank_file(rank)} (tp_size {cfg.tp_size})")
        shards.append(load_state_dict_file(f))
    return cfg, shards


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def _meta_base(cfg: BaseConfig) -> BaseModel:
    with torch.device("meta"):
        return BaseModel(cfg)


def read_checkpoint_config(ckpt_dir: str | os.PathLike) -> RedrafterCheckpointConfig:
    path = Path(ckpt_dir) / CHECKPOINT_CONFIG
    return RedrafterCheckpointConfig.from_dict(read_json(path, "checkpoint config"), str(path))


def load_checkpoint_models(ckpt_dir: str | os.PathLike, weights_file: str | os.PathLike | None = None,
                           dtype: torch.dtype | None = None,
                           config: RedrafterCheckpointConfig | None = None,
                           ) -> tuple[RedrafterCheckpointConfig, BaseModel, Drafter]:
    """Build the base model and drafter from a checkpoint directory (or, with ``config``
    given, from any directory holding ``rank0.safetensors``, such as a torch engine)."""
    ckpt_dir = Path(ckpt_dir)
    cfg = config or read_checkpoint_config(ckpt_dir)
    require(cfg.tp_size == 1,
            f"{ckpt_dir}: a tp_size {cfg.tp_size} checkpoint; the torch backend runs tp_size 1 only: "
            "convert again with --tp_size 1, or build it with --backend trtllm inside the "
            "TensorRT-LLM container")
    weights = Path(weights_file) if weights_file else ckpt_dir / rank_file(0)
    sd = load_state_dict_file(weights)
    if cfg.quant_algo == fp8.QUANT_ALGO:  # the torch modeling runs FP8 weights dequantized
        fp8.check_trtllm_fp8(cfg.base.num_hidden_layers,
                             {k: v for k, v in sd.items() if not k.startswith("drafter.")}, str(weights))
        sd = fp8.dequantize_state_dict(sd, str(weights))
    else:
        bad = sorted(k for k, v in sd.items() if fp8.is_fp8(v))
        require(not bad, f"{weights}: tensor {bad[0] if bad else ''} is FP8 but the config's "
                "quantization.quant_algo is not 'FP8'")
    torch_dtype = dtype or DTYPES[cfg.dtype]
    base_sd = {k: v for k, v in sd.items() if not k.startswith("drafter.")}
    drafter_sd = drafter_from_checkpoint_names(
        cfg.drafter, {k: v for k, v in sd.items() if k.startswith("drafter.")})
    base = BaseModel(cfg.base).to(torch_dtype)
    if cfg.base.tie_word_embeddings and "lm_head.weight" in base_sd:
        require(torch.equal(base_sd["lm_head.weight"], base_sd["transformer.vocab_embedding.weight"]),
                f"{weights}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    load_checked(base, base_sd, str(weights))
    drafter = Drafter(cfg.drafter).to(torch_dtype)
    load_drafter_state(drafter, drafter_sd, str(weights))
    base.eval()
    drafter.eval()
    return cfg, base, drafter


__all__ = ["convert_checkpoint", "load_hf_base", "hf_base_config", "hf_to_trtllm", "trtllm_to_hf",
           "hf_config_dict",
           "read_checkpoint_config", "load_checkpoint_models", "RedrafterCheckpointConfig",
           "drafter_to_checkpoint_names", "drafter_from_checkpoint_names", "expected_drafter_shapes",
           "copy_tokenizer_files", "rank_file", "DTYPES", "check_tp_size", "padded_vocab_size",
           "tp_shard", "tp_merge", "load_rank_shards", "REDRAFTER_DRAFT_VOCAB_SIZE", "CKPT_DRAFT_VOCAB"]


# --------------------------------------------------------------------------- what a directory is
DIR_KINDS = {
    "engine": "a redrafter-build engine directory (give it to redrafter-run --engine_dir)",
    "checkpoint": "a redrafter-convert checkpoint (give it to redrafter-build --checkpoint_dir)",
    "drafter": "a draft head directory (give it to redrafter-convert --drafter_model_dir)",
    "base": "a Hugging Face base model directory (give it to --model_dir)",
}


def model_dir_kind(path: str | os.PathLike) -> str | None:
    """Which of the project's directory kinds ``path`` holds, from its ``config.json``:
    ``"engine"``, ``"checkpoint"``, ``"drafter"``, ``"base"``, or None (no readable config)."""
    f = Path(path) / CHECKPOINT_CONFIG
    try:
        raw = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    if "backend" in raw and "build_config" in raw:
        return "engine"
    if "redrafter_num_beams" in raw or str(raw.get("architecture", "")).startswith("ReDrafter"):
        return "checkpoint"
    if raw.get("model_type") == "recurrent_drafting_drafter" or {"exit_dim", "num_draft_layers"} <= set(raw):
        return "drafter"
    if "architectures" in raw or "model_type" in raw:
        return "base"
    return None


def require_model_dir(path: str | os.PathLike | None, flag: str, kind: str) -> Path:
    """``path`` as a directory of ``kind`` (see :data:`DIR_KINDS`), else a
    :class:`RedrafterError` naming ``flag``, the path and what it holds instead."""
    require(path is not None and str(path) != "", f"{flag}: no directory given")
    p = Path(path)
    require(p.exists(), f"{flag} {p}: not found; expected {DIR_KINDS[kind]}")
    require(p.is_dir(), f"{flag} {p}: not a directory; expected {DIR_KINDS[kind]}")
    require((p / CHECKPOINT_CONFIG).is_file(),
            f"{flag} {p}: no {CHECKPOINT_CONFIG}; expected {DIR_KINDS[kind]}")
    found = model_dir_kind(p)
    require(found is None or found == kind,
            f"{flag} {p}: this is {DIR_KINDS.get(found, found)}, not {DIR_KINDS[kind].split(' (')[0]}")
    return p
