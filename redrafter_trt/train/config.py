"""``redrafter-train train`` settings (:class:`TrainConfig`) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import require

LOSSES = ("kl", "ce", "mix", "logit_match")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_DTYPES = ("float32", "bfloat16")
#: tokens per batch of the base when it computes features (1,024 ran 1.1-1.2x faster than 4,096
#: on the CPU kernels; docs/results.md, 2026-12-07)
FEATURE_BATCH_TOKENS = 1024
LM_HEAD_INITS = ("random", "base")
KL_VOCABS = ("full", "batch")
NEW_ROWS = ("mapped", "base")


@dataclass
class TrainConfig:
    model_dir: str
    data: list[str]
    output_dir: str
    # head
    exit_dim: int | None = None  # None = 2 x base hidden size (no input_proj)
    num_draft_layers: int | None = None  # None = 1, or the --init_from head's own
    rnn: bool = True
    init_from: str | None = None  # start from an existing drafter directory
    lm_head_init: str = "random"  # random | base (copy the base's vocabulary projection)
    freeze_lm_head: bool = False  # keep the final vocabulary projection fixed
    draft_vocab_size: int | None = None  # K: draft over the K most frequent answer tokens (+ EOS)
    new_rows: str = "mapped"  # mapped | base: a new id's row when init_from's vocabulary widens
    draft_len: int = 4  # D unrolled draft steps
    # loss
    loss: str = "kl"  # kl | ce | mix | logit_match
    mse_weight: float = 1.0  # logit_match: weight of the full-vocabulary logit MSE
    kl_vocab: str = "full"  # full | batch (softmax over the batch's teacher top-k union)
    alpha: float | None = None  # weight of the KL term (kl: 1, ce: 0, mix: 0.5 default)
    temperature: float = 1.0
    teacher_topk: int = 32  # 0 = the full distribution (computed on the fly)
    depth_weights: list[float] | None = None
    own_path: bool = False  # depth i trained only where the head's own drafts 1..i-1 are right
    # optimisation
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_steps: int | None = None
    epochs: float = 1.0  # used when max_steps is None
    time_budget_s: float | None = None  # caps the total steps from the measured step time
    batch_size: int = 256  # positions per micro-batch (per rank)
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
    feature_batch_tokens: int = FEATURE_BATCH_TOKENS
    base_dtype: str = "float32"  # the frozen base's dtype for the features
    cache_dir: str | None = None
    # bookkeeping
    checkpoint_dir: str | None = None  # default: <output_dir>.checkpoints
    save_every: int = 0  # 0 = only at the end
    eval_every: int = 0
    resume: str | None = None  # None | "auto" | a checkpoint file
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
            require(
                self.alpha is None or self.alpha == 1.0,
                "--loss logit_match is pure distillation; --alpha does not apply to it",
            )
            require(
                self.freeze_lm_head and self.teacher_topk > 0,
                "--loss logit_match needs --freeze_lm_head with --lm_head_init base (the head's "
                "projection must be the base's) and --teacher_topk > 0",
            )
            require(self.mse_weight >= 0, f"--mse_weight must be >= 0, got {self.mse_weight}")
        require(
            self.kl_vocab in KL_VOCABS, f"--kl_vocab {self.kl_vocab!r}: expected one of {KL_VOCABS}"
        )
        require(
            self.kl_vocab == "full" or (self.teacher_topk > 0 and self.loss != "logit_match"),
            "--kl_vocab batch takes its vocabulary from the teacher's top-k: it needs --teacher_topk > 0 "
            "(and does not apply to --loss logit_match)",
        )
        require(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        require(self.teacher_topk >= 0, f"--teacher_topk must be >= 0, got {self.teacher_topk}")
        require(self.draft_len >= 1, f"--draft_len must be >= 1, got {self.draft_len}")
        require(
            self.batch_size >= 1 and self.grad_accum >= 1,
            "--batch_size and --grad_accum must be >= 1",
        )
        require(
            self.depth_weights is None
            or (
                len(self.depth_weights) == self.draft_len
                and all(w >= 0 for w in self.depth_weights)
                and sum(self.depth_weights) > 0
            ),
            f"--depth_weights needs {self.draft_len} non-negative values (one per draft step), "
            f"got {self.depth_weights}",
        )
        require(
            self.lm_head_init in LM_HEAD_INITS,
            f"--lm_head_init {self.lm_head_init!r}: expected one of {LM_HEAD_INITS}",
        )
        require(
            not (self.lm_head_init == "base" and self.init_from),
            "--lm_head_init base and --init_from both set the head's weights; pass one of them",
        )
        require(
            self.lm_head_init == "base" or self.init_from or not self.freeze_lm_head,
            "--freeze_lm_head keeps a random vocabulary projection fixed; use it with "
            "--lm_head_init base (or --init_from a trained head)",
        )
        require(
            self.draft_vocab_size is None or self.draft_vocab_size >= 1,
            f"--draft_vocab_size must be >= 1, got {self.draft_vocab_size}",
        )
        require(
            self.draft_vocab_size is None or self.loss != "logit_match",
            "--loss logit_match matches the base's full-vocabulary logits; it does not take --draft_vocab_size",
        )
        require(
            self.precision in PRECISIONS,
            f"--precision {self.precision!r}: expected one of {PRECISIONS}",
        )
        require(
            self.base_dtype in BASE_DTYPES,
            f"--base_dtype {self.base_dtype!r}: expected one of {BASE_DTYPES}",
        )
        require(
            0.0 <= self.eval_fraction < 1.0,
            f"--eval_fraction must be in [0, 1), got {self.eval_fraction}",
        )
        require(
            self.lr > 0 and 0 <= self.min_lr_ratio <= 1,
            "--lr must be > 0 and --min_lr_ratio in [0, 1]",
        )
        require(self.max_steps is None or self.max_steps >= 1, "--max_steps must be >= 1")
        require(self.epochs > 0, "--epochs must be > 0")
        require(
            self.new_rows in NEW_ROWS,
            f"--new_rows {self.new_rows!r}: expected one of {NEW_ROWS}",
        )

    def schedule_fields(self) -> dict[str, Any]:
        """Settings a resumed run must share with the checkpoint for an exact continuation."""
        d = asdict(self)
        for k in (
            "output_dir",
            "checkpoint_dir",
            "save_every",
            "eval_every",
            "resume",
            "overwrite",
            "device",
            "progress",
            "log_every",
            "cache_dir",
            "time_budget_s",
            "max_steps",
            "epochs",
            "model_dir",
            "data",
            "new_rows",  # the start of the head only; a resume reads its parameters
        ):
            d.pop(k)
        return d


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )
