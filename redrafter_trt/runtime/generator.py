"""The runtime: batches of prompts driven through any backend's step contract.

Written only against :mod:`redrafter_trt.contract`; a backend provides ``shape``, ``vocab_size``,
``max_batch_size``, ``max_input_len``, ``max_seq_len``, ``reserve(slots, tokens)`` and
``step(inputs)``. Plain decoding runs through the same loop with ``num_draft_steps = 0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .. import contract as C
from ..errors import RedrafterError, require
from ..ops.sampling import position_uniforms
from .adaptive import NUM_DRAFT_BEAMS
from .detokenize import IncrementalDetokenizer


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
    num_steps: int = 0        # backend calls after the prompts' calls (speculative or plain steps)
    num_prompts: int = 0
    generated_tokens: int = 0  # tokens added by those steps (the prompts' first tokens excluded)
    row_steps: int = 0        # sum over rows of the steps they took part in
    wall_s: float = 0.0
    step_timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> float:
        return self.generated_tokens / self.row_steps if self.row_steps else 0.0


class _Row:
    def __init__(self, index: int, prompt: list[int], max_new: int, stop_ids: set[int]):
        self.index = index
        self.prompt = prompt
        self.max_new = max_new
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.accepted: list[int] = []
        self.finish_reason: str | None = None
        self.detok: IncrementalDetokenizer | None = None


class Generator:
    """Generate with a backend; see :meth:`generate` and :meth:`generate_stream`."""

    def __init__(self, backend: Any, tokenizer: Any = None, eos_token_ids: Sequence[int] = (),
                 random_drafter: bool = False):
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.random_drafter = random_drafter
        self.policy = None  # adaptive speculation (runtime/adaptive.py): choose(b) / observe(...)
        self.last_stats = GenerationStats()
        self.last_results: list[GenerationResult] = []

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str | Sequence[int], use_chat_template: bool = False,
               system_prompt: str | None = None) -> list[int]:
        if isinstance(prompt, str):
            require(self.tokenizer is not None,
                    "this engine has no tokenizer: pass token ids (--input_ids_file) instead of text")
            require(prompt != "", "empty prompt: every prompt needs at least one token")
            if use_chat_template:
                require(getattr(self.tokenizer, "chat_template", None) is not None,
                        "--use_chat_template: the tokenizer has no chat template")
                msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                    {"role": "user", "content": prompt}]
                ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                         tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids = list(ids)
        else:
            ids = list(prompt)
            require(all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids),
                    f"token-id prompt must be a list of integers, got {prompt!r:.80}")
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
    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 speculative: bool = True, use_chat_template: bool = False,
                 stop: Sequence[str] = (), eos_token_ids: Sequence[int] | None = None,
                 ignore_eos: bool = False) -> list[GenerationResult]:
        """Generate for every prompt; returns one :class:`GenerationResult` per prompt."""
        for _ in self._run(prompts, max_new_tokens, temperature, top_k, top_p, seed, speculative,
                           use_chat_template, stop, eos_token_ids, ignore_eos):
            pass
        return self.last_results

    def _text(self, row: _Row, stop: Sequence[str]) -> str | None:
        """Decoded output; on a stop string, cut right after its first occurrence."""
        text = self.decode(row.tokens)
        if text is not None and row.finish_reason == "stop":
            ends = [text.find(s) + len(s) for s in stop if s and s in text]
            text = text[:min(ends)] if ends else text
        return text

    def generate_stream(self, prompts: Sequence[str | Sequence[int]], **kwargs) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, yielding each row's new tokens as every step completes; once
        exhausted, ``last_results`` holds what :meth:`generate` would have returned."""
        args = dict(max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                    speculative=True, use_chat_template=False, stop=(), eos_token_ids=None,
                    ignore_eos=False)
        unknown = set(kwargs) - set(args)
        require(not unknown, f"unknown generate_stream arguments {sorted(unknown)}")
        args.update(kwargs)
        yield from self._run(prompts, *args.values())

    # ------------------------------------------------------------------ loop
    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, speculative,
             use_chat_template, stop, eos_token_ids, ignore_eos):
        be = self.backend
        require(isinstance(prompts, (list, tuple)) and len(prompts) > 0,
                "prompts must be a non-empty list of strings or token-id lists")
        require(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
                f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
        require(isinstance(top_k, int) and top_k >= 0, f"top_k must be >= 0, got {top_k}")
        require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
        stop_ids = set() if ignore_eos else set(self.eos_token_ids if eos_token_ids is None else eos_token_ids)
        stop = [s for s in stop if s]
        require(not stop or self.tokenizer is not None, "stop strings need a tokenizer")
        encoded = [self.encode(p, use_chat_template) for p in prompts]
        for i, ids in enumerate(encoded):
            require(len(ids) <= be.max_input_len,
                    f"prompt {i} has {len(ids)} tokens, more than the engine's max_input_len "
                    f"{be.max_input_len} (rebuild with a larger --max_input_len)")
            require(len(ids) < be.max_seq_len,
                    f"prompt {i} has {len(ids)} tokens, leaving no room under max_seq_len {be.max_seq_len}")
        rows: dict[int, _Row] = {}
        stats = GenerationStats(num_prompts=len(encoded))
        self.last_stats = stats
        timings_before = dict(getattr(be, "timings", {}))
        t_start = time.perf_counter()
        for lo in range(0, len(encoded), be.max_batch_size):
            chunk = [_Row(lo + j, ids, min(max_new_tokens, be.max_seq_len - len(ids)), stop_ids)
                     for j, ids in enumerate(encoded[lo:lo + be.max_batch_size])]
            for r in chunk:
                rows[r.index] = r
            yield from self._run_chunk(chunk, temperature, top_k, top_p, seed, speculative, stop, stats)
        stats.wall_s = time.perf_counter() - t_start
        self.last_results = [GenerationResult(r.tokens, self._text(r, stop), r.accepted,
                                              r.finish_reason or "length", r.prompt)
                             for _, r in sorted(rows.items())]
        stats.step_timings = {k: v - timings_before.get(k, 0.0) for k, v in getattr(be, "timings", {}).items()}

    def _emit(self, row: _Row, new: list[int], stop: Sequence[str]) -> list[int]:
        """Append a step's tokens to ``row`` up to its stopping point; returns what was added."""
        added = []
        for tok in new:
            added.append(tok)
            row.tokens.append(tok)
            if tok in row.stop_ids:
                row.finish_reason = "eos"
            elif stop and any(s in (self.decode(row.tokens) or "") for s in stop):
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_new:
                row.finish_reason = "length"
            if row.finish_reason:
                break
        row.accepted.append(len(added))
        return added

    def _run_chunk(self, chunk: list[_Row], temperature, top_k, top_p, seed, speculative, stop,
                   stats: GenerationStats):
        be = self.backend
        shape: C.StepShape = be.shape
        w, l, n = shape.num_beams, shape.beam_len, shape.tree_size
        b = len(chunk)
        be.reserve(b, max(len(r.prompt) + r.max_new for r in chunk))
        draft_steps = torch.tensor(shape.draft_len if speculative else 0, dtype=torch.int32)
        i32 = dict(dtype=torch.int32)
        temp_all = torch.full((b,), float(temperature), dtype=torch.float32)
        topk_all = torch.full((b,), int(top_k), **i32)
        topp_all = torch.full((b,), float(top_p), dtype=torch.float32)
        request_ids = np.array([r.index for r in chunk])

        def uniforms(idx: np.ndarray, start: np.ndarray) -> torch.Tensor:
            pos = start[:, None] + np.arange(l)[None, :]
            return torch.from_numpy(position_uniforms(seed, request_ids[idx][:, None], pos))

        # Context call: every row's prompt.
        t = max(len(r.prompt) for r in chunk)
        ids = torch.zeros((b, t), **i32)
        for j, r in enumerate(chunk):
            ids[j, :len(r.prompt)] = torch.tensor(r.prompt, **i32)
        lens = np.array([len(r.prompt) for r in chunk])
        inputs = {
            C.REQUEST_TYPES: torch.full((b,), C.CONTEXT, **i32),
            C.SLOT_IDS: torch.arange(b, **i32),
            C.CACHE_LENGTHS: torch.zeros(b, **i32),
            C.INPUT_IDS: ids,
            C.INPUT_LENGTHS: torch.from_numpy(lens).to(torch.int32),
            C.POSITION_OFFSETS: torch.zeros((b, t), **i32),
            C.PACKED_MASK: torch.zeros((b, t, (t + 31) // 32), **i32),
            C.DRAFT_TOKENS: torch.full((b, w, l), -1, **i32),
            C.DRAFT_INDICES: torch.zeros((b, w, l), **i32),
            C.TEMPERATURE: temp_all, C.TOP_K: topk_all, C.TOP_P: topp_all,
            C.UNIFORMS: uniforms(np.arange(b), lens),
            C.NUM_DRAFT_STEPS: draft_steps,
        }
        policy = self.policy if speculative else None
        if policy is not None:  # the policy picks the next tree's beams and depth, every step
            drafted = policy.choose(b)
            inputs.update({C.NUM_DRAFT_STEPS: torch.tensor(drafted[1], **i32), NUM_DRAFT_BEAMS: torch.tensor(drafted[0], **i32)})
        out = be.step(inputs)
        carried = {dst: out[src].cpu() for src, dst in C.CARRIED.items()}
        active = np.arange(b)
        if self.tokenizer is not None:
            for r in chunk:
                r.detok = IncrementalDetokenizer(self.tokenizer)
        first = True
        while True:
            counts = out[C.NUM_OUTPUT_TOKENS].cpu().tolist()
            if policy is not None and not first:
                policy.observe(*verified, [c - 1 for c in counts])  # the tree this step verified
            emitted = out[C.OUTPUT_TOKENS].cpu().tolist()
            still = []
            for k, j in enumerate(active):
                r = chunk[j]
                added = self._emit(r, emitted[k][:counts[k]], stop)
                if not first:  # tokens per step counts generation steps, not the prompt's call
                    stats.row_steps += 1
                    stats.generated_tokens += len(added)
                text = None
                if r.detok is not None:
                    text = (r.detok.finish(added, self._text(r, stop)) if r.finish_reason
                            else r.detok.push(added))
                yield StreamEvent(r.index, added, r.finish_reason is not None, r.finish_reason, text)
                if r.finish_reason is None:
                    still.append(k)
            if not first:
                stats.num_steps += 1
            first = False
            if not still:
                return
            keep = torch.tensor(still, dtype=torch.int64)
            active = active[still]
            carried = {k: v[keep] for k, v in carried.items()}
            m = len(active)
            start = np.array([len(chunk[j].prompt) + len(chunk[j].tokens) for j in active])
            inputs = {
                C.REQUEST_TYPES: torch.full((m,), C.GENERATION, **i32),
                C.SLOT_IDS: torch.from_numpy(active).to(torch.int32),
                **carried,
                C.TEMPERATURE: temp_all[keep], C.TOP_K: topk_all[keep], C.TOP_P: topp_all[keep],
                C.UNIFORMS: uniforms(active, start),
                C.NUM_DRAFT_STEPS: draft_steps,
            }
            if policy is not None:
                verified, drafted = drafted, policy.choose(m)
                inputs.update({C.NUM_DRAFT_STEPS: torch.tensor(drafted[1], **i32), NUM_DRAFT_BEAMS: torch.tensor(drafted[0], **i32)})
            out = be.step(inputs)
            carried = {dst: out[src].cpu() for src, dst in C.CARRIED.items()}


def check_backend_limits(backend: Any) -> None:
    for name in ("max_batch_size", "max_input_len", "max_seq_len"):
        v = getattr(backend, name)
        if not (isinstance(v, int) and v >= 1):
            raise RedrafterError(f"engine {name} must be a positive integer, got {v!r}")
