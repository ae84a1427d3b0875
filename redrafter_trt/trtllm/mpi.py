"""Tensor-parallel TensorRT-LLM engines on MPI ranks, one GPU each (GPU only; not run yet).

As TensorRT-LLM's own runtime does (``runtime/model_runner.py``, ``runtime/generation.py``,
``_utils.py`` of 1.3.0rc3): the job is started by ``mpirun -n N`` (``mpi4py`` as in NVIDIA's
container); each process is MPI rank ``r`` of ``COMM_WORLD`` (``mpi_rank()``), checks that the
world size is the engine's ``tp_size`` (``model_runner.py``: "Engine world size ... != Runtime
world size"), selects GPU ``r % device_count`` and deserializes ``rank{r}.engine``; the engine's
NCCL all-reduce / all-gather plugins take their communicator from MPI, so this module moves no
activations. Where TensorRT-LLM's ranks each run the same generation loop, here rank 0 alone
owns the scheduler, tokenizer and I/O, and broadcasts each step's inputs
(:class:`redrafter_trt.backends.tp.TPBackend`, the same header + payload as the torch ranks) over
MPI; the other ranks run :func:`redrafter_trt.backends.tp.follow` and exit when rank 0 is done.

Timeouts: MPI collectives have none, so the broadcast is a non-blocking ``Ibcast`` polled
against ``--tp_timeout``; on expiry the rank says which collective it waited on and calls
``MPI_Abort``, which ends every rank of the job. A rank that dies ends the job through
``mpirun`` itself (Open MPI aborts the job when a rank exits abnormally). The engine's own NCCL
collectives have no timeout (as in TensorRT-LLM).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

from ..backends.tp import DEFAULT_TIMEOUT_S, TPBackend, TPError, follow
from ..errors import RedrafterError, require
from ..formats.checkpoint import RedrafterCheckpointConfig

#: Environment variables mpirun (Open MPI, MPICH/Hydra, Slurm's PMI) sets in every rank.
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def under_mpirun() -> bool:
    return any(k in os.environ for k in MPI_ENV)


def mpi_comm():
    """``MPI.COMM_WORLD`` (mpi4py), or a :class:`RedrafterError` saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RedrafterError(
            f"a tensor-parallel TensorRT-LLM engine runs on MPI ranks and needs mpi4py ({e}); "
            "it is in NVIDIA's TensorRT-LLM container"
        ) from None
    return MPI.COMM_WORLD


class MpiGroup:
    """The MPI side of :class:`TPBackend`/:func:`follow`: ``broadcast`` of CPU tensors from rank
    0 with a timeout."""

    backend = "mpi"

    def __init__(self, comm, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.device = torch.device("cpu")  # the step inputs travel through host memory
        self.timeout_s = float(timeout_s)
        self.lock = threading.RLock()
        self.broken = False

    def broadcast(self, x: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        """Rank 0's ``x`` (a contiguous CPU tensor) on every rank, in place."""
        buf = x.numpy()  # shares x's memory
        with self.lock:
            req = self.comm.Ibcast(buf, root=0)
            deadline = time.monotonic() + self.timeout_s
            while not req.Test():
                if time.monotonic() > deadline:
                    self.broken = True
                    msg = (
                        f"tensor-parallel MPI rank {self.rank}/{self.size}: {what} did not "
                        f"complete within {self.timeout_s:.0f} s (--tp_timeout): a rank died or "
                        "stopped answering; aborting the MPI job"
                    )
                    print(f"redrafter: {msg}", file=sys.stderr, flush=True)
                    self.comm.Abort(1)  # ends every rank of the job
                    raise TPError(msg)
                time.sleep(0.0002)
        return x


def start_trtllm_tp(
    engine_dir: str | os.PathLike,
    cfg: RedrafterCheckpointConfig,
    build_config: dict,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TPBackend:
    """This MPI rank's engine; rank 0 gets the backend that drives the others, the other ranks
    follow rank 0 here and exit the process."""
    from .runtime import TrtllmBackend

    n = cfg.tp_size
    require(
        under_mpirun(),
        f"{engine_dir}: a tp_size {n} TensorRT-LLM engine runs on {n} MPI ranks, one GPU each: "
        f"start it with mpirun -n {n} (e.g. mpirun -n {n} redrafter-run --engine_dir "
        f"{engine_dir} ...)",
    )
    comm = mpi_comm()
    rank, world = comm.Get_rank(), comm.Get_size()
    require(
        world == n,
        f"{engine_dir}: the engine has tp_size {n} but mpirun started {world} ranks; "
        f"use mpirun -n {n}",
    )
    require(
        torch.cuda.device_count() >= 1, "a TensorRT-LLM engine needs a CUDA GPU; none is visible"
    )
    group = MpiGroup(comm, timeout_s)
    failure = None
    local = None
    try:
        local = TrtllmBackend(Path(engine_dir), cfg, build_config, rank=rank)
    except RedrafterError as e:
        failure = f"rank {rank}: {e}"
    failures = [f for f in comm.allgather(failure) if f]
    if failures:
        raise RedrafterError("; ".join(failures))
    if rank != 0:
        code = 0
        try:
            follow(local, group)
        except TPError as e:
            print(f"redrafter: {e}", file=sys.stderr, flush=True)
            code = 1
        sys.exit(code)
    return TPBackend(local, group, heartbeat_s=max(timeout_s / 4, 0.5))


__all__ = ["MpiGroup", "start_trtllm_tp", "under_mpirun", "mpi_comm", "MPI_ENV"]
