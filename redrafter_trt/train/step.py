"""One training step of the draft head: the loss of a micro-batch (:func:`forward_loss`, with the
teacher, the draft-vocabulary and batch-vocabulary restrictions and the frozen projection), the
autocast precision, and one optimizer step over ``grad_accum`` micro-batches
(:func:`optimizer_step`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import require
from ..models.drafter import Drafter
from .config import TrainConfig
from .features import Features
from .losses import (
    depth_weighted_mean,
    distill_loss,
    gather_batch,
    logit_match_loss,
    projected_distill_loss,
    teacher_probs,
)
from .positions import PositionSampler


class NullContext:
    """A context factory that does nothing (fp32: no autocast)."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if hasattr(model, "module") else model


def precision_context(cfg: TrainConfig, dev: torch.device) -> tuple[Callable[[], Any], bool, str]:
    """(autocast context factory, use_grad_scaler, name)."""
    p = cfg.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "fp32"
    if p == "fp32":
        return NullContext, False, "fp32"
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    require(
        not (p == "fp16" and dev.type == "cpu"),
        "--precision fp16 needs a GPU (use bf16 or fp32 on CPU)",
    )
    return (lambda: torch.autocast(dev.type, dtype=dtype)), p == "fp16", p


def restrict_to_draft_vocab(
    vocab_map: torch.Tensor,
    vocab_size: int,
    labels: torch.Tensor,
    t_ids: torch.Tensor | None,
    t_probs: torch.Tensor | None,
    alpha: float,
):
    """Labels and teacher in the head's K columns: the teacher restricted to the draft vocabulary
    and renormalised (the distribution on those K ids closest in KL to the base's; the mass
    outside them cannot be drafted, so the head is not asked for it).

    Args: vocab_map [K] full ids; labels [M] full ids; t_ids [M, k] full ids or None (then t_probs
        dense [M, V]); t_probs [M, k] or [M, V] or None.
        alpha: the KL weight; with a cross-entropy part (alpha < 1) a row needs its label inside.
    Returns: (labels [M] column, 0 where outside; keep [M] float: 1 where the row has a target
        in the draft vocabulary; t_ids in columns (0 where outside, with probability 0); t_probs).
    """
    dev = labels.device
    col = torch.full((vocab_size,), -1, dtype=torch.int64, device=dev)
    col[vocab_map.to(dev, torch.int64)] = torch.arange(vocab_map.numel(), device=dev)
    lab = col[labels]
    keep = lab >= 0 if alpha < 1 else torch.ones_like(lab, dtype=torch.bool)
    if t_probs is not None and alpha > 0:
        if t_ids is None:
            t_probs = t_probs[:, vocab_map.to(dev, torch.int64)]
        else:
            ids = col[t_ids]
            t_probs = torch.where(ids >= 0, t_probs, 0.0)
            t_ids = ids.clamp(min=0)
        mass = t_probs.sum(-1, keepdim=True)
        keep = keep & (mass[:, 0] > 0)
        t_probs = t_probs / mass.clamp(min=1e-30)
    return lab.clamp(min=0), keep.to(torch.float32), t_ids, t_probs


