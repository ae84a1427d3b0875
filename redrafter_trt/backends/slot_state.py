"""Carried tree state kept where the backend computes it: per-slot buffers on the backend's device.

A generation row verifies the tree its slot's previous call drafted: that call's carried outputs
(:data:`~redrafter_trt.contract.CARRIED`). :class:`SlotState` keeps them in ``[S, ...]`` buffers
indexed by slot id (TensorRT-LLM's ``batchSlots``), written by every call for its rows' slots, so
a call with ``FROM_SLOTS`` passes slot ids and nothing of a tree goes to the host and back. Three
small integers per slot (tree nodes, tree depth, cache length) are mirrored on the host, copied
once per call after its outputs exist (on CUDA asynchronously, read at the next call, by which
time the runtime has read the call's tokens), so a call's shapes (its ``T``, the acceptance
depth) and TensorRT-LLM's host plumbing never read the device mid-step.

A slot's state is what the last call with a row in that slot left: a request that reuses a freed
slot overwrites its predecessor's tree in its own first (context) call. :meth:`SlotState.gather`
refuses a generation row whose slot no call has written since the state was made (``reserve``
makes a new one).

:class:`StepRows` is one call's inputs in the form every backend computes from: every contract
input on the device, [B, ...] at the call's full width, with the per-row facts the host needs.
:func:`explicit_rows` builds it from a call that passes every input; :meth:`SlotState.gather`
from a ``FROM_SLOTS`` call. Both give the same tensors for the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import contract as C
from ..errors import RedrafterError


@dataclass
class StepRows:
    """One call's inputs, ready to compute: ``x`` holds every input of
    :data:`~redrafter_trt.contract.ENGINE_INPUTS`, [B, ...] on the backend's device (the host
    scalars stay in the call's own inputs), ``index`` the rows' slot ids there ([B] int64). The
    host facts are lists of B: ``is_ctx``, ``slots``, ``lengths`` (prompt-chunk tokens or tree
    nodes), ``cache_lengths`` and ``depths`` (nodes on a generation row's longest tree path; 0 for
    context rows)."""

    x: dict[str, torch.Tensor]
    index: torch.Tensor
    is_ctx: list[bool]
    slots: list[int]
    lengths: list[int]
    cache_lengths: list[int]
    depths: list[int]

    @property
    def batch(self) -> int:
        return len(self.slots)

    @property
    def all_context(self) -> bool:
        return all(self.is_ctx)

    @property
    def tokens(self) -> int:
        """T of the call: its longest row (prompt chunk or packed tree)."""
        return max(self.lengths)

    @property
    def depth(self) -> int:
        """Beam nodes acceptance reads: the deepest tree among the generation rows, 1 for prompts
        and plain decoding."""
        return max(max(self.depths), 1)


def tree_depths(offsets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Nodes on each tree's longest path: 1 + the deepest of its ``lengths`` first nodes.
    offsets: [B, T] int; lengths: [B] int -> [B] int64."""
    node = torch.arange(offsets.shape[1], device=offsets.device)
    live = node[None, :] < lengths.to(offsets.device, torch.int64)[:, None]
    return offsets.to(torch.int64).masked_fill(~live, 0).amax(dim=1) + 1


def explicit_rows(inputs: dict[str, torch.Tensor], device: torch.device) -> StepRows:
    """The rows of a call that passes every input (the caller's tensors, normally on the CPU)."""
    is_ctx = [t == C.CONTEXT for t in inputs[C.REQUEST_TYPES].tolist()]
    depths = tree_depths(inputs[C.POSITION_OFFSETS].cpu(), inputs[C.INPUT_LENGTHS].cpu())
    x = {n: inputs[n].to(device) for n in C.ENGINE_INPUTS}
    return StepRows(
        x=x,
        index=x[C.SLOT_IDS].to(torch.int64),
        is_ctx=is_ctx,
        slots=inputs[C.SLOT_IDS].tolist(),
        lengths=inputs[C.INPUT_LENGTHS].tolist(),
        cache_lengths=inputs[C.CACHE_LENGTHS].tolist(),
        depths=[0 if c else d for c, d in zip(is_ctx, depths.tolist())],
    )


