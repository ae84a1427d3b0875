"""The distillation training job: frozen base features -> draft head -> Apple-format drafter dir.

``train_drafter(TrainConfig(...))`` runs the whole job:

1. data (:mod:`.data`) -> tokenised examples with a target mask;
2. frozen base features (:mod:`.features`), computed once and cached;
3. training positions (:mod:`.positions`: every stream position whose first draft step has a
   target), a held-out split by sequence, a fixed per-epoch shuffle keyed by (seed, epoch);
4. the head (:mod:`.head`), AdamW, linear warmup + cosine decay (:mod:`.config`), gradient
   accumulation, gradient clipping, autocast (bf16/fp16 on GPU, fp32 on CPU unless asked; one
   step: :mod:`.step`), DDP under torchrun;
5. checkpoints every N optimizer steps with exact resume (:mod:`.resume`: parameters, optimizer,
   schedule, data position, RNG), evaluation on held-out data (:mod:`.evaluation`: per-depth
   top-1 accuracy, expected tokens per step of greedy chains);
6. the drafter directory (``config.json`` + ``model.safetensors``) with ``training_report.json``,
   written atomically.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RedrafterError, require
from ..memory import cuda_peak_bytes, peak_rss_bytes
from ..models.drafter import Drafter, save_drafter
from ..models.hub import resolve_base_model_dir
from .config import TrainConfig, lr_at
from .data import (
    expand_sources,
    load_base_tokenizer,
    load_examples,
    model_fingerprint,
    selfdistill_needs_tokenizer,
    source_kind,
)
from .evaluation import evaluate, format_per_depth
from .features import Features, cached_features, concat_features
from .frozen_base import eos_ids, feature_base, load_frozen_base
from .head import choose_draft_vocab, head_ids, load_init_head, make_drafter
from .losses import UnrolledHead
from .positions import PositionSampler, train_and_eval_positions
from .resume import find_resume, restore, save_checkpoint
from .step import FrozenProjection, StepStats, optimizer_step, precision_context

REPORT_FILE = "training_report.json"


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def peak_memory_mb(dev: torch.device) -> dict[str, float]:
    out = {"host_max_rss_mb": peak_rss_bytes() / 2**20}
    gpu = cuda_peak_bytes(dev)
    if gpu is not None:
        out["gpu_max_allocated_mb"] = gpu / 2**20
    return out


def _check_output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists():
        require(out.is_dir(), f"--output_dir {out}: exists and is not a directory")
        require(
            cfg.overwrite or not any(out.iterdir()),
            f"--output_dir {out}: not empty; pass --overwrite or choose another directory",
        )
    return out


def _device(cfg: TrainConfig, world: int, local_rank: int) -> torch.device:
    """The run's device (``--device``, else this rank's GPU, else the CPU), with the process
    group started under torchrun."""
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
    return dev


@dataclass
class _Data:
    """The run's frozen-base features and where they came from."""

    feats: Features
    tokenizer: Any
    sources: list[str]  # the data sources, directories expanded into their files
    paths: list[Path]
    seconds: float

    @property
    def key(self) -> str:
        """Identifies the data of a run (a resumed run must have the same)."""
        return "+".join(p.name for p in self.paths)


