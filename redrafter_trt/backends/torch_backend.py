"""The PyTorch backend: the step contract on CPU or GPU, and the oracle for every other backend.

One call: base forward over prompts / packed trees -> acceptance -> KV relocation -> context
hidden state -> D-step beam search from the bonus token -> tree packing. Vectorised over the
batch and the tree; the only Python loops are over layers, depths and draft steps.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import contract as C
from .. import native
from ..errors import RedrafterError
from ..models.base import BaseModel, Linear
from ..models.drafter import Drafter
from ..ops import pack_tree, packed_mask_to_bool
from ..ops.beam_search import DEFAULT_WARP_K
from ..ops.tree import PackedTree, bool_to_packed_mask, root_only_tree
from . import cuda_ops
from .slot_state import SlotState, StepRows, explicit_rows
from .timing import PhaseTimer

#: ``(context [B, H], root [B], slots [B], root_positions [B]) -> beams [B, W, L]`` int
Proposer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: /proc/cpuinfo flags of CPU bfloat16 matrix units.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 matrix-unit flags (:data:`CPU_BF16_FLAGS`) this CPU reports in /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def auto_dtype(cpuinfo: str | None = None) -> tuple[str, str]:
    """``--dtype auto``: bfloat16 on a CUDA GPU with bf16; on a CPU, float32 where the toolkit's
    CPU kernels run (they compute in float32; bf16 would only re-round the converted weights,
    and on the built-in 4-bit model it changed answers), else bfloat16 where the CPU has bf16
    matrix units for torch (avx512_bf16/amx_bf16), else float32. Returns (dtype name, reason)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16", f"CUDA device {torch.cuda.get_device_name(0)} has bf16 units"
    flags = cpu_bf16_flags(cpuinfo)
    if flags and _cpu_kernels_run():
        return "float32", (
            f"the CPU has {', '.join(flags)}, but the model runs on the toolkit's CPU kernels, "
            "which compute in float32"
        )
    if flags:
        return "bfloat16", f"the CPU has {', '.join(flags)}"
    return "float32", f"no CUDA device and no {'/'.join(CPU_BF16_FLAGS)} in /proc/cpuinfo"


def _cpu_kernels_state() -> str:
    """``on`` where the toolkit's CPU kernels run by default, ``no-simd`` on an x86 CPU without
    AVX2+FMA (their portable path would be slow), ``unbuilt`` on an x86 CPU where the library
    does not load, ``off`` elsewhere (another architecture, ``$REDRAFTER_CPU_LINEAR=torch``)."""
    import platform

    if (
        platform.machine().lower() not in ("x86_64", "amd64", "i686")
        or os.environ.get(CPU_LINEAR_ENV, "").strip().lower() == "torch"
    ):
        return "off"
    if not native.linear_available():
        return "unbuilt"
    return "on" if native.simd_level() > 0 else "no-simd"


def _cpu_kernels_run() -> bool:
    return _cpu_kernels_state() == "on"


def pad_tree(beams: torch.Tensor, shape: C.StepShape) -> tuple[PackedTree, torch.Tensor]:
    """Pack beams [B, w, d+1] (w <= W, d <= D) and pad to the engine's [B, W, L] / W*L shapes:
    missing beams repeat beam 0 (the tree dedups them), missing depths are -1 tokens."""
    b, w, l1 = beams.shape
    W, L, N = shape.num_beams, shape.beam_len, shape.tree_size
    if w < W:
        beams = torch.cat([beams, beams[:, :1].expand(b, W - w, l1)], 1)
    tree = pack_tree(beams)
    if l1 == L:
        return tree, beams
    n = tree.tokens.shape[1]
    dev = beams.device
    full = torch.full((b, W, L), -1, dtype=beams.dtype, device=dev)
    full[:, :, :l1] = beams
    unpacker = torch.zeros((b, W, L), dtype=tree.unpacker.dtype, device=dev)
    unpacker[:, :, :l1] = tree.unpacker
    tokens = torch.zeros((b, N), dtype=tree.tokens.dtype, device=dev)
    tokens[:, :n] = tree.tokens
    offsets = torch.zeros((b, N), dtype=tree.offsets.dtype, device=dev)
    offsets[:, :n] = tree.offsets
    mask = torch.zeros((b, N, N), dtype=torch.bool, device=dev)
    mask[:, :n, :n] = tree.mask
    return PackedTree(
        tokens=tokens,
        lengths=tree.lengths,
        unpacker=unpacker,
        offsets=offsets,
        packed_mask=bool_to_packed_mask(mask),
        mask=mask,
    ), full


