"""Tensor names, written once: the base's Hugging Face names <-> TensorRT-LLM names, and the draft
head's Apple names <-> its ``drafter.*`` checkpoint names.

The TensorRT-LLM names are also :class:`~redrafter_trt.models.base.BaseModel`'s own parameter
names, and the names of every ``rank{i}.safetensors`` a checkpoint holds. :data:`BASE_NAME_TABLE`
is the one table of the base's names; :func:`hf_to_trtllm` and :func:`trtllm_to_hf` both read it,
so neither direction can drift from the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from ..errors import require
from ..models.base import BaseConfig
from ..models.drafter import DRAFT_VOCAB, DrafterConfig

#: TensorRT-LLM names of the two vocabulary-sized base tensors (the projection may be tied to the
#: embedding: ``tie_word_embeddings``).
EMBEDDING = "transformer.vocab_embedding.weight"
LM_HEAD = "lm_head.weight"


class NameRow(NamedTuple):
    """One row of :data:`BASE_NAME_TABLE`: a module's Hugging Face name(s) and its TensorRT-LLM
    name, without the ``.weight`` / ``.bias`` suffix; ``{}`` stands for the layer index."""

    #: Hugging Face modules; more than one: fused into one TensorRT-LLM tensor, concatenated
    #: along dim 0 in this order (q, k, v).
    hf: tuple[str, ...]
    trtllm: str
    #: The :class:`BaseConfig` flag under which the module also has a ``.bias``; None: weight only.
    bias: str | None = None


#: The base model's tensors, Hugging Face (Llama / Qwen2) -> TensorRT-LLM, in checkpoint order.
BASE_NAME_TABLE: tuple[NameRow, ...] = (
    NameRow(("model.embed_tokens",), "transformer.vocab_embedding"),
    NameRow(("model.layers.{}.input_layernorm",), "transformer.layers.{}.input_layernorm"),
    NameRow(("model.layers.{}.post_attention_layernorm",), "transformer.layers.{}.post_layernorm"),
    NameRow(
        (
            "model.layers.{}.self_attn.q_proj",
            "model.layers.{}.self_attn.k_proj",
            "model.layers.{}.self_attn.v_proj",
        ),
        "transformer.layers.{}.attention.qkv",
        "qkv_bias",
    ),
    NameRow(
        ("model.layers.{}.self_attn.o_proj",), "transformer.layers.{}.attention.dense", "dense_bias"
    ),
    NameRow(("model.layers.{}.mlp.gate_proj",), "transformer.layers.{}.mlp.fc", "mlp_bias"),
    NameRow(("model.layers.{}.mlp.up_proj",), "transformer.layers.{}.mlp.gate", "mlp_bias"),
    NameRow(("model.layers.{}.mlp.down_proj",), "transformer.layers.{}.mlp.proj", "mlp_bias"),
    NameRow(("model.norm",), "transformer.ln_f"),
    NameRow(("lm_head",), "lm_head"),
)


#: The per-layer prefixes of the two namings (``{}``: the layer index).
HF_LAYER = "model.layers.{}."
TRTLLM_LAYER = "transformer.layers.{}."
#: The rows of the base's linear layers (those that may have a bias; FP8 quantizes these).
LINEAR_ROWS: tuple[NameRow, ...] = tuple(r for r in BASE_NAME_TABLE if r.bias is not None)


class NamePair(NamedTuple):
    """One tensor of a config: its Hugging Face name(s) and its TensorRT-LLM name."""

    hf: tuple[str, ...]
    trtllm: str
    #: True for a ``.bias`` and for the weight of a module that may have one (a linear layer).
    linear: bool


def base_name_pairs(cfg: BaseConfig, all_biases: bool = False) -> Iterator[NamePair]:
    """Every tensor name of the base ``cfg`` from :data:`BASE_NAME_TABLE`, in checkpoint order
    (the embedding, layer by layer, the final norm, the vocabulary projection).

    A ``.bias`` is listed where ``cfg`` has it (its :attr:`NameRow.bias` flag), or for every
    linear layer with ``all_biases``."""
    rows = list(BASE_NAME_TABLE)
    i = 0
    while i < len(rows):
        if "{}" not in rows[i].trtllm:
            yield from _row_pairs(rows[i], None, cfg, all_biases)
            i += 1
            continue
        j = i
        while j < len(rows) and "{}" in rows[j].trtllm:  # a run of per-layer rows, layer-major
            j += 1
        for layer in range(cfg.num_hidden_layers):
            for row in rows[i:j]:
                yield from _row_pairs(row, layer, cfg, all_biases)
        i = j


def _row_pairs(
    row: NameRow, layer: int | None, cfg: BaseConfig, all_biases: bool
) -> Iterator[NamePair]:
    fmt = (lambda s: s) if layer is None else (lambda s: s.format(layer))
    kinds = ["weight"]
    if row.bias is not None and (all_biases or getattr(cfg, row.bias)):
        kinds.append("bias")
    for kind in kinds:
        yield NamePair(
            tuple(f"{fmt(h)}.{kind}" for h in row.hf),
            f"{fmt(row.trtllm)}.{kind}",
            row.bias is not None,
        )


def _fused_sizes(cfg: BaseConfig, parts: int) -> list[int]:
    """Dim-0 sizes of the parts of a fused tensor: q, k, v heads."""
    require(parts == 3, f"a fused tensor of {parts} parts: only q/k/v are fused")
    hd = cfg.head_size
    return [
        cfg.num_attention_heads * hd,
        cfg.num_key_value_heads * hd,
        cfg.num_key_value_heads * hd,
    ]


def hf_to_trtllm(
    cfg: BaseConfig, hf: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) Hugging Face base tensors to TensorRT-LLM names.

    ``hf``: Hugging Face name -> tensor (extra tensors are ignored); ``where`` names the source
    in the error for a missing tensor. The fused ``attention.qkv.weight`` is
    [(num_attention_heads + 2 num_key_value_heads) * head_size, H] (q rows, then k, then v); a
    tied (or absent) ``lm_head.weight`` is the embedding tensor itself."""
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        require(name in hf, f"{where}: missing tensor {name}")
        return hf[name]

    for pair in base_name_pairs(cfg):
        if pair.trtllm == LM_HEAD:
            if LM_HEAD in hf and not cfg.tie_word_embeddings:
                out[LM_HEAD] = hf[LM_HEAD]
            else:
                require(cfg.tie_word_embeddings or LM_HEAD in hf, f"{where}: missing {LM_HEAD}")
                out[LM_HEAD] = out[EMBEDDING]
        elif len(pair.hf) == 1:
            out[pair.trtllm] = take(pair.hf[0])
        else:
            out[pair.trtllm] = torch.cat([take(n) for n in pair.hf], 0)
    return out


