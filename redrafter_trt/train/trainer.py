"""The distillation training loop: frozen base features -> draft head -> Apple-format drafter dir.

``train_drafter(TrainConfig(...))`` runs the whole job:

1. data (:mod:`.data`) -> tokenised examples with a target mask;
2. frozen base features (:mod:`.features`), computed once and cached;
3. training positions (every stream position whose first draft step has a target), a held-out
   split by sequence, a fixed per-epoch shuffle keyed by (seed, epoch);
4. AdamW, linear warmup + cosine decay, gradient accumulation, gradient clipping, autocast
   (bf16/fp16 on GPU, fp32 on CPU unless asked), DDP under torchrun;
5. checkpoints every N optimizer steps with exact resume (parameters, optimizer, schedule, data
   position, RNG), evaluation on held-out data (per-depth top-1 accuracy, expected tokens per step
   of greedy chains);
6. the drafter directory (``config.json`` + ``model.safetensors``) with ``training_report.json``,
   written atomically.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import RedrafterError, require
from ..memory import cuda_peak_bytes, peak_rss_bytes
from ..models.drafter import (Drafter, DrafterConfig, init_drafter, load_drafter, save_drafter,
                              validate_against_base)
from ..models.hub import resolve_base_model_dir
from .base import eos_ids, load_frozen_base
from .data import load_base_tokenizer, load_examples, model_fingerprint, source_kind
from .features import Features, cached_features, concat_features
from .losses import (depth_weighted_mean, distill_loss, gather_batch, logit_match_loss,
                     projected_distill_loss, teacher_probs, UnrolledHead)

REPORT_FILE = "training_report.json"
CHECKPOINT_FORMAT = "redrafter-train-checkpoint"
CHECKPOINT_VERSION = 1
LOSSES = ("kl", "ce", "mix", "logit_match")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LM_HEAD_INITS = ("random", "base")
KL_VOCABS = ("full", "batch")


@dataclass
class TrainConfig:
    model_dir: str
    data: list[str]
    output_dir: str
    # head
    exit_dim: int | None = None          # None = 2 x base hidden size (no input_proj)
    num_draft_layers: int = 1
    rnn: bool = True
    init_from: str | None = None         # start from an existing drafter directory
    lm_head_init: str = "random"         # random | base (copy the base's vocabulary projection)
    freeze_lm_head: bool = False         # keep the final vocabulary projection fixed
    draft_vocab_size: int | None = None  # K: draft over the K most frequent answer tokens (+ EOS)
    draft_len: int = 4                   # D unrolled draft steps
    # loss
    loss: str = "kl"                     # kl | ce | mix | logit_match
    mse_weight: float = 1.0              # logit_match: weight of the full-vocabulary logit MSE
    kl_vocab: str = "full"               # full | batch (softmax over the batch's teacher top-k union)
    alpha: float | None = None           # weight of the KL term (kl: 1, ce: 0, mix: 0.5 default)
    temperature: float = 1.0
    teacher_topk: int = 32               # 0 = the full distribution (computed on the fly)
    depth_weights: list[float] | None = None
    # optimisation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_steps: int | None = None
    epochs: float = 1.0                  # used when max_steps is None
    time_budget_s: float | None = None   # caps the total steps from the measured step time
    batch_size: int = 256                # positions per micro-batch (per rank)
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    # data
    max_seq_len: int = 1024
    limit_per_source: int | None = None  # first N examples of each data source
    chat_template: bool = True
    eval_fraction: float = 0.05
    eval_positions: int = 4096
    feature_batch_tokens: int = 4096
    cache_dir: str | None = None
    # bookkeeping
    checkpoint_dir: str | None = None    # default: <output_dir>.checkpoints
    save_every: int = 0                  # 0 = only at the end
    eval_every: int = 0
    resume: str | None = None            # None | "auto" | a checkpoint file
    overwrite: bool = False
    device: str | None = None
    progress: bool = True
    log_every: int = 10

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        return {"kl": 1.0, "ce": 0.0, "mix": 0.5, "logit_match": 1.0}[self.loss]

    def validate(self) -> None:
        require(self.loss in LOSSES, f"--loss {self.loss!r}: expected one of {LOSSES}")
        a = self.resolved_alpha()
        require(0.0 <= a <= 1.0, f"--alpha must be in [0, 1], got {a}")
        if self.loss == "logit_match":
            require(self.alpha is None or self.alpha == 1.0,
                    "--loss logit_match is pure distillation; --alpha does not apply to it")
            require(self.freeze_lm_head and self.teacher_topk > 0,
                    "--loss logit_match needs --freeze_lm_head with --lm_head_init base (the head's "
                    "projection must be the base's) and --teacher_topk > 0")
            require(self.mse_weight >= 0, f"--mse_weight must be >= 0, got {self.mse_weight}")
        require(self.kl_vocab in KL_VOCABS, f"--kl_vocab {self.kl_vocab!r}: expected one of {KL_VOCABS}")
        require(self.kl_vocab == "full" or (self.teacher_topk > 0 and self.loss != "logit_match"),
                "--kl_vocab batch takes its vocabulary from the teacher's top-k: it needs --teacher_topk > 0 "
                "(and does not apply to --loss logit_match)")
        require(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        require(self.teacher_topk >= 0, f"--teacher_topk must be >= 0, got {self.teacher_topk}")
        require(self.draft_len >= 1, f"--draft_len must be >= 1, got {self.draft_len}")
        require(self.batch_size >= 1 and self.grad_accum >= 1, "--batch_size and --grad_accum must be >= 1")
        require(self.depth_weights is None or (len(self.depth_weights) == self.draft_len
                                               and all(w >= 0 for w in self.depth_weights)
                                               and sum(self.depth_weights) > 0),
                f"--depth_weights needs {self.draft_len} non-negative values (one per draft step), "
                f"got {self.depth_weights}")
        require(self.lm_head_init in LM_HEAD_INITS,
                f"--lm_head_init {self.lm_head_init!r}: expected one of {LM_HEAD_INITS}")
        require(not (self.lm_head_init == "base" and self.init_from),
                "--lm_head_init base and --init_from both set the head's weights; pass one of them")
        require(self.lm_head_init == "base" or self.init_from or not self.freeze_lm_head,
                "--freeze_lm_head keeps a random vocabulary projection fixed; use it with "
                "--lm_head_init base (or --init_from a trained head)")
        require(self.draft_vocab_size is None or self.draft_vocab_size >= 1,
                f"--draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        require(self.draft_vocab_size is None or not self.init_from,
                "--draft_vocab_size and --init_from both set the head's vocabulary; pass one of them "
                "(an --init_from head keeps its own draft_vocab)")
        require(self.draft_vocab_size is None or self.loss != "logit_match",
                "--loss logit_match matches the base's full-vocabulary logits; it does not take --draft_vocab_size")
        require(self.precision in PRECISIONS, f"--precision {self.precision!r}: expected one of {PRECISIONS}")
        require(0.0 <= self.eval_fraction < 1.0, f"--eval_fraction must be in [0, 1), got {self.eval_fraction}")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be > 0 and --min_lr_ratio in [0, 1]")
        require(self.max_steps is None or self.max_steps >= 1, "--max_steps must be >= 1")
        require(self.epochs > 0, "--epochs must be > 0")

    def schedule_fields(self) -> dict[str, Any]:
        """Settings a resumed run must share with the checkpoint for an exact continuation."""
        d = asdict(self)
        for k in ("output_dir", "checkpoint_dir", "save_every", "eval_every", "resume", "overwrite",
                  "device", "progress", "log_every", "cache_dir", "time_budget_s", "max_steps",
                  "epochs", "model_dir", "data"):
            d.pop(k)
        return d


# --------------------------------------------------------------------------- schedule
def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- data order
class PositionSampler:
    """Deterministic micro-batches of training positions: epoch ``e`` is a permutation keyed by
    (seed, e); the state is (epoch, cursor), so a resumed run continues with the same batches."""

    def __init__(self, positions: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.positions = positions
        self.batch = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.per_epoch = len(positions) // (batch_size * world)
        require(self.per_epoch >= 1, f"only {len(positions)} training positions: fewer than one batch "
                f"of {batch_size * world}; lower --batch_size or add data")
        self.epoch, self.cursor = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.positions), generator=g)
        return self._perm

    def next(self) -> torch.Tensor:
        if self.cursor >= self.per_epoch:
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        g = self.batch * self.world
        lo = self.cursor * g + self.rank * self.batch
        idx = self._permutation()[lo:lo + self.batch]
        self.cursor += 1
        return self.positions[idx]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, st: dict[str, int]) -> None:
        self.epoch, self.cursor, self._perm = int(st["epoch"]), int(st["cursor"]), None


def split_positions(feats: Features, draft_len: int, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, held-out positions): stream positions whose first draft step is valid,
    split by whole sequences (held-out sequences chosen by a seeded permutation)."""
    s = feats.num_tokens
    p = torch.arange(s)
    lab = (p + 2).clamp(max=s - 1)
    usable = (p + 2 < feats.seq_end) & feats.targets[lab]
    seq_of = torch.searchsorted(feats.seq_starts, p, right=True) - 1
    n_seq = feats.num_sequences
    n_eval = int(round(eval_fraction * n_seq))
    if eval_fraction > 0 and n_seq >= 2:
        n_eval = min(max(n_eval, 1), n_seq - 1)
    g = torch.Generator().manual_seed(seed + 7)
    held = torch.zeros(n_seq, dtype=torch.bool)
    held[torch.randperm(n_seq, generator=g)[:n_eval]] = True
    is_eval = held[seq_of]
    return p[usable & ~is_eval], p[usable & is_eval]


