"""In-flight batching over the step contract: a scheduler that owns the engine's KV slots.

Every iteration of :meth:`Scheduler.step` makes one or two backend calls:

- new requests (taken from a bounded FIFO queue while slots are free) enter as *context* rows;
- every running request enters as a *generation* row verifying the tree its previous call drafted,
  which the backend keeps in the request's slot (``FROM_SLOTS``: only the slot id is passed; of a
  call's outputs only the emitted tokens, and log-probabilities where asked, come to the host).

Where the backend accepts both kinds in one call (``backend.mixed_request_types``, the torch
backend) and the prompts (or prompt chunks) are no longer than the packed tree (so the generation
rows carry no padding), both kinds share one call; otherwise the context rows run in their own call just
before the generation call (the TensorRT-LLM backend always does this). A finished or cancelled
request frees its slot before the next call. A request's tokens depend only on its prompt and its
own sampling parameters: the uniforms of sampling are keyed by the request's ``(seed, stream)``
and the absolute position (:func:`~redrafter_trt.ops.sampling.position_uniforms`), never by its
row or slot.

Chunked prefill (``prefill_chunk``): the prompt tokens prefilled per iteration are bounded (summed
over the iteration's context rows, padding included); a longer prompt is prefilled over successive
iterations, each chunk a context row whose ``cache_lengths`` is the number of prompt tokens its slot
holds already (the backend must say ``chunked_context``). Only the last chunk's call emits the
request's first token, so chunking changes no output. While a long prompt is prefilled the running
rows keep decoding: a chunk shares their call where the backend mixes request types and the chunk
is no longer than the packed tree (else it runs in its own call just before theirs), so a running
row waits at most one chunk's prefill per step instead of the whole prompt's. Without
``prefill_chunk`` a prompt is prefilled whole in one context call (stalling
the running rows for that call); ``max_prefill_tokens`` then bounds the padded prompt tokens
admitted per iteration.

The number of draft steps of each call comes from a pluggable ``draft_policy(rows, shape) -> int``
over the call's live requests (default :func:`full_or_plain`: the engine's full draft length
when every row asked for speculation, else 0 = plain decoding).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import contract as C
from ..errors import RedrafterError, require
from ..ops.sampling import position_uniforms
from .detokenize import IncrementalDetokenizer


class QueueFull(RedrafterError):
    """The scheduler's waiting queue holds ``max_queue`` requests already."""


