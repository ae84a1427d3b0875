"""Tensor parallelism for the torch backend: one rank's share of a ``tp_size`` N checkpoint, the
collectives between ranks, and rank 0's backend that drives the others (docs/design.md
"Tensor parallelism").

Layout and collectives are TensorRT-LLM's (its ``layers/linear.py``, ``models/llama``,
``models/redrafter/drafter.py``), as :mod:`redrafter_trt.formats.sharding` writes the rank files:

- attention ``qkv`` and MLP ``fc``/``gate`` are column-parallel (each rank its own heads and
  intermediate columns, no collective); attention ``dense`` and MLP ``proj`` are row-parallel:
  the partial products are **all-reduced**, then the replicated bias is added once (RowLinear);
- the embedding and the norms are replicated (TensorRT-LLM's default, no parallel embedding);
- ``lm_head`` is vocabulary-parallel (ColumnLinear over the padded vocabulary with
  ``gather_output``): each rank's logits columns are **all-gathered** and the padding trimmed;
- the draft head is **sharded, not replicated**: TensorRT-LLM's ReDrafter ``Drafter`` builds
  ``input_proj``, every ResBlock ``linear``, ``lm_head``, ``rnn_u`` and ``rnn_w`` as
  ``ColumnLinear(..., gather_output=True)`` with the model's mapping, so each is split along its
  output dimension and **all-gathered** after the product; everything around them (SiLU, the
  residuals, the beam search) runs replicated on every rank on identical gathered values.

Rank 0 owns the scheduler, the tokenizer and all I/O. :class:`TPBackend` is its
:class:`~redrafter_trt.contract.Backend`: each call broadcasts the step inputs (a fixed header and
one packed byte payload) and then runs the rank's own share; the other ranks run
:func:`follow`, which receives the same inputs and runs the same step. Random numbers are step
inputs (``uniforms``), so every rank samples with the same numbers; acceptance and beam search
read gathered/all-reduced tensors, which the collectives deliver bit-identical to every rank.

Every collective has a timeout; a failing one raises :class:`TPError` naming this rank and,
through the group's ``diagnose`` hook (set by the launcher, :mod:`redrafter_trt.runtime.tp`),
the ranks that died or stopped answering.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import contract as C
from ..contract import Backend
from ..errors import RedrafterError, require
from ..formats import fp8
from ..formats.checkpoint import (
    RANK_META_CONFIG as META_CONFIG,
)
from ..formats.checkpoint import (
    RANK_META_RANK as META_RANK,
)
from ..formats.checkpoint import (
    RANK_META_TP_SIZE as META_TP_SIZE,
)
from ..formats.checkpoint import (
    RedrafterCheckpointConfig,
    config_digest,
    rank_file,
)
from ..formats.names import (
    EMBEDDING,
    LM_HEAD,
    drafter_from_checkpoint_names,
    drafter_to_checkpoint_names,
)
from ..formats.sharding import check_tp_size, padded_vocab_size
from ..models.base import BaseConfig, BaseModel, Linear
from ..models.drafter import DRAFT_VOCAB, Drafter, check_draft_vocab, load_checked
from ..models.io import load_state_dict_file

#: Default seconds a collective may wait for the other ranks (``--tp_timeout``).
DEFAULT_TIMEOUT_S = 120.0


class TPError(RedrafterError):
    """A collective failed or timed out: a rank died or hung."""


# --------------------------------------------------------------------------- the group
class RankGroup(Protocol):
    """What rank 0's backend and the other ranks need of their group: a :class:`TPGroup` (torch
    ranks), or the MPI group of :mod:`redrafter_trt.trtllm.mpi` (TensorRT-LLM engine ranks)."""

    rank: int
    size: int
    #: where a broadcast's tensors live; ``backend``: "gloo", "nccl" or "mpi"
    device: torch.device
    backend: str
    #: held around each command, so rank 0's heartbeat never interleaves with a step
    lock: Any

    def broadcast(self, x: torch.Tensor, what: str = "broadcast") -> torch.Tensor: ...


class TPGroup:
    """One rank's view of the tensor-parallel group: a c10d backend object (gloo on CPU, NCCL on
    CUDA) used directly, so no process-global default group is needed.

    ``diagnose()`` (set by the launcher) returns a sentence naming the ranks that died or hung;
    it is appended to every collective's error.
    """

    def __init__(
        self,
        store,
        rank: int,
        size: int,
        device: torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        import torch.distributed as dist

        self.rank, self.size, self.device = rank, size, torch.device(device)
        self.timeout = timedelta(seconds=float(timeout_s))
        self.store = store
        self.diagnose: Callable[[], str] = lambda: ""
        self.broken = False  # a collective failed: the group is unusable
        if self.device.type == "cuda":  # NCCL: the engine's GPUs talk directly
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self.timeout
            self.backend = "nccl"
            self.pg: Any = dist.ProcessGroupNCCL(store, rank, size, opts)
        else:
            self.backend = "gloo"
            self.pg = dist.ProcessGroupGloo(store, rank, size, self.timeout)
        self.lock = threading.RLock()  # collectives of one rank never interleave (heartbeat)

    def _run(self, what: str, work_fn) -> None:
        try:
            with self.lock:
                work_fn().wait(self.timeout)
        except RuntimeError as e:
            self.broken = True
            detail = str(e).splitlines()[0][:300]
            hint = self.diagnose()
            raise TPError(
                f"tensor-parallel rank {self.rank}/{self.size}: {what} failed ({detail})"
                + (f"; {hint}" if hint else "; another rank died or stopped answering")
            ) from None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (every rank gets the same bits)."""
        x = x.contiguous()
        self._run("all-reduce", lambda: self.pg.allreduce([x]))
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` [..., n] concatenated in rank order along the last dim [..., size*n]."""
        x = x.contiguous()
        outs = [torch.empty_like(x) for _ in range(self.size)]
        self._run("all-gather", lambda: self.pg.allgather([outs], [x]))
        return torch.cat(outs, -1)

    def broadcast(self, x: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        """Rank 0's ``x`` on every rank (in place)."""
        self._run(what, lambda: self.pg.broadcast(x, 0))
        return x

    def shutdown(self) -> None:
        """Release the group. Dropping the backend object is the clean way: gloo's
        ``shutdown()``, or leaving it to interpreter exit, aborts the process ("terminate called
        without an active exception") in about 7 of 8 runs here, a deleted one never did."""
        self.pg = None


# --------------------------------------------------------------------------- layers
class RowParallelLinear(Linear):
    """TensorRT-LLM's RowLinear: weight [out, in/N] of this rank's input columns; the partial
    products are all-reduced, then the (replicated) bias is added once."""

    tp: TPGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.device.type == "cpu" and not torch.is_grad_enabled():
            from .. import native

            y = native.linear_packed(x, self.packed_weight(), None)
        else:
            y = F.linear(x, self.weight)
        if self.tp is not None:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(nn.Linear):
    """TensorRT-LLM's ColumnLinear with ``gather_output``: weight/bias of this rank's output rows
    [out_padded/N, in]; the outputs are all-gathered and trimmed to ``full_out`` (vocabulary
    padding)."""

    tp: TPGroup | None = None

    def __init__(self, in_features: int, local_out: int, full_out: int, bias: bool):
        super().__init__(in_features, local_out, bias=bias)
        self.full_out = full_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.tp is not None:
            y = self.tp.all_gather_last(y)
        return y[..., : self.full_out]


def kv_heads_of_rank(cfg: BaseConfig, tp_size: int, rank: int) -> int:
    """KV heads rank ``rank`` holds (ranks share one when tp_size exceeds the KV heads)."""
    return max(cfg.num_key_value_heads // tp_size, 1)


def local_base_config(cfg: BaseConfig, tp_size: int) -> BaseConfig:
    """The shapes one rank's modules have: its query/KV heads and intermediate columns (the
    hidden size, the vocabulary of the replicated embedding and RoPE are the model's)."""
    return replace(
        cfg,
        num_attention_heads=cfg.num_attention_heads // tp_size,
        num_key_value_heads=kv_heads_of_rank(cfg, tp_size, 0),
        intermediate_size=cfg.intermediate_size // tp_size,
        tie_word_embeddings=False,  # the lm_head shard is not the (replicated) embedding
    )


class TPBaseModel(BaseModel):
    """One rank's share of the base model (module docstring). ``config`` holds the rank's head
    counts and intermediate size; ``full_config`` the model's."""

    def __init__(self, cfg: BaseConfig, tp_size: int, tp: TPGroup | None = None):
        super().__init__(local_base_config(cfg, tp_size))
        self.full_config = cfg
        self.tp_size = tp_size
        local = self.config
        h = cfg.hidden_size
        vp = padded_vocab_size(cfg.vocab_size, tp_size) // tp_size
        self.lm_head = Linear(h, vp, bias=False)
        for layer in self.transformer.layers:
            att: Any = layer.attention
            mlp: Any = layer.mlp
            att.dense = RowParallelLinear(att.nh * att.hd, h, bias=cfg.dense_bias)
            mlp.proj = RowParallelLinear(local.intermediate_size, h, bias=cfg.mlp_bias)
        self.set_group(tp)

    def set_group(self, tp: TPGroup | None) -> None:
        self.tp = tp
        for m in self.modules():
            if isinstance(m, RowParallelLinear):
                m.tp = tp

    def logits(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Vocabulary logits [..., V]: this rank's vocabulary columns, all-gathered, the padding
        rows of the last rank trimmed."""
        local = super().logits(hidden, *args, **kwargs)
        if self.tp is not None:
            local = self.tp.all_gather_last(local)
        return local[..., : self.config.vocab_size]


def tp_drafter(cfg, tp_size: int, tp: TPGroup | None = None) -> Drafter:
    """The draft head with every linear column-parallel and gathered (TensorRT-LLM's ReDrafter
    ``Drafter``: ``ColumnLinear(gather_output=True)`` for input_proj, the ResBlocks, lm_head,
    rnn_u and rnn_w)."""
    d = Drafter(cfg)

    def swap(parent: nn.Module, name: str, full_out: int | None = None) -> None:
        old = getattr(parent, name)
        full = full_out or old.out_features
        local = padded_vocab_size(full, tp_size) // tp_size
        new = ColumnParallelLinear(old.in_features, local, full, old.bias is not None)
        new.tp = tp
        setattr(parent, name, new)

    if d.input_proj is not None:
        swap(d, "input_proj")
    n = cfg.num_draft_layers
    for i in range(n):
        swap(d.lm_head[i], "linear")
    swap(d.lm_head, str(n), cfg.head_vocab_size)
    if cfg.rnn:
        swap(d, "rnn_u")
        swap(d, "rnn_w")
    return d


def set_drafter_group(d: Drafter, tp: TPGroup | None) -> None:
    for m in d.modules():
        if isinstance(m, ColumnParallelLinear):
            m.tp = tp


# --------------------------------------------------------------------------- checkpoint shards
def expected_rank_tensors(
    cfg: RedrafterCheckpointConfig,
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Checkpoint name -> (shape, floating) of one rank's tensors (every rank's are alike)."""
    with torch.device("meta"):
        base = TPBaseModel(cfg.base, cfg.tp_size)
        drafter = tp_drafter(cfg.drafter, cfg.tp_size)
    out = {k: (tuple(v.shape), True) for k, v in base.state_dict().items()}
    sd = drafter_to_checkpoint_names(cfg.drafter, drafter.state_dict())
    out.update({k: (tuple(v.shape), v.is_floating_point()) for k, v in sd.items()})
    return out


def check_rank_files(
    model_dir: str | os.PathLike,
    cfg: RedrafterCheckpointConfig,
    tp_size: int | None,
    config_dict: dict | None = None,
    flag: str = "--tp_size",
) -> list[Path]:
    """Check, from the headers only, that ``model_dir`` holds ``cfg.tp_size`` rank files that
    agree with the config and each other, before any rank starts. ``tp_size`` is the rank count
    asked for (None: the checkpoint's). ``config_dict``: the config the files were written with
    (a checkpoint's ``config.json``, an engine's ``pretrained_config``), compared with the digest
    ``redrafter-convert`` records in each file. Returns the rank files, in rank order."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    n = cfg.tp_size
    require(
        tp_size is None or tp_size == n,
        f"{flag} {tp_size}: {model_dir} was converted for tp_size {n} ({n} rank files); "
        f"run it with {flag} {n}, or convert again with redrafter-convert --tp_size {tp_size}",
    )
    check_tp_size(cfg.base, cfg.drafter, n)
    files = [model_dir / rank_file(r) for r in range(n)]
    missing = [f.name for f in files if not f.is_file()]
    require(not missing, f"{model_dir}: missing {', '.join(missing)} (its config says tp_size {n})")
    extra = sorted(
        p.name for p in model_dir.glob("rank*.safetensors") if p.name not in {f.name for f in files}
    )
    require(
        not extra,
        f"{model_dir}: {', '.join(extra)} beyond its tp_size {n}: rank files of another "
        "conversion; convert into an empty directory",
    )
    want = expected_rank_tensors(cfg)
    digest = config_digest(config_dict) if config_dict is not None else None
    float_types = {"F64", "F32", "F16", "BF16", "F8_E4M3"}
    for r, f in enumerate(files):
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {}
                got = {
                    k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype())
                    for k in h.keys()
                }
        except (OSError, RuntimeError, ValueError) as e:  # safetensors raises its own kinds
            raise RedrafterError(f"{f}: not a readable safetensors file ({e})") from None
        if META_RANK in meta:
            require(
                meta[META_RANK] == str(r) and meta.get(META_TP_SIZE) == str(n),
                f"{f}: holds rank {meta[META_RANK]} of tp_size {meta.get(META_TP_SIZE)}, "
                f"expected rank {r} of tp_size {n}",
            )
        if digest is not None and META_CONFIG in meta:
            require(
                meta[META_CONFIG] == digest,
                f"{f}: written with a different config than {model_dir / 'config.json'} "
                "(the rank files come from different conversions); convert again",
            )
        names = {k for k in got if not k.endswith(("_scaling_factor",))}
        missing = sorted(set(want) - names)
        unexpected = sorted(names - set(want))
        require(not missing, f"{f}: missing tensors {missing[:6]}")
        require(not unexpected, f"{f}: unexpected tensors {unexpected[:6]}")
        for k, (shape, floating) in want.items():
            require(
                got[k][0] == shape,
                f"{f}: tensor {k} has shape {got[k][0]}, rank {r} of tp_size {n} needs {shape}",
            )
            require(
                (got[k][1] in float_types) == floating,
                f"{f}: tensor {k} has dtype {got[k][1]}",
            )
    return files


def load_rank_models(
    model_dir: str | os.PathLike,
    cfg: RedrafterCheckpointConfig,
    rank: int,
    dtype: torch.dtype | None = None,
    tp: TPGroup | None = None,
) -> tuple[TPBaseModel, Drafter]:
    """Rank ``rank``'s base model and draft head from ``model_dir/rank{rank}.safetensors``
    (every tensor checked for name, shape and finiteness)."""
    from ..formats.checkpoint import DTYPES

    weights = Path(model_dir) / rank_file(rank)
    sd = load_state_dict_file(weights)
    if cfg.quant_algo == fp8.QUANT_ALGO:  # run dequantized, as the tp_size 1 loader does
        sd = fp8.dequantize_state_dict(sd, str(weights))
    torch_dtype = dtype or DTYPES[cfg.dtype]
    base_sd = {k: v for k, v in sd.items() if not k.startswith("drafter.")}
    drafter_sd = drafter_from_checkpoint_names(
        cfg.drafter, {k: v for k, v in sd.items() if k.startswith("drafter.")}
    )
    base = TPBaseModel(cfg.base, cfg.tp_size, tp).to(torch_dtype)
    load_checked(base, base_sd, str(weights))
    require(
        EMBEDDING in base_sd and LM_HEAD in base_sd, f"{weights}: missing {EMBEDDING} / {LM_HEAD}"
    )
    drafter = tp_drafter(cfg.drafter, cfg.tp_size, tp).to(torch_dtype)
    if cfg.drafter.draft_vocab_size is not None:
        require(DRAFT_VOCAB in drafter_sd, f"{weights}: missing drafter.{DRAFT_VOCAB}")
        check_draft_vocab(drafter_sd[DRAFT_VOCAB], cfg.drafter, f"{weights}: drafter.{DRAFT_VOCAB}")
    load_checked(drafter, drafter_sd, str(weights))
    return base.eval(), drafter.eval()


def rank_bytes_per_step(cfg: RedrafterCheckpointConfig, tp_size: int, bytes_per_param: int) -> dict:
    """Weight bytes one rank reads per step (the base forward reads every linear and the lm_head
    once; the draft head's linears are read once per draft step), and the collective payload
    per token. Embedding rows read are negligible and left out."""
    c = cfg.base
    lc = local_base_config(c, tp_size)
    h, hd = c.hidden_size, c.head_size
    per_layer = (
        h * (lc.num_attention_heads + 2 * lc.num_key_value_heads) * hd
        + lc.num_attention_heads * hd * h
        + 3 * h * lc.intermediate_size
    )
    base = c.num_hidden_layers * per_layer + h * padded_vocab_size(c.vocab_size, tp_size) // tp_size
    d = cfg.drafter
    draft = (
        (d.exit_dim * 2 * h if d.exit_dim != 2 * h else 0)
        + d.num_draft_layers * d.exit_dim * d.exit_dim
        + d.exit_dim * padded_vocab_size(d.head_vocab_size, tp_size)
        + (2 * h * h if d.rnn else 0)
    ) // tp_size
    return {
        "tp_size": tp_size,
        "base_weight_bytes": base * bytes_per_param,
        "draft_weight_bytes_per_draft_step": draft * bytes_per_param,
        "weight_bytes_per_step": (base + cfg.draft_len * draft) * bytes_per_param,
        "all_reduce_bytes_per_token": 2 * c.num_hidden_layers * h * bytes_per_param
        if tp_size > 1
        else 0,
    }


# --------------------------------------------------------------------------- step protocol
# One command = a fixed int64 header (broadcast) + for STEP one uint8 payload (broadcast).
CMD_STEP, CMD_RESERVE, CMD_PING, CMD_STOP, CMD_LOGITS = 1, 2, 3, 4, 5
_NAMES = (*C.ALL_INPUTS, "prompt_ids")  # every step input, the optional ones too
# cmd, seq, W, D, a, b, payload bytes, tensors; per tensor (name, dtype, ndim, 4 dims)
_HEADER = 8 + len(_NAMES) * 7
_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64, torch.bool, torch.float16)


def _pack(tensors: dict[str, torch.Tensor], header: torch.Tensor) -> torch.Tensor:
    parts, i = [], 0
    for name, t in tensors.items():
        require(t.dim() <= 4, f"step input {name}: more than 4 dims")
        t = t.detach().to("cpu").contiguous()
        row = 8 + 7 * i
        header[row : row + 3] = torch.tensor([_NAMES.index(name), _DTYPES.index(t.dtype), t.dim()])
        header[row + 3 : row + 3 + t.dim()] = torch.tensor(t.shape)
        parts.append(t.reshape(-1).view(torch.uint8))
        i += 1
    header[7] = i
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    header[6] = payload.numel()
    return payload


def _unpack(header: torch.Tensor, payload: torch.Tensor) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    h = header.tolist()
    for i in range(int(h[7])):
        row = 8 + 7 * i
        name, dt, nd = _NAMES[h[row]], _DTYPES[h[row + 1]], h[row + 2]
        shape = tuple(h[row + 3 : row + 3 + nd])
        nbytes = (
            int(torch.tensor(shape, dtype=torch.int64).prod()) * dt.itemsize if nd else dt.itemsize
        )
        out[name] = payload[off : off + nbytes].clone().view(dt).reshape(shape)
        off += nbytes
    return out


class _Channel:
    """Rank 0's side of the command stream: numbered commands, a heartbeat while idle."""

    def __init__(self, tp: RankGroup, heartbeat_s: float | None):
        self.tp = tp
        self.seq = 0
        self.last = time.monotonic()
        self.closed = False
        self.failure: TPError | None = None
        self._stop = threading.Event()
        if heartbeat_s:
            self._thread = threading.Thread(
                target=self._beat, args=(heartbeat_s,), name="redrafter-tp-heartbeat", daemon=True
            )
            self._thread.start()

    def _beat(self, period: float) -> None:
        while not self._stop.wait(period / 4):
            if time.monotonic() - self.last < period:
                continue
            with self.tp.lock:
                if self.closed:
                    return
                try:
                    self.send(CMD_PING)
                except TPError as e:
                    self.failure = e
                    return

    def send(
        self, cmd: int, shape=(0, 0), args=(0, 0), tensors: dict[str, torch.Tensor] | None = None
    ) -> None:
        if self.failure is not None:
            raise self.failure
        require(not self.closed, "this tensor-parallel generator is closed")
        with self.tp.lock:
            self.seq += 1
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[:6] = torch.tensor([cmd, self.seq, *shape, *args])
            payload = _pack(tensors or {}, header)
            dev = self.tp.device if self.tp.backend == "nccl" else torch.device("cpu")
            self.tp.broadcast(header.to(dev), "sending the step inputs")
            if payload.numel():
                self.tp.broadcast(payload.to(dev), "sending the step inputs")
            self.last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        with self.tp.lock:
            if self.closed:
                return
            try:
                if self.failure is None:
                    self.send(CMD_STOP)
            except TPError:
                pass
            self.closed = True


def prompt_logits(base: BaseModel, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, T, V] of prompts ``ids`` [B, T] in a scratch cache (no state kept)."""
    b, t = ids.shape
    dev = base.lm_head.weight_device
    cache = base.new_cache(b, t)
    zero = torch.zeros(b, dtype=torch.int64, device=dev)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None].expand(b, t, t)
    pos = torch.arange(t, device=dev)[None].expand(b, t)
    hidden = base(ids.to(dev), pos, cache, torch.arange(b, device=dev), zero, causal)
    return base.logits(hidden, float32=True)


def rank_base(local: Backend) -> BaseModel:
    """The torch base model of this rank's backend, its share of the weights (a TensorRT-LLM
    engine's rank has none: its logits come from the engine)."""
    base = local.base
    if not isinstance(base, BaseModel):
        raise RedrafterError(
            f"prompt logits run on the torch ranks' base models; this rank's {local.name} "
            "backend has none"
        )
    return base


class TPBackend:
    """Rank 0's backend of a tensor-parallel engine (a :class:`~redrafter_trt.contract.Backend`):
    each call sends its inputs to the other ranks, then runs this rank's share. ``close()``
    stops the other ranks (the launcher's ``on_close`` then reaps them).

    ``local`` is this rank's backend (a
    :class:`~redrafter_trt.backends.torch_backend.TorchBackend` over its shard, or a TensorRT-LLM
    engine's rank); ``tp`` its :class:`RankGroup`."""

    def __init__(
        self,
        local: Backend,
        tp: RankGroup,
        heartbeat_s: float | None = None,
        on_close: Callable[[], None] | None = None,
        _channel: _Channel | None = None,
    ):
        self.local = local
        self.tp = tp
        self.store: Any = None  # a launcher's rendezvous store, kept alive as long as the ranks
        self.tp_size = tp.size
        self.channel = _channel or _Channel(tp, heartbeat_s)
        self._on_close = on_close
        # the rank's own backend's facts: every rank's are alike
        self.name = local.name
        self.mixed_request_types = local.mixed_request_types
        self.chunked_context = local.chunked_context
        self.shape = local.shape
        self.device, self.dtype = local.device, local.dtype
        self.max_batch_size = local.max_batch_size
        self.max_input_len, self.max_seq_len = local.max_input_len, local.max_seq_len
        self.warp_k = local.warp_k

    @property
    def timings(self) -> dict[str, float]:
        return self.local.timings

    @property
    def vocab_size(self) -> int:
        return self.local.vocab_size

    @property
    def base(self) -> None:
        """None: no process holds the whole base model (this rank's share is ``local.base``),
        so what needs its full weights (the transformers baseline, calibration) says so."""
        return None

    @property
    def drafter(self) -> None:
        return None

    @property
    def native_linear(self) -> bool:
        return bool(getattr(self.local, "native_linear", False))

    @property
    def kv_cache_bytes(self) -> int | None:
        """Bytes of this rank's KV cache (its KV heads); every rank holds as much."""
        return self.local.kv_cache_bytes

    def _shape(self) -> tuple[int, int]:
        return (self.shape.num_beams, self.shape.draft_len)

    def reserve(self, slots: int, tokens_per_slot: int) -> None:
        with self.tp.lock:
            self.channel.send(CMD_RESERVE, self._shape(), (slots, tokens_per_slot))
            self.local.reserve(slots, tokens_per_slot)

    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        C.check_inputs(inputs, self.shape)
        with self.tp.lock:
            self.channel.send(CMD_STEP, self._shape(), tensors=dict(inputs))
            return self.local.step(inputs)

    def prompt_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 base logits [B, T, V] of token ids [B, T] (all ranks compute them together)."""
        base = rank_base(self.local)
        with self.tp.lock:
            self.channel.send(CMD_LOGITS, self._shape(), tensors={"prompt_ids": ids})
            with torch.inference_mode():
                return prompt_logits(base, ids)

    def reshaped(self, num_beams: int, draft_len: int) -> TPBackend | None:
        """The same ranks with beam shape W x D (each rank reshapes its own backend); None where
        the rank's backend has a fixed shape (an engine)."""
        if (num_beams, draft_len) == self._shape():
            return self
        local = self.local.reshaped(num_beams, draft_len)
        return None if local is None else TPBackend(local, self.tp, _channel=self.channel)

    def close(self) -> None:
        """Stop the other ranks; idempotent."""
        self.channel.close()
        if self._on_close is not None:
            fn, self._on_close = self._on_close, None
            fn()


def follow(
    local: Backend,
    tp: RankGroup,
    progress: Callable[[int], None] | None = None,
) -> None:
    """A rank other than 0: run rank 0's commands until it says stop (or a collective fails,
    raising :class:`TPError`)."""
    require(tp.rank != 0, "rank 0 drives; follow() is for the other ranks")
    backends = {(local.shape.num_beams, local.shape.draft_len): local}
    dev = tp.device if tp.backend == "nccl" else torch.device("cpu")
    while True:
        header = torch.zeros(_HEADER, dtype=torch.int64, device=dev)
        tp.broadcast(header, "waiting for rank 0's next command")
        header = header.cpu()
        cmd, seq, w, d, a, b, nbytes = header[:7].tolist()
        payload = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        if nbytes:
            tp.broadcast(payload, "receiving the step inputs")
        if cmd == CMD_STOP:
            return
        if cmd == CMD_PING:
            continue
        be = backends.get((w, d))
        if be is None:
            be = backends[(w, d)] = local.reshaped(w, d)
        if cmd == CMD_RESERVE:
            be.reserve(a, b)
        elif cmd == CMD_STEP:
            be.step(_unpack(header, payload.cpu()))
        elif cmd == CMD_LOGITS:
            with torch.inference_mode():
                prompt_logits(rank_base(be), _unpack(header, payload.cpu())["prompt_ids"])
        else:
            raise TPError(f"tensor-parallel rank {tp.rank}: unknown command {cmd} from rank 0")
        if progress is not None:
            progress(seq)


def read_config_dict(model_dir: str | os.PathLike) -> dict:
    """The config a directory's rank files were written with: an engine's
    ``pretrained_config``, or a checkpoint's ``config.json``."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return raw.get("pretrained_config", raw)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TPError",
    "TPGroup",
    "TPBaseModel",
    "TPBackend",
    "RowParallelLinear",
    "ColumnParallelLinear",
    "tp_drafter",
    "local_base_config",
    "check_rank_files",
    "load_rank_models",
    "expected_rank_tensors",
    "rank_bytes_per_step",
    "follow",
    "prompt_logits",
    "read_config_dict",
]
