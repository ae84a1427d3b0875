"""Tensor parallelism of checkpoint tensors: which dimension of each tensor is split across ranks,
and the shard / merge of a checkpoint's tensors (``rank{i}.safetensors``, :mod:`.checkpoint`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import require
from ..models.base import BaseConfig
from ..models.drafter import DrafterConfig
from .names import CKPT_DRAFT_PROJECTION, CKPT_DRAFT_VOCAB, LM_HEAD


class ShardedConfig(Protocol):
    """What sharding reads of a checkpoint config
    (:class:`~redrafter_trt.formats.checkpoint.RedrafterCheckpointConfig`)."""

    base: BaseConfig
    drafter: DrafterConfig
    tp_size: int


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
    require(
        isinstance(tp_size, int) and tp_size >= 1,
        f"tp_size (--tp_size) must be >= 1, got {tp_size}",
    )
    if tp_size == 1:
        return
    nkv = base.num_key_value_heads
    for what, size in (
        ("num_attention_heads", base.num_attention_heads),
        ("intermediate_size", base.intermediate_size),
        ("hidden_size", base.hidden_size),
        ("redrafter_exit_dim", drafter.exit_dim),
    ):
        require(
            size % tp_size == 0,
            f"--tp_size {tp_size} does not divide the {what} {size}: "
            "choose a tp_size that divides the model's head count and widths",
        )
    require(
        nkv % tp_size == 0 or tp_size % nkv == 0,
        f"--tp_size {tp_size}: num_key_value_heads {nkv} must be a multiple or a divisor of it "
        "(fewer KV heads than ranks are replicated, as in TensorRT-LLM)",
    )


def _tp_rule(name: str, ndim: int) -> str:
    if name.endswith("_scaling_factor") or name == CKPT_DRAFT_VOCAB:  # FP8 scales; the [K] id map
        return _REPLICATED
    if name in (LM_HEAD, CKPT_DRAFT_PROJECTION):
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


def tp_shard(
    tensors: dict[str, torch.Tensor], cfg: ShardedConfig, rank: int
) -> dict[str, torch.Tensor]:
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


def tp_merge(shards: list[dict[str, torch.Tensor]], cfg: ShardedConfig) -> dict[str, torch.Tensor]:
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
            rows = cfg.drafter.head_vocab_size if name == CKPT_DRAFT_PROJECTION else base.vocab_size
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


__all__ = ["ShardedConfig", "padded_vocab_size", "check_tp_size", "tp_shard", "tp_merge"]
