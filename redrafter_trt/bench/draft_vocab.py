"""Drafting cost and coverage of a reduced draft vocabulary on SmolLM2-135M-Instruct.

``python -m redrafter_trt.bench.draft_vocab [--ks 0,16384,8192,4096] [--rounds 5]`` prints one
JSON object:

- ``draft_ms_per_step``: median wall time of one draft step (state update, head, beam search
  over K columns, map to full ids) of ``Drafter.beam_search`` at B=1, W=4, D=4, exit_dim 576,
  one thread, for each K (0 = the full vocabulary, no map); the Ks are timed interleaved, round
  by round, so load changes hit them alike;
- ``coverage``: the base's own greedy answers to two disjoint sets of prompts; K ids are chosen
  by frequency on the first set (plus EOS) and the fraction of the second set's tokens inside
  them is reported (a token outside is one the head can never draft).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

#: Prompts whose answers choose the ids (model-written answers; the prompts are ours).
CHOOSE_PROMPTS = [
    "Explain how a bicycle gear system works.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Give me three tips for learning a new language.",
    "Describe the water cycle for a ten-year-old.",
    "Write a Python function that reverses a string.",
    "Compare electric cars and petrol cars.",
    "Plan a one-day trip to a mountain village.",
    "Why is the sky blue?",
    "Summarise the benefits of regular exercise.",
    "Write a polite email declining a meeting.",
    "How do vaccines train the immune system?",
    "List five healthy breakfast ideas.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn rain.",
    "Explain recursion with an example.",
]
#: Held-out prompts in the style of multi-turn chat benchmarks (writing, reasoning, coding, STEM).
MEASURE_PROMPTS = [
    "Compose an engaging travel blog post about a recent trip to a coastal town.",
    "A train leaves at 3 pm and travels 120 km at 60 km/h. When does it arrive? Explain.",
    "Write a function in Python that finds the longest common prefix of a list of strings.",
    "Explain the concept of opportunity cost and give two everyday examples.",
    "Draft a persuasive paragraph encouraging people to recycle more.",
    "What are the pros and cons of remote work for a small company?",
    "Describe how photosynthesis converts light into chemical energy.",
    "Suggest a weekly study plan for a student preparing for a maths exam.",
]


def _answers(gen, tok, prompts: list[str], max_new: int) -> list[list[int]]:
    ids = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    ids = [
        list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids
    ]
    return [r.token_ids for r in gen.generate(ids, max_new_tokens=max_new, speculative=False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="0,16384,8192,4096", help="draft vocabulary sizes (0 = full V)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--reps", type=int, default=5, help="beam searches per K per round")
    ap.add_argument(
        "--max_new_tokens", type=int, default=160, help="answer length for the coverage"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from ..backends.torch_backend import TorchBackend
    from ..models.drafter import DrafterConfig, init_drafter
    from ..models.hub import ensure_smollm2
    from ..runtime import Generator
    from ..train.data import load_base_tokenizer
    from ..train.frozen_base import eos_ids, load_frozen_base

    model_dir = ensure_smollm2()
    base = load_frozen_base(model_dir, torch.device("cpu"))
    tok = load_base_tokenizer(model_dir)
    v, h = base.config.vocab_size, base.config.hidden_size
    gen = Generator(
        TorchBackend(base, None, 1, 1, max_batch_size=16, max_input_len=256, max_seq_len=512),
        tokenizer=tok,
        eos_token_ids=eos_ids(base, tok),
    )
    t0 = time.perf_counter()
    choose = _answers(gen, tok, CHOOSE_PROMPTS, args.max_new_tokens)
    measure = _answers(gen, tok, MEASURE_PROMPTS, args.max_new_tokens)
    gen_s = time.perf_counter() - t0
    counts = torch.bincount(torch.tensor([t for r in choose for t in r]), minlength=v).to(
        torch.float64
    )
    counts[torch.tensor(eos_ids(base, tok))] = float("inf")
    order = torch.sort(counts, descending=True, stable=True).indices
    held = torch.tensor([t for r in measure for t in r])
    ks = [int(k) for k in args.ks.split(",")]
    coverage = {str(k or v): float(torch.isin(held, order[: k or v]).float().mean()) for k in ks}
    coverage_seen = {
        str(k or v): float(
            torch.isin(torch.tensor([t for r in choose for t in r]), order[: k or v]).float().mean()
        )
        for k in ks
    }

    heads = {}
    for k in ks:
        ids = None if k == 0 else torch.sort(order[:k]).values.to(torch.int32)
        head = init_drafter(
            DrafterConfig(v, h, h, 1, True, draft_vocab_size=None if k == 0 else k),
            seed=0,
            draft_vocab=ids,
        )
        with torch.no_grad():  # the base's rows, as --lm_head_init base gives
            head.projection.weight.copy_(
                base.lm_head.weight.float()[order[:k].sort().values]
                if k
                else base.lm_head.weight.float()
            )
        heads[k] = head.eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, h, generator=g)
    root = torch.tensor([int(held[0])])
    w, d = 4, 4
    times: dict[int, list[float]] = {k: [] for k in ks}
    for k in ks:  # warm-up
        heads[k].beam_search(base.embedding, ctx, root, w, d)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for k in ks:
            for _ in range(args.reps):
                t = time.perf_counter()
                heads[k].beam_search(base.embedding, ctx, root, w, d)
                times[k].append((time.perf_counter() - t) / d * 1e3)
    load_after = os.getloadavg()
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "V": v,
                "exit_dim": h,
                "W": w,
                "D": d,
                "B": 1,
                "threads": 1,
                "draft_ms_per_step": {
                    str(k or v): round(statistics.median(times[k]), 3) for k in ks
                },
                "draft_ms_per_step_min": {str(k or v): round(min(times[k]), 3) for k in ks},
                "samples_per_k": args.rounds * args.reps,
                "loadavg_1_5_15_before": load_before,
                "loadavg_1_5_15_after": load_after,
                "coverage_held_out": coverage,
                "coverage_on_choosing_set": coverage_seen,
                "tokens_choosing": int(sum(len(r) for r in choose)),
                "tokens_held_out": int(held.numel()),
                "generation_s": round(gen_s, 1),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
