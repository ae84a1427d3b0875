#!/usr/bin/env python3
"""Serve an engine with redrafter-serve and query it with the official openai client.

    python examples/serve.py --engine_dir ENGINE_DIR [options]

1. starts ``redrafter-serve`` on 127.0.0.1 (a free port unless --port) and waits for GET /health;
2. lists the models, sends a completion, a chat completion and a streamed chat completion with
   the ``openai`` client (greedy, so the answers are reproducible), prints the server's tokens per
   step (the ``x-redrafter-tokens-per-step`` header) and a few Prometheus metrics;
3. stops the server with SIGTERM (it finishes running requests first) and checks that it exited
   cleanly.

ENGINE_DIR comes from redrafter-build (examples/llama_end_to_end.sh or qwen2_end_to_end.py write
one) and needs tokenizer files for text prompts. Needs ``pip install 'redrafter-trt[serve]'
openai``. Exit status: 0 when every request was answered and the server stopped cleanly; 1
otherwise; 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Steps and exit status: see the top of this file.",
    )
    ap.add_argument("--engine_dir", required=True, help="engine directory from redrafter-build")
    ap.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    ap.add_argument(
        "--prompt",
        default="Tell me a short story about a lighthouse.",
        help="the user message of the chat requests",
    )
    ap.add_argument(
        "--completion_prompt",
        default="Once upon a time, the lighthouse keeper",
        help="the text the completion request continues (a completion continues text: an "
        "instruct model often ends an instruction sent this way at once)",
    )
    ap.add_argument("--max_tokens", type=int, default=48, help="tokens per answer (default: 48)")
    ap.add_argument(
        "--no_speculation", action="store_true", help="serve with plain decoding (the baseline)"
    )
    ap.add_argument(
        "--startup_timeout",
        type=float,
        default=300,
        help="seconds to wait for /health (default: 300)",
    )
    args = ap.parse_args(argv)
    if not (Path(args.engine_dir) / "config.json").is_file():
        ap.error(
            f"--engine_dir {args.engine_dir}: no config.json (expected a redrafter-build engine)"
        )
    if args.max_tokens < 1 or not 0 <= args.port < 65536:
        ap.error("--max_tokens must be >= 1 and --port in [0, 65535]")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"redrafter-serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"redrafter-serve did not answer {url}/health within {timeout:.0f} s")


def query(base_url: str, args: argparse.Namespace) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    print(f"model: {model}")

    raw = client.completions.with_raw_response.create(
        model=model, prompt=args.completion_prompt, max_tokens=args.max_tokens, temperature=0
    )
    completion = raw.parse()
    print(f"completion: {completion.choices[0].text!r} ({speed(completion, raw.headers)})")

    messages = [{"role": "user", "content": args.prompt}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    chat = raw.parse()
    print(f"chat: {chat.choices[0].message.content!r} ({speed(chat, raw.headers)})")

    print("chat, streamed: ", end="", flush=True)
    streamed = []
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            streamed.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    if "".join(streamed) != chat.choices[0].message.content:
        sys.exit("the streamed chat answer differs from the same greedy request unstreamed")

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    for line in metrics.splitlines():
        if line.startswith(("redrafter_requests_total", "redrafter_output_tokens_total")):
            print(f"metric: {line}")


def speed(response, headers) -> str:
    """Tokens, finish reason and tokens per generation step of a response, or why there are no
    steps: the prompt's own call gives the first token, so an answer that ends there ran none."""
    n = response.usage.completion_tokens
    finish = response.choices[0].finish_reason
    if n <= 1:
        return (
            f"{n} token, finish: {finish}; the model ended at its first token, so no "
            "generation step ran and there is no tokens/step"
        )
    return f"{n} tokens, finish: {finish}, {headers.get('x-redrafter-tokens-per-step')} tokens/step"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exe = shutil.which("redrafter-serve")
    if exe is None:
        sys.exit("redrafter-serve is not on PATH (pip install 'redrafter-trt[serve]' installs it)")
    port = args.port or free_port()
    cmd = [exe, "--engine_dir", args.engine_dir, "--host", "127.0.0.1", "--port", str(port)]
    if args.no_speculation:
        cmd.append("--no_speculation")
    print(f"== {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, args.startup_timeout)
        query(url, args)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(f"redrafter-serve stopped (exit status {proc.returncode})")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