# --------------------------------------------------------------------------- model pieces
def choose_draft_vocab(feats: Features, vocab_size: int, k: int, always: list[int]) -> torch.Tensor:
    """``--draft_vocab_size K``: the ``always`` ids (the EOS ids), then the most frequent tokens
    the base itself wrote in the data (the target tokens: self-distilled answers), ties to the
    lower id, then the lowest unused ids if the data have fewer than K distinct tokens.

    Returns: [K] int32 distinct ids in [0, V), ascending.
    """
    require(1 <= k <= vocab_size, f"--draft_vocab_size {k} must be in [1, V={vocab_size}] (the base's vocabulary)")
    counts = torch.bincount(feats.tokens[feats.targets].to(torch.int64), minlength=vocab_size).to(torch.float64)
    counts[torch.tensor([t for t in always if 0 <= t < vocab_size], dtype=torch.int64)] = float("inf")
    # stable descending sort: equal counts keep ascending id order
    order = torch.sort(counts, descending=True, stable=True).indices[:k]
    return torch.sort(order).values.to(torch.int32)


def restrict_to_draft_vocab(vocab_map: torch.Tensor, vocab_size: int, labels: torch.Tensor,
                            t_ids: torch.Tensor | None, t_probs: torch.Tensor | None, alpha: float):
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


