"""Serving benchmark: redrafter-serve under concurrent streaming clients, speculative and plain.

Starts the server in-process on 127.0.0.1 (a free port), then for each mode and concurrency C runs
C closed-loop streaming clients (each sends its next request when the last one ends) over a fixed
list of prompts, and reports time to first token (TTFT), time per output token after the first
(TPOT), p50/p99, and aggregate output tokens/s. Writes JSON and, with matplotlib, a PNG.

    python -m redrafter_trt.bench.serving --engine_dir E --out docs/serve_bench.json \\
        --plot docs/serve_bench.png --concurrency 1 4 16 32 --requests_per_client 2 --max_tokens 32

Two more modes:

- ``--stall``: the stall a long prompt causes. One request streams while a prompt of
  ``--stall_prompt_tokens`` arrives; for each ``--prefill_chunk`` value (0 = whole-prompt prefill)
  it reports the running stream's largest gap between two token events while the prompt is
  prefilled, against its median gap before the prompt arrived, and the long prompt's time to
  first token. Runs on the scheduler directly (no HTTP: the gaps are the engine's).
- ``--soak N``: N requests of mixed prompt lengths and sampling settings over HTTP, from
  ``--soak_clients`` concurrent clients, some hanging up mid-stream at random; then every request
  that was not cancelled is served again alone and compared (greedy and seeded requests must
  repeat exactly), and the server process's RSS after the run is compared with its RSS after a
  warm-up. ``--tiny_engine DIR`` writes a tiny random engine (byte-level BPE tokenizer, so
  characters span tokens) to run it on the CPU in minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np

from ..cmdline import (
    add_adaptive_argument,
    add_threads_argument,
    non_negative_int,
    positive_int,
    run_main,
)
from ..errors import RedrafterError, require

PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a hash table is.",
    "List three uses of copper.",
    "What is the capital of France?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Describe a cat in two sentences.",
    "How do vaccines work?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state):
    import uvicorn

    from ..serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(600):
        if server.started:
            return server, th, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    raise RuntimeError("server did not start in 60 s")


async def _client(http, url, model, queue, max_tokens, out):
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        t0 = time.perf_counter()
        first = last = None
        n = 0
        async with http.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                c = json.loads(line[6:])
                if "usage" in c:
                    n = c["usage"]["completion_tokens"]
                if c["choices"] and c["choices"][0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
        end = time.perf_counter()
        first = first or end
        out.append(
            {
                "ttft": first - t0,
                "tpot": ((last or end) - first) / max(n - 1, 1),
                "tokens": n,
                "start": t0,
                "end": end,
            }
        )


async def run_level(url, model, concurrency, requests, max_tokens):
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    out: list[dict] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(
            *[_client(http, url, model, queue, max_tokens, out) for _ in range(concurrency)]
        )
        wall = time.perf_counter() - t0
    ttft = np.array([o["ttft"] for o in out]) * 1e3
    tpot = np.array([o["tpot"] for o in out]) * 1e3
    toks = sum(o["tokens"] for o in out)
    return {
        "concurrency": concurrency,
        "requests": len(out),
        "output_tokens": toks,
        "wall_s": wall,
        "tokens_per_s": toks / wall,
        "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "tpot_ms_p50": float(np.percentile(tpot, 50)),
        "tpot_ms_p99": float(np.percentile(tpot, 99)),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m redrafter_trt.bench.serving",
        description="Throughput and latency of redrafter-serve against concurrency, "
        "speculative and plain, in one run.",
    )
    p.add_argument(
        "--engine_dir",
        default=None,
        help="engine directory from redrafter-build (required unless --tiny_engine)",
    )
    p.add_argument(
        "--tiny_engine",
        default=None,
        metavar="DIR",
        help="write a tiny random engine (2 layers, hidden 32, byte-level BPE tokenizer) to "
        "DIR (reused if present) and benchmark it; meant for --soak on a CPU",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        nargs="+",
        default=[1, 4, 16, 32],
        help="concurrent streaming clients (default: %(default)s)",
    )
    p.add_argument(
        "--requests_per_client",
        type=positive_int,
        default=2,
        help="requests per client at each level (default: %(default)s)",
    )
    p.add_argument(
        "--max_tokens",
        type=positive_int,
        default=32,
        help="output tokens per request (default: %(default)s)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["speculative", "plain"],
        choices=["speculative", "plain"],
        help="decoding modes to run (default: both)",
    )
    p.add_argument(
        "--prefill_chunk",
        type=non_negative_int,
        nargs="+",
        default=None,
        help="chunked prefill (prompt tokens per step, 0 = whole prompts): the server's "
        "setting for the throughput and soak runs (first value; default: "
        "redrafter-serve's), the values compared by --stall (default: 0 64 256)",
    )
    p.add_argument(
        "--stall",
        action="store_true",
        help="measure the stall a long prompt causes a running stream, for each "
        "--prefill_chunk value, instead of the throughput run",
    )
    p.add_argument(
        "--stall_prompt_tokens",
        type=positive_int,
        default=None,
        help="--stall: tokens of the long prompt (default: the engine's max_input_len)",
    )
    p.add_argument(
        "--stall_repeats",
        type=positive_int,
        default=3,
        help="--stall: long prompts per setting, one after another (default: %(default)s)",
    )
    p.add_argument(
        "--soak",
        type=positive_int,
        default=None,
        metavar="N",
        help="run the soak: N mixed requests with random client cancels, instead of the "
        "throughput run",
    )
    p.add_argument(
        "--soak_clients",
        type=positive_int,
        default=16,
        help="--soak: concurrent clients (default: %(default)s)",
    )
    p.add_argument(
        "--soak_cancel",
        type=float,
        default=0.2,
        help="--soak: fraction of requests whose client hangs up mid-stream (default: %(default)s)",
    )
    p.add_argument(
        "--soak_timeout",
        type=positive_int,
        default=3600,
        help="--soak: seconds the N requests may take at most; beyond it the soak "
        "fails (default: %(default)s)",
    )
    p.add_argument(
        "--rss_tolerance_mib",
        type=float,
        default=16.0,
        help="--soak: RSS growth after the run over the warm-up's that still counts as "
        "flat (default: %(default)s MiB)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="--soak: seed of the request mix (default: %(default)s)"
    )
    add_threads_argument(p)
    add_adaptive_argument(
        p, "the speculative mode's policy; the JSON records which ran and the shapes it chose. "
    )
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    return p


def main_fn(args) -> int:
    from ..serve.state import load_state

    require(args.engine_dir or args.tiny_engine, "pass --engine_dir (or --tiny_engine DIR)")
    if args.tiny_engine:
        require(not args.engine_dir, "pass --engine_dir or --tiny_engine, not both")
        args.engine_dir = str(write_tiny_engine(Path(args.tiny_engine)))
    require(
        0 < args.soak_cancel < 1 or args.soak_cancel == 0,
        f"--soak_cancel must be in [0, 1), got {args.soak_cancel}",
    )
    if args.stall:
        return stall_main(args)
    chunk = args.prefill_chunk[0] if args.prefill_chunk else None
    clients = args.soak_clients if args.soak else max(args.concurrency)
    serving = dict(
        device="cpu",
        max_queue=clients * 4,
        prefill_chunk=chunk,
        served_model_name="bench",
        adaptive=args.adaptive,
    )
    if args.soak:
        return soak_main(args, serving)
    state, gen = load_state(args.engine_dir, max_batch_size=max(args.concurrency), **serving)
    ran = what_ran(gen, args)
    shapes = None
    if state.scheduler.policy is not None:
        from ..runtime.adaptive import ShapeLog

        shapes = state.scheduler.policy = ShapeLog(state.scheduler.policy)
    print(
        f"[serve-bench] speculative mode: {ran['speculative_policy']}; "
        f"{ran['threads']} torch threads ({ran['threads_source']})",
        file=sys.stderr,
        flush=True,
    )
    server, th, url = start_server(state)
    results = {
        "engine_dir": str(args.engine_dir),
        "random_drafter": bool(gen.random_drafter),
        "max_tokens": args.max_tokens,
        **ran,
        "load_average_before": os.getloadavg(),
        "levels": {},
    }
    try:
        for mode in args.modes:
            state.speculative = mode == "speculative"
            asyncio.run(run_level(url, "bench", 1, 1, 4))  # warm-up
            rows = []
            for c in args.concurrency:
                if shapes is not None:
                    shapes.chosen.clear()
                r = asyncio.run(
                    run_level(url, "bench", c, c * args.requests_per_client, args.max_tokens)
                )
                if mode == "speculative":
                    r["chosen_shapes"] = shapes.counts() if shapes is not None else None
                rows.append(r)
                print(
                    f"{mode:11s} c={c:3d}  {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:7.0f} ms "
                    f"p99 {r['ttft_ms_p99']:7.0f}  TPOT p50 {r['tpot_ms_p50']:6.0f} ms p99 {r['tpot_ms_p99']:6.0f}",
                    file=sys.stderr,
                    flush=True,
                )
            results["levels"][mode] = rows
        c = state.scheduler.counters
        results["tokens_per_step_all_modes"] = (
            c.generated_tokens / c.row_steps if c.row_steps else 0.0
        )
    finally:
        server.should_exit = True
        th.join(60)
        state.scheduler.shutdown(cancel_running=True, timeout=10)
    results["load_average_after"] = os.getloadavg()
    for mode, rows in results["levels"].items():
        by_c = {r["concurrency"]: r["tokens_per_s"] for r in rows}
        if 1 in by_c and 16 in by_c:
            results.setdefault("speedup_16_over_1", {})[mode] = by_c[16] / by_c[1]
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    if args.plot:
        _plot(results, args.plot)
    return 0


def what_ran(gen, args) -> dict:
    """The speculative mode's policy (the adaptive one and its cost model, or the engine's fixed
    beam shape) and the torch threads, as the results JSON records them."""
    import torch

    shape = gen.backend.shape
    policy = (
        f"adaptive ({gen.policy_note})"
        if gen.policy is not None
        else f"fixed {shape.num_beams}x{shape.draft_len} ({gen.policy_note})"
    )
    return {
        "speculative_policy": policy,
        "adaptive": args.adaptive,
        "threads": torch.get_num_threads(),
        "threads_source": getattr(args, "threads_reason", "torch default"),
    }


def _plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode, rows in results["levels"].items():
        cs = [r["concurrency"] for r in rows]
        ax[0].plot(cs, [r["tokens_per_s"] for r in rows], "o-", label=mode)
        ax[1].plot(cs, [r["ttft_ms_p50"] for r in rows], "o-", label=f"{mode} p50")
        ax[1].plot(cs, [r["ttft_ms_p99"] for r in rows], "x--", label=f"{mode} p99")
        ax[2].plot(cs, [r["tpot_ms_p50"] for r in rows], "o-", label=f"{mode} p50")
        ax[2].plot(cs, [r["tpot_ms_p99"] for r in rows], "x--", label=f"{mode} p99")
    for a, t in zip(
        ax, ["aggregate output tokens/s", "time to first token (ms)", "time per output token (ms)"]
    ):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent streams")
        a.set_title(t)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- tiny random engine
#: text the tiny engine's tokenizer is trained on and its soak prompts are drawn from (ASCII words
#: that merge into multi-byte tokens, characters that span several byte tokens)
SOAK_WORDS = [
    "the",
    "tea",
    "is",
    "hot",
    "and",
    "sea",
    "copper",
    "hash",
    "table",
    "sky",
    "blue",
    "cat",
    "茶",
    "绿茶很好喝",
    "é",
    "à",
    "ü",
    "ß",
    "🍵",
    "🫖",
    "☕",
    "中文",
    "naïve",
    "café",
    "42",
    "!",
]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def byte_level_tokenizer():
    """A byte-level BPE tokenizer (256 byte tokens, a few merges, ``<eos>``): every non-ASCII
    character is several tokens, as with Llama 3 / Qwen2 / SmolLM2 for most CJK text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(w for w in SOAK_WORDS if w.isascii()) * 4], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def write_tiny_engine(path: Path, log=None) -> Path:
    """A torch engine of a tiny random Llama (2 layers, hidden 32) with a random draft head
    (W=3, D=2) and :func:`byte_level_tokenizer`, at ``path`` (reused when it is there already;
    written in a temporary directory beside it, then renamed)."""
    import shutil
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..backends.torch_backend import auto_dtype
    from ..formats.checkpoint import convert_checkpoint
    from ..formats.hf import load_hf_base
    from ..formats.names import LM_HEAD
    from ..models.drafter import DrafterConfig, init_drafter, load_drafter, save_drafter
    from ..runtime.engine import build_engine

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if (path / "config.json").is_file():
        return path
    log(f"[bench] writing a tiny random engine to {path} ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        tok = byte_level_tokenizer()
        v = len(tok)
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=v,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=0.2,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
        LlamaForCausalLM(cfg).eval().save_pretrained(str(tmp / "base"))
        tok.save_pretrained(str(tmp / "base"))
        save_drafter(
            init_drafter(DrafterConfig(v, 32, 64, 1, True), seed=2, std=0.5), tmp / "drafter"
        )
        # what redrafter-convert and redrafter-build write for these directories with their
        # defaults and W=3, D=2
        base_cfg, base_sd = load_hf_base(tmp / "base")
        drafter = load_drafter(tmp / "drafter", base_lm_head=base_sd[LM_HEAD])
        convert_checkpoint(
            base_cfg,
            base_sd,
            drafter,
            tmp / "ckpt",
            dtype=auto_dtype()[0],
            num_beams=3,
            draft_len=2,
            tokenizer_dir=tmp / "base",
        )
        build_engine(
            tmp / "ckpt",
            tmp / "engine",
            backend="torch",
            max_batch_size=16,
            max_input_len=96,
            max_seq_len=192,
        )
        tok.save_pretrained(str(tmp / "engine"))
        os.replace(tmp / "engine", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- --stall
def _stamp_token_events(times: list[float], ev) -> None:
    """The arrival time of each scheduler event that carries tokens, appended to ``times``."""
    if ev.token_ids:
        times.append(time.perf_counter())


def stall_main(args) -> int:
    """A running stream's largest inter-token gap while a long prompt is prefilled, per chunk size."""
    from ..runtime.loader import load
    from ..runtime.scheduler import SamplingParams, Scheduler

    gen = load(args.engine_dir, device="cpu")
    be = gen.backend
    p_len = args.stall_prompt_tokens or be.max_input_len
    require(
        p_len <= be.max_input_len,
        f"--stall_prompt_tokens {p_len} exceeds the engine's max_input_len {be.max_input_len}",
    )
    short = gen.encode(PROMPTS[0]) if gen.tokenizer is not None else [1, 2, 3]
    rng = np.random.default_rng(args.seed)
    longs = [rng.integers(0, be.vocab_size, size=p_len).tolist() for _ in range(args.stall_repeats)]
    chunks = args.prefill_chunk or [0, 64, 256]
    slot = be.max_seq_len
    out = {
        "engine_dir": str(args.engine_dir),
        "prompt_tokens": p_len,
        "repeats": args.stall_repeats,
        "torch_threads": __import__("torch").get_num_threads(),
        "load_average_before": os.getloadavg(),
        "settings": [],
    }
    for chunk in chunks:
        sched = Scheduler(
            be,
            gen.tokenizer,
            gen.eos_token_ids,
            max_slots=2,
            tokens_per_slot=slot,
            prefill_chunk=chunk or None,
        )
        times: list[float] = []
        running = sched.submit(
            short,
            SamplingParams(max_new_tokens=slot - len(short), ignore_eos=True),
            on_event=partial(_stamp_token_events, times),
        )
        sched.start()
        try:
            while len(times) < 6:
                time.sleep(0.005)
            reps = []
            for ids in longs:
                n0 = len(times)
                t_arrive = time.perf_counter()
                req = sched.submit(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
                req.done.wait()
                while not running.finished and not (times and times[-1] > req.t_first):
                    time.sleep(0.002)
                ev = [t for t in times[n0 - 1 :] if t <= times[-1]]
                gaps = np.diff(ev)
                reps.append(
                    {
                        "max_gap_ms": 1e3 * float(gaps.max()),
                        "ttft_ms": 1e3 * (req.t_first - t_arrive),
                        "running_tokens_events": len(ev) - 2,
                    }
                )
                time.sleep(0.05)  # a few undisturbed steps before the next prompt
            base = 1e3 * float(np.median(np.diff(times[:6])))
        finally:
            sched.cancel(running)
            sched.shutdown(cancel_running=True, timeout=60)
        row = {
            "prefill_chunk": chunk,
            "median_gap_before_ms": base,
            "max_gap_ms": max(r["max_gap_ms"] for r in reps),
            "max_gap_ms_median": float(np.median([r["max_gap_ms"] for r in reps])),
            "ttft_ms_median": float(np.median([r["ttft_ms"] for r in reps])),
            "running_events_during_prefill": [r["running_tokens_events"] for r in reps],
        }
        out["settings"].append(row)
        print(
            f"prefill_chunk {chunk or 'off':>4}: running stream's max gap {row['max_gap_ms']:7.0f} ms "
            f"(median over prompts {row['max_gap_ms_median']:6.0f}; {base:5.0f} ms before), long prompt "
            f"TTFT {row['ttft_ms_median']:7.0f} ms",
            file=sys.stderr,
            flush=True,
        )
    out["load_average_after"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


# --------------------------------------------------------------------------- --soak
def rss_mib() -> float:
    """This process's resident set size (Linux /proc/self/status VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RedrafterError(
        "/proc/self/status has no VmRSS line: --soak measures memory on Linux only"
    )


def soak_requests(
    n: int, seed: int, tok, max_input_len: int, tokens_per_slot: int, cancel: float
) -> list[dict]:
    """``n`` request specs: mixed prompt lengths (1 word up to the engine's input limit), output
    lengths, greedy and seeded sampling settings, stop strings, streamed or not, some cancelled."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        words = [rng.choice(SOAK_WORDS) for _ in range(rng.choice([1, 2, 5, 12, 30, 60]))]
        while len(tok(" ".join(words))["input_ids"]) > max_input_len - 1:
            words = words[: len(words) * 3 // 4]
        prompt = " ".join(words)
        room = tokens_per_slot - len(tok(prompt)["input_ids"])
        body = {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": min(rng.randint(1, 48), room),
            "temperature": rng.choice([0, 0, 0.7, 1.0, 1.3]),
            "top_p": rng.choice([1.0, 1.0, 0.9, 0.5]),
            "top_k": rng.choice([0, 0, 5, 40]),
            "seed": seed * 1_000_003 + i,
            "ignore_eos": rng.random() < 0.5,
            "stream": rng.random() < 0.5,
        }
        if rng.random() < 0.15:
            body["stop"] = [rng.choice(["e", "the", "茶", "!"])]
        cut = rng.randint(0, 3) if rng.random() < cancel else None
        if cut is not None:
            body["stream"] = True
        specs.append({"i": i, "body": body, "cancel_after": cut})
    return specs


async def _one(http, url, spec) -> dict:
    """Send one request; returns its outcome: text and finish_reason, "cancelled", or "lost"."""
    body = spec["body"]
    for _ in range(100):  # a full queue answers 429: back off and retry
        if not body["stream"]:
            r = await http.post(url + "/v1/completions", json=body, timeout=600)
            if r.status_code == 429:
                await asyncio.sleep(0.2)
                continue
            if r.status_code != 200:
                return {"outcome": "lost", "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            c = r.json()["choices"][0]
            return {"outcome": "ok", "text": c["text"], "finish_reason": c["finish_reason"]}
        async with http.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code == 429:
                await r.aread()
                await asyncio.sleep(0.2)
                continue
            if r.status_code != 200:
                return {
                    "outcome": "lost",
                    "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}",
                }
            text, finish, events = [], None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if spec["cancel_after"] is not None and events >= spec["cancel_after"]:
                    return {
                        "outcome": "cancelled"
                    }  # hang up: leaving the block closes the connection
                events += 1
                c = json.loads(line[6:])
                if "error" in c:
                    return {"outcome": "lost", "error": str(c["error"])[:200]}
                if c["choices"]:
                    text.append(c["choices"][0].get("text") or "")
                    finish = c["choices"][0].get("finish_reason") or finish
            if spec["cancel_after"] is not None:
                return {"outcome": "cancelled"}  # finished before the client hung up
            if finish is None:
                return {"outcome": "lost", "error": "stream ended without a finish_reason"}
            return {"outcome": "ok", "text": "".join(text), "finish_reason": finish}
    return {"outcome": "lost", "error": "queue full 100 times"}


async def _run_specs(url, specs, clients) -> list[dict]:
    import httpx

    queue: asyncio.Queue[dict] = asyncio.Queue()
    for s in specs:
        queue.put_nowait(s)
    results: dict[int, dict] = {}

    async def client(http):
        while True:
            try:
                s = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                results[s["i"]] = await _one(http, url, s)
            except Exception as e:  # noqa: BLE001 - a failed request is counted as lost, not fatal
                results[s["i"]] = {"outcome": "lost", "error": f"{type(e).__name__}: {e}"}

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*[client(http) for _ in range(clients)])
    return [results[s["i"]] for s in specs]


def _wait_idle(sched, timeout: float = 120) -> bool:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if sched.idle():
            return True
        time.sleep(0.05)
    return False


def soak_main(args, serving: dict) -> int:
    """The soak (``--soak``) against a server on ``args.engine_dir`` set up with ``serving``
    (:func:`~redrafter_trt.serve.state.load_state`'s keywords)."""
    from ..serve.state import load_state

    state, gen = load_state(args.engine_dir, **serving)
    sched = state.scheduler
    require(
        gen.tokenizer is not None,
        f"--soak: {args.engine_dir} has no tokenizer (the soak sends text)",
    )
    server, th, url = start_server(state)
    n, clients = args.soak, args.soak_clients
    be = gen.backend

    def mk(count: int, seed: int) -> list[dict]:
        return soak_requests(
            count, seed, gen.tokenizer, be.max_input_len, sched.tokens_per_slot, args.soak_cancel
        )

    out = {
        "engine_dir": str(args.engine_dir),
        "requests": n,
        "clients": clients,
        "prefill_chunk": sched.prefill_chunk,
        "slots": sched.num_slots,
        "torch_threads": __import__("torch").get_num_threads(),
        "load_average_before": os.getloadavg(),
    }
    try:
        warm = mk(max(50, n // 10), args.seed + 1)
        asyncio.run(_run_specs(url, warm, clients))
        _wait_idle(sched)
        gc.collect()
        out["rss_mib_after_warmup"] = rss_mib()
        specs = mk(n, args.seed)
        print(f"[soak] {n} requests from {clients} clients ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            got = asyncio.run(asyncio.wait_for(_run_specs(url, specs, clients), args.soak_timeout))
        except (asyncio.TimeoutError, TimeoutError):
            raise RedrafterError(
                f"--soak: {n} requests did not finish in --soak_timeout {args.soak_timeout} s"
            ) from None
        out["wall_s"] = time.perf_counter() - t0
        out["idle_after"] = _wait_idle(sched)
        gc.collect()
        out["rss_mib_after_run"] = rss_mib()
        out["slots_free_after"] = sched.free_slots
        done = [i for i, g in enumerate(got) if g["outcome"] == "ok"]
        out["cancelled"] = sum(g["outcome"] == "cancelled" for g in got)
        out["completed"] = len(done)
        out["lost"] = sum(g["outcome"] == "lost" for g in got)
        out["lost_errors"] = [g["error"] for g in got if g["outcome"] == "lost"][:10]
        print(
            f"[soak] {out['completed']} completed, {out['cancelled']} cancelled, {out['lost']} lost in "
            f"{out['wall_s']:.0f} s; serving each completed request again alone ...",
            file=sys.stderr,
            flush=True,
        )
        # each completed request again, alone (one client), non-streamed: greedy and seeded outputs must repeat
        alone = [
            dict(specs[i], body=dict(specs[i]["body"], stream=False), cancel_after=None)
            for i in done
        ]
        again = asyncio.run(_run_specs(url, alone, 1))
        bad = [
            i
            for i, a in zip(done, again)
            if a["outcome"] != "ok"
            or (a["text"], a["finish_reason"]) != (got[i]["text"], got[i]["finish_reason"])
        ]
        greedy = [i for i in done if specs[i]["body"]["temperature"] == 0]
        out["greedy_checked"] = len(greedy)
        out["sampled_checked"] = len(done) - len(greedy)
        out["corrupt_greedy"] = sum(1 for i in bad if i in set(greedy))
        out["corrupt_sampled"] = len(bad) - out["corrupt_greedy"]
        out["corrupt_examples"] = [
            {"request": specs[i]["body"], "batched": got[i], "alone": a}
            for i, a in zip(done, again)
            if i in set(bad)
        ][:3]
        _wait_idle(sched)
        gc.collect()
        out["rss_mib_after_check"] = rss_mib()
        out["rss_growth_mib"] = out["rss_mib_after_run"] - out["rss_mib_after_warmup"]
        out["rss_tolerance_mib"] = args.rss_tolerance_mib
        out["finished_total"] = sched.counters.finished
    finally:
        server.should_exit = True
        th.join(60)
        sched.shutdown(cancel_running=True, timeout=10)
    out["load_average_after"] = os.getloadavg()
    ok = (
        out["lost"] == 0
        and not bad
        and out["idle_after"]
        and out["slots_free_after"] == sched.num_slots
        and out["rss_growth_mib"] <= args.rss_tolerance_mib
    )
    out["passed"] = ok
    text = json.dumps(out, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    print(
        f"[soak] {'PASS' if ok else 'FAIL'}: {n} requests in {out['wall_s']:.0f} s, lost {out['lost']}, "
        f"corrupt {len(bad)} (greedy {out['corrupt_greedy']} of {len(greedy)}), RSS "
        f"{out['rss_mib_after_warmup']:.1f} -> {out['rss_mib_after_run']:.1f} MiB "
        f"(tolerance +{args.rss_tolerance_mib} MiB)",
        file=sys.stderr,
        flush=True,
    )
    return 0 if ok else 1


def main(argv=None) -> int:
    return run_main(main_fn, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
