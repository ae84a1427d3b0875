"""Training-step benchmark: time one optimizer step of the draft head under each loss path, in one
run, on the same batches, and print positions per second and the ratios to the plain path.

    python -m redrafter_trt.bench.train_step [--features_dir DIR] [--vocab 49152 --hidden 576]

With ``--features_dir`` (a feature cache directory written by ``redrafter-train train``) the
batches are real positions and teacher top-k sets; without it, synthetic features with
Zipf-distributed token ids stand in (the batch vocabulary's size depends on that distribution,
so real features give the representative figure). No base model is loaded: the frozen projection
is random, which does not change the cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..models.drafter import DrafterConfig, init_drafter
from ..train.config import TrainConfig
from ..train.features import FEATURES_FILE, Features
from ..train.losses import UnrolledHead
from ..train.positions import split_positions
from ..train.step import FrozenProjection, forward_loss, precision_context

#: (name, loss, kl_vocab, precision, frozen projection)
PATHS = (
    ("kl, full vocabulary, fp32, plain", "kl", "full", "fp32", False),
    ("kl, full vocabulary, fp32, fused", "kl", "full", "fp32", True),
    ("kl, full vocabulary, bf16, fused", "kl", "full", "bf16", True),
    ("kl, batch vocabulary, fp32", "kl", "batch", "fp32", True),
    ("kl, batch vocabulary, bf16", "kl", "batch", "bf16", True),
    ("logit_match, fp32", "logit_match", "full", "fp32", True),
    ("logit_match, bf16", "logit_match", "full", "bf16", True),
)


class _Base:
    """What forward_loss reads from the frozen base: the embedding and the projection."""

    def __init__(self, vocab: int, hidden: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.embedding = torch.nn.Embedding.from_pretrained(
            torch.randn(vocab, hidden, generator=g) * 0.02
        )
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.05)


def synthetic_features(n: int, vocab: int, hidden: int, topk: int, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    tokens = torch.multinomial(zipf, n, replacement=True, generator=g)
    topk_ids = torch.multinomial(zipf, n * topk, replacement=True, generator=g).view(n, topk)
    return Features(
        tokens=tokens,
        targets=torch.ones(n, dtype=torch.bool),
        seq_end=torch.full((n,), n, dtype=torch.int64),
        hidden=torch.randn(n, hidden, generator=g).to(torch.float16),
        topk_values=torch.randn(n, topk, generator=g).sort(-1, descending=True).values,
        topk_ids=topk_ids,
        seq_starts=torch.zeros(1, dtype=torch.int64),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m redrafter_trt.bench.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--features_dir",
        default=None,
        help="a feature cache directory of redrafter-train (default: synthetic features)",
    )
    p.add_argument("--vocab", type=int, default=49152, help="V (default: SmolLM2's 49152)")
    p.add_argument("--hidden", type=int, default=576, help="H = exit_dim (default: SmolLM2's 576)")
    p.add_argument("--batch_size", type=int, default=256, help="positions per step (default: 256)")
    p.add_argument("--draft_len", type=int, default=4, help="D (default: 4)")
    p.add_argument("--teacher_topk", type=int, default=32, help="teacher top-k (default: 32)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (default: 5)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    if args.features_dir:
        from ..models.io import load_state_dict_file

        f = Path(args.features_dir) / FEATURES_FILE
        feats = Features.from_tensors(load_state_dict_file(f), str(f))
        args.hidden = int(feats.hidden.shape[1])
        args.vocab = max(args.vocab, int(feats.topk_ids.max()) + 1, int(feats.tokens.max()) + 1)
    else:
        feats = synthetic_features(200_000, args.vocab, args.hidden, args.teacher_topk, seed=0)
    base = _Base(args.vocab, args.hidden, seed=1)
    usable, _ = split_positions(feats, args.draft_len, 0.0, seed=0)  # the positions training draws
    g = torch.Generator().manual_seed(2)
    starts = [
        usable[torch.randint(0, len(usable), (args.batch_size,), generator=g)]
        for _ in range(args.steps + 1)
    ]
    rows = []
    for name, loss, vocab, precision, frozen in PATHS:
        cfg = TrainConfig(
            model_dir="-",
            data=["-"],
            output_dir="-",
            exit_dim=args.hidden,
            loss=loss,
            kl_vocab=vocab,
            precision=precision,
            teacher_topk=args.teacher_topk,
            lm_head_init="base",
            freeze_lm_head=True,
            draft_len=args.draft_len,
        )
        cfg.validate()
        head = init_drafter(DrafterConfig(args.vocab, args.hidden, args.hidden, 1, True), seed=0)
        with torch.no_grad():
            head.projection.weight.copy_(base.lm_head.weight)
        head.projection.weight.requires_grad_(False)
        autocast, _, prec = precision_context(cfg, torch.device("cpu"))
        mm = torch.bfloat16 if prec == "bf16" else torch.float32
        proj = FrozenProjection.of(head, base, cfg, mm) if frozen else None
        model = UnrolledHead(head)
        times = []
        for i, pos in enumerate(starts):
            t0 = time.perf_counter()
            loss_v, _ = forward_loss(model, base, feats, pos, cfg, "cpu", autocast, proj)
            loss_v.backward()
            head.zero_grad(set_to_none=True)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        rows.append(
            {"path": name, "seconds_per_step": sec, "positions_per_s": args.batch_size / sec}
        )
        print(
            f"{name:36s} {sec * 1000:8.1f} ms/step {args.batch_size / sec:8.0f} positions/s",
            flush=True,
        )
    ref = rows[0]["seconds_per_step"]
    for r in rows:
        r["speedup_vs_plain"] = ref / r["seconds_per_step"]
    print(
        "speed-up over the plain fp32 path: "
        + ", ".join(f"{r['path']}: {r['speedup_vs_plain']:.1f}x" for r in rows[1:])
    )
    print(
        f"threads: {torch.get_num_threads()}; V={args.vocab} H={args.hidden} "
        f"{args.batch_size} positions x D={args.draft_len}; "
        f"{'features ' + args.features_dir if args.features_dir else 'synthetic Zipf features'}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "threads": torch.get_num_threads(),
                    "vocab": args.vocab,
                    "hidden": args.hidden,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
