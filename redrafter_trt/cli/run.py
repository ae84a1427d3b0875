"""``redrafter-run``: generate with an engine directory, speculative or plain."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..cmdline import (
    add_adaptive_argument,
    add_threads_argument,
    non_negative_int,
    positive_int,
    run_main,
)
from ..contract import Backend
from ..errors import RedrafterError, require
from .common import add_tp_arguments, apply_tp_threads

if TYPE_CHECKING:
    from ..runtime.adaptive import ShapeLog

RANDOM_HEAD_NOTE = (
    "note: this engine's draft head is randomly initialised (--random_drafter), so it "
    "accepts almost no draft tokens; train one for your base model with redrafter-train"
)


STREAM_HELP = (
    "print text as it is generated. With one prompt the text is streamed as each step completes; "
    "with several prompts each prompt's complete text is printed as one '[i] ...' block when "
    "that prompt finishes (prompts finish in any order), so outputs never interleave. With "
    "--json: JSON Lines, see --json"
)
JSON_HELP = (
    "print JSON on stdout. Without --streaming: one object with outputs (output_token_ids, "
    "output_text, accepted_per_step, finish_reason, time_to_first_token_s), tokens_per_step, "
    "num_steps, generated_tokens, wall_s, tokens_per_s, time_to_first_token_s, speculative. With "
    '--streaming: JSON Lines, one object per event {"index", "token_ids", "text", '
    '"finished", "finish_reason"} as steps complete (text: the characters those tokens '
    'complete, null without a tokenizer), then that same summary object with "summary": true '
    "as the last line"
)
INPUT_FILE_HELP = (
    "prompt file: plain text, one prompt per line (blank lines skipped; --use_chat_template "
    'applies), or JSON Lines of conversations, one {"messages": [{"role": "system"|"user"|'
    '"assistant", "content": "..."}, ...]} per line, each rendered with the tokenizer\'s chat '
    "template for the next assistant turn (multi-turn). The format is JSON Lines when the first "
    "non-blank line is such an object"
)
CHAT_ROLES = ("system", "user", "assistant")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-run",
        description="Generate text or token ids with a redrafter-build engine. Greedy speculative "
        "output equals plain greedy output token for token; sampling with the same "
        "--random_seed gives the same tokens with and without speculation. Prints "
        "steps, tokens/step, tokens/s and time to first token on stderr.",
    )
    p.add_argument("--engine_dir", required=True, help="engine directory from redrafter-build")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input_text", nargs="+", help="one or more prompts (needs a tokenizer)")
    src.add_argument("--input_file", help=INPUT_FILE_HELP)
    src.add_argument(
        "--input_ids_file",
        help="JSON file holding a list of token-id lists (no tokenizer involved)",
    )
    p.add_argument(
        "--max_output_len",
        type=positive_int,
        default=128,
        help="new tokens per prompt at most (default: %(default)s); capped, with a "
        "warning, where prompt + output would exceed the engine's max_seq_len",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (default); > 0 samples exactly from the base model",
    )
    p.add_argument("--top_k", type=non_negative_int, default=0, help="top-k filter, 0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="top-p (nucleus) filter, 1 = off")
    p.add_argument(
        "--random_seed", type=int, default=0, help="sampling seed (default: %(default)s)"
    )
    p.add_argument(
        "--no_speculation",
        action="store_true",
        help="plain decoding through the same engine (the baseline)",
    )
    add_adaptive_argument(p)
    p.add_argument(
        "--use_chat_template",
        action="store_true",
        help="wrap each prompt as a user turn with the tokenizer's chat template",
    )
    p.add_argument(
        "--system_prompt",
        default=None,
        help="system turn for --use_chat_template, and for --input_file conversations "
        "that have none",
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--ignore_eos", action="store_true", help="do not stop at end-of-sequence tokens"
    )
    p.add_argument("--streaming", action="store_true", help=STREAM_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument(
        "--no_progress",
        action="store_true",
        help="no progress bar on stderr (shown without --streaming)",
    )
    p.add_argument(
        "--device", default=None, help="torch backend: cpu, cuda, cuda:N (default: auto)"
    )
    add_threads_argument(p)
    add_tp_arguments(p)
    return p


def read_ids_file(path: str, flag: str = "--input_ids_file") -> list[list[int]]:
    f = Path(path)
    require(f.is_file(), f"{flag} {f}: not found")
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RedrafterError(f"{flag} {f}: not valid JSON ({e})") from e
    ok = (
        isinstance(data, list)
        and data
        and all(
            isinstance(row, list)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in row)
            for row in data
        )
    )
    require(
        ok,
        f"{flag} {f}: expected a non-empty JSON list of token-id lists, e.g. [[1, 2, 3], [4, 5]]",
    )
    return data


def require_utf8(text: str, what: str) -> str:
    """``text`` unless it holds bytes that are not UTF-8 (Python maps undecodable command-line
    bytes to lone surrogates), else a :class:`RedrafterError` naming ``what`` and the offset."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end].encode("utf-8", "surrogateescape")
        raise RedrafterError(
            f"{what}: not valid UTF-8 (byte {bad[:1].hex(' ')!s} at character "
            f"{e.start}); pass text in UTF-8"
        ) from None
    return text