class SlotState:
    """The carried outputs of each of ``slots`` slots' last call, on ``device`` (module docstring).

    ``buffers[name]`` is [S, ...] for each carried input ``name`` (``T`` = N); ``facts[s]`` mirrors
    slot s's tree nodes, tree depth and cache length on the host (None: no call wrote it)."""

    def __init__(self, slots: int, shape: C.StepShape, device: torch.device):
        self.shape = shape
        self.device = device
        sizes = C.dim_sizes(slots, shape.tree_size, shape)
        self.buffers = {dst: C.SPECS[dst].new(sizes, device) for dst in C.CARRIED.values()}
        self.facts: list[tuple[int, int, int] | None] = [None] * slots
        self._pending: list[tuple[list[int], torch.Tensor, torch.cuda.Event]] = []

    @property
    def slots(self) -> int:
        return len(self.facts)

    def store(self, rows: StepRows, outputs: dict[str, torch.Tensor]) -> None:
        """Keep ``outputs`` (the call of ``rows``, on the device) as the state of its slots."""
        for src, dst in C.CARRIED.items():
            self.buffers[dst][rows.index] = outputs[src]
        lengths = outputs[C.NEXT_PACKED_LENGTHS]
        facts = torch.stack(
            [
                lengths.to(torch.int64),
                tree_depths(outputs[C.NEXT_POSITION_OFFSETS], lengths),
                outputs[C.NEW_CACHE_LENGTHS].to(torch.int64),
            ],
            dim=1,
        )
        if facts.device.type == "cuda":  # read at the next call, after the runtime's own read
            host = torch.empty(facts.shape, dtype=torch.int64, pin_memory=True)
            host.copy_(facts, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((rows.slots, host, done))
        else:
            self._keep(rows.slots, facts)

    def _keep(self, slots: list[int], facts: torch.Tensor) -> None:
        for slot, f in zip(slots, facts.tolist()):
            self.facts[slot] = tuple(f)

    def _settle(self) -> None:
        for slots, host, done in self._pending:
            done.synchronize()
            self._keep(slots, host)
        self._pending.clear()

    def gather(self, inputs: dict[str, torch.Tensor]) -> StepRows:
        """The rows of a ``FROM_SLOTS`` call: context rows from ``inputs``, generation rows'
        carried inputs from their slots, at the width the call would have with every input given
        (``T`` = the longest context chunk, at least N with generation rows)."""
        self._settle()
        dev = self.device
        is_ctx = [t == C.CONTEXT for t in inputs[C.REQUEST_TYPES].tolist()]
        slots = inputs[C.SLOT_IDS].tolist()
        require_slots(slots, self.slots)
        gen = [j for j, c in enumerate(is_ctx) if not c]
        empty = [slots[j] for j in gen if self.facts[slots[j]] is None]
        if empty:
            raise RedrafterError(
                f"generation rows in slots {empty}: no call has left a tree there since the KV "
                "cache was reserved (a request starts with a context row)"
            )
        n, b = self.shape.tree_size, len(slots)
        width = max(inputs[C.INPUT_IDS].shape[1], n if gen else 0)
        sizes = C.dim_sizes(b, width, self.shape)
        x = {k: inputs[k].to(dev, non_blocking=True) for k in C.ENGINE_INPUTS if k in inputs}
        index = x[C.SLOT_IDS].to(torch.int64)
        if gen:
            rows = torch.tensor(gen, device=dev) if len(gen) < b else None
            from_slots = index if rows is None else index[rows]
        for name, buf in self.buffers.items():
            full_width = buf.shape[1:] == C.SPECS[name].shape(sizes)[1:]
            if len(gen) == b and full_width:  # a generation call: one gather
                x[name] = buf[from_slots]
                continue
            full = C.SPECS[name].new(sizes, dev)
            if name in x:  # the context rows' values
                full[tuple(slice(0, k) for k in x[name].shape)] = x[name]
            if gen:
                tree = buf[from_slots]
                where = (
                    slice(None) if rows is None else rows,
                    *(slice(0, k) for k in tree.shape[1:]),
                )
                full[where] = tree
            x[name] = full
        given = (inputs[C.INPUT_LENGTHS].tolist(), inputs[C.CACHE_LENGTHS].tolist())
        facts = [None if c else self.facts[s] for c, s in zip(is_ctx, slots)]
        return StepRows(
            x=x,
            index=index,
            is_ctx=is_ctx,
            slots=slots,
            lengths=[g if f is None else f[0] for g, f in zip(given[0], facts)],
            cache_lengths=[g if f is None else f[2] for g, f in zip(given[1], facts)],
            depths=[0 if f is None else f[1] for f in facts],
        )


def require_slots(slots: list[int], available: int) -> None:
    """Every slot id of a call names a reserved slot, once."""
    bad = [s for s in slots if not 0 <= s < available]
    if bad:
        raise RedrafterError(f"slot ids {bad} outside the {available} slots reserved")
    if len(set(slots)) != len(slots):
        raise RedrafterError(f"slot ids {slots}: a slot holds one row of a call")