class SchedulerClosed(RedrafterError):
    """The scheduler no longer accepts requests (it is shutting down)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    ``seed`` and ``stream`` key the request's uniforms: the same prompt with the same
    ``(seed, stream)`` gives the same tokens alone or in any batch. ``stop_token_ids`` = None
    means the scheduler's end-of-sequence ids."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    speculative: bool = True
    #: None: no log-probabilities; K >= 0: the base model's log-probability of each generated
    #: token and its K most likely alternatives (``Request.logprobs`` / ``top_logprobs``)
    logprobs: int | None = None

    def validate(self) -> None:
        require(
            isinstance(self.max_new_tokens, int)
            and not isinstance(self.max_new_tokens, bool)
            and self.max_new_tokens >= 1,
            f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}",
        )
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(
            isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"
        )
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(
            self.logprobs is None
            or (
                isinstance(self.logprobs, int)
                and not isinstance(self.logprobs, bool)
                and self.logprobs >= 0
            ),
            f"logprobs must be None or an integer >= 0, got {self.logprobs!r}",
        )


@dataclass
class Event:
    """Tokens one call added to ``request`` (``text``: the characters they complete)."""

    request: Request
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None


class Request:
    """One request's state; created by :meth:`Scheduler.submit`.

    ``tokens`` exclude the prompt; ``accepted[i]`` counts the tokens call i added (call 0 is the
    prompt's own). ``finish_reason``: "eos" | "stop" | "length" | "cancelled" | "error"."""

    def __init__(
        self,
        rid: int,
        prompt: list[int],
        params: SamplingParams,
        max_new: int,
        stop_ids: set[int],
        index: int,
        on_event: Callable[[Event], None] | None,
    ):
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.max_new = max_new
        self.stop_ids = stop_ids
        self.index = index
        self.on_event = on_event
        self.tokens: list[int] = []
        # with params.logprobs: per token of ``tokens``, its log-probability under the base model
        # and the params.logprobs most likely (token, log-probability) pairs
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prefilled = 0  # prompt tokens in the slot's cache (< len(prompt) while prefilling)
        self.accepted: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text: str | None = None
        self.detok: IncrementalDetokenizer | None = None
        self.slot: int | None = None
        # the prompt is prefilled and the backend holds, in the slot, the tree the next call
        # verifies (contract.FROM_SLOTS: the tree never comes to the host)
        self.generating = False
        self.drafted: tuple[int, int] | None = None  # (beams, depth) of that tree
        self.cancel_requested = False
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Holds a slot, prompt not fully prefilled yet (no token emitted)."""
        return self.slot is not None and not self.generating

    @property
    def cache_length(self) -> int:
        """Tokens the slot's cache holds while generating: the prompt and every token but the
        last, the root of the tree the next call verifies (the backend's ``new_cache_lengths``)."""
        return len(self.prompt) + len(self.tokens) - 1

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens per generation step (the prompt's call excluded)."""
        steps = self.accepted[1:]
        return sum(steps) / len(steps) if steps else 0.0


@dataclass
class StepReport:
    """What one scheduler iteration did (for metrics)."""

    context_rows: int  # prompts (or prompt chunks) prefilled
    generation_rows: int
    calls: int
    seconds: float
    emitted_tokens: int
    accepted: list[int]  # per generation row: draft tokens accepted (0..D)
    num_draft_steps: int
    queue_depth: int
    live_rows: int
    prefill_tokens: int = 0  # prompt tokens prefilled (padding excluded)


@dataclass
class Counters:
    """Cumulative totals since the scheduler was made."""

    generation_calls: int = 0
    context_calls: int = 0
    row_steps: int = 0
    generated_tokens: int = 0  # tokens added by generation rows (prompts' first tokens excluded)
    step_seconds: float = 0.0
    finished: int = 0
    accepted_hist: dict[int, int] = field(default_factory=dict)

    def copy(self) -> Counters:
        return Counters(
            self.generation_calls,
            self.context_calls,
            self.row_steps,
            self.generated_tokens,
            self.step_seconds,
            self.finished,
            dict(self.accepted_hist),
        )


@dataclass
class Call:
    """One backend call as :meth:`Scheduler._pack` planned it."""

    rows: list[Request]
    ctx: list[bool]  # per row: a context row (prefilling its prompt)
    emits: list[bool]  # per row: the call ends its prompt or is a generation row
    num_draft_steps: int
    num_beams: int
    logprobs: bool  # some row asked for log-probabilities
    inputs: dict[str, torch.Tensor]


#: The outputs the scheduler reads to the host, with the log-probabilities where asked.
HOST_OUTPUTS = (C.NUM_OUTPUT_TOKENS, C.OUTPUT_TOKENS)
LOGPROB_OUTPUTS = (C.OUTPUT_LOGPROBS, C.TOP_LOGPROB_TOKENS, C.TOP_LOGPROBS)


def read_outputs(out: dict[str, torch.Tensor], logprobs: bool) -> dict[str, list]:
    """The outputs a call's rows need on the host, as lists (the carried tree stays with the
    backend)."""
    names = HOST_OUTPUTS + (LOGPROB_OUTPUTS if logprobs else ())
    return {n: out[n].cpu().tolist() for n in names}


def full_or_plain(rows: Sequence[Request], shape: C.StepShape) -> int:
    """Default draft policy: the engine's draft length if every row asked for speculation."""
    return shape.draft_len if rows and all(r.params.speculative for r in rows) else 0


class Scheduler:
    """Owns a backend's KV slots and drives its step contract with in-flight batching.

    Args:
        backend: a step-contract backend (:class:`~redrafter_trt.contract.Backend`).
        tokenizer: for text deltas and stop strings (None: token ids only).
        eos_token_ids: default stop tokens.
        max_queue: requests waiting beyond the free slots at most (None = unbounded);
            :meth:`submit` raises :class:`QueueFull` beyond it.
        max_slots, tokens_per_slot: reserve the KV cache now for this many concurrent rows of
            this many tokens (prompt + output); None = reserve on demand while idle
            (:meth:`ensure_capacity`).
        draft_policy: ``(rows, shape) -> num_draft_steps`` for each call.
        max_prefill_tokens: without ``prefill_chunk``: padded prompt tokens admitted per iteration
            at most (>= 1 whole prompt).
        prefill_chunk: chunked prefill: prompt tokens prefilled per iteration at most (summed over
            its context rows, padding included); longer prompts are prefilled in chunks over
            successive iterations while the running rows keep decoding. None = whole prompts.
            Needs a backend with ``chunked_context`` (context rows continuing a cache).
    """

    def __init__(
        self,
        backend: C.Backend,
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        max_queue: int | None = None,
        max_slots: int | None = None,
        tokens_per_slot: int | None = None,
        draft_policy: Callable[[Sequence[Request], C.StepShape], int] = full_or_plain,
        max_prefill_tokens: int | None = None,
        prefill_chunk: int | None = None,
        step_listener: Callable[[StepReport], None] | None = None,
    ):
        self.backend: C.Backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_queue = max_queue
        self.draft_policy = draft_policy
        # adaptive speculation (runtime/adaptive.py): ``choose(batch) -> (beams, depth)`` and
        # ``observe(beams, depth, accepted)``; consulted for calls the draft policy lets speculate
        self.policy = None
        self.step_listener = step_listener
        self.shape: C.StepShape = backend.shape
        self.mixed = bool(backend.mixed_request_types)
        self.max_prefill_tokens = max_prefill_tokens or max(backend.max_input_len, 1)
        if prefill_chunk is not None:
            require(
                isinstance(prefill_chunk, int)
                and not isinstance(prefill_chunk, bool)
                and prefill_chunk >= 1,
                f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}",
            )
            require(
                bool(backend.chunked_context),
                f"prefill_chunk {prefill_chunk}: the {backend.name} "
                "backend cannot continue a prompt's cache in a context row (no chunked_context); "
                "run without chunked prefill",
            )
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._live: dict[int, Request] = {}  # slot -> request
        self._free: list[int] = []
        self._slots = 0
        self._tokens_per_slot = 0
        self._next_id = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop_loop = False
        self.counters = Counters()
        if max_slots is not None or tokens_per_slot is not None:
            self._reserve(
                max_slots or backend.max_batch_size, tokens_per_slot or backend.max_seq_len
            )
        self._fixed = max_slots is not None or tokens_per_slot is not None

    # ------------------------------------------------------------------ capacity
    @property
    def num_slots(self) -> int:
        return self._slots

    @property
    def tokens_per_slot(self) -> int:
        return self._tokens_per_slot

    def _reserve(self, slots: int, tokens: int) -> None:
        be = self.backend
        require(
            1 <= slots <= be.max_batch_size,
            f"slots must be in [1, {be.max_batch_size}] (the engine's max_batch_size), got {slots}",
        )
        require(
            1 <= tokens <= be.max_seq_len,
            f"tokens per slot must be in [1, {be.max_seq_len}] (the engine's max_seq_len), got {tokens}",
        )
        be.reserve(slots, tokens)
        self._slots, self._tokens_per_slot = slots, tokens
        self._free = list(range(slots))
        heapq.heapify(self._free)

    def ensure_capacity(self, slots: int, tokens: int) -> None:
        """Grow the KV cache to ``slots`` x ``tokens`` (only while no request is live)."""
        with self._lock:
            if slots <= self._slots and tokens <= self._tokens_per_slot:
                return
            require(
                not self._live and not self._waiting,
                "the KV cache can only grow while no request is queued or running",
            )
            self._reserve(max(slots, self._slots), max(tokens, self._tokens_per_slot))

    # ------------------------------------------------------------------ requests
    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        """Validate a token-id prompt against the engine; returns it as a list of ints."""
        be = self.backend
        ids = list(prompt)
        require(len(ids) > 0, "empty prompt: every prompt needs at least one token")
        require(
            all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids),
            f"token-id prompt must be a list of integers, got {prompt!r:.80}",
        )
        v = be.vocab_size
        bad = [int(t) for t in ids if not 0 <= int(t) < v]
        require(not bad, f"prompt has token ids outside [0, {v}): {bad[:5]}")
        require(
            len(ids) <= be.max_input_len,
            f"prompt has {len(ids)} tokens, more than the engine's max_input_len {be.max_input_len}",
        )
        limit = self._tokens_per_slot if self._fixed else be.max_seq_len
        require(
            len(ids) < limit,
            f"prompt has {len(ids)} tokens, leaving no room under the {limit} tokens a slot holds",
        )
        return [int(t) for t in ids]

    def max_new_for(self, prompt_len: int, requested: int) -> int:
        limit = self._tokens_per_slot if self._fixed else self.backend.max_seq_len
        return min(requested, limit - prompt_len)

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        index: int = 0,
        on_event: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request; it joins the batch at the next iteration with a free slot.

        Raises :class:`QueueFull` when ``max_queue`` requests wait already,
        :class:`SchedulerClosed` after :meth:`shutdown`, RedrafterError on bad input."""
        params.validate()
        require(
            params.logprobs is None or getattr(self.backend, "logprobs", False),
            f"logprobs: the {getattr(self.backend, 'name', '?')} backend does not return "
            "log-probabilities (the torch backend does)",
        )
        ids = self.check_prompt(prompt)
        stop = tuple(s for s in params.stop if s)
        require(not stop or self.tokenizer is not None, "stop strings need a tokenizer")
        stop_ids = (
            set()
            if params.ignore_eos
            else set(self.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        )
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the server is shutting down and accepts no new requests")
            # requests that a free slot takes at the next iteration do not count as queued
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + len(
                self._free
            ):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            req = Request(
                self._next_id,
                ids,
                params,
                self.max_new_for(len(ids), params.max_new_tokens),
                stop_ids,
                index,
                on_event,
            )
            self._next_id += 1
            if self.tokenizer is not None:
                req.detok = IncrementalDetokenizer(self.tokenizer)
            self._waiting.append(req)
            self._lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Cancel ``req``: its slot is freed before the next backend call."""
        with self._lock:
            req.cancel_requested = True
            self._lock.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def live_rows(self) -> int:
        return len(self._live)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._live

    # ------------------------------------------------------------------ output
    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def final_text(self, req: Request) -> str | None:
        """Decoded output; on a stop string, cut right after its first occurrence."""
        text = self.decode(req.tokens)
        if text is not None and req.finish_reason == "stop":
            ends = [text.find(s) + len(s) for s in req.params.stop if s and s in text]
            text = text[: min(ends)] if ends else text
        return text

    def _append(self, req: Request, new: list[int]) -> list[int]:
        """Append a call's tokens up to the request's stopping point; returns what was added."""
        stop = [s for s in req.params.stop if s]
        added = []
        for tok in new:
            added.append(tok)
            req.tokens.append(tok)
            if tok in req.stop_ids:
                req.finish_reason = "eos"
            elif stop and any(s in (self.decode(req.tokens) or "") for s in stop):
                req.finish_reason = "stop"
            elif len(req.tokens) >= req.max_new:
                req.finish_reason = "length"
            if req.finish_reason:
                break
        req.accepted.append(len(added))
        return added

    def _finish(
        self,
        req: Request,
        reason: str | None,
        events: list[Event],
        added: Sequence[int] = (),
        error: str | None = None,
    ) -> None:
        """Close ``req`` (reason set already when None), free its slot, emit its last event."""
        if reason is not None:
            req.finish_reason = reason
        req.error = error
        req.text = self.final_text(req) if req.finish_reason != "error" else self.decode(req.tokens)
        text = None
        if req.detok is not None:
            text = req.detok.finish(added, req.text)
        if req.slot is not None:
            self._live.pop(req.slot, None)
            heapq.heappush(self._free, req.slot)
            req.slot = None
        req.generating = False
        req.t_done = time.perf_counter()
        self.counters.finished += 1
        events.append(Event(req, list(added), text, True, req.finish_reason))

    def _reap_cancelled(self, events: list[Event]) -> None:
        for q in [r for r in self._waiting if r.cancel_requested]:
            self._waiting.remove(q)
            self._finish(q, "cancelled", events)
        for r in [r for r in self._live.values() if r.cancel_requested]:
            self._finish(r, "cancelled", events)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> list[Event]:
        """Admit waiting requests, run one step for every live row; returns the events (also
        handed to each request's ``on_event``)."""
        events: list[Event] = []
        with self._lock:
            self._reap_cancelled(events)
            chunks = self._plan_prefill()
        t0 = time.perf_counter()
        ctx_rows = list(chunks)
        gen_rows = [r for r in self._live.values() if r.generating]
        ctx_calls, calls, accepted, d_used = 0, 0, list[int](), 0
        if ctx_rows or gen_rows:
            t_ctx = max(chunks.values(), default=0)
            n = self.shape.tree_size
            cap = self._slots and (self._tokens_per_slot + n)
            # one call when the generation rows need no padding for it (a wider call pads every
            # generation row to the chunk: the torch backend computes padding, so two calls are cheaper)
            mix = (
                self.mixed
                and ctx_rows
                and gen_rows
                and t_ctx <= n
                and max(r.cache_length for r in gen_rows) + max(t_ctx, n) <= cap
                and max(r.prefilled for r in ctx_rows) + max(t_ctx, n) <= cap
            )
            if mix:
                d_used = self._call(ctx_rows + gen_rows, chunks, events, accepted)
                ctx_calls = calls = 1
            else:
                if ctx_rows:
                    d_used = self._call(ctx_rows, chunks, events, accepted)
                    ctx_calls = calls = 1
                if gen_rows:
                    d_used = self._call(gen_rows, chunks, events, accepted)
                    calls += 1
        dt = time.perf_counter() - t0
        c = self.counters
        c.context_calls += ctx_calls
        if gen_rows:
            c.generation_calls += 1
        c.step_seconds += dt
        for n_acc in accepted:
            c.accepted_hist[n_acc] = c.accepted_hist.get(n_acc, 0) + 1
        for ev in events:
            if ev.finished:
                ev.request.done.set()
            if ev.request.on_event is not None:
                ev.request.on_event(ev)
        if self.step_listener is not None and (ctx_rows or gen_rows):
            self.step_listener(
                StepReport(
                    len(ctx_rows),
                    len(gen_rows),
                    calls,
                    dt,
                    sum(len(e.token_ids) for e in events),
                    accepted,
                    d_used,
                    len(self._waiting),
                    len(self._live),
                    sum(chunks.values()),
                )
            )
        return events

    def _plan_prefill(self) -> dict[Request, int]:
        """This iteration's context rows: ``{request: prompt tokens to prefill}``.

        Requests part-way through a chunked prefill come first (oldest first), then waiting
        requests move into free slots (FIFO). Without chunking every prompt is taken whole, while
        the padded total stays within ``max_prefill_tokens`` (the first always fits). With
        ``prefill_chunk`` the padded total stays within it: a row takes what is left of its prompt
        up to the budget, or a smaller chunk that fits beside the rows taken already."""
        chunking = self.prefill_chunk is not None
        budget = self.prefill_chunk if chunking else self.max_prefill_tokens
        cap = self._tokens_per_slot + self.shape.tree_size
        plan: dict[Request, int] = {}
        width = 0  # padded tokens per context row so far

        def fits(r: Request) -> int:
            """Tokens ``r`` takes beside ``plan`` (0: it waits)."""
            left = len(r.prompt) - r.prefilled
            k = len(plan) + 1
            c = min(left, budget) if chunking else left
            if plan and max(width, c) * k > budget:
                c = min(left, budget // k) if chunking else 0
                if c < 1 or max(width, c) * k > budget:
                    return 0
            if plan and max([q.prefilled for q in plan] + [r.prefilled]) + max(width, c) > cap:
                return 0  # padding would run past a slot's cache
            return c

        for r in sorted((q for q in self._live.values() if q.prefilling), key=lambda q: q.id):
            c = fits(r)
            if not c:
                return plan
            plan[r] = c
            width = max(width, c)
        if not self._slots and self._waiting:
            # On-demand reservation for the first request(s) of an idle scheduler.
            need = max(len(r.prompt) + r.max_new for r in self._waiting)
            self._reserve(min(len(self._waiting), self.backend.max_batch_size), need)
            cap = self._tokens_per_slot + self.shape.tree_size
        while self._waiting and self._free:
            r = self._waiting[0]
            if len(r.prompt) + r.max_new > self._tokens_per_slot:
                if self._live or plan or self._fixed:
                    break  # waits until the batch drains, then the cache grows
                self._reserve(self._slots, len(r.prompt) + r.max_new)
                cap = self._tokens_per_slot + self.shape.tree_size
            c = fits(r)
            if not c:
                break
            self._waiting.popleft()
            r.slot = heapq.heappop(self._free)
            self._live[r.slot] = r
            plan[r] = c
            width = max(width, c)
        return plan

    def _call(
        self,
        rows: list[Request],
        chunks: dict[Request, int],
        events: list[Event],
        accepted_out: list[int],
    ) -> int:
        """One backend call over ``rows``: its inputs, the step, its outputs applied to the rows.
        Returns the call's draft steps."""
        call = self._pack(rows, chunks)
        try:
            out = self.backend.step(call.inputs)
        except Exception as e:  # noqa: BLE001 - a failed call fails its rows, not the server
            with self._lock:
                for r in rows:
                    self._finish(r, "error", events, error=f"{type(e).__name__}: {e}")
            return call.num_draft_steps
        self._apply(call, chunks, read_outputs(out, call.logprobs), events, accepted_out)
        return call.num_draft_steps

    def _pack(self, rows: list[Request], chunks: dict[Request, int]) -> Call:
        """The inputs of one call (shapes and dtypes from the contract's table): context rows
        prefill their next ``chunks[r]`` prompt tokens after the ``r.prefilled`` ones in their
        slot; generation rows pass their slot alone, the backend holds their trees
        (``FROM_SLOTS``)."""
        shape = self.shape
        ctx = [not r.generating for r in rows]
        t = max((chunks[r] for r, c in zip(rows, ctx) if c), default=0)
        sizes = C.dim_sizes(len(rows), t, shape)
        ids, lens, clen, uni = (
            C.SPECS[n].new(sizes)
            for n in (C.INPUT_IDS, C.INPUT_LENGTHS, C.CACHE_LENGTHS, C.UNIFORMS)
        )
        positions, uniforms = np.arange(shape.beam_len), uni.numpy()
        for j, (r, c) in enumerate(zip(rows, ctx)):
            if c:
                seg = r.prompt[r.prefilled : r.prefilled + chunks[r]]
                ids[j, : len(seg)] = C.input_tensor(C.INPUT_IDS, seg)
                lens[j] = len(seg)
                clen[j] = r.prefilled
            start = len(r.prompt) + len(r.tokens)
            uniforms[j] = position_uniforms(r.params.seed, r.params.stream, start + positions)
        # rows whose prompt is done after this call (mid-prompt chunks emit nothing)
        emits = [not c or r.prefilled + chunks[r] == len(r.prompt) for r, c in zip(rows, ctx)]
        d = int(self.draft_policy(rows, shape)) if any(emits) else 0
        beams = shape.num_beams
        if d > 0 and self.policy is not None:
            beams, d = (int(x) for x in self.policy.choose(len(rows)))
        inputs = {
            C.REQUEST_TYPES: C.input_tensor(
                C.REQUEST_TYPES, [C.CONTEXT if c else C.GENERATION for c in ctx]
            ),
            C.SLOT_IDS: C.input_tensor(C.SLOT_IDS, [r.slot for r in rows]),
            C.CACHE_LENGTHS: clen,
            C.INPUT_IDS: ids,
            C.INPUT_LENGTHS: lens,
            C.TEMPERATURE: C.input_tensor(C.TEMPERATURE, [r.params.temperature for r in rows]),
            C.TOP_K: C.input_tensor(C.TOP_K, [r.params.top_k for r in rows]),
            C.TOP_P: C.input_tensor(C.TOP_P, [r.params.top_p for r in rows]),
            C.UNIFORMS: uni,
            C.NUM_DRAFT_STEPS: C.input_tensor(C.NUM_DRAFT_STEPS, d),
            C.FROM_SLOTS: C.input_tensor(C.FROM_SLOTS, 1),
        }
        if self.policy is not None:
            inputs[C.NUM_DRAFT_BEAMS] = C.input_tensor(C.NUM_DRAFT_BEAMS, beams if d > 0 else 1)
        top = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        if top:
            inputs[C.NUM_TOP_LOGPROBS] = C.input_tensor(C.NUM_TOP_LOGPROBS, max(top))
        return Call(rows, ctx, emits, d, beams, bool(top), inputs)

    def _apply(
        self,
        call: Call,
        chunks: dict[Request, int],
        out: dict[str, list],
        events: list[Event],
        accepted_out: list[int],
    ) -> None:
        """A call's outputs (read to the host) applied to its rows: tokens appended, rows that
        stop finished, events for the rest."""
        counts, emitted = out[C.NUM_OUTPUT_TOKENS], out[C.OUTPUT_TOKENS]
        beams, d = call.num_beams, call.num_draft_steps
        now = time.perf_counter()
        with self._lock:
            for j, (r, c) in enumerate(zip(call.rows, call.ctx)):
                if c:
                    r.prefilled += chunks[r]
                    if not call.emits[j]:  # a mid-prompt chunk: its token is not the request's
                        if r.cancel_requested:
                            self._finish(r, "cancelled", events)
                        continue
                added = self._append(r, emitted[j][: counts[j]])
                if r.params.logprobs is not None:
                    n_top = r.params.logprobs
                    r.logprobs.extend(out[C.OUTPUT_LOGPROBS][j][: len(added)])
                    ids, lps = out[C.TOP_LOGPROB_TOKENS][j], out[C.TOP_LOGPROBS][j]
                    r.top_logprobs.extend(
                        list(zip(ids[i][:n_top], lps[i][:n_top])) for i in range(len(added))
                    )
                if c:
                    r.t_first = now
                else:
                    self.counters.row_steps += 1
                    self.counters.generated_tokens += len(added)
                    accepted_out.append(counts[j] - 1)
                    if self.policy is not None and r.drafted is not None:
                        self.policy.observe(*r.drafted, [counts[j] - 1])
                r.drafted = (beams, d) if d > 0 else None
                if r.finish_reason is not None or r.cancel_requested:
                    self._finish(r, None if r.finish_reason else "cancelled", events, added)
                    continue
                r.generating = True
                text = r.detok.push(added) if r.detok is not None else None
                events.append(Event(r, added, text, False, None))

    # ------------------------------------------------------------------ background loop
    def start(self) -> None:
        """Run :meth:`step` in a background thread whenever there is work."""
        require(self._thread is None, "the scheduler loop is already running")
        self._stop_loop = False
        self._thread = threading.Thread(target=self._loop, name="redrafter-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop_loop and not self._waiting and not self._live:
                    self._lock.wait(0.5)
                if self._stop_loop and not self._waiting and not self._live:
                    return
            self.step()

    def shutdown(self, cancel_running: bool = False, timeout: float | None = None) -> None:
        """Stop accepting requests; finish (or cancel) what is queued and running; stop the loop.

        After ``timeout`` seconds of finishing, whatever still runs is cancelled."""
        with self._lock:
            self._closed = True
            if cancel_running:
                for r in list(self._waiting) + list(self._live.values()):
                    r.cancel_requested = True
            self._stop_loop = True
            self._lock.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                for r in list(self._waiting) + list(self._live.values()):
                    r.cancel_requested = True
                self._lock.notify_all()
            self._thread.join()
        self._thread = None

    # ------------------------------------------------------------------ state for callers
    @property
    def running(self) -> bool:
        """True while the background loop of :meth:`start` runs (until :meth:`shutdown`)."""
        return self._thread is not None

    @property
    def free_slots(self) -> int:
        """KV slots that no request holds."""
        with self._lock:
            return len(self._free)
