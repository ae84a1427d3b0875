"""``redrafter-run``: generate with an engine directory, speculative or plain."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import RedrafterError, require
from .common import add_threads_argument, non_negative_int, positive_int, run_main

RANDOM_HEAD_NOTE = ("note: this engine's draft head is randomly initialised (--random_drafter), so it "
                    "accepts almost no draft tokens; train one for your base model with redrafter-train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-run",
        description="Generate text or token ids with a redrafter-build engine. Greedy speculative "
                    "output equals plain greedy output token for token; sampling with the same "
                    "--random_seed gives the same tokens with and without speculation.")
    p.add_argument("--engine_dir", required=True, help="engine directory from redrafter-build")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input_text", nargs="+", help="one or more prompts (needs a tokenizer)")
    src.add_argument("--input_ids_file",
                     help="JSON file holding a list of token-id lists (no tokenizer involved)")
    p.add_argument("--max_output_len", type=positive_int, default=128,
                   help="new tokens per prompt at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples exactly from the base model")
    p.add_argument("--top_k", type=non_negative_int, default=0, help="top-k filter, 0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="top-p (nucleus) filter, 1 = off")
    p.add_argument("--random_seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--no_speculation", action="store_true",
                   help="plain decoding through the same engine (the baseline)")
    p.add_argument("--use_chat_template", action="store_true",
                   help="wrap each prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--system_prompt", default=None, help="system turn for --use_chat_template")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore_eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--streaming", action="store_true", help="print tokens as each step completes")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: outputs (output_token_ids, output_text, "
                        "accepted_per_step), tokens_per_step, num_steps, wall_s")
    p.add_argument("--device", default=None, help="torch backend: cpu, cuda, cuda:N (default: auto)")
    add_threads_argument(p)
    return p


def read_ids_file(path: str, flag: str = "--input_ids_file") -> list[list[int]]:
    f = Path(path)
    require(f.is_file(), f"{flag} {f}: not found")
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RedrafterError(f"{flag} {f}: not valid JSON ({e})") from e
    ok = (isinstance(data, list) and data and all(
        isinstance(row, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)
        for row in data))
    require(ok, f"{flag} {f}: expected a non-empty JSON list of token-id lists, "
            "e.g. [[1, 2, 3], [4, 5]]")
    return data


def run(args: argparse.Namespace) -> int:
    from .. import load

    require(args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}")
    require(0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")
    prompts = read_ids_file(args.input_ids_file) if args.input_ids_file else args.input_text
    gen = load(args.engine_dir, device=args.device)
    if gen.random_drafter and not args.no_speculation:
        print(RANDOM_HEAD_NOTE, file=sys.stderr)
    kw = dict(max_new_tokens=args.max_output_len, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.random_seed, speculative=not args.no_speculation,
              use_chat_template=args.use_chat_template, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.system_prompt is not None:
        require(args.use_chat_template, "--system_prompt needs --use_chat_template")
        require(gen.tokenizer is not None, "--system_prompt needs a tokenizer")
        prompts = [gen.encode(p, True, args.system_prompt) for p in prompts]
        kw["use_chat_template"] = False
    if args.streaming:
        results = _stream(gen, prompts, kw, args.json)
    else:
        results = gen.generate(prompts, **kw)
    stats = gen.last_stats
    if args.json:
        print(json.dumps({
            "outputs": [{"output_token_ids": r.token_ids, "output_text": r.text,
                         "accepted_per_step": r.accepted_per_step, "finish_reason": r.finish_reason}
                        for r in results],
            "tokens_per_step": stats.tokens_per_step, "num_steps": stats.num_steps,
            "wall_s": stats.wall_s, "speculative": not args.no_speculation}))
    elif not args.streaming:
        for i, r in enumerate(results):
            shown = r.text if r.text is not None else " ".join(map(str, r.token_ids))
            print(f"[{i}] {shown}")
    if not args.json:
        print(f"steps: {stats.num_steps}  tokens/step: {stats.tokens_per_step:.2f}  "
              f"wall: {stats.wall_s:.2f} s  ({'speculative' if not args.no_speculation else 'plain'})",
              file=sys.stderr)
    return 0


def _stream(gen, prompts, kw, as_json: bool):
    """Print each step's new tokens as it completes; return the final results."""
    for ev in gen.generate_stream(prompts, **kw):
        if as_json:
            print(json.dumps({"index": ev.index, "token_ids": ev.token_ids, "finished": ev.finished}),
                  flush=True)
            continue
        # ev.text never splits a multi-byte character (held back until the step completing it)
        delta = ev.text if ev.text is not None else " ".join(map(str, ev.token_ids))
        prefix = f"[{ev.index}] " if len(prompts) > 1 else ""
        if delta:
            sys.stdout.write(prefix + delta + ("\n" if len(prompts) > 1 else ""))
            sys.stdout.flush()
    if not as_json and len(prompts) == 1:
        sys.stdout.write("\n")
    return gen.last_results


def main(argv=None) -> int:
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
