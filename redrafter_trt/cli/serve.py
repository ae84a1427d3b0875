"""``redrafter-serve``: serve an engine over the OpenAI API with in-flight batching."""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys

from ..cmdline import (
    add_adaptive_argument,
    add_threads_argument,
    non_negative_int,
    positive_int,
    run_main,
)
from ..errors import RedrafterError, require
from ..serve.state import DEFAULT_PREFILL_CHUNK, load_state
from .common import add_tp_arguments, apply_tp_threads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-serve",
        description="OpenAI-compatible server (POST /v1/completions, /v1/chat/completions; GET "
        "/v1/models, /health, /metrics) over a redrafter-build engine. Requests join the "
        "running batch at the next step and free their KV slot as soon as they finish "
        "or their client goes away. Needs the 'serve' extra (fastapi, uvicorn, "
        "prometheus-client).",
    )
    p.add_argument("--engine_dir", required=True, help="engine directory from redrafter-build")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="TCP port, 0 = any free port (default: %(default)s)"
    )
    p.add_argument(
        "--max_queue",
        type=positive_int,
        default=64,
        help="requests waiting for a slot at most; beyond it: HTTP 429 with Retry-After "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max_batch_size",
        type=positive_int,
        default=None,
        help="concurrent rows (KV slots) at most (default: the engine's max_batch_size)",
    )
    p.add_argument(
        "--max_seq_len",
        type=positive_int,
        default=None,
        help="prompt + output tokens per request at most; sizes the KV cache "
        "(default: the engine's max_seq_len)",
    )
    p.add_argument(
        "--prefill_chunk",
        type=non_negative_int,
        default=None,
        help="chunked prefill: prompt tokens prefilled per step at most; a longer prompt is "
        "prefilled in chunks over successive steps while the running requests keep "
        "decoding, so it delays each of their tokens by at most one chunk's prefill. "
        f"0 = off (prompts prefilled whole). Default: {DEFAULT_PREFILL_CHUNK} where the "
        "engine can continue a prompt's cache (torch engines; trtllm engines built with "
        "paged context FMHA), else off",
    )
    p.add_argument(
        "--max_prefill_tokens",
        type=positive_int,
        default=None,
        help="with --prefill_chunk 0: padded prompt tokens admitted per step at most (at "
        "least one whole prompt) (default: the engine's max_input_len)",
    )
    p.add_argument(
        "--no_speculation",
        action="store_true",
        help="plain decoding for every request (speculation is on by default)",
    )
    add_adaptive_argument(p)
    p.add_argument(
        "--served_model_name",
        default=None,
        help="model id clients must send (default: the engine directory's name)",
    )
    p.add_argument(
        "--device", default=None, help="torch backend: cpu, cuda, cuda:N (default: auto)"
    )
    add_threads_argument(p)
    p.add_argument(
        "--graceful_timeout",
        type=positive_int,
        default=30,
        help="on SIGTERM, seconds to let running requests finish before they are "
        "cancelled (default: %(default)s)",
    )
    p.add_argument(
        "--log_level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default: %(default)s)",
    )
    add_tp_arguments(p)
    return p


def make_state(args: argparse.Namespace):
    """Load the engine and build the scheduler + app state from the parsed flags."""
    require(0 <= args.port <= 65535, f"--port must be in [0, 65535], got {args.port}")
    apply_tp_threads(args)
    return load_state(
        args.engine_dir,
        device=args.device,
        adaptive=getattr(args, "adaptive", "auto"),
        tp_size=getattr(args, "tp_size", None),
        tp_timeout=getattr(args, "tp_timeout", None),
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        max_queue=args.max_queue,
        prefill_chunk=getattr(args, "prefill_chunk", None),
        max_prefill_tokens=args.max_prefill_tokens,
        served_model_name=args.served_model_name,
        speculative=not args.no_speculation,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0 = any free port), not yet listening; a port in
    use, a privileged port or an address that is not this machine's is a :class:`RedrafterError`
    naming the flag, before anything is announced or loaded."""
    require(0 <= port <= 65535, f"--port must be in [0, 65535], got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise RedrafterError(f"--host {host}: not an address or a resolvable name ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = (
                f"--port {port}: port {port} on {host} is already in use; pick another, or "
                "--port 0 for any free port"
            )
        elif e.errno == errno.EACCES:
            why = f"--port {port}: permission denied (ports below 1024 need privileges)"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = f"--host {host}: not an address of this machine"
        else:
            why = f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
        raise RedrafterError(why) from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (the port it got, also for --port 0)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        from ..errors import RedrafterError

        raise RedrafterError(
            f"redrafter-serve needs fastapi, uvicorn and prometheus-client "
            f"(pip install 'redrafter-trt[serve]'): {e}"
        ) from e
    sock = bind_socket(args.host, args.port)  # a port in use fails here, before the weights load
    try:
        return _serve_on(args, sock, uvicorn, create_app)
    finally:
        sock.close()


def _serve_on(args: argparse.Namespace, sock: socket.socket, uvicorn, create_app) -> int:
    state, gen = make_state(args)
    if gen.random_drafter and not args.no_speculation:
        from .run import RANDOM_HEAD_NOTE

        print(RANDOM_HEAD_NOTE, file=sys.stderr)
    config = uvicorn.Config(
        create_app(state),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    server = uvicorn.Server(config)
    print(
        f"redrafter-serve: model '{state.model_name}' on {url_of(sock)} "
        f"({state.scheduler.num_slots} slots x {state.scheduler.tokens_per_slot} tokens, "
        f"{'speculative' if state.speculative else 'plain'})",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers
    # in place that is a no-op, so a SIGTERM/SIGINT after a graceful shutdown exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    print("redrafter-serve: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    return run_main(serve, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