def _features(
    cfg: TrainConfig, base, model_dir: Path, world: int, is_main: bool, log: Callable[[str], None]
) -> _Data:
    sources = expand_sources(cfg.data)
    needs_tok = any(
        source_kind(s) != "selfdistill" or selfdistill_needs_tokenizer(s) for s in sources
    )
    tok = load_base_tokenizer(model_dir) if needs_tok else None
    # Features are cached per data source, so sources can be combined without recomputation.
    per_source = [
        load_examples(
            [src], tok, cfg.chat_template, cfg.max_seq_len, model_dir, cfg.limit_per_source
        )
        for src in sources
    ]
    model_fp = model_fingerprint(model_dir)
    feat_base = base
    if cfg.base_dtype != "float32":  # a copy in that dtype computes the features, cached apart
        feat_base = functools.cache(lambda: feature_base(base, getattr(torch, cfg.base_dtype)))
        model_fp = f"{model_fp}:base-{cfg.base_dtype}"
    topk_store = cfg.teacher_topk  # stored for every loss, so kl/ce/mix runs share one cache
    if world > 1 and not is_main:
        torch.distributed.barrier()  # rank 0 computes and caches the features first
    parts, feat_paths, feat_secs = [], [], 0.0
    for examples in per_source:
        f, path, secs = cached_features(
            feat_base,
            examples,
            model_fp,
            topk_store,
            cfg.cache_dir,
            cfg.feature_batch_tokens,
            progress=cfg.progress and is_main,
            log=log,
        )
        parts.append(f)
        feat_paths.append(path)
        feat_secs += secs
    return _Data(concat_features(parts), tok, sources, feat_paths, feat_secs)


def _draft_vocab(
    cfg: TrainConfig,
    data: _Data,
    base,
    model_dir: Path,
    log: Callable[[str], None],
    init: Drafter | None,
) -> torch.Tensor | None:
    """``--draft_vocab_size K``: the head's K ids (:func:`choose_draft_vocab`), or None; the
    ids of the ``init`` (``--init_from``) head are kept when they fit."""
    if cfg.draft_vocab_size is None:
        return None
    bc, feats = base.config, data.feats
    eos_tok = data.tokenizer
    if eos_tok is None:  # self-distilled ids need no tokenizer, but its EOS id must be draftable
        try:
            eos_tok = load_base_tokenizer(model_dir)
        except RedrafterError:
            eos_tok = None
    always = eos_ids(base, eos_tok)
    if init is not None:  # widening a trained head's vocabulary keeps the ids it has
        own = head_ids(init).tolist()
        if len(set(own) | set(always)) <= cfg.draft_vocab_size:
            always = list(always) + own
    draft_vocab = choose_draft_vocab(feats, bc.vocab_size, cfg.draft_vocab_size, always)
    log(
        f"[train] draft vocabulary: K={cfg.draft_vocab_size} of V={bc.vocab_size} ids, covering "
        f"{float(torch.isin(feats.tokens[feats.targets], draft_vocab.to(torch.int64)).float().mean()):.4f} "
        "of the data's answer tokens"
    )
    return draft_vocab


@dataclass
class _Budget:
    """``--time_budget_min``: the step count set from the measured step time."""

    seconds: float | None
    planned: int
    fixed: bool
    first_estimate: tuple[int, float] | None = None

    def update(
        self, step: int, total: int, elapsed: float, warmup_steps: int, log: Callable[[str], None]
    ) -> int:
        """The total steps after optimizer step ``step``, ``elapsed`` seconds into this run's loop.

        A first estimate after a few steps, refined once 5% of the budget has passed from the
        step time since then (the first steps run slower)."""
        if self.fixed:
            return total
        if self.first_estimate is None and step >= max(1, min(10, warmup_steps)):
            self.first_estimate = (step, elapsed)
            per_step = elapsed / step
        elif (
            self.first_estimate is not None
            and elapsed >= 0.05 * self.seconds
            and step > self.first_estimate[0]
        ):
            per_step = (elapsed - self.first_estimate[1]) / (step - self.first_estimate[0])
            self.fixed = True
        else:
            per_step = None
        if per_step is not None:
            total = min(self.planned, max(step, int((self.seconds - elapsed) / per_step) + step))
            log(
                f"[train] time budget {self.seconds:.0f} s: {per_step:.3f} s/step -> {total} steps"
                + ("" if self.fixed else " (first estimate)")
            )
        return total

    def spent(self, step: int, total: int, elapsed: float, log: Callable[[str], None]) -> bool:
        """True when the budget is spent, ``elapsed`` seconds into the run (resumed runs
        included), before the fixed step count: the steps ran slower than the measured ones and
        the run stops at ``step``."""
        if not (self.seconds and self.fixed and step < total and elapsed > self.seconds):
            return False
        log(
            f"\n[train] time budget {self.seconds:.0f} s spent at step {step} (estimated "
            f"{total}: the steps ran slower than the measured ones); stopping at step {step}"
        )
        return True