def make_drafter(cfg: TrainConfig, hidden_size: int, vocab_size: int,
                 base_lm_head: torch.Tensor | None = None, draft_vocab: torch.Tensor | None = None) -> Drafter:
    """The head to train: loaded (``init_from``), random, or with the base's vocabulary projection.

    ``lm_head_init="base"`` (needs ``exit_dim == H``) copies the base model's ``lm_head`` weight
    [V, H] into the head's final projection and starts ``input_proj`` as ``[I | 0]`` (the context
    half passes through) with the residual blocks near identity, so the untrained head already
    maps into the base's output space; only the small layers in front must learn the shift by
    one token per draft step. With ``freeze_lm_head`` the V x H projection is not trained, which
    on small data sets stops the head from memorising through its largest matrix. With
    ``draft_vocab`` [K] the projection has K rows (the base's rows of those ids with ``base``).
    """
    if cfg.init_from:
        d = load_drafter(cfg.init_from, base_lm_head=base_lm_head)
        validate_against_base(d.config, hidden_size, vocab_size, (vocab_size, hidden_size),
                              f"--init_from {cfg.init_from}")
        d = d.float()
    else:
        exit_dim = cfg.exit_dim or 2 * hidden_size
        if cfg.lm_head_init == "base":
            require(exit_dim == hidden_size,
                    f"--lm_head_init base copies the base's [V, H] projection, so --exit_dim must be the "
                    f"base hidden size {hidden_size} (got {exit_dim})")
            require(base_lm_head is not None and tuple(base_lm_head.shape) == (vocab_size, hidden_size),
                    f"--lm_head_init base: the base lm_head has shape "
                    f"{None if base_lm_head is None else tuple(base_lm_head.shape)}, expected "
                    f"{(vocab_size, hidden_size)}")
        dcfg = DrafterConfig(vocab_size=vocab_size, hidden_size=hidden_size, exit_dim=exit_dim,
                             num_draft_layers=cfg.num_draft_layers, rnn=cfg.rnn,
                             draft_vocab_size=None if draft_vocab is None else int(draft_vocab.numel()))
        d = init_drafter(dcfg, seed=cfg.seed, draft_vocab=draft_vocab)
        if cfg.lm_head_init == "base":
            rows = base_lm_head.detach().float()
            if draft_vocab is not None:
                rows = rows[draft_vocab.to(rows.device, torch.int64)]
            with torch.no_grad():
                d.lm_head[-1].weight.copy_(rows)
                proj = d.input_proj.weight                     # [H, 2H]
                proj[:, :hidden_size] += torch.eye(hidden_size)
    if cfg.freeze_lm_head:
        d.lm_head[-1].weight.requires_grad_(False)
    return d


