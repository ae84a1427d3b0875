"""Serving benchmark: redrafter-serve under concurrent streaming clients, speculative and plain.

Starts the server in-process on 127.0.0.1 (a free port), then for each mode and concurrency C runs
C closed-loop streaming clients (each sends its next request when the last one ends) over a fixed
list of prompts, and reports time to first token (TTFT), time per output token after the first
(TPOT), p50/p99, and aggregate output tokens/s. Writes JSON and, with matplotlib, a PNG.

    python -m redrafter_trt.bench.serve --engine_dir E --out docs/serve_bench.json \\
        --plot docs/serve_bench.png --concurrency 1 4 16 32 --requests_per_client 2 --max_tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..cli.common import positive_int, run_main

PROMPTS = ["Write a haiku about the sea.", "Explain what a hash table is.", "List three uses of copper.",
           "What is the capital of France?", "Give me a recipe for pancakes.", "Why is the sky blue?",
           "Describe a cat in two sentences.", "How do vaccines work?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state):
    import uvicorn

    from ..serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
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
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
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
        out.append({"ttft": first - t0, "tpot": ((last or end) - first) / max(n - 1, 1), "tokens": n,
                    "start": t0, "end": end})


async def run_level(url, model, concurrency, requests, max_tokens):
    import httpx

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    out: list[dict] = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[_client(http, url, model, queue, max_tokens, out) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ttft = np.array([o["ttft"] for o in out]) * 1e3
    tpot = np.array([o["tpot"] for o in out]) * 1e3
    toks = sum(o["tokens"] for o in out)
    return {"concurrency": concurrency, "requests": len(out), "output_tokens": toks, "wall_s": wall,
            "tokens_per_s": toks / wall, "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p99": float(np.percentile(ttft, 99)), "tpot_ms_p50": float(np.percentile(tpot, 50)),
            "tpot_ms_p99": float(np.percentile(tpot, 99))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m redrafter_trt.bench.serve",
                                description="Throughput and latency of redrafter-serve against concurrency, "
                                            "speculative and plain, in one run.")
    p.add_argument("--engine_dir", required=True, help="engine directory from redrafter-build")
    p.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 16, 32],
                   help="concurrent streaming clients (default: %(default)s)")
    p.add_argument("--requests_per_client", type=positive_int, default=2,
                   help="requests per client at each level (default: %(default)s)")
    p.add_argument("--max_tokens", type=positive_int, default=32, help="output tokens per request (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["speculative", "plain"], choices=["speculative", "plain"],
                   help="decoding modes to run (default: both)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    return p


def main_fn(args) -> int:
    import torch

    from ..cli.serve import make_state

    if args.threads:
        torch.set_num_threads(args.threads)
    ns = argparse.Namespace(engine_dir=args.engine_dir, port=0, device="cpu", max_batch_size=max(args.concurrency),
                            max_seq_len=None, max_queue=max(args.concurrency) * 4, max_prefill_tokens=None,
                            no_speculation=False, served_model_name="bench")
    state, gen = make_state(ns)
    server, th, url = start_server(state)
    results = {"engine_dir": str(args.engine_dir), "random_drafter": bool(gen.random_drafter),
               "max_tokens": args.max_tokens, "load_average_before": os.getloadavg(), "levels": {}}
    try:
        for mode in args.modes:
            state.speculative = mode == "speculative"
            asyncio.run(run_level(url, "bench", 1, 1, 4))  # warm-up
            rows = []
            for c in args.concurrency:
                r = asyncio.run(run_level(url, "bench", c, c * args.requests_per_client, args.max_tokens))
                rows.append(r)
                print(f"{mode:11s} c={c:3d}  {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:7.0f} ms "
                      f"p99 {r['ttft_ms_p99']:7.0f}  TPOT p50 {r['tpot_ms_p50']:6.0f} ms p99 {r['tpot_ms_p99']:6.0f}",
                      file=sys.stderr, flush=True)
            results["levels"][mode] = rows
        c = state.scheduler.counters
        results["tokens_per_step_all_modes"] = c.generated_tokens / c.row_steps if c.row_steps else 0.0
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
    for a, t in zip(ax, ["aggregate output tokens/s", "time to first token (ms)", "time per output token (ms)"]):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent streams")
        a.set_title(t)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    return run_main(main_fn, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