def read_input_file(path: str, flag: str = "--input_file") -> list:
    """Prompts of a prompt file: a list of strings (text, one per line) or of message lists
    (JSON Lines of ``{"messages": [...]}``); see :data:`INPUT_FILE_HELP`."""
    f = Path(path)
    require(f.is_file(), f"{flag} {f}: not found")
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RedrafterError(
            f"{flag} {f}: not valid UTF-8 (byte 0x{raw[e.start]:02x} on line "
            f"{line}); save the file as UTF-8"
        ) from None
    lines = [(n, ln.rstrip("\r")) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]
    require(lines, f"{flag} {f}: no prompts (the file is empty)")
    first = lines[0][1].lstrip()
    if not first.startswith("{"):
        return [ln for _, ln in lines]
    prompts = []
    for n, ln in lines:
        where = f"{flag} {f} line {n}"
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise RedrafterError(
                f"{where}: not valid JSON ({e}); a JSON Lines prompt file holds "
                'one {"messages": [...]} object per line'
            ) from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        require(
            isinstance(msgs, list) and msgs,
            f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} with at '
            "least one message",
        )
        for i, m in enumerate(msgs):
            require(
                isinstance(m, dict)
                and m.get("role") in CHAT_ROLES
                and isinstance(m.get("content"), str),
                f'{where}: message {i} must be {{"role": one of {list(CHAT_ROLES)}, '
                f'"content": a string}}, got {json.dumps(m)[:80]}',
            )
        require(
            msgs[-1]["role"] != "assistant",
            f"{where}: the last message is the assistant's; end with a user turn for the "
            "model to answer",
        )
        prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return prompts


def render_conversation(gen, messages: list[dict], system_prompt: str | None) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ready for the next
    assistant turn (``system_prompt`` added first when the conversation has no system turn)."""
    tok = gen.tokenizer
    require(tok is not None, "--input_file conversations need a tokenizer; this engine has none")
    require(
        getattr(tok, "chat_template", None) is not None,
        "--input_file conversations need a chat template; the tokenizer has none (use a "
        "plain text prompt file instead)",
    )
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}] + messages
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return gen.encode(list(ids))


def encode_prompts(gen, args, prompts) -> list[list[int]]:
    """Every prompt as token ids, the way the generator would encode it."""
    require(
        args.system_prompt is None or args.use_chat_template or args.input_file,
        "--system_prompt needs --use_chat_template",
    )
    source = prompt_source(args)
    be = gen.backend
    out = []
    for i, p in enumerate(prompts):
        try:
            if isinstance(p, list) and p and isinstance(p[0], dict):
                ids = render_conversation(gen, p, args.system_prompt)
            else:
                ids = gen.encode(
                    p,
                    args.use_chat_template,
                    args.system_prompt if args.use_chat_template else None,
                )
        except RedrafterError as e:
            raise RedrafterError(f"{source} prompt {i}: {e}") from None
        # checked here, before any warning about the engine's limits is printed
        require(
            len(ids) <= be.max_input_len,
            f"{source} prompt {i} has {len(ids)} tokens, more than the engine's max_input_len "
            f"{be.max_input_len} (rebuild with a larger --max_input_len)",
        )
        require(
            len(ids) < be.max_seq_len,
            f"{source} prompt {i} has {len(ids)} tokens, leaving no room under the engine's "
            f"max_seq_len {be.max_seq_len}",
        )
        out.append(ids)
    return out


def prompt_source(args) -> str:
    """The flag (and file) the prompts came from, for messages about one of them."""
    if getattr(args, "input_ids_file", None):
        return f"--input_ids_file {args.input_ids_file}"
    if getattr(args, "input_file", None):
        return f"--input_file {args.input_file}"
    return "--input_text"


def limit_warnings(backend: Backend, encoded: list[list[int]], max_output_len: int) -> list[str]:
    """What the engine's limits will do to this request that the user did not ask for."""
    notes = []
    n, b = len(encoded), backend.max_batch_size
    if n > b:
        notes.append(
            f"warning: {n} prompts but the engine's max_batch_size is {b}: at most {b} "
            f"run at a time and the others wait for a free slot (rebuild with "
            f"redrafter-build --max_batch_size {n} to run them together)"
        )
    capped = [
        (i, len(ids))
        for i, ids in enumerate(encoded)
        if len(ids) + max_output_len > backend.max_seq_len
    ]
    for i, length in capped[:3]:
        notes.append(
            f"warning: prompt {i} has {length} tokens; with --max_output_len "
            f"{max_output_len} it would exceed the engine's max_seq_len "
            f"{backend.max_seq_len}: at most {max(0, backend.max_seq_len - length)} new "
            "tokens (rebuild with a larger --max_seq_len)"
        )
    if len(capped) > 3:
        notes.append(f"warning: {len(capped) - 3} more prompts are capped the same way")
    return notes