def _teacher(feats: Features, base, batch, cfg: TrainConfig, dev) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
        logits = base.logits(feats.hidden[tp].to(dev, base.lm_head.weight.dtype)).float()
    return None, teacher_probs(logits, cfg.temperature)


@dataclass
class FrozenProjection:
    """The head's frozen vocabulary projection ``W`` [V, H]: float32, a copy in the matmul dtype,
    and (for ``--loss logit_match``, where ``W`` must be the base's) ``W^T W``."""

    weight: torch.Tensor
    matmul_weight: torch.Tensor
    gram: torch.Tensor | None

    @classmethod
    def of(cls, drafter: Drafter, base, cfg: "TrainConfig", matmul_dtype: torch.dtype) -> "FrozenProjection":
        layer = drafter.lm_head[-1].weight
        w = layer.detach().float()
        gram = None
        if cfg.loss == "logit_match":
            require(not layer.requires_grad and w.shape == base.lm_head.weight.shape
                    and torch.equal(w, base.lm_head.weight.detach().float()),
                    "--loss logit_match needs the head's final projection to be the base model's "
                    "lm_head, frozen (--lm_head_init base --freeze_lm_head)")
            w64 = w.to(torch.float64)
            gram = (w64.T @ w64).float()
        return cls(weight=w, matmul_weight=w.to(matmul_dtype), gram=gram)