def _start_log(
    cfg: TrainConfig,
    base,
    drafter: Drafter,
    n_params: int,
    feats: Features,
    n_train: int,
    n_eval: int,
    total: int,
    budget_fixed: bool,
    precision: str,
    dev,
) -> str:
    bc = base.config
    return (
        f"[train] {bc.architecture} H={bc.hidden_size} V={bc.vocab_size}; head exit_dim="
        f"{drafter.config.exit_dim} layers={drafter.config.num_draft_layers} rnn={drafter.config.rnn} "
        f"({n_params / 1e6:.1f}M params); D={cfg.draft_len}; loss={cfg.loss} alpha={cfg.resolved_alpha()} "
        f"T={cfg.temperature} top-k={cfg.teacher_topk}; {feats.num_sequences} sequences, "
        f"{feats.num_tokens} tokens, {n_train} train / {n_eval} held-out positions; "
        + (
            f"{total} steps"
            if budget_fixed
            else f"up to {total} steps (--time_budget_min {cfg.time_budget_s / 60:g} sets the count "
            "once the step time is measured)"
        )
        + f" x {cfg.grad_accum} x {cfg.batch_size} positions; {precision} on {dev}"
    )


def _log_entry(step: int, stats: StepStats, lr: float, gnorm, bar) -> dict[str, Any]:
    """The history entry of a log step (shown on the progress bar too); restarts the per-depth
    accuracy counts."""
    acc = (stats.correct / stats.valid.clamp(min=1)).tolist()
    bar.set_postfix(
        loss=f"{stats.loss_ema:.3f}", acc="/".join(f"{a:.2f}" for a in acc), lr=f"{lr:.1e}"
    )
    stats.correct.zero_()
    stats.valid.zero_()
    return {
        "step": step,
        "loss": stats.loss_ema,
        "top1_accuracy_per_depth": acc,
        "grad_norm": float(gnorm),
        "lr": lr,
    }


def _eval_line(ev: dict[str, Any]) -> str:
    return (
        f"held-out acc {format_per_depth(ev['top1_accuracy_per_depth'])}, "
        f"greedy chain tokens/step {ev['greedy_chain_tokens_per_step']:.2f}"
    )


def _data_stats(feats: Features, train_pos: torch.Tensor, eval_pos: torch.Tensor) -> dict:
    return {
        "sequences": feats.num_sequences,
        "tokens": feats.num_tokens,
        "train_positions": int(len(train_pos)),
        "eval_positions": int(len(eval_pos)),
        "eval_sequences": int(feats.seq_end[eval_pos].unique().numel()) if len(eval_pos) else 0,
    }


def _throughput(stats: StepStats, world: int, train_secs: float) -> dict:
    return {
        "positions_per_s": stats.positions * world / max(train_secs, 1e-9),
        "draft_predictions_per_s": stats.predictions * world / max(train_secs, 1e-9),
        "note": "a position is one context token t trained on all D draft steps; "
        "a draft prediction is one (t, depth) target",
    }


def _optimised(cfg: TrainConfig, drafter: Drafter, dev: torch.device, world: int):
    """The unrolled head to step (wrapped for data parallelism over ``world`` ranks), its
    trainable parameters and their AdamW optimiser."""
    model: torch.nn.Module = UnrolledHead(drafter)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    return model, params, opt


