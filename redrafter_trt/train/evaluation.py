"""Held-out evaluation of the draft head: loss and top-1 accuracy per depth, agreement with the
base, and the tokens per step of greedy chains walked the way the runtime steps."""

from __future__ import annotations

from typing import Any

import torch

from .config import TrainConfig
from .features import Features
from .losses import UnrolledHead, distill_loss, gather_batch
from .step import NullContext, restrict_to_draft_vocab, teacher


@torch.no_grad()
def evaluate(
    drafter,
    base,
    feats: Features,
    positions: torch.Tensor,
    cfg: TrainConfig,
    dev,
    autocast=None,
    chunk: int = 256,
) -> dict[str, Any]:
    """Held-out metrics over ``positions`` (whole held-out sequences, in stream order).

    - loss and top-1 accuracy per depth (vs the data token, and agreement with the base's top-1);
    - ``greedy_chain_tokens_per_step``: a single greedy chain (W=1) walked through each sequence
      the way the runtime steps: from context ``t`` a step emits ``1 + n`` tokens, ``n`` = the
      number of leading draft steps whose top-1 equals the data, and the next context is
      ``t + 1 + n``. Exact for the runtime at W=1 when the data are the base's greedy outputs;
    - ``mean_accepted_run``: ``1 +`` the position-averaged run length (the optimistic variant).
    """
    autocast = autocast or NullContext
    d = cfg.draft_len
    was_training = drafter.training
    drafter.eval()
    head = UnrolledHead(drafter)
    correct_sum, teach_sum, valid_sum, loss_sum = (torch.zeros(d) for _ in range(4))
    runs = torch.zeros(len(positions), dtype=torch.int64)
    for lo in range(0, len(positions), chunk):
        pos = positions[lo : lo + chunk]
        batch = gather_batch(feats.tokens, feats.targets, feats.seq_end, feats.hidden, pos, d)
        emb = base.embedding(batch.in_tokens.to(dev))
        with autocast():
            logits = head(batch.context.to(dev), emb)
        pred = logits.float().argmax(-1).cpu()  # [N, D] (columns of the head)
        if drafter.vocab_map is not None:
            pred = drafter.vocab_map.cpu().to(torch.int64)[pred]
        valid = batch.valid
        correct = (pred == batch.labels) & valid
        runs[lo : lo + len(pos)] = correct.to(torch.int64).cumprod(1).sum(1)
        tt = (
            feats.topk_ids[batch.teacher_pos, 0]
            if feats.teacher_topk
            else base.logits(feats.hidden[batch.teacher_pos].to(dev, base.lm_head.weight_dtype))
            .argmax(-1)
            .cpu()
        )
        teach_sum += ((pred == tt) & valid).sum(0)
        correct_sum += correct.sum(0)
        valid_sum += valid.sum(0)
        v = valid.to(dev)
        t_ids, t_probs = teacher(feats, base, batch, cfg, dev)
        labels, keep = batch.labels.to(dev)[v], None
        if drafter.vocab_map is not None:
            labels, keep, t_ids, t_probs = restrict_to_draft_vocab(
                drafter.vocab_map,
                base.config.vocab_size,
                labels,
                t_ids,
                t_probs,
                cfg.resolved_alpha(),
            )
        rows = distill_loss(
            logits[v], labels, t_ids, t_probs, cfg.temperature, cfg.resolved_alpha()
        )
        rows = (rows if keep is None else rows * keep.to(rows.dtype)).cpu()
        loss_sum += torch.zeros(valid.shape).masked_scatter(valid, rows).sum(0)
    drafter.train(was_training)
    vs = valid_sum.clamp(min=1)
    return {
        "positions": int(len(positions)),
        "loss_per_depth": (loss_sum / vs).tolist(),
        "top1_accuracy_per_depth": (correct_sum / vs).tolist(),
        "top1_agreement_with_base_per_depth": (teach_sum / vs).tolist(),
        "greedy_chain_tokens_per_step": walk_tokens_per_step(positions, runs, feats.seq_end),
        "mean_accepted_run": 1.0 + float(runs.to(torch.float64).mean()) if len(runs) else 0.0,
    }


def walk_tokens_per_step(
    positions: torch.Tensor, runs: torch.Tensor, seq_end: torch.Tensor
) -> float:
    """Tokens per step of greedy chains stepping through each sequence (see :func:`evaluate`).

    ``positions`` [N] sorted stream positions (the usable contexts of whole sequences), ``runs``
    [N] accepted draft tokens from each. A step from context ``t`` emits ``x_{t+2} ..
    x_{t+2+run}`` (clipped at the sequence end) and moves to ``t + 1 + run``.
    """
    if len(positions) == 0:
        return 0.0
    import bisect

    pos, rn, ends = positions.tolist(), runs.tolist(), seq_end[positions].tolist()
    seq_stop = [0] * len(pos)  # index of the first position of the next sequence
    nxt = len(pos)
    for j in range(len(pos) - 1, -1, -1):
        if j + 1 < len(pos) and ends[j + 1] != ends[j]:
            nxt = j + 1
        seq_stop[j] = nxt
    tokens = steps = 0
    j = 0
    while j < len(pos):
        t, n = pos[j], rn[j]
        emit = min(1 + n, ends[j] - (t + 2))
        if emit > 0:
            tokens += emit
            steps += 1
        j = (
            bisect.bisect_left(pos, t + 1 + n, j + 1, seq_stop[j])
            if seq_stop[j] > j + 1
            else seq_stop[j]
        )
    return tokens / steps if steps else 0.0


def format_per_depth(xs) -> str:
    """``0.512/0.301/...``: a per-depth metric for a log line."""
    return "/".join(f"{x:.3f}" for x in xs)