def trtllm_to_hf(cfg: BaseConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TensorRT-LLM names -> Hugging Face names (inverse of :func:`hf_to_trtllm`).

    The embedding and norms must be in ``sd``; a linear layer's weight or bias is converted when
    present; ``lm_head.weight`` is left out for tied embeddings; other tensors (FP8 scales) are
    not converted."""
    out: dict[str, torch.Tensor] = {}
    for pair in base_name_pairs(cfg, all_biases=True):
        if pair.trtllm == LM_HEAD and cfg.tie_word_embeddings:
            continue
        if pair.linear and pair.trtllm not in sd:
            continue
        t = sd[pair.trtllm]
        if len(pair.hf) == 1:
            out[pair.hf[0]] = t
        else:
            for name, part in zip(pair.hf, t.split(_fused_sizes(cfg, len(pair.hf)), 0)):
                out[name] = part
    return out


# --------------------------------------------------------------------------- drafter names
#: Checkpoint name of the head's [K] int32 id map (Apple name :data:`DRAFT_VOCAB`).
CKPT_DRAFT_VOCAB = "drafter." + DRAFT_VOCAB
#: Checkpoint name of the head's final (vocabulary) projection (Apple ``lm_head.{n}.weight``).
CKPT_DRAFT_PROJECTION = "drafter.lm_head.weight"


def drafter_to_checkpoint_names(
    cfg: DrafterConfig, sd: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apple names -> ``drafter.*`` TensorRT-LLM ReDrafter names."""
    out = {}
    n = cfg.num_draft_layers
    for k, v in sd.items():
        if k == f"lm_head.{n}.weight":
            out[CKPT_DRAFT_PROJECTION] = v
        elif k.startswith("lm_head."):
            out["drafter.layers." + k[len("lm_head.") :]] = v
        else:
            out["drafter." + k] = v
    return out


def drafter_from_checkpoint_names(
    cfg: DrafterConfig, sd: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``drafter.*`` names -> Apple names (inverse of :func:`drafter_to_checkpoint_names`)."""
    out = {}
    for k, v in sd.items():
        k = k[len("drafter.") :]
        if k == "lm_head.weight":
            out[f"lm_head.{cfg.num_draft_layers}.weight"] = v
        elif k.startswith("layers."):
            out["lm_head." + k[len("layers.") :]] = v
        else:
            out[k] = v
    return out


__all__ = [
    "BASE_NAME_TABLE",
    "NameRow",
    "NamePair",
    "HF_LAYER",
    "TRTLLM_LAYER",
    "LINEAR_ROWS",
    "base_name_pairs",
    "hf_to_trtllm",
    "trtllm_to_hf",
    "EMBEDDING",
    "LM_HEAD",
    "CKPT_DRAFT_VOCAB",
    "CKPT_DRAFT_PROJECTION",
    "drafter_to_checkpoint_names",
    "drafter_from_checkpoint_names",
]
