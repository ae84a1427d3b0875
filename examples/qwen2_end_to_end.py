#!/usr/bin/env python3
"""A Qwen2 Hugging Face model end to end, with the Python API for generation.

    python examples/qwen2_end_to_end.py --model_dir MODEL_DIR --work_dir WORK_DIR [options]

1. ``redrafter-convert``: base + draft head -> WORK_DIR/ckpt (a random head unless --drafter_dir);
2. ``redrafter-build``: checkpoint -> WORK_DIR/engine (torch backend: CPU or a GPU);
3. ``redrafter_trt.load(engine)``: a batch of chat prompts, greedy, speculative and plain (the
   outputs must be identical), then seeded sampling, then one prompt streamed step by step
   with ``generate_stream``;
4. ``redrafter-bench``: speculative against plain decoding on a prompt set (WORK_DIR/bench).

Qwen2 differs from Llama in the biases of its q/k/v projections and, for the Instruct models,
its ChatML chat template; the tools read both from the directory, so the steps are the same
as for Llama (examples/llama_end_to_end.sh shows them as shell commands).

Exit status: 0 when every step ran and greedy speculative outputs equal plain ones; 1 when a step
failed or outputs differ; 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "Give me three tips for writing clear code.",
    "What is speculative decoding?",
    "Write a haiku about the sea.",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Steps and exit status: see the top of this file.",
    )
    ap.add_argument("--model_dir", required=True, help="Hugging Face Qwen2 directory")
    ap.add_argument("--work_dir", required=True, help="where ckpt/, engine/ and bench/ are written")
    ap.add_argument(
        "--drafter_dir",
        help="draft head directory (config.json + model.safetensors), e.g. from "
        "examples/train_head.sh; default: a random head (plumbing only, output still exact)",
    )
    ap.add_argument("--beams", type=int, default=4, help="W, beams drafted per step (default: 4)")
    ap.add_argument("--draft_len", type=int, default=4, help="D, tokens per beam (default: 4)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="checkpoint dtype (default: auto)",
    )
    ap.add_argument(
        "--max_seq_len",
        type=int,
        default=1024,
        help="engine's prompt + output limit (default: 1024)",
    )
    ap.add_argument(
        "--prompt",
        action="append",
        help="a chat prompt (repeatable; default: three short requests)",
    )
    ap.add_argument(
        "--max_new_tokens", type=int, default=64, help="new tokens per prompt (default: 64)"
    )
    ap.add_argument(
        "--bench_dataset",
        default="mt-bench",
        help="redrafter-bench --dataset: mt-bench, writingbench, sharegpt or a .json/.jsonl "
        "prompt file (default: mt-bench)",
    )
    ap.add_argument("--bench_prompts", type=int, default=8, help="prompts benchmarked (default: 8)")
    ap.add_argument(
        "--bench_repetitions", type=int, default=3, help="timed repetitions (default: 3)"
    )
    args = ap.parse_args(argv)
    for name in (
        "beams",
        "draft_len",
        "max_seq_len",
        "max_new_tokens",
        "bench_prompts",
        "bench_repetitions",
    ):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not (Path(args.model_dir) / "config.json").is_file():
        ap.error(
            f"--model_dir {args.model_dir}: no config.json (expected a Hugging Face directory)"
        )
    return args


def tool(name: str, **flags) -> None:
    """Run one of the toolkit's command-line tools with ``--flag value`` for each keyword (``True``:
    the bare flag); a failure ends the example with status 1."""
    exe = shutil.which(name)
    if exe is None:
        sys.exit(f"{name} is not on PATH (pip install redrafter-trt installs it)")
    args = []
    for flag, value in flags.items():
        args += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
    print(f"== {name} {' '.join(args)}", file=sys.stderr, flush=True)
    if subprocess.run([exe, *args]).returncode != 0:
        sys.exit(f"{name} failed (its message is above)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    ckpt, engine = work / "ckpt", work / "engine"
    head = {"drafter_model_dir": args.drafter_dir} if args.drafter_dir else {"random_drafter": True}

    # 1-2. Convert and build with the command-line tools.
    tool(
        "redrafter-convert",
        model_dir=args.model_dir,
        **head,
        output_dir=ckpt,
        dtype=args.dtype,
        redrafter_num_beams=args.beams,
        redrafter_draft_len_per_beam=args.draft_len,
        overwrite=True,
    )
    tool(
        "redrafter-build",
        checkpoint_dir=ckpt,
        output_dir=engine,
        backend="torch",
        max_batch_size=4,
        max_input_len=args.max_seq_len // 2,
        max_seq_len=args.max_seq_len,
        overwrite=True,
    )

    # 3. Generation through the Python API.
    import redrafter_trt

    gen = redrafter_trt.load(engine)
    prompts = args.prompt or PROMPTS
    kw = dict(max_new_tokens=args.max_new_tokens, use_chat_template=True)
    spec = gen.generate(prompts, **kw)
    spec_stats = gen.last_stats
    plain = gen.generate(prompts, speculative=False, **kw)
    for i, (s, p) in enumerate(zip(spec, plain)):
        print(f"[{i}] {s.text!r}  (steps added {s.accepted_per_step} tokens)")
        if s.token_ids != p.token_ids:
            print(f"[{i}] greedy speculative output differs from plain output", file=sys.stderr)
            return 1
    print(
        f"greedy: speculative == plain for all {len(prompts)} prompts; "
        f"{spec_stats.tokens_per_step:.2f} tokens/step, {spec_stats.wall_s:.2f} s "
        f"(plain {gen.last_stats.wall_s:.2f} s)"
    )
    sampled = gen.generate(prompts, temperature=0.8, top_p=0.95, seed=7, **kw)
    again = gen.generate(prompts, temperature=0.8, top_p=0.95, seed=7, speculative=False, **kw)
    same = [a.token_ids for a in sampled] == [b.token_ids for b in again]
    print(f"sampling (T=0.8, top-p 0.95, seed 7): speculative == plain with the same seed: {same}")
    print("streamed:", end=" ", flush=True)
    for event in gen.generate_stream(prompts[:1], **kw):
        print(event.text if event.text is not None else event.token_ids, end="", flush=True)
    print()

    # 4. Benchmark (bench.json and bench.md in WORK_DIR/bench; --strict: a greedy mismatch fails).
    tool(
        "redrafter-bench",
        engine_dir=engine,
        dataset=args.bench_dataset,
        num_prompts=args.bench_prompts,
        max_new_tokens=args.max_new_tokens,
        repetitions=args.bench_repetitions,
        output_dir=work / "bench",
        no_plot=True,
        strict=True,
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