#: ``TorchBackend(native_linear=...)``'s default can be forced off with this variable set to ``torch``
CPU_LINEAR_ENV = "REDRAFTER_CPU_LINEAR"


def default_native_linear(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the base's linear layers run on the batch-invariant CPU kernels by default: on an
    x86 CPU with AVX2+FMA (or AVX-512) and float32/bfloat16 weights where the library loads,
    unless ``$REDRAFTER_CPU_LINEAR=torch``. An x86 CPU without AVX2+FMA keeps the torch path and
    says so once on stderr (the kernels' portable path gives the same bits, but slowly); so does
    an x86 CPU where the library is not built (torch's kernels are slower for the small batches
    of decoding, and on a CPU with bf16 units the model then runs in bfloat16)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    state = _cpu_kernels_state()
    if state in _NOTES and state not in _NOTES_SAID:
        print(_NOTES[state], file=sys.stderr)
        _NOTES_SAID.add(state)
    return state == "on"


_NOTES = {
    "no-simd": "note: this CPU has no AVX2+FMA: the model runs on torch's kernels, not the "
    "toolkit's batch-invariant ones (set TorchBackend(native_linear=True) for their portable "
    "path: the same bits, slower)",
    "unbuilt": "note: the toolkit's CPU kernels are not built (or do not load), so the model "
    "runs on torch's kernels, slower for decoding's small batches; build them with "
    f"`{native.BUILD_COMMAND} --cpu-only` (seconds)",
}
_NOTES_SAID: set[str] = set()


def require_native_linear(dtype: torch.dtype) -> None:
    """Raise a :class:`RedrafterError` saying why the CPU kernel cannot run these weights."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise RedrafterError(
            f"the CPU linear kernel takes float32 or bfloat16 weights, not {dtype}; "
            "use the torch path (native_linear=False)"
        )
    native.require_linear()  # raises saying how to build the library


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


class TorchBackend:
    """Runs whole ReDrafter steps with PyTorch (implements :class:`~redrafter_trt.contract.Backend`).

    Args:
        base: the base LLM; drafter: its draft head (same dtype and device), or None for a
            backend that only decodes plainly (``num_draft_steps`` 0; a step asking for draft
            steps raises).
        num_beams: W; draft_len: D; warp_k: top-k warp of draft logits (0 = off).
        max_batch_size, max_seq_len: engine limits the runtime enforces.
        proposer: ``(context [B,H], root [B], slots [B], root_positions [B]) -> beams [B,W,L]``
            in place of the draft head's beam search (tests plug in proposers that know the answer).
    """

    name = "torch"
    #: step() returns the emitted tokens' log-probabilities when asked (``NUM_TOP_LOGPROBS``)
    logprobs = True
    #: context rows and generation rows may share one call (the runtime scheduler mixes them)
    mixed_request_types = True
    #: a context row may continue a slot's cache (``cache_lengths`` > 0: chunked prefill)
    chunked_context = True

    def __init__(
        self,
        base: BaseModel,
        drafter: Drafter | None,
        num_beams: int,
        draft_len: int,
        warp_k: int = DEFAULT_WARP_K,
        max_batch_size: int = 8,
        max_input_len: int = 1024,
        max_seq_len: int = 2048,
        proposer: Proposer | None = None,
        native_linear: bool | None = None,
    ):
        self.base = base.eval()
        self.drafter = drafter.eval() if drafter is not None else None
        self.shape = C.StepShape(num_beams, draft_len)
        self.warp_k = warp_k
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.cache: torch.Tensor | None = None
        # proposer(context [B,H], root [B], slots [B], root_positions [B]) -> beams [B,W,L];
        # default: the draft head's beam search. Tests plug in proposers that know the answer.
        self.custom_proposer = proposer
        self.proposer = proposer or self._draft
        # (not base.lm_head.weight: a projection streaming GGUF blocks would decode it)
        self.device, self.dtype = base.lm_head.weight_device, base.lm_head.weight_dtype
        self.timer = PhaseTimer(self.device)
        #: each slot's carried tree, on the device (made by :meth:`reserve`)
        self.slot_state: SlotState | None = None
        self.ops = cuda_ops.select_ops(
            self.device
        )  # cpp/ kernels on CUDA when built; .name says which
        # native_linear: every base linear on the batch-invariant CPU kernel (cpp/src/linear_cpu.cpp);
        # None = the default: on for float32/bfloat16 weights on an x86 CPU where the library loads
        if native_linear is None:
            native_linear = default_native_linear(self.device, self.dtype)
        elif native_linear and self.device.type == "cpu":
            require_native_linear(self.dtype)
        self.native_linear = bool(native_linear) and self.device.type == "cpu"
        if self.base.native_linear != self.native_linear:
            self.base.use_native_linear(self.native_linear)
        if self.drafter is not None and self.drafter.native_linear != self.native_linear:
            self.drafter.use_native_linear(self.native_linear)

    @property
    def vocab_size(self) -> int:
        return self.base.config.vocab_size

    @property
    def timings(self) -> dict[str, float]:
        """Cumulative seconds per phase (verify / accept / draft / pack); see :class:`PhaseTimer`."""
        return self.timer.totals

    @property
    def kv_cache_bytes(self) -> int | None:
        """Bytes of the contiguous KV cache (None before :meth:`reserve`)."""
        c = self.cache
        return None if c is None else int(c.numel() * c.element_size())

    def reshaped(self, num_beams: int, draft_len: int) -> TorchBackend:
        """A backend of beam shape W x D around the same modules (no copy). A plugged-in proposer
        is shape-specific: it serves this backend's own shape only."""
        own = (self.shape.num_beams, self.shape.draft_len) == (num_beams, draft_len)
        return TorchBackend(
            self.base,
            self.drafter,
            num_beams,
            draft_len,
            warp_k=self.warp_k,
            max_batch_size=self.max_batch_size,
            max_input_len=self.max_input_len,
            max_seq_len=self.max_seq_len,
            proposer=self.custom_proposer if own else None,
            native_linear=self.native_linear,
        )

    def reserve(self, slots: int, tokens_per_slot: int) -> None:
        """Make sure the KV cache holds ``slots`` rows of ``tokens_per_slot`` tokens (+ a tree);
        every slot's carried tree is dropped."""
        need = tokens_per_slot + self.shape.tree_size
        c = self.cache
        if c is None or c.shape[2] < slots or c.shape[4] < need:
            self.cache = None
            self.cache = self.base.new_cache(slots, need)
        self.slot_state = SlotState(self.cache.shape[2], self.shape, self.device)

    def _rows(self, inputs: dict[str, torch.Tensor]) -> StepRows:
        """The call's inputs on the device: generation rows' trees from the slot state
        (``FROM_SLOTS``) or from ``inputs``."""
        if C.from_slots(inputs):
            return self.slot_state.gather(inputs)
        return explicit_rows(inputs, self.device)

    def _head(self) -> Drafter:
        if self.drafter is None:
            raise RedrafterError(
                f"this torch backend has no draft head: it decodes plainly only "
                f"({C.NUM_DRAFT_STEPS} 0); load an engine with a draft head to speculate"
            )
        return self.drafter

    def _draft(
        self,
        context: torch.Tensor,
        root: torch.Tensor,
        slots: torch.Tensor,
        root_positions: torch.Tensor,
    ) -> torch.Tensor:
        return self._head().beam_search(
            self.base.embedding,
            context,
            root,
            self.shape.num_beams,
            self.shape.draft_len,
            self.warp_k,
            step=self._step_kernel(),
        )

    def _step_kernel(self):
        """The beam-search step kernel where one runs (CUDA), else None (the PyTorch step)."""
        return self.ops.beam_search_step if self.ops.name == cuda_ops.KERNEL else None

    def thread_split(self):
        """The thread split of a step: with the CPU kernels on, the
        linear and attention kernels take the run's threads and torch's own remaining ops
        (norms, RoPE, the gated activation, indexing: a few percent of a step, less for long
        prompts) run on one thread (:func:`redrafter_trt.native.torch_ops_on_one_thread`); torch's
        OpenMP regions over a few kilobytes cost more in hand-off than they compute, and on a
        busy machine a second torch thread waiting for a core stalls every op."""
        if self.native_linear:
            return native.torch_ops_on_one_thread()
        return contextlib.nullcontext()

    def engine_signature(self) -> dict[str, Any]:
        """The facts of this engine that its step costs depend on (a cost model of
        :mod:`redrafter_trt.runtime.adaptive` holds them, and is used only where they match)."""
        cfg = self.base.config
        return {
            "num_beams": self.shape.num_beams,
            "draft_len": self.shape.draft_len,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size,
            "intermediate_size": cfg.intermediate_size,
            "native_linear": bool(self.native_linear),
            # what the base's projections stream: float32 panels and GGUF blocks cost differently
            "weights": ",".join(
                sorted({m.streamed_format for m in self.base.modules() if isinstance(m, Linear)})
            ),
            # the CPU kernels' build: another build of them times differently
            "kernels": native.kernels_fingerprint() if self.native_linear else None,
            # K: the draft cost scales with the head's projection rows (a reduced draft vocabulary)
            "draft_vocab_size": None
            if self.drafter is None
            else self.drafter.config.head_vocab_size,
        }

    @torch.inference_mode()
    def measure_step_costs(
        self,
        token_points: Sequence[int],
        draft_rows: Sequence[int],
        cached_tokens: int,
        repeats: int,
        log: Callable[[str], None] | None = None,
    ) -> tuple[dict[int, float], dict[int, float]]:
        """Seconds of the base forward over ``n`` new tokens in one row, for each ``n`` of
        ``token_points`` (``cached_tokens`` already cached), and of one draft step over ``n`` beam
        rows, for each ``n`` of ``draft_rows``: the median of ``repeats`` rounds interleaved over
        ``n``, after one warm-up round, each under the step's thread split. Minutes on a slow CPU
        for large models; progress through ``log``."""
        base, drafter = self.base, self._head()
        dev, dt = self.device, self.dtype
        cache = base.new_cache(1, cached_tokens + max(token_points) + 1)
        g = torch.Generator().manual_seed(0)
        v, h = base.config.vocab_size, base.config.hidden_size
        prompt = torch.randint(0, v, (1, cached_tokens), generator=g).to(dev)
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        causal = torch.ones(cached_tokens, cached_tokens, dtype=torch.bool, device=dev).tril()[None]
        base(prompt, torch.arange(cached_tokens, device=dev)[None], cache, zero, zero, causal)
        cl = torch.tensor([cached_tokens], device=dev)
        verify: dict[int, list[float]] = {n: [] for n in token_points}
        draft: dict[int, list[float]] = {n: [] for n in draft_rows}

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        for rep in range(repeats + 1):  # the first round warms up
            for n in token_points:
                ids = torch.randint(0, v, (1, n), generator=g).to(dev)
                mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None]
                positions = cached_tokens + torch.arange(n, device=dev)[None]
                sync()
                t0 = time.perf_counter()
                with self.thread_split():  # the thread split the step uses for n tokens
                    base.logits(base(ids, positions, cache, zero, cl, mask), float32=True)
                sync()
                if rep:
                    verify[n].append(time.perf_counter() - t0)
            for n in draft_rows:
                ctx = torch.randn(n, h, generator=g).to(dt).to(dev)
                root = torch.randint(0, v, (n,), generator=g).to(dev)
                times = []
                for d in (1, 2):
                    sync()
                    t0 = time.perf_counter()
                    with self.thread_split():
                        drafter.beam_search(base.embedding, ctx, root, 1, d, self.warp_k)
                    sync()
                    times.append(time.perf_counter() - t0)
                if rep:
                    draft[n].append(max(times[1] - times[0], times[0] / 2))
            if log and rep:
                t1 = verify[token_points[0]][-1]
                log(f"[calibrate] round {rep}/{repeats}: t(1) {t1 * 1e3:.1f} ms")
        return {n: _median(x) for n, x in verify.items()}, {n: _median(x) for n, x in draft.items()}

    def step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.thread_split():
            return self._step(inputs)

    @torch.inference_mode()
    def _step(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        C.check_inputs(inputs, self.shape)
        assert self.cache is not None, "reserve() the KV cache before step()"
        dev = self.device
        t0 = self.timer.start()
        # every input on the device; T, the acceptance depth and whether every row is a prompt
        # come from the host (no read of the device mid-step)
        feed = self._rows(inputs)
        x = feed.x
        all_ctx = feed.all_context
        is_ctx = x[C.REQUEST_TYPES] == C.CONTEXT
        lengths = x[C.INPUT_LENGTHS].to(torch.int64)
        b = lengths.shape[0]
        rows = torch.arange(b, device=dev)
        t = feed.tokens
        # a context row's cache_lengths are the prompt tokens its slot holds already (chunked
        # prefill; 0 for a prompt's first chunk): its tokens attend to them causally
        cache_len = x[C.CACHE_LENGTHS].to(torch.int64)
        ar = torch.arange(t, device=dev)
        offsets = torch.where(
            is_ctx[:, None], ar[None, :], x[C.POSITION_OFFSETS][:, :t].to(torch.int64)
        )
        full_t = x[C.INPUT_IDS].shape[1]
        tree_mask = packed_mask_to_bool(x[C.PACKED_MASK], full_t)[:, :t, :t]
        causal = (ar[None, :] <= ar[:, None])[None]
        block = torch.where(is_ctx[:, None, None], causal, tree_mask)
        slots = x[C.SLOT_IDS].to(torch.int64)
        hidden = self.base(
            x[C.INPUT_IDS][:, :t], cache_len[:, None] + offsets, self.cache, slots, cache_len, block
        )
        # Nodes whose logits acceptance reads: the packed tree, or a prompt's last token at node 0.
        last = hidden[rows, lengths - 1]
        if all_ctx:
            node_hidden = last[:, None]
        else:
            node_hidden = hidden.clone()
            node_hidden[:, 0] = torch.where(is_ctx[:, None], last, hidden[:, 0])
        logits = self.base.logits(node_hidden, float32=True)  # acceptance reads float32
        t0 = self.timer.tick("verify", t0)

        # Acceptance over the trees' real depth only (1 for prompts and plain decoding).
        depth = feed.depth
        beams = torch.where(is_ctx[:, None, None], -1, x[C.DRAFT_TOKENS].to(torch.int64))[
            :, :, :depth
        ]
        unpacker = torch.where(is_ctx[:, None, None], 0, x[C.DRAFT_INDICES].to(torch.int64))[
            :, :, :depth
        ]
        acc = self.ops.accept(
            logits,
            beams,
            unpacker,
            x[C.TEMPERATURE],
            x[C.TOP_K],
            x[C.TOP_P],
            x[C.UNIFORMS][:, :depth],
        )
        n = acc.num_accepted.to(torch.int64)
        l = self.shape.beam_len
        path = torch.zeros((b, l), dtype=torch.int64, device=dev)
        path[:, :depth] = acc.accepted_indices
        self.ops.relocate_kv(self.cache, slots, cache_len, path, n)
        new_len = torch.where(is_ctx, cache_len + lengths, cache_len + n + 1)
        context = node_hidden[rows, path[rows, n]]
        out_tokens = torch.full((b, l), -1, dtype=torch.int32, device=dev)
        out_tokens[:, :depth] = acc.emitted
        t0 = self.timer.tick("accept", t0)

        d = int(inputs[C.NUM_DRAFT_STEPS])
        nb = int(inputs[C.NUM_DRAFT_BEAMS]) if C.NUM_DRAFT_BEAMS in inputs else self.shape.num_beams
        if not 0 <= d <= self.shape.draft_len:
            raise ValueError(f"{C.NUM_DRAFT_STEPS} must be in [0, {self.shape.draft_len}], got {d}")
        if not 1 <= nb <= self.shape.num_beams:
            raise ValueError(
                f"{C.NUM_DRAFT_BEAMS} must be in [1, {self.shape.num_beams}], got {nb}"
            )
        if d > 0:
            if d == self.shape.draft_len and nb == self.shape.num_beams:
                next_beams = self.proposer(context, acc.bonus, slots, new_len)
            elif self.custom_proposer is None:  # draft only what this step asks for
                next_beams = self._head().beam_search(
                    self.base.embedding,
                    context,
                    acc.bonus,
                    nb,
                    d,
                    self.warp_k,
                    step=self._step_kernel(),
                )
            else:  # a plugged-in proposer: the best nb beams' first d draft tokens
                next_beams = self.proposer(context, acc.bonus, slots, new_len)[:, :nb, : d + 1]
            t0 = self.timer.tick("draft", t0)
            if next_beams.shape[1:] == (self.shape.num_beams, self.shape.beam_len):
                tree = pack_tree(next_beams)
            else:
                tree, next_beams = pad_tree(next_beams, self.shape)
        else:
            tree, next_beams = root_only_tree(acc.bonus, self.shape)
        out = {
            C.NUM_ACCEPTED_TOKENS: acc.num_accepted,
            C.ACCEPTED_BEAM_INDEX: acc.best_beam,
            C.OUTPUT_TOKENS: out_tokens,
            C.NUM_OUTPUT_TOKENS: (n + 1).to(torch.int32),
            C.NEW_CACHE_LENGTHS: new_len.to(torch.int32),
            C.NEXT_DRAFT_TOKENS: next_beams.to(torch.int32),
            C.NEXT_DRAFT_INDICES: tree.unpacker,
            C.NEXT_FLAT_TOKENS: tree.tokens,
            C.NEXT_PACKED_LENGTHS: tree.lengths,
            C.NEXT_POSITION_OFFSETS: tree.offsets,
            C.NEXT_PACKED_MASK: tree.packed_mask,
        }
        self.slot_state.store(feed, out)  # the next call's generation rows read it
        self.timer.tick("pack", t0)
        if C.NUM_TOP_LOGPROBS in inputs:  # optional: log-probabilities of the emitted tokens
            out.update(
                emitted_logprobs(
                    logits, path[:, :depth], acc.emitted, l, int(inputs[C.NUM_TOP_LOGPROBS])
                )
            )
        return out


# --------------------------------------------------------------------------- optional logprobs
def emitted_logprobs(
    logits: torch.Tensor, nodes: torch.Tensor, emitted: torch.Tensor, beam_len: int, top: int
) -> dict[str, torch.Tensor]:
    """The base model's log-softmax at the nodes each emitted token came from (``nodes`` [B, d]:
    the accepted path's packed indices; ``emitted`` [B, d], -1 after the last): the
    ``OUTPUT_LOGPROBS`` / ``TOP_LOGPROB_TOKENS`` / ``TOP_LOGPROBS`` outputs, padded to
    ``beam_len``."""
    b, d = emitted.shape
    rows = torch.arange(b, device=logits.device)[:, None]
    lsm = torch.log_softmax(logits[rows, nodes.clamp(0, logits.shape[1] - 1)].float(), dim=-1)
    chosen = lsm.gather(-1, emitted.clamp(min=0).to(torch.int64)[..., None])[..., 0]
    chosen = torch.where(emitted >= 0, chosen, torch.zeros_like(chosen))
    k = max(0, min(int(top), lsm.shape[-1]))
    top_lp, top_ids = lsm.topk(k, dim=-1) if k else (lsm[..., :0], lsm[..., :0].long())
    out_lp = torch.zeros((b, beam_len), dtype=torch.float32, device=logits.device)
    out_lp[:, :d] = chosen
    t_ids = torch.zeros((b, beam_len, k), dtype=torch.int32, device=logits.device)
    t_lp = torch.zeros((b, beam_len, k), dtype=torch.float32, device=logits.device)
    t_ids[:, :d] = top_ids.to(torch.int32)
    t_lp[:, :d] = top_lp
    return {C.OUTPUT_LOGPROBS: out_lp, C.TOP_LOGPROB_TOKENS: t_ids, C.TOP_LOGPROBS: t_lp}