def _report(
    cfg: TrainConfig,
    *,
    model_dir: Path,
    data,
    drafter: Drafter,
    n_params: int,
    precision: str,
    dev: torch.device,
    world: int,
    positions: tuple[torch.Tensor, torch.Tensor],
    steps: tuple[int, int, bool],
    resume_file: Path | None,
    seconds: tuple[float, float, float],
    stats: StepStats,
    final_eval: dict | None,
    history: list,
) -> dict[str, Any]:
    """``training_report.json``: the run's settings, data, steps (done, planned, stopped by the
    time budget), times (this run's training, earlier runs', the start), throughput, memory and
    held-out evaluation."""
    feats = data.feats
    (train_pos, eval_pos), (step, total, stopped_early) = positions, steps
    train_secs, prior_elapsed, t_start = seconds
    return {
        "model_dir": str(model_dir),
        "data": data.sources,
        "settings": asdict(cfg),
        "drafter_config": drafter.config.to_dict(),
        "trainable_parameters": n_params,
        "base_frozen": True,
        "precision": precision,
        "device": str(dev),
        "world_size": world,
        "data_stats": _data_stats(feats, train_pos, eval_pos),
        "features": {
            "cache": [str(p) for p in data.paths],
            "seconds": data.seconds,
            "tokens_per_s": feats.num_tokens / data.seconds if data.seconds else None,
        },
        "steps": step,
        "total_steps": total,
        "stopped_by_time_budget": stopped_early,
        "resumed_from": str(resume_file) if resume_file else None,
        "train_seconds_this_run": train_secs,
        "train_seconds_total": prior_elapsed + train_secs,
        "throughput": _throughput(stats, world, train_secs),
        "peak_memory": peak_memory_mb(dev),
        "eval": final_eval,
        "history": history,
        "wall_seconds": time.perf_counter() - t_start,
    }


def _base_data_and_head(cfg: TrainConfig, dev: torch.device, world: int, is_main: bool, log):
    """The frozen base on ``dev``, the training data with its base features, and the new (or
    ``--init_from``) head; rank 0 computes the features the other ranks then read. The
    ``--init_from`` head is read and checked first, so that a wrong one fails before the
    features are computed."""
    model_dir = resolve_base_model_dir(cfg.model_dir)
    base = load_frozen_base(model_dir, dev)
    bc = base.config
    lm_head = base.lm_head.weight
    init = (
        load_init_head(cfg.init_from, bc.hidden_size, bc.vocab_size, lm_head, cfg.num_draft_layers)
        if cfg.init_from
        else None
    )
    data = _features(cfg, base, model_dir, world, is_main, log)
    draft_vocab = _draft_vocab(cfg, data, base, model_dir, log, init)
    drafter = make_drafter(cfg, bc.hidden_size, bc.vocab_size, lm_head, draft_vocab, init)
    if world > 1 and is_main:
        torch.distributed.barrier()
    return model_dir, base, data, drafter.to(dev)


def _final_log(log, out: Path, report: dict[str, Any], final_eval: dict | None) -> None:
    if final_eval:
        log(
            f"[train] held-out top-1 per depth {format_per_depth(final_eval['top1_accuracy_per_depth'])}; greedy "
            f"chain tokens/step {final_eval['greedy_chain_tokens_per_step']:.2f}"
        )
    stopped = ", stopped by the time budget" if report["stopped_by_time_budget"] else ""
    log(
        f"[train] wrote {out} ({report['steps']} steps{stopped}, "
        f"{report['train_seconds_this_run']:.0f} s, "
        f"{report['throughput']['positions_per_s']:.0f} positions/s, peak RSS "
        f"{report['peak_memory']['host_max_rss_mb']:.0f} MB)"
    )


def _progress_bar(total: int, step: int, show: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=step, unit="step", desc="train", file=sys.stderr, disable=not show
    )