def teacher(
    feats: Features, base, batch, cfg: TrainConfig, dev
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Teacher (ids [M, K], probs [M, K]) or (None, dense probs [M, V]) for the valid rows."""
    if cfg.resolved_alpha() == 0:
        return None, None
    tp = batch.teacher_pos[batch.valid]
    if cfg.teacher_topk > 0:
        k = cfg.teacher_topk
        require(feats.teacher_topk >= k, f"features hold top-{feats.teacher_topk}, need {k}")
        ids = feats.topk_ids[tp, :k].to(dev)
        return ids, teacher_probs(feats.topk_values[tp, :k].to(dev), cfg.temperature)
    with torch.no_grad():
        logits = base.logits(feats.hidden[tp].to(dev, base.lm_head.weight_dtype)).float()
    return None, teacher_probs(logits, cfg.temperature)


@dataclass
class FrozenProjection:
    """The head's frozen vocabulary projection ``W`` [V, H]: float32, a copy in the matmul dtype,
    and (for ``--loss logit_match``, where ``W`` must be the base's) ``W^T W``."""

    weight: torch.Tensor
    matmul_weight: torch.Tensor
    gram: torch.Tensor | None

    @classmethod
    def of(
        cls, drafter: Drafter, base, cfg: TrainConfig, matmul_dtype: torch.dtype
    ) -> FrozenProjection:
        layer = drafter.projection.weight
        w = layer.detach().float()
        gram = None
        if cfg.loss == "logit_match":
            require(
                not layer.requires_grad
                and w.shape == base.lm_head.weight.shape
                and torch.equal(w, base.lm_head.weight.detach().float()),
                "--loss logit_match needs the head's final projection to be the base model's "
                "lm_head, frozen (--lm_head_init base --freeze_lm_head)",
            )
            w64 = w.to(torch.float64)
            gram = (w64.T @ w64).float()
        return cls(weight=w, matmul_weight=w.to(matmul_dtype), gram=gram)


def batch_vocabulary(
    t_ids: torch.Tensor | None, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``--kl_vocab batch``: the sorted union ``U`` of the batch's teacher top-k ids and labels
    (whichever are given), with each re-indexed into ``U`` (None where not given)."""
    given = [x for x in (t_ids, labels) if x is not None]
    u = torch.unique(torch.cat([x.reshape(-1) for x in given]))
    return (u,) + tuple(None if x is None else torch.searchsorted(u, x) for x in (t_ids, labels))


def forward_loss(
    head,
    base,
    feats: Features,
    pos: torch.Tensor,
    cfg: TrainConfig,
    dev,
    autocast,
    proj: FrozenProjection | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch and its metrics (per-depth correct / valid counts, loss sum).

    ``proj`` (given when the head's projection is frozen) routes the loss through the fused
    projection (:func:`projected_distill_loss`). "correct" compares the head's top-1 with the data
    token over the vocabulary the loss saw: the full one, the batch's (``--kl_vocab batch``) or the
    teacher's top-k (``--loss logit_match``); the held-out evaluation always uses the full one.
    """
    d = cfg.draft_len
    batch = gather_batch(feats.tokens, feats.targets, feats.seq_end, feats.hidden, pos, d)
    valid = batch.valid.to(dev)
    with torch.no_grad():
        emb = base.embedding(batch.in_tokens.to(dev))  # frozen, shared
    labels = batch.labels.to(dev)[valid]
    t_ids, t_probs = teacher(feats, base, batch, cfg, dev)
    alpha = cfg.resolved_alpha()
    vocab_map, keep = unwrap(head).drafter.vocab_map, None
    if vocab_map is not None:  # the loss over the head's K columns (labels/teacher re-indexed)
        full_labels = labels
        labels, keep, t_ids, t_probs = restrict_to_draft_vocab(
            vocab_map, base.config.vocab_size, labels, t_ids, t_probs, alpha
        )
    if cfg.loss == "logit_match":
        require(
            proj is not None and proj.gram is not None,
            "--loss logit_match: the frozen projection was not prepared",
        )
        with autocast():
            feat = head(batch.context.to(dev), emb, valid, project=False)  # [M, H]
        target = feats.hidden[batch.teacher_pos[batch.valid]].to(dev, torch.float32)
        rows, zk = logit_match_loss(
            feat.float(),
            target,
            proj.gram,
            proj.weight[t_ids],
            t_probs,
            proj.weight.shape[0],
            cfg.temperature,
            cfg.mse_weight,
        )
        with torch.no_grad():
            pred = t_ids.gather(1, zk.argmax(-1, keepdim=True)).squeeze(1)
    elif cfg.kl_vocab == "batch" or proj is not None:
        with autocast():
            feat = head(batch.context.to(dev), emb, valid, project=False)  # [M, exit_dim]
        if cfg.kl_vocab == "batch":
            require(t_ids is not None or alpha == 0, "--kl_vocab batch needs --teacher_topk > 0")
            u, ids_u, labels_u = batch_vocabulary(t_ids, labels if alpha < 1 else None)
            labels_u = labels if labels_u is None else labels_u  # a pure KL never reads them
        else:
            u, ids_u, labels_u = None, t_ids, labels
        if proj is not None:
            w = proj.matmul_weight if u is None else proj.matmul_weight[u]
            rows, pred = projected_distill_loss(
                feat, w, labels_u, ids_u, t_probs, cfg.temperature, alpha, matmul_dtype=w.dtype
            )
        else:
            weight = unwrap(head).drafter.projection.weight
            with autocast():
                flat = torch.nn.functional.linear(feat, weight[u])
            rows = distill_loss(flat, labels_u, ids_u, t_probs, cfg.temperature, alpha)
            pred = flat.detach().argmax(-1)
        if u is not None:
            pred = u[pred]
    else:
        with autocast():
            flat = head(batch.context.to(dev), emb, valid)  # [M, V]: valid rows only
        rows = distill_loss(flat, labels, t_ids, t_probs, cfg.temperature, alpha)
        with torch.no_grad():
            pred = flat.argmax(-1)
    if keep is not None:  # a row whose target lies outside the draft vocabulary teaches nothing
        rows = rows * keep.to(rows.dtype)
        pred = vocab_map.to(dev, torch.int64)[pred]
        labels = full_labels
    row_loss = torch.zeros(valid.shape, dtype=torch.float32, device=dev)
    row_loss = row_loss.masked_scatter(valid, rows)
    weights = torch.tensor(cfg.depth_weights or [1.0] * d, dtype=torch.float32, device=dev)
    with torch.no_grad():
        correct = torch.zeros(valid.shape, dtype=torch.bool, device=dev)
        correct[valid] = pred == labels
    trained = valid & own_path_reach(correct) if cfg.own_path else valid
    loss = depth_weighted_mean(row_loss, trained, weights)
    return loss, {
        "correct": correct.sum(0).cpu(),
        "valid": valid.sum(0).cpu(),
        "loss_sum": (row_loss.detach() * valid).sum(0).cpu(),
    }


def own_path_reach(correct: torch.Tensor) -> torch.Tensor:
    """[N, D] bool: depth i of a position lies on the path the head's own top-1 draft takes, i.e.
    its drafts at depths 1..i-1 all equal the data (depth 1 always does). With the base's greedy
    answers as data, that is the path greedy verification would accept up to depth i."""
    reach = torch.ones_like(correct)
    reach[:, 1:] = correct[:, :-1].to(torch.int64).cumprod(1).bool()
    return reach


@dataclass
class StepStats:
    """Running training metrics between two log lines: per-depth correct / valid counts [D], and
    totals over the run."""

    correct: torch.Tensor
    valid: torch.Tensor
    positions: int = 0
    predictions: int = 0
    loss_ema: float | None = None

    @classmethod
    def zeros(cls, draft_len: int) -> StepStats:
        return cls(correct=torch.zeros(draft_len), valid=torch.zeros(draft_len))


def optimizer_step(
    model,
    base,
    feats: Features,
    sampler: PositionSampler,
    cfg: TrainConfig,
    dev,
    autocast,
    proj: FrozenProjection | None,
    opt: torch.optim.Optimizer,
    params: list,
    scaler,
    lr: float,
    stats: StepStats,
) -> torch.Tensor:
    """One optimizer step at learning rate ``lr``: ``cfg.grad_accum`` micro-batches from
    ``sampler``, gradient clipping, the (scaled) update; adds to ``stats``; returns the gradient
    norm before clipping (0 with ``grad_clip`` 0)."""
    for g in opt.param_groups:
        g["lr"] = lr
    for _ in range(cfg.grad_accum):
        pos = sampler.next()
        loss, m = forward_loss(model, base, feats, pos, cfg, dev, autocast, proj)
        scaled = loss / cfg.grad_accum
        (scaler.scale(scaled) if scaler else scaled).backward()
        stats.correct += m["correct"]
        stats.valid += m["valid"]
        stats.positions += len(pos)
        stats.predictions += int(m["valid"].sum())
        lv = float(loss.detach())
        stats.loss_ema = lv if stats.loss_ema is None else 0.9 * stats.loss_ema + 0.1 * lv
    if scaler:
        scaler.unscale_(opt)
    gnorm = (
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if cfg.grad_clip > 0
        else torch.tensor(0.0)
    )
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm
