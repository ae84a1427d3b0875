"""Starting the ranks of a tensor-parallel torch engine (``load(..., tp_size=N)``,
``redrafter-run --tp_size N``); the collectives and the step protocol are
:mod:`redrafter_trt.backends.tp`.

Two ways to start:

- **by itself** (the default): the calling process is rank 0 (scheduler, tokenizer, all I/O);
  it hosts the rendezvous store and starts ranks 1..N-1 as ``python -m redrafter_trt.runtime.tp``
  child processes in their own session (Ctrl-C reaches rank 0 only, which stops them). A child
  that dies is noticed within a fraction of a second: rank 0 prints which rank died and how,
  ends the others and fails its current call with that message. A child whose parent is gone
  (rank 0 SIGKILLed) exits within a second with a message.
- **under torchrun** (or any launcher setting ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``): every process runs the same command; rank 0 returns the generator, the other
  ranks follow it inside ``load()`` and exit the process when rank 0 finishes.

Before any rank starts, :func:`redrafter_trt.backends.tp.check_rank_files` checks from the
files' headers that the rank files exist, match the config and each other, and that the rank
count is the checkpoint's.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

from ..backends.tp import DEFAULT_TIMEOUT_S, TPBackend, TPError, TPGroup, follow, load_rank_models
from ..errors import RedrafterError, require
from ..formats.checkpoint import RedrafterCheckpointConfig
from ..ops.beam_search import DEFAULT_WARP_K

#: Environment of an external launcher (torchrun, or any that sets these four).
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_externally() -> bool:
    return all(k in os.environ for k in LAUNCHER_ENV)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank (``LOCAL_RANK`` under a launcher, else the rank), or the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local % max(torch.cuda.device_count(), 1))


def _local_backend(engine_dir, cfg, bc, rank, device, dtype, tp, proposer=None):
    from ..backends.torch_backend import TorchBackend

    base, drafter = load_rank_models(engine_dir, cfg, rank, dtype=dtype, tp=tp)
    return TorchBackend(
        base.to(device),
        drafter.to(device),
        cfg.num_beams,
        cfg.draft_len,
        warp_k=bc.get("warp_k", DEFAULT_WARP_K),
        max_batch_size=bc["max_batch_size"],
        max_input_len=bc["max_input_len"],
        max_seq_len=bc["max_seq_len"],
        proposer=proposer,
    )


def _ready(tp: TPGroup, store, failure: str | None) -> None:
    """Every rank says whether it loaded; any failure fails them all with its message."""
    if failure is not None:
        store.set(f"error/{tp.rank}", failure)
    flags = torch.zeros(tp.size, dtype=torch.int64)
    flags[tp.rank] = int(failure is not None)
    dev = tp.device if tp.backend == "nccl" else torch.device("cpu")
    flags = tp.all_reduce(flags.to(dev)).cpu()
    bad = [r for r in range(tp.size) if flags[r]]
    if bad:
        msgs = [store.get(f"error/{r}").decode() for r in bad]
        raise RedrafterError("; ".join(f"rank {r}: {m}" for r, m in zip(bad, msgs)))


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Ranks:
    """Rank 0's children: started, watched, named when they die, reaped."""

    def __init__(self, procs: dict[int, subprocess.Popen]):
        self.procs = procs
        self.dead: dict[int, str] = {}
        self.stopping = False
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._poll, name="redrafter-tp-watch", daemon=True)
        self._watch.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            for r, p in self.procs.items():
                code = p.poll()
                if code is None or r in self.dead or self.stopping:
                    continue
                self.dead[r] = f"rank {r} (pid {p.pid}) {_signal_name(code)}"
                print(f"redrafter: tensor-parallel {self.dead[r]}; ending the run", file=sys.stderr)
                self.kill()  # the others cannot go on without it

    def describe(self) -> str:
        return "; ".join(self.dead[r] for r in sorted(self.dead))

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()

    def reap(self, grace_s: float) -> None:
        self.stopping = True
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._stop.set()


def _behind(store, n: int, seq: int) -> str:
    """The ranks that have not finished rank 0's command ``seq`` (a hung rank), from the
    progress each child records in the store."""
    late = []
    for r in range(1, n):
        done = int(store.get(f"done/{r}").decode()) if store.check([f"done/{r}"]) else 0
        if done < seq:
            late.append(f"rank {r} (last finished command {done}, rank 0 is at {seq})")
    if not late:
        return ""
    return "alive but not through this command within --tp_timeout: " + ", ".join(late)


def _wait_joined(store, ranks: _Ranks, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = set(range(1, n))
    while waiting:
        waiting = {r for r in waiting if not store.check([f"joined/{r}"])}
        if ranks.dead:
            raise RedrafterError(f"tensor-parallel {ranks.describe()} while starting")
        if time.monotonic() > deadline:
            raise RedrafterError(
                f"tensor-parallel rank(s) {sorted(waiting)} did not start within {timeout_s:.0f} s "
                "(--tp_timeout)"
            )
        time.sleep(0.05)


def _child_env() -> dict[str, str]:
    """The environment of a child rank: this one, importing this very package first."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def start_torch_tp(
    engine_dir: str | os.PathLike,
    cfg: RedrafterCheckpointConfig,
    build_config: dict,
    device: torch.device,
    dtype: torch.dtype | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    proposer=None,
) -> TPBackend:
    """Start the ranks of a tp_size ``cfg.tp_size`` torch engine (rank files checked already)
    and return rank 0's backend. Under an external launcher, ranks other than 0 follow rank 0
    here and then exit the process."""
    import torch.distributed as dist

    n = cfg.tp_size
    require(timeout_s > 0, f"--tp_timeout must be > 0, got {timeout_s}")
    if launched_externally():
        return _start_external(engine_dir, cfg, build_config, device, dtype, timeout_s, proposer)
    store = dist.TCPStore(
        "127.0.0.1", 0, n, True, timedelta(seconds=timeout_s), wait_for_workers=False
    )
    procs = {}
    ranks = None
    try:
        for r in range(1, n):
            cmd = [
                sys.executable,
                "-m",
                "redrafter_trt.runtime.tp",
                "--engine_dir",
                str(engine_dir),
                "--rank",
                str(r),
                "--tp_size",
                str(n),
                "--port",
                str(store.port),
                "--device",
                device.type,
                "--timeout",
                str(timeout_s),
                "--threads",
                str(torch.get_num_threads()),
                "--parent_pid",
                str(os.getpid()),
            ]
            if dtype is not None:
                cmd += ["--dtype", str(dtype).replace("torch.", "")]
            procs[r] = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                env=_child_env(),
            )
        ranks = _Ranks(procs)
        _wait_joined(store, ranks, n, timeout_s)
        dev = rank_device(device, 0)
        if dev.type == "cuda":  # NCCL binds the current device
            torch.cuda.set_device(dev)
        tp = TPGroup(store, 0, n, dev, timeout_s)

        backend_box: list[TPBackend] = []

        def diagnose() -> str:
            time.sleep(0.3)  # let the watcher see a rank that just died
            if ranks.dead or not backend_box:
                return ranks.describe()
            return _behind(store, n, backend_box[0].channel.seq)

        tp.diagnose = diagnose
        failure, local = None, None
        try:
            local = _local_backend(engine_dir, cfg, build_config, 0, dev, dtype, tp, proposer)
        except RedrafterError as e:
            failure = str(e)
        _ready(tp, store, failure)
    except BaseException:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        if ranks is not None:
            ranks.reap(0)
        raise

    def on_close() -> None:
        ranks.reap(0.5 if ranks.dead or tp.broken else 10.0)
        tp.shutdown()

    backend = TPBackend(local, tp, heartbeat_s=max(timeout_s / 4, 0.5), on_close=on_close)
    backend.store = store  # kept alive as long as the ranks
    backend_box.append(backend)
    atexit.register(backend.close)
    return backend


def _start_external(engine_dir, cfg, bc, device, dtype, timeout_s, proposer) -> TPBackend:
    import torch.distributed as dist

    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    require(
        world == cfg.tp_size,
        f"the launcher started {world} processes (WORLD_SIZE) but the engine has tp_size "
        f"{cfg.tp_size}: start it with --nproc_per_node {cfg.tp_size}",
    )
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base_store = dist.TCPStore(
        host, port, world, rank == 0 and not agent, timedelta(seconds=timeout_s)
    )
    store = dist.PrefixStore(f"redrafter_tp/{env.get('TORCHELASTIC_RUN_ID', 'run')}/", base_store)
    dev = rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tp = TPGroup(store, rank, world, dev, timeout_s)
    failure, local = None, None
    try:
        local = _local_backend(engine_dir, cfg, bc, rank, dev, dtype, tp, proposer)
    except RedrafterError as e:
        failure = str(e)
    _ready(tp, store, failure)
    if rank != 0:
        code = 0
        try:
            follow(local, tp)
        except TPError as e:
            print(f"redrafter: {e}", file=sys.stderr)
            code = 1
        tp.shutdown()
        sys.exit(code)
    backend = TPBackend(
        local, tp, heartbeat_s=max(timeout_s / 4, 0.5), on_close=lambda: tp.shutdown()
    )
    backend.store = base_store
    atexit.register(backend.close)
    return backend


# --------------------------------------------------------------------------- a child rank
def _watch_parent(parent_pid: int, rank: int) -> None:
    while True:
        time.sleep(0.2)
        if os.getppid() != parent_pid:
            print(
                f"redrafter: tensor-parallel rank {rank}: rank 0 (pid {parent_pid}) is gone; "
                "exiting",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)


def child_main(argv=None) -> int:
    """Entry point of ranks 1..N-1 started by :func:`start_torch_tp` (not a user command)."""
    import torch.distributed as dist

    from ..formats.checkpoint import DTYPES, ENGINE_CONFIG
    from ..models.io import read_json

    p = argparse.ArgumentParser(prog="redrafter-tp-rank")
    for flag in ("--engine_dir", "--device", "--dtype"):
        p.add_argument(flag, default=None)
    for flag in ("--rank", "--tp_size", "--port", "--threads", "--parent_pid"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    a = p.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(a.parent_pid, a.rank), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl-C and stops us
    torch.set_num_threads(max(1, a.threads))
    store = dist.TCPStore("127.0.0.1", a.port, a.tp_size, False, timedelta(seconds=a.timeout))
    store.set(f"joined/{a.rank}", "1")
    tag = f"redrafter: tensor-parallel rank {a.rank}"
    try:
        dev = rank_device(torch.device(a.device or "cpu"), a.rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tp = TPGroup(store, a.rank, a.tp_size, dev, a.timeout)

        def diagnose() -> str:
            time.sleep(0.1)
            if os.getppid() != a.parent_pid:
                return f"rank 0 (pid {a.parent_pid}) is gone"
            return "rank 0 or another rank died or stopped answering"

        tp.diagnose = diagnose
        failure, local = None, None
        try:
            ecfg = read_json(Path(a.engine_dir) / ENGINE_CONFIG, "engine config")
            cfg = RedrafterCheckpointConfig.from_dict(
                ecfg["pretrained_config"], str(Path(a.engine_dir) / "config.json")
            )
            dtype = None
            if a.dtype is not None:
                dtype = torch.float64 if a.dtype == "float64" else DTYPES[a.dtype]
            local = _local_backend(a.engine_dir, cfg, ecfg["build_config"], a.rank, dev, dtype, tp)
        except RedrafterError as e:
            failure = str(e)
        _ready(tp, store, failure)
        follow(local, tp, progress=lambda seq: store.set(f"done/{a.rank}", str(seq)))
    except TPError as e:  # names this rank already
        print(f"redrafter: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # no teardown of a broken group (gloo aborts in it)
    except RedrafterError as e:
        print(f"{tag}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    tp.shutdown()
    return 0


__all__ = ["start_torch_tp", "launched_externally", "rank_device", "child_main", "LAUNCHER_ENV"]


if __name__ == "__main__":
    sys.exit(child_main())