def train_drafter(
    cfg: TrainConfig,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Train a draft head and write the drafter directory ``cfg.output_dir``; returns its path.

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    cfg.validate()
    world, rank, local_rank = _dist_info()
    is_main = rank == 0
    out = _check_output_dir(cfg)
    # A resume checkpoint is read before any expensive work, so a bad one fails fast.
    ckpt_dir = (
        Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.with_name(out.name + ".checkpoints")
    )
    resume_file, st = find_resume(cfg, ckpt_dir, log)
    dev = _device(cfg, world, local_rank)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    model_dir, base, data, drafter = _base_data_and_head(cfg, dev, world, is_main, log)
    feats = data.feats
    train_pos, eval_pos = train_and_eval_positions(feats, cfg)
    sampler = PositionSampler(train_pos, cfg.batch_size, cfg.seed, rank, world)
    steps_per_epoch = max(1, sampler.per_epoch // cfg.grad_accum)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    budget = _Budget(cfg.time_budget_s, planned=total, fixed=cfg.time_budget_s is None)

    autocast, use_scaler, precision = precision_context(cfg, dev)
    model, params, opt = _optimised(cfg, drafter, dev, world)
    scaler = torch.amp.GradScaler(dev.type) if use_scaler else None

    step, prior_elapsed = 0, 0.0
    history: list[dict[str, Any]] = []
    if st is not None:
        step, total, history, prior_elapsed = restore(
            st, resume_file, cfg, data.key, drafter, opt, sampler, log
        )
        budget.fixed = True

    # the frozen projection, in the matmul dtype of the precision (after a resume loaded the head)
    mm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    proj = FrozenProjection.of(drafter, base, cfg, mm_dtype) if cfg.freeze_lm_head else None
    n_params = sum(p.numel() for p in params)
    if is_main:
        split = (len(train_pos), len(eval_pos))
        log(
            _start_log(
                cfg, base, drafter, n_params, feats, *split, total, budget.fixed, precision, dev
            )
        )
    bar = _progress_bar(total, step, cfg.progress and is_main)
    model.train()
    stats = StepStats.zeros(cfg.draft_len)
    t_loop = time.perf_counter()
    stopped_early = False
    while step < total:
        gnorm = optimizer_step(
            model,
            base,
            feats,
            sampler,
            cfg,
            dev,
            autocast,
            proj,
            opt,
            params,
            scaler,
            lr_at(step, cfg, total),
            stats,
        )
        step += 1
        if not budget.fixed:
            total = budget.update(step, total, time.perf_counter() - t_loop, cfg.warmup_steps, log)
            bar.total = total
        if budget.spent(step, total, prior_elapsed + time.perf_counter() - t_loop, log):
            stopped_early = True
            total = step
            bar.total = total
        bar.update(1)
        if step % max(1, cfg.log_every) == 0 or step == total:
            history.append(_log_entry(step, stats, opt.param_groups[0]["lr"], gnorm, bar))
        if on_step is not None:
            on_step(step)
        if (
            is_main
            and cfg.eval_every
            and step % cfg.eval_every == 0
            and len(eval_pos)
            and step < total
        ):
            last_eval = evaluate(drafter, base, feats, eval_pos, cfg, dev, autocast)
            history.append({"step": step, "eval": last_eval})
            log(f"\n[train] step {step}: {_eval_line(last_eval)}")
        if is_main and cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(
                ckpt_dir,
                drafter,
                opt,
                sampler,
                step,
                total,
                cfg,
                data.key,
                history,
                prior_elapsed + time.perf_counter() - t_loop,
            )
    bar.close()
    train_secs = time.perf_counter() - t_loop
    if world > 1:
        torch.distributed.barrier()
    if not is_main:
        return out
    final_eval = (
        evaluate(drafter, base, feats, eval_pos, cfg, dev, autocast) if len(eval_pos) else None
    )
    report = _report(
        cfg,
        model_dir=model_dir,
        data=data,
        drafter=drafter,
        n_params=n_params,
        precision=precision,
        dev=dev,
        world=world,
        positions=(train_pos, eval_pos),
        steps=(step, total, stopped_early),
        resume_file=resume_file,
        seconds=(train_secs, prior_elapsed, t_start),
        stats=stats,
        final_eval=final_eval,
        history=history,
    )
    save_drafter(
        drafter.to("cpu").float(),
        out,
        overwrite=cfg.overwrite,
        extra_files={REPORT_FILE: json.dumps(report, indent=2)},
    )
    _final_log(log, out, report, final_eval)
    return out


__all__ = ["train_drafter", "REPORT_FILE", "peak_memory_mb"]