def run(args: argparse.Namespace) -> int:
    from ..runtime.adaptive import ShapeLog
    from ..runtime.loader import load, resolve_device

    require(args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}")
    require(0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")
    for i, t in enumerate(args.input_text or []):
        require_utf8(t, f"--input_text prompt {i}")
    for s in args.stop:
        require_utf8(s, f"--stop {s!r}")
    if args.system_prompt is not None:
        require_utf8(args.system_prompt, "--system_prompt")
    if args.input_ids_file:
        prompts: list = read_ids_file(args.input_ids_file)
    elif args.input_file:
        prompts = read_input_file(args.input_file)
    else:
        prompts = args.input_text
    resolve_device(args.device)  # a bad --device fails before the weights are read
    apply_tp_threads(args)
    gen = load(
        args.engine_dir,
        device=args.device,
        adaptive=args.adaptive,
        tp_size=args.tp_size,
        tp_timeout=args.tp_timeout,
    )
    if gen.policy is not None and not args.no_speculation:
        print(f"[run] {gen.policy_note}", file=sys.stderr)
    if gen.random_drafter and not args.no_speculation:
        print(RANDOM_HEAD_NOTE, file=sys.stderr)
    encoded = encode_prompts(gen, args, prompts)
    for note in limit_warnings(gen.backend, encoded, args.max_output_len):
        print(note, file=sys.stderr)
    kw = dict(
        max_new_tokens=args.max_output_len,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.random_seed,
        speculative=not args.no_speculation,
        use_chat_template=False,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    shapes = None
    if gen.policy is not None and not args.no_speculation:
        shapes = ShapeLog(gen.policy)
        gen.policy = shapes
    results, timing = _generate(gen, encoded, kw, args)
    stats = gen.last_stats
    generated = sum(len(r.token_ids) for r in results)
    tokens_per_s = generated / stats.wall_s if stats.wall_s > 0 else 0.0
    summary = {
        "outputs": [
            {
                "output_token_ids": r.token_ids,
                "output_text": r.text,
                "accepted_per_step": r.accepted_per_step,
                "finish_reason": r.finish_reason,
                "time_to_first_token_s": timing["row_ttft"].get(i),
            }
            for i, r in enumerate(results)
        ],
        "tokens_per_step": stats.tokens_per_step,
        "num_steps": stats.num_steps,
        "generated_tokens": generated,
        "wall_s": stats.wall_s,
        "tokens_per_s": tokens_per_s,
        "time_to_first_token_s": timing["ttft"],
        "speculative": not args.no_speculation,
        "policy": policy_name(gen, args),
        "chosen_shapes": shapes.counts() if shapes is not None else None,
        "policy_note": gen.policy_note if gen.policy is not None else None,
        "policy_why": policy_why(gen.policy, len(prompts)) if gen.policy is not None else None,
        "threads": getattr(args, "threads_used", None),
    }
    if args.json:
        if args.streaming:
            summary = {"summary": True, **summary}
        print(json.dumps(summary), flush=True)
    elif not args.streaming:
        for i, r in enumerate(results):
            print(f"[{i}] {_shown(r.text, r.token_ids)}")
    if not args.json:
        ttft = f"{timing['ttft']:.2f} s" if timing["ttft"] is not None else "-"
        print(
            f"steps: {stats.num_steps}  tokens/step: {stats.tokens_per_step:.2f}  "
            f"tokens: {generated}  wall: {stats.wall_s:.2f} s  tokens/s: {tokens_per_s:.1f}  "
            f"time to first token: {ttft}  ({mode_line(gen, args, shapes)})",
            file=sys.stderr,
        )
    return 0


def policy_why(policy, batch: int) -> dict | None:
    """Why the adaptive policy chose as it did, at the end of the run: its acceptance estimate,
    the best speculative shape at this batch size and that shape's predicted speed-up over
    plain decoding (the policy drafts only above 1 + its margin)."""
    try:
        (w, d), gain = policy.best(batch)
        return {
            "batch": batch,
            "best_speculative": f"{w}x{d}",
            "predicted_speedup": round(float(gain), 3),
            "speculates_above": round(1 + float(policy.margin), 3),
            "estimated_acceptance": [round(float(p), 3) for p in policy.survival[w]],
        }
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def policy_name(gen, args) -> str:
    """``plain``, ``adaptive`` (shapes chosen per step from the cost model) or
    ``fixed WxD`` (the engine's own beam shape every step)."""
    if args.no_speculation:
        return "plain"
    if gen.policy is not None:
        return "adaptive"
    shape = gen.backend.shape
    return f"fixed {shape.num_beams}x{shape.draft_len}"


def mode_line(gen, args, shapes: ShapeLog | None) -> str:
    """What ran, for the summary line: plain, the fixed shape, or the adaptive policy's choices."""
    name = policy_name(gen, args)
    if name == "plain":
        return "plain"
    if shapes is None:
        return f"speculative, {name} shape"
    steps = ", ".join(
        f"{c['shape']}{' (plain)' if c['shape'].endswith('x0') else ''} in {c['steps']} steps"
        for c in shapes.counts()
    )
    return f"speculative, adaptive policy chose beams x depth: {steps or 'no step'}"


def _shown(text: str | None, ids) -> str:
    return text if text is not None else " ".join(map(str, ids))


def _generate(gen, encoded, kw, args):
    """Run the request through ``generate_stream``, printing what ``--streaming`` asks for, a
    progress bar otherwise; returns the results and the measured times to first token (from the
    start of the request to the event holding a row's first token)."""
    from tqdm import tqdm

    many = len(encoded) > 1
    # the bar counts tokens up to each row's limit; a row that stops early (end-of-sequence, a
    # stop string) counts its remaining ones as done, so the bar ends at 100%
    budget = [min(kw["max_new_tokens"], gen.backend.max_seq_len - len(ids)) for ids in encoded]
    got = [0] * len(encoded)
    bar = tqdm(
        total=sum(budget),
        unit="tok",
        desc="generate",
        file=sys.stderr,
        leave=True,  # its last state stays on a line of its own: what follows starts a new line
        disable=args.streaming or args.no_progress,
    )
    row_ttft: dict[int, float] = {}
    pieces: dict[int, list[str]] = {}
    t0 = time.perf_counter()
    for ev in gen.generate_stream(encoded, **kw):
        if ev.token_ids and ev.index not in row_ttft:
            row_ttft[ev.index] = time.perf_counter() - t0
        got[ev.index] += len(ev.token_ids)
        bar.update(
            len(ev.token_ids) + (max(0, budget[ev.index] - got[ev.index]) if ev.finished else 0)
        )
        if not args.streaming:
            continue
        if args.json:
            print(
                json.dumps(
                    {
                        "index": ev.index,
                        "token_ids": ev.token_ids,
                        "text": ev.text,
                        "finished": ev.finished,
                        "finish_reason": ev.finish_reason,
                    }
                ),
                flush=True,
            )
            continue
        # ev.text never splits a multi-byte character (held back until the step completing it)
        delta = ev.text if ev.text is not None else "".join(f"{t} " for t in ev.token_ids)
        if many:  # one complete block per prompt, when it finishes: outputs never interleave
            pieces.setdefault(ev.index, []).append(delta)
            if ev.finished:
                block = "".join(pieces.pop(ev.index))
                sys.stdout.write(
                    f"[{ev.index}] {block if ev.text is not None else block.rstrip()}\n"
                )
                sys.stdout.flush()
        elif delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
    bar.close()
    if args.streaming and not args.json and not many:
        sys.stdout.write("\n")
    ttft = min(row_ttft.values()) if row_ttft else None
    return gen.last_results, {"ttft": ttft, "row_ttft": row_ttft}


def main(argv=None) -> int:
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
