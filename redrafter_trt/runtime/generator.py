"""The runtime: prompts driven through any backend's step contract by the in-flight
:class:`~redrafter_trt.runtime.scheduler.Scheduler` (rows join and leave at any step).

Written only against :mod:`redrafter_trt.contract`: a backend is a
:class:`~redrafter_trt.contract.Backend` (``shape``, ``vocab_size``, the limits, ``reserve(slots,
tokens)``, ``step(inputs)``, ``timings``). Plain decoding runs through the same loop with
``num_draft_steps = 0``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import contract as C
from ..errors import RedrafterError, require
from .scheduler import SamplingParams, Scheduler


@dataclass
class GenerationResult:
    """One prompt's output. ``token_ids`` exclude the prompt; ``accepted_per_step[i]`` counts
    the tokens step i added to the row (1 + accepted draft tokens, fewer where the row stopped
    inside the step); step 0 is the prompt's own call, which adds the first token. So
    ``sum(accepted_per_step) == len(token_ids)``."""

    token_ids: list[int]
    text: str | None
    accepted_per_step: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_token_ids: list[int]


@dataclass
class StreamEvent:
    """Tokens one step added to prompt ``index`` (``finished`` on the row's last event).

    ``text`` is the text those tokens complete (``None`` without a tokenizer): a multi-byte
    character split over steps arrives whole in the event that completes it, and the events'
    texts of one row concatenate to its ``GenerationResult.text``."""

    index: int
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    text: str | None = None


@dataclass
class GenerationStats:
    num_steps: int = 0  # backend calls after the prompts' calls (speculative or plain steps)
    num_prompts: int = 0
    generated_tokens: int = 0  # tokens added by those steps (the prompts' first tokens excluded)
    row_steps: int = 0  # sum over rows of the steps they took part in
    wall_s: float = 0.0
    step_timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> float:
        return self.generated_tokens / self.row_steps if self.row_steps else 0.0


class Generator:
    """Generate with a backend; see :meth:`generate` and :meth:`generate_stream`."""

    def __init__(
        self,
        backend: C.Backend,
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        random_drafter: bool = False,
    ):
        self.backend: C.Backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.random_drafter = random_drafter
        self.last_stats = GenerationStats()
        self.last_results: list[GenerationResult] = []
        self._sched: Scheduler | None = None
        self.policy: Any = (
            None  # adaptive speculation (runtime/adaptive.py), handed to the scheduler
        )
        self.policy_note = (
            "adaptive speculation off"  # why policy is (not) set; see runtime.loader.load
        )

    def close(self) -> None:
        """Release the backend (a tensor-parallel backend stops its other ranks); idempotent."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ prompts
    def encode(
        self,
        prompt: str | Sequence[int],
        use_chat_template: bool = False,
        system_prompt: str | None = None,
    ) -> list[int]:
        if isinstance(prompt, str):
            require(
                self.tokenizer is not None,
                "this engine has no tokenizer: pass token ids (--input_ids_file) instead of text",
            )
            require(prompt != "", "empty prompt: every prompt needs at least one token")
            if use_chat_template:
                require(
                    getattr(self.tokenizer, "chat_template", None) is not None,
                    "--use_chat_template: the tokenizer has no chat template",
                )
                msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                    {"role": "user", "content": prompt}
                ]
                ids = self.tokenizer.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids = list(ids)
        else:
            ids = list(prompt)
            require(
                all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids),
                f"token-id prompt must be a list of integers, got {prompt!r:.80}",
            )
        v = self.backend.vocab_size
        require(len(ids) > 0, "empty prompt: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= int(t) < v]
        require(not bad, f"prompt has token ids outside [0, {v}): {bad[:5]}")
        return [int(t) for t in ids]

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ API
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        speculative: bool = True,
        use_chat_template: bool = False,
        stop: Sequence[str] = (),
        eos_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt; returns one :class:`GenerationResult` per prompt."""
        for _ in self._run(
            prompts,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            speculative,
            use_chat_template,
            stop,
            eos_token_ids,
            ignore_eos,
        ):
            pass
        return self.last_results

    def generate_stream(
        self, prompts: Sequence[str | Sequence[int]], **kwargs
    ) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, yielding each row's new tokens as every step completes; once
        exhausted, ``last_results`` holds what :meth:`generate` would have returned."""
        args = dict(_GENERATE_DEFAULTS)  # generate's own defaults, in its order
        unknown = set(kwargs) - set(args)
        require(not unknown, f"unknown generate_stream arguments {sorted(unknown)}")
        args.update(kwargs)
        yield from self._run(prompts, *args.values())

    # ------------------------------------------------------------------ loop
    def _scheduler(self) -> Scheduler:
        if self._sched is None or self._sched.backend is not self.backend:
            self._sched = Scheduler(self.backend, self.tokenizer, self.eos_token_ids)
        self._sched.tokenizer = self.tokenizer
        self._sched.policy = self.policy
        self._sched.eos_token_ids = list(self.eos_token_ids)
        return self._sched

    def _run(
        self,
        prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        speculative,
        use_chat_template,
        stop,
        eos_token_ids,
        ignore_eos,
    ):
        """Every prompt is a request of one in-flight :class:`Scheduler`: prompt ``i`` is keyed
        ``(seed, stream=i)`` and joins as soon as a slot is free."""
        be = self.backend
        require(
            isinstance(prompts, (list, tuple)) and len(prompts) > 0,
            "prompts must be a non-empty list of strings or token-id lists",
        )
        stop = tuple(s for s in stop if s)
        require(not stop or self.tokenizer is not None, "stop strings need a tokenizer")
        base = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=None if eos_token_ids is None else tuple(eos_token_ids),
            ignore_eos=ignore_eos,
            speculative=speculative,
        )
        base.validate()
        encoded = [self.encode(p, use_chat_template) for p in prompts]
        for i, ids in enumerate(encoded):
            require(
                len(ids) <= be.max_input_len,
                f"prompt {i} has {len(ids)} tokens, more than the engine's max_input_len "
                f"{be.max_input_len} (rebuild with a larger --max_input_len)",
            )
            require(
                len(ids) < be.max_seq_len,
                f"prompt {i} has {len(ids)} tokens, leaving no room under max_seq_len {be.max_seq_len}",
            )
        sched = self._scheduler()
        require(sched.idle(), "this Generator is already generating (one generate() at a time)")
        stats = GenerationStats(num_prompts=len(encoded))
        self.last_stats = stats
        timings_before = dict(be.timings)
        t_start = time.perf_counter()
        sched.ensure_capacity(
            min(len(encoded), be.max_batch_size),
            max(len(ids) + min(max_new_tokens, be.max_seq_len - len(ids)) for ids in encoded),
        )
        before = sched.counters.copy()
        reqs = [
            sched.submit(ids, replace(base, stream=i), index=i) for i, ids in enumerate(encoded)
        ]
        try:
            while not all(r.finished for r in reqs):
                for ev in sched.step():
                    r = ev.request
                    yield StreamEvent(r.index, ev.token_ids, ev.finished, ev.finish_reason, ev.text)
        finally:
            for r in reqs:  # the consumer stopped early: free every slot now
                if not r.finished:
                    sched.cancel(r)
            while not all(r.finished for r in reqs):
                sched.step()
        failed = [r for r in reqs if r.finish_reason == "error"]
        if failed:
            raise RedrafterError(
                f"prompt {failed[0].index}: the backend step failed: {failed[0].error}"
            )
        after = sched.counters
        stats.num_steps = after.generation_calls - before.generation_calls
        stats.row_steps = after.row_steps - before.row_steps
        stats.generated_tokens = after.generated_tokens - before.generated_tokens
        stats.wall_s = time.perf_counter() - t_start
        self.last_results = [
            GenerationResult(r.tokens, r.text, r.accepted, r.finish_reason or "length", r.prompt)
            for r in reqs
        ]
        stats.step_timings = {k: v - timings_before.get(k, 0.0) for k, v in be.timings.items()}


#: ``Generator.generate``'s keyword defaults (all but ``prompts``), which ``generate_stream`` shares
_GENERATE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(Generator.generate).parameters.items()
    if name not in ("self", "prompts")
}