def batch_vocabulary(t_ids: torch.Tensor | None, labels: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``--kl_vocab batch``: the sorted union ``U`` of the batch's teacher top-k ids and labels
    (whichever are given), with each re-indexed into ``U`` (None where not given)."""
    given = [x for x in (t_ids, labels) if x is not None]
    u = torch.unique(torch.cat([x.reshape(-1) for x in given]))
    return (u,) + tuple(None if x is None else torch.searchsorted(u, x) for x in (t_ids, labels))


def forward_loss(head, base, feats: Features, pos: torch.Tensor, cfg: TrainConfig, dev,
                 autocast, proj: FrozenProjection | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        emb = base.embedding(batch.in_tokens.to(dev))      # frozen, shared
    labels = batch.labels.to(dev)[valid]
    t_ids, t_probs = _teacher(feats, base, batch, cfg, dev)
    alpha = cfg.resolved_alpha()
    vocab_map, keep = _unwrap(head).drafter.vocab_map, None
    if vocab_map is not None:  # the loss over the head's K columns (labels/teacher re-indexed)
        full_labels = labels
        labels, keep, t_ids, t_probs = restrict_to_draft_vocab(vocab_map, base.config.vocab_size,
                                                               labels, t_ids, t_probs, alpha)
    if cfg.loss == "logit_match":
        require(proj is not None and proj.gram is not None,
                "--loss logit_match: the frozen projection was not prepared")
        with autocast():
            feat = head(batch.context.to(dev), emb, valid, project=False)   # [M, H]
        target = feats.hidden[batch.teacher_pos[batch.valid]].to(dev, torch.float32)
        rows, zk = logit_match_loss(feat.float(), target, proj.gram, proj.weight[t_ids], t_probs,
                                    proj.weight.shape[0], cfg.temperature, cfg.mse_weight)
        with torch.no_grad():
            pred = t_ids.gather(1, zk.argmax(-1, keepdim=True)).squeeze(1)
    elif cfg.kl_vocab == "batch" or proj is not None:
        with autocast():
            feat = head(batch.context.to(dev), emb, valid, project=False)   # [M, exit_dim]
        if cfg.kl_vocab == "batch":
            require(t_ids is not None or alpha == 0, "--kl_vocab batch needs --teacher_topk > 0")
            u, ids_u, labels_u = batch_vocabulary(t_ids, labels if alpha < 1 else None)
            labels_u = labels if labels_u is None else labels_u  # a pure KL never reads them
        else:
            u, ids_u, labels_u = None, t_ids, labels
        if proj is not None:
            w = proj.matmul_weight if u is None else proj.matmul_weight[u]
            rows, pred = projected_distill_loss(feat, w, labels_u, ids_u, t_probs, cfg.temperature, alpha,
                                                matmul_dtype=w.dtype)
        else:
            weight = _unwrap(head).drafter.lm_head[-1].weight
            with autocast():
                flat = torch.nn.functional.linear(feat, weight[u])
            rows = distill_loss(flat, labels_u, ids_u, t_probs, cfg.temperature, alpha)
            pred = flat.detach().argmax(-1)
        if u is not None:
            pred = u[pred]
    else:
        with autocast():
            flat = head(batch.context.to(dev), emb, valid)     # [M, V]: valid rows only
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
    loss = depth_weighted_mean(row_loss, valid, weights)
    with torch.no_grad():
        correct = torch.zeros(valid.shape, dtype=torch.bool, device=dev)
        correct[valid] = pred == labels
    return loss, {"correct": correct.sum(0).cpu(), "valid": valid.sum(0).cpu(),
                  "loss_sum": (row_loss.detach() * valid).sum(0).cpu()}


@torch.no_grad()
def evaluate(drafter, base, feats: Features, positions: torch.Tensor, cfg: TrainConfig, dev,
             autocast=None, chunk: int = 256) -> dict[str, Any]:
    """Held-out metrics over ``positions`` (whole held-out sequences, in stream order).

    - loss and top-1 accuracy per depth (vs the data token, and agreement with the base's top-1);
    - ``greedy_chain_tokens_per_step``: a single greedy chain (W=1) walked through each sequence
      the way the runtime steps: from context ``t`` a step emits ``1 + n`` tokens, ``n`` = the
      number of leading draft steps whose top-1 equals the data, and the next context is
      ``t + 1 + n``. Exact for the runtime at W=1 when the data are the base's greedy outputs;
    - ``mean_accepted_run``: ``1 +`` the position-averaged run length (the optimistic variant).
    """
    autocast = autocast or _null_ctx
    d = cfg.draft_len
    was_training = drafter.training
    drafter.eval()
    head = UnrolledHead(drafter)
    correct_sum, teach_sum, valid_sum, loss_sum = (torch.zeros(d) for _ in range(4))
    runs = torch.zeros(len(positions), dtype=torch.int64)
    for lo in range(0, len(positions), chunk):
        pos = positions[lo:lo + chunk]
        batch = gather_batch(feats.tokens, feats.targets, feats.seq_end, feats.hidden, pos, d)
        emb = base.embedding(batch.in_tokens.to(dev))
        with autocast():
            logits = head(batch.context.to(dev), emb)
        pred = logits.float().argmax(-1).cpu()              # [N, D] (columns of the head)
        if drafter.vocab_map is not None:
            pred = drafter.vocab_map.cpu().to(torch.int64)[pred]
        valid = batch.valid
        correct = (pred == batch.labels) & valid
        runs[lo:lo + len(pos)] = correct.to(torch.int64).cumprod(1).sum(1)
        tt = feats.topk_ids[batch.teacher_pos, 0] if feats.teacher_topk else \
            base.logits(feats.hidden[batch.teacher_pos].to(dev, base.lm_head.weight.dtype)).argmax(-1).cpu()
        teach_sum += ((pred == tt) & valid).sum(0)
        correct_sum += correct.sum(0)
        valid_sum += valid.sum(0)
        v = valid.to(dev)
        t_ids, t_probs = _teacher(feats, base, batch, cfg, dev)
        labels, keep = batch.labels.to(dev)[v], None
        if drafter.vocab_map is not None:
            labels, keep, t_ids, t_probs = restrict_to_draft_vocab(drafter.vocab_map, base.config.vocab_size,
                                                                   labels, t_ids, t_probs, cfg.resolved_alpha())
        rows = distill_loss(logits[v], labels, t_ids, t_probs, cfg.temperature, cfg.resolved_alpha())
        rows = (rows if keep is None else rows * keep.to(rows.dtype)).cpu()
        loss_sum += torch.zeros(valid.shape).masked_scatter(valid, rows).sum(0)
    drafter.train(was_training)
    vs = valid_sum.clamp(min=1)
    return {"positions": int(len(positions)),
            "loss_per_depth": (loss_sum / vs).tolist(),
            "top1_accuracy_per_depth": (correct_sum / vs).tolist(),
            "top1_agreement_with_base_per_depth": (teach_sum / vs).tolist(),
            "greedy_chain_tokens_per_step": walk_tokens_per_step(positions, runs, feats.seq_end),
            "mean_accepted_run": 1.0 + float(runs.to(torch.float64).mean()) if len(runs) else 0.0}


def walk_tokens_per_step(positions: torch.Tensor, runs: torch.Tensor, seq_end: torch.Tensor) -> float:
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
        j = bisect.bisect_left(pos, t + 1 + n, j + 1, seq_stop[j]) if seq_stop[j] > j + 1 else seq_stop[j]
    return tokens / steps if steps else 0.0


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------- checkpoints
def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: Path, drafter, opt, sampler: PositionSampler, step: int, total: int,
                    cfg: TrainConfig, data_key: str, history: list, elapsed: float) -> Path:
    """Write ``step-XXXXXX.pt`` atomically (tmp file + rename)."""
    path.mkdir(parents=True, exist_ok=True)
    f = path / f"step-{step:07d}.pt"
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
             "total_steps": total, "drafter": _unwrap(drafter).state_dict(),
             "drafter_config": _unwrap(drafter).config.to_dict(), "optimizer": opt.state_dict(),
             "data": sampler.state(), "settings": json.dumps(cfg.schedule_fields(), sort_keys=True),
             "data_key": data_key, "rng": torch.get_rng_state(), "history": json.dumps(history),
             "elapsed_s": elapsed}
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, f)
    return f


def latest_checkpoint(path: Path) -> Path | None:
    files = sorted(path.glob("step-*.pt")) if path.is_dir() else []
    return files[-1] if files else None


def load_checkpoint(f: Path) -> dict[str, Any]:
    require(f.is_file(), f"--resume {f}: checkpoint file not found")
    try:
        st = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the safe unpickler is a bad file
        raise RedrafterError(f"--resume {f}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                             "it may be truncated: resume from an earlier step-*.pt or start over") from e
    require(isinstance(st, dict) and st.get("format") == CHECKPOINT_FORMAT,
            f"--resume {f}: not a redrafter-train checkpoint")
    require(st.get("version") == CHECKPOINT_VERSION,
            f"--resume {f}: checkpoint version {st.get('version')} != {CHECKPOINT_VERSION}")
    return st


# --------------------------------------------------------------------------- the job
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _precision(cfg: TrainConfig, dev: torch.device):
    """(autocast context factory, use_grad_scaler, name)."""
    p = cfg.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "fp32"
    if p == "fp32":
        return _null_ctx, False, "fp32"
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    require(not (p == "fp16" and dev.type == "cpu"), "--precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
    return (lambda: torch.autocast(dev.type, dtype=dtype)), p == "fp16", p


def peak_memory_mb(dev: torch.device) -> dict[str, float]:
    out = {"host_max_rss_mb": peak_rss_bytes() / 2**20}
    gpu = cuda_peak_bytes(dev)
    if gpu is not None:
        out["gpu_max_allocated_mb"] = gpu / 2**20
    return out


def train_drafter(cfg: TrainConfig, log: Callable[[str], None] | None = None,
                  on_step: Callable[[int], None] | None = None) -> Path:
    """Train a draft head and write the drafter directory ``cfg.output_dir``; returns its path.

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg.validate()
    world, rank, local_rank = _dist_info()
    is_main = rank == 0
    out = Path(cfg.output_dir)
    if out.exists():
        require(out.is_dir(), f"--output_dir {out}: exists and is not a directory")
        require(cfg.overwrite or not any(out.iterdir()),
                f"--output_dir {out}: not empty; pass --overwrite or choose another directory")
    # A resume checkpoint is read before any expensive work, so a bad one fails fast.
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    resume_file, st = None, None
    if cfg.resume:
        resume_file = latest_checkpoint(ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if resume_file is None:
            log(f"[train] --resume auto: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            st = load_checkpoint(resume_file)
    if cfg.device:
        dev = torch.device(cfg.device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    model_dir = resolve_base_model_dir(cfg.model_dir)
    base = load_frozen_base(model_dir, dev)
    bc = base.config
    needs_tok = any(source_kind(s) != "selfdistill" for s in cfg.data)
    tok = load_base_tokenizer(model_dir) if needs_tok else None
    # Features are cached per data source, so sources can be combined without recomputation.
    per_source = [load_examples([src], tok, cfg.chat_template, cfg.max_seq_len, model_dir,
                                cfg.limit_per_source) for src in cfg.data]
    model_fp = model_fingerprint(model_dir)
    topk_store = cfg.teacher_topk  # stored for every loss, so kl/ce/mix runs share one cache
    if world > 1 and not is_main:
        torch.distributed.barrier()  # rank 0 computes and caches the features first
    parts, feat_paths, feat_secs = [], [], 0.0
    for examples in per_source:
        f, path, secs = cached_features(base, examples, model_fp, topk_store, cfg.cache_dir,
                                        cfg.feature_batch_tokens, progress=cfg.progress and is_main, log=log)
        parts.append(f)
        feat_paths.append(path)
        feat_secs += secs
    feats = concat_features(parts)
    draft_vocab = None
    if cfg.draft_vocab_size is not None:
        eos_tok = tok
        if eos_tok is None:  # self-distilled ids need no tokenizer, but its EOS id must be draftable
            try:
                eos_tok = load_base_tokenizer(model_dir)
            except RedrafterError:
                eos_tok = None
        draft_vocab = choose_draft_vocab(feats, bc.vocab_size, cfg.draft_vocab_size, eos_ids(base, eos_tok))
        log(f"[train] draft vocabulary: K={cfg.draft_vocab_size} of V={bc.vocab_size} ids, covering "
            f"{float(torch.isin(feats.tokens[feats.targets], draft_vocab.to(torch.int64)).float().mean()):.4f} "
            "of the data's answer tokens")
    drafter = make_drafter(cfg, bc.hidden_size, bc.vocab_size, base.lm_head.weight, draft_vocab).to(dev)
    if world > 1 and is_main:
        torch.distributed.barrier()
    data_key = "+".join(p.name for p in feat_paths)
    train_pos, eval_pos = split_positions(feats, cfg.draft_len, cfg.eval_fraction, cfg.seed)
    require(len(train_pos) > 0, "no training positions: every sequence is too short or held out")
    if cfg.eval_positions and len(eval_pos) > cfg.eval_positions:  # whole sequences, in order
        cut = int(feats.seq_end[eval_pos[cfg.eval_positions - 1]])
        eval_pos = eval_pos[eval_pos < cut]
    sampler = PositionSampler(train_pos, cfg.batch_size, cfg.seed, rank, world)
    steps_per_epoch = max(1, sampler.per_epoch // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    planned = total

    autocast, use_scaler, precision = _precision(cfg, dev)
    model = UnrolledHead(drafter)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(dev.type) if use_scaler else None

    step, history, prior_elapsed, budget_fixed = 0, [], 0.0, cfg.time_budget_s is None
    first_estimate: tuple[int, float] | None = None
    if st is not None:
        require(st["settings"] == json.dumps(cfg.schedule_fields(), sort_keys=True),
                f"--resume {resume_file}: made with other training settings; resume with the same "
                f"flags (checkpoint: {st['settings']})")
        require(st["data_key"] == data_key, f"--resume {resume_file}: made with other data (features "
                f"{st['data_key']} != {data_key})")
        try:
            drafter.load_state_dict(st["drafter"])
            opt.load_state_dict(st["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RedrafterError(f"--resume {resume_file}: does not fit this head ({e})") from e
        sampler.load(st["data"])
        torch.set_rng_state(st["rng"])
        step, total = int(st["step"]), int(st["total_steps"])
        history = json.loads(st["history"])
        prior_elapsed = float(st.get("elapsed_s", 0.0))
        budget_fixed = True
        log(f"[train] resumed from {resume_file} at step {step}/{total}")

    # the frozen projection, in the matmul dtype of the precision (after a resume loaded the head)
    mm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    proj = FrozenProjection.of(drafter, base, cfg, mm_dtype) if cfg.freeze_lm_head else None
    n_params = sum(p.numel() for p in params)
    if is_main:
        log(f"[train] {bc.architecture} H={bc.hidden_size} V={bc.vocab_size}; head exit_dim="
            f"{drafter.config.exit_dim} layers={drafter.config.num_draft_layers} rnn={drafter.config.rnn} "
            f"({n_params / 1e6:.1f}M params); D={cfg.draft_len}; loss={cfg.loss} alpha={cfg.resolved_alpha()} "
            f"T={cfg.temperature} top-k={cfg.teacher_topk}; {feats.num_sequences} sequences, "
            f"{feats.num_tokens} tokens, {len(train_pos)} train / {len(eval_pos)} held-out positions; "
            + (f"{total} steps" if budget_fixed else
               f"up to {total} steps (--time_budget_min {cfg.time_budget_s / 60:g} sets the count "
               "once the step time is measured)")
            + f" x {cfg.grad_accum} x {cfg.batch_size} positions; {precision} on {dev}")
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, unit="step", desc="train", file=sys.stderr,
               disable=not (cfg.progress and is_main))
    model.train()
    acc_c, acc_v = torch.zeros(cfg.draft_len), torch.zeros(cfg.draft_len)
    n_positions, n_preds, loss_ema = 0, 0, None
    t_loop = time.perf_counter()
    last_eval: dict[str, Any] | None = None
    stopped_early = False
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, total)
        for _ in range(cfg.grad_accum):
            pos = sampler.next()
            loss, m = forward_loss(model, base, feats, pos, cfg, dev, autocast, proj)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            acc_c += m["correct"]
            acc_v += m["valid"]
            n_positions += len(pos)
            n_preds += int(m["valid"].sum())
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        if scaler:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if not budget_fixed:
            # Steps that fit the budget: a first estimate after a few steps, refined once 5% of the
            # budget has passed from the step time since then (the first steps run slower).
            now = time.perf_counter() - t_loop
            if first_estimate is None and step >= max(1, min(10, cfg.warmup_steps)):
                first_estimate = (step, now)
                per_step = now / step
            elif first_estimate is not None and now >= 0.05 * cfg.time_budget_s and step > first_estimate[0]:
                per_step = (now - first_estimate[1]) / (step - first_estimate[0])
                budget_fixed = True
            else:
                per_step = None
            if per_step is not None:
                total = min(planned, max(step, int((cfg.time_budget_s - now) / per_step) + step))
                bar.total = total
                log(f"[train] time budget {cfg.time_budget_s:.0f} s: {per_step:.3f} s/step -> {total} steps"
                    + ("" if budget_fixed else " (first estimate)"))
        if cfg.time_budget_s and budget_fixed and step < total and \
                prior_elapsed + time.perf_counter() - t_loop > cfg.time_budget_s:
            log(f"\n[train] time budget {cfg.time_budget_s:.0f} s spent at step {step} (estimated "
                f"{total}: the steps ran slower than the measured ones); stopping at step {step}")
            stopped_early = True
            total = step
            bar.total = total
        bar.update(1)
        if step % max(1, cfg.log_every) == 0 or step == total:
            acc = (acc_c / acc_v.clamp(min=1)).tolist()
            bar.set_postfix(loss=f"{loss_ema:.3f}", acc="/".join(f"{a:.2f}" for a in acc),
                            lr=f"{opt.param_groups[0]['lr']:.1e}")
            history.append({"step": step, "loss": loss_ema, "top1_accuracy_per_depth": acc,
                            "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"]})
            acc_c.zero_()
            acc_v.zero_()
        if on_step is not None:
            on_step(step)
        if is_main and cfg.eval_every and step % cfg.eval_every == 0 and len(eval_pos) and step < total:
            last_eval = evaluate(drafter, base, feats, eval_pos, cfg, dev, autocast)
            history.append({"step": step, "eval": last_eval})
            log(f"\n[train] step {step}: held-out acc {_fmt(last_eval['top1_accuracy_per_depth'])}, "
                f"greedy chain tokens/step {last_eval['greedy_chain_tokens_per_step']:.2f}")
        if is_main and cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(ckpt_dir, drafter, opt, sampler, step, total, cfg, data_key, history,
                            prior_elapsed + time.perf_counter() - t_loop)
    bar.close()
    train_secs = time.perf_counter() - t_loop
    if world > 1:
        torch.distributed.barrier()
    if not is_main:
        return out
    final_eval = evaluate(drafter, base, feats, eval_pos, cfg, dev, autocast) if len(eval_pos) else None
    report = {
        "model_dir": str(model_dir), "data": list(cfg.data), "settings": asdict(cfg),
        "drafter_config": drafter.config.to_dict(), "trainable_parameters": n_params,
        "base_frozen": True, "precision": precision, "device": str(dev), "world_size": world,
        "data_stats": {"sequences": feats.num_sequences, "tokens": feats.num_tokens,
                       "train_positions": int(len(train_pos)), "eval_positions": int(len(eval_pos)),
                       "eval_sequences": int(feats.seq_end[eval_pos].unique().numel()) if len(eval_pos) else 0},
        "features": {"cache": [str(p) for p in feat_paths], "seconds": feat_secs,
                     "tokens_per_s": feats.num_tokens / feat_secs if feat_secs else None},
        "steps": step, "total_steps": total, "stopped_by_time_budget": stopped_early,
        "resumed_from": str(resume_file) if resume_file else None,
        "train_seconds_this_run": train_secs,
        "train_seconds_total": prior_elapsed + train_secs,
        "throughput": {"positions_per_s": n_positions * world / max(train_secs, 1e-9),
                       "draft_predictions_per_s": n_preds * world / max(train_secs, 1e-9),
                       "note": "a position is one context token t trained on all D draft steps; "
                               "a draft prediction is one (t, depth) target"},
        "peak_memory": peak_memory_mb(dev),
        "eval": final_eval, "history": history,
        "wall_seconds": time.perf_counter() - t_start,
    }
    save_drafter(drafter.to("cpu").float(), out, overwrite=cfg.overwrite,
                 extra_files={REPORT_FILE: json.dumps(report, indent=2)})
    if final_eval:
        log(f"[train] held-out top-1 per depth {_fmt(final_eval['top1_accuracy_per_depth'])}; greedy "
            f"chain tokens/step {final_eval['greedy_chain_tokens_per_step']:.2f}")
    log(f"[train] wrote {out} ({step} steps"
        f"{', stopped by the time budget' if stopped_early else ''}, {train_secs:.0f} s, "
        f"{report['throughput']['positions_per_s']:.0f} positions/s, peak RSS "
        f"{report['peak_memory']['host_max_rss_mb']:.0f} MB)")
    return out


def _fmt(xs) -> str:
    return "/".join(f"{x:.3f}" for x in xs)
