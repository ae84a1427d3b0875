"""The measurement: plain vs speculative decoding (and transformers' ``generate``), interleaved.

For each batch size ``B``, the prompts are cut into batches of ``B`` (cycled to fill the last
batch, so every call really runs ``B`` rows). Every configuration (``B``, beam shape ``W x D``)
runs plain and speculative decoding on those same batches with ``ignore_eos=True``, so both
produce exactly ``max_new_tokens`` tokens per row. Within one repetition every method at that
batch size runs once, in an order that alternates between repetitions (plain/speculative pairs
flip; the transformers baseline moves from first to last, llama.cpp's greedy decoding at batch
size 1 from last to first), so machine drift hits them alike.
Warm-up calls (untimed, first batch only) come before the repetitions.

Speed-up of a repetition = plain wall / speculative wall of that repetition (same prompts,
same lengths); the report gives the median and the spread over repetitions.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import contract as C
from ..errors import RedrafterError, require
from ..memory import cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak
from ..runtime.generator import Generator
from . import metrics as M

PHASES = ("verify", "accept", "draft", "pack")
PLAIN, SPEC, HF, LLAMA = "plain", "speculative", "transformers", "llama.cpp"
#: ``beam_shape`` of the configuration whose speculative runs choose their shape per step
ADAPTIVE = "adaptive"


@dataclass
class BenchSettings:
    """What to measure. ``beam_shapes`` None = the engine's own shape only."""

    batch_sizes: Sequence[int] = (1,)
    beam_shapes: Sequence[tuple[int, int]] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetitions: int = 3
    warmup: int = 1
    hf_baseline: bool = True
    #: also run the engine's shape under the adaptive policy (beam_shape ADAPTIVE), given a cost model
    adaptive: bool = True
    #: compare with llama.cpp on the built-in model's GGUF when it can (bench/llamacpp_baseline.py)
    llama_cpp: bool = True


def parse_beam_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x4,4x4"`` -> ``[(1, 4), (4, 4)]`` (W x D)."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        parts = item.split("x")
        ok = len(parts) == 2 and all(p.isdigit() and int(p) >= 1 for p in parts)
        require(ok, f"--beam_shapes: {item!r} is not WxD with positive integers (e.g. 4x4)")
        w, d = int(parts[0]), int(parts[1])
        require(d + 1 <= 64, f"--beam_shapes {item}: beam length D+1 = {d + 1} exceeds 64")
        shapes.append((w, d))
    require(shapes, "--beam_shapes: no shapes given")
    require(len(set(shapes)) == len(shapes), f"--beam_shapes {text!r}: a shape is repeated")
    return shapes


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def make_batches(prompts: Sequence[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Batches of exactly ``batch_size`` prompts; prompts are reused cyclically to fill the last."""
    n = -(-len(prompts) // batch_size) * batch_size
    seqs = [prompts[i % len(prompts)] for i in range(n)]
    return [seqs[i : i + batch_size] for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------- one timed run
class StepTimer:
    """Wraps ``backend.step``: wall time and the backend's own phase timings per call kind.

    ``context`` calls prefill prompts; ``generation`` calls are the steps tokens per step counts.
    Phase timings come from ``backend.timings`` (verify / accept / draft / pack) when it has them.
    """

    def __init__(self, backend: C.Backend):
        self.backend = backend
        self.inner = backend.step
        self.has_phases = isinstance(backend.timings, dict)
        backend.step = self  # type: ignore[method-assign]  # timed until unwrapped
        self.reset()

    def reset(self) -> None:
        self.calls = {"context": 0, "generation": 0}
        self.wall = {"context": 0.0, "generation": 0.0}
        self.phases: dict[str, defaultdict[str, float]] = {
            "context": defaultdict(float),
            "generation": defaultdict(float),
        }

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind = "context" if bool((inputs[C.REQUEST_TYPES] == C.CONTEXT).all()) else "generation"
        before = dict(self.backend.timings) if self.has_phases else {}
        t0 = time.perf_counter()
        out = self.inner(inputs)
        self.wall[kind] += time.perf_counter() - t0
        self.calls[kind] += 1
        if self.has_phases:
            for k, v in self.backend.timings.items():
                self.phases[kind][k] += v - before.get(k, 0.0)
        return out


@dataclass
class Run:
    """One method over all batches of one configuration, one repetition."""

    wall_s: float
    token_ids: list[list[int]]
    accepted: list[list[int]] = field(default_factory=list)
    generated_tokens: int = 0  # GenerationStats.generated_tokens summed over batches
    row_steps: int = 0  # GenerationStats.row_steps summed over batches
    num_steps: int = 0  # generation calls (backend steps after the prompts' calls)
    calls: dict[str, int] = field(default_factory=dict)
    step_wall: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # generation calls only
    cuda_peak_bytes: int | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generator(
    gen: Generator,
    timer: StepTimer | None,
    batches: Sequence[Sequence[list[int]]],
    settings: BenchSettings,
    speculative: bool,
) -> Run:
    """Generate every batch (one ``generate`` call each) and time the calls."""
    device = gen.backend.device
    reset_cuda_peak(device)
    if timer is not None:
        timer.reset()
    run = Run(wall_s=0.0, token_ids=[])
    for batch in batches:
        _sync(device)
        t0 = time.perf_counter()
        results = gen.generate(
            list(batch),
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
            speculative=speculative,
            ignore_eos=True,
        )
        _sync(device)
        run.wall_s += time.perf_counter() - t0
        stats = gen.last_stats
        run.generated_tokens += stats.generated_tokens
        run.row_steps += stats.row_steps
        run.num_steps += stats.num_steps
        run.token_ids += [r.token_ids for r in results]
        run.accepted += [r.accepted_per_step for r in results]
    if timer is not None:
        run.calls = dict(timer.calls)
        run.step_wall = dict(timer.wall)
        run.phases = dict(timer.phases["generation"]) if timer.has_phases else {}
    run.cuda_peak_bytes = cuda_peak_bytes(device)
    # The reported tokens per step is derived from the results; it must be the runtime's own.
    derived = M.tokens_per_step(run.accepted)
    runtime = run.generated_tokens / run.row_steps if run.row_steps else 0.0
    if abs(derived - runtime) > 1e-9:
        raise RuntimeError(
            f"bench: tokens per step from accepted_per_step ({derived}) differs from "
            f"the runtime's GenerationStats ({runtime})"
        )
    return run


def run_hf(model: Any, batches: Sequence[Sequence[list[int]]], settings: BenchSettings) -> Run:
    from .hf_baseline import generate_fixed_length

    dev = next(model.parameters()).device
    reset_cuda_peak(dev)
    run = Run(wall_s=0.0, token_ids=[])
    for batch in batches:
        new, wall = generate_fixed_length(
            model,
            batch,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            settings.seed,
        )
        run.wall_s += wall
        run.token_ids += new
    run.cuda_peak_bytes = cuda_peak_bytes(dev)
    return run


def run_llama(llama: Any, batches: Sequence[Sequence[list[int]]], settings: BenchSettings) -> Run:
    """llama.cpp's greedy decoding of every prompt of ``batches``, one at a time (batch 1)."""
    new, wall = llama.generate([p for batch in batches for p in batch], settings.max_new_tokens)
    return Run(wall_s=wall, token_ids=new)


# --------------------------------------------------------------------------- backends per shape
def backend_for_shape(gen: Generator, shape: tuple[int, int]) -> C.Backend:
    """A backend with beam shape ``shape`` that shares ``gen``'s weights.

    The torch backend is rebuilt around the loaded modules (no copy); a backend with a fixed shape
    (a TensorRT-LLM engine) serves only its own shape.
    """
    be = gen.backend
    own = (be.shape.num_beams, be.shape.draft_len)
    C.check_num_beams(shape[0], be.vocab_size, f"--beam_shapes {shape_name(shape)}: W")
    sbe = be.reshaped(*shape)
    require(
        sbe is not None,
        f"--beam_shapes {shape_name(shape)}: a {be.name} engine has the fixed "
        f"beam shape {shape_name(own)}; benchmark other shapes with engines built for them "
        "(redrafter-convert --redrafter_num_beams W --redrafter_draft_len_per_beam D, then "
        "redrafter-build), one redrafter-bench run per engine",
    )
    return sbe


def check_sweep_settings(
    gen: Generator,
    batch_sizes: Sequence[int],
    beam_shapes: Sequence[tuple[int, int]] | None = None,
    repetitions: int = 1,
) -> None:
    """Every batch size and beam shape the engine can run, before anything is measured."""
    be = gen.backend
    for b in batch_sizes:
        require(
            b <= be.max_batch_size,
            f"--batch_sizes {b}: the engine's max_batch_size is {be.max_batch_size}; rebuild with "
            f"redrafter-build --max_batch_size {max(batch_sizes)}",
        )
    for shape in beam_shapes or ():
        backend_for_shape(gen, shape)
    require(repetitions >= 1, f"--repetitions must be >= 1, got {repetitions}")


# --------------------------------------------------------------------------- the sweep
@dataclass
class _Cell:
    batch_size: int
    shape: tuple[int, int]
    gen: Generator
    timer: StepTimer
    runs: dict[str, list[Run]] = field(default_factory=lambda: {PLAIN: [], SPEC: []})
    policy: Any = None  # a ChoiceLog for the ADAPTIVE configuration


def run_sweep(
    gen: Generator,
    prompts: Sequence[list[int]],
    settings: BenchSettings,
    hf_model: Any = None,
    log: Callable[[str], None] | None = None,
    cost_model: Any = None,
    llama: Any = None,
) -> dict[str, Any]:
    """Measure every (batch size, beam shape); returns the ``configs`` and ``hf_baseline`` parts
    of the report (see :mod:`redrafter_trt.bench.report` for the whole document). With a
    ``cost_model`` and ``settings.adaptive``, one more configuration per batch size
    (``beam_shape`` :data:`ADAPTIVE`) runs the engine's shape under
    :class:`~redrafter_trt.runtime.adaptive.AdaptivePolicy`. With ``llama`` (a
    :class:`~redrafter_trt.bench.llamacpp_baseline.LlamaCppModel`), its greedy decoding joins
    the repetitions at batch size 1, and ``llama_cpp_plain`` holds its section (None without
    batch size 1)."""
    log = log or (lambda msg: None)
    be = gen.backend
    require(len(prompts) > 0, "no prompts to benchmark")
    shapes = list(settings.beam_shapes or [(be.shape.num_beams, be.shape.draft_len)])
    check_sweep_settings(gen, settings.batch_sizes, settings.beam_shapes, settings.repetitions)
    greedy = settings.temperature == 0
    configs: list[dict[str, Any]] = []
    hf_records: list[dict[str, Any]] = []
    llama_record = None
    for b in settings.batch_sizes:
        batches = make_batches(prompts, b)
        cells = []
        for shape in shapes:
            sbe = backend_for_shape(gen, shape)
            g = Generator(
                sbe,
                tokenizer=gen.tokenizer,
                eos_token_ids=gen.eos_token_ids,
                random_drafter=gen.random_drafter,
            )
            cells.append(_Cell(b, shape, g, StepTimer(sbe)))
        if cost_model is not None and settings.adaptive:
            from .calibrate import ChoiceLog

            own = (be.shape.num_beams, be.shape.draft_len)
            sbe = backend_for_shape(gen, own)
            g = Generator(
                sbe,
                tokenizer=gen.tokenizer,
                eos_token_ids=gen.eos_token_ids,
                random_drafter=gen.random_drafter,
            )
            g.policy = ChoiceLog(cost_model, *own)
            cells.append(_Cell(b, own, g, StepTimer(sbe), policy=g.policy))
        hf_runs: list[Run] = []
        llama_here = llama is not None and b == 1  # llama.cpp's side runs batch 1
        llama_runs: list[Run] = []
        for i in range(settings.warmup):
            log(f"[bench] B={b}: warm-up {i + 1}/{settings.warmup}")
            for cell in cells:
                run_generator(cell.gen, cell.timer, batches[:1], settings, speculative=False)
                run_generator(cell.gen, cell.timer, batches[:1], settings, speculative=True)
            if hf_model is not None:
                run_hf(hf_model, batches[:1], settings)
            if llama_here:
                run_llama(llama, batches[:1], settings)
        for cell in cells:  # count the timed steps' choices only
            if cell.policy is not None:
                cell.policy.steps.clear()
        for rep in range(settings.repetitions):
            tasks: list[tuple[_Cell | None, str]] = []
            for cell in cells:
                pair = [(cell, PLAIN), (cell, SPEC)]
                tasks += pair if rep % 2 == 0 else pair[::-1]
            if hf_model is not None:
                tasks = [(None, HF)] + tasks if rep % 2 == 0 else tasks + [(None, HF)]
            if llama_here:  # last, then first: the other end from transformers
                tasks = tasks + [(None, LLAMA)] if rep % 2 == 0 else [(None, LLAMA)] + tasks
            for cell, method in tasks:
                if method == HF:
                    run = run_hf(hf_model, batches, settings)
                    hf_runs.append(run)
                    what = "transformers generate"
                elif method == LLAMA:
                    run = run_llama(llama, batches, settings)
                    llama_runs.append(run)
                    what = "llama.cpp greedy"
                else:
                    run = run_generator(
                        cell.gen, cell.timer, batches, settings, speculative=method == SPEC
                    )
                    cell.runs[method].append(run)
                    what = f"{ADAPTIVE if cell.policy is not None else shape_name(cell.shape)} {method}"
                log(
                    f"[bench] B={b} rep {rep + 1}/{settings.repetitions} {what}: "
                    f"{run.new_tokens / run.wall_s:.1f} tok/s ({run.wall_s:.2f} s)"
                )
        hf_summary = None
        if hf_model is not None:
            hf_summary = _summarize_hf(b, hf_runs, cells[0].runs[PLAIN], greedy)
            hf_records.append(hf_summary)
        if llama_here:
            from .llamacpp_baseline import plain_section

            plain = cells[0].runs[PLAIN]
            llama_record = plain_section(
                [r.wall_s for r in llama_runs],
                llama_runs[0].token_ids,
                [r.wall_s for r in plain],
                plain[0].token_ids if greedy else None,
                llama_runs[0].new_tokens,
            )
        for cell in cells:
            configs.append(_summarize_cell(cell, hf_runs, greedy, len(prompts), len(batches)))
            cell.timer.backend.step = cell.timer.inner  # type: ignore[method-assign]  # unwrap
        del cells
    return {"configs": configs, "hf_baseline": hf_records, "llama_cpp_plain": llama_record}


# --------------------------------------------------------------------------- summaries
def _tok_s(runs: Sequence[Run]) -> list[float]:
    return [r.new_tokens / r.wall_s for r in runs]


def _step_times(runs: Sequence[Run], has_phases: bool) -> dict[str, Any]:
    """Median per generation step (ms): backend phases, the whole step call, runtime overhead."""

    def med(values):
        return M.spread(values)["median"]

    per = {}
    if has_phases:
        for p in PHASES:
            per[p] = med(
                [1e3 * r.phases.get(p, 0.0) / r.num_steps if r.num_steps else 0.0 for r in runs]
            )
    else:
        per.update({p: None for p in PHASES})
    per["step"] = med(
        [
            1e3 * r.step_wall.get("generation", 0.0) / r.num_steps if r.num_steps else 0.0
            for r in runs
        ]
    )
    # Everything in the generate call outside backend steps (runtime loop, host copies).
    per["runtime_overhead"] = med(
        [
            1e3 * (r.wall_s - sum(r.step_wall.values())) / r.num_steps if r.num_steps else 0.0
            for r in runs
        ]
    )
    per["prefill_per_batch"] = med(
        [
            1e3 * r.step_wall.get("context", 0.0) / r.calls["context"]
            if r.calls.get("context")
            else 0.0
            for r in runs
        ]
    )
    return per


def _method_summary(runs: Sequence[Run], draft_len: int, has_phases: bool) -> dict[str, Any]:
    accepted = [a for r in runs for a in r.accepted]
    cuda = [r.cuda_peak_bytes for r in runs if r.cuda_peak_bytes is not None]
    return {
        "wall_s": M.spread([r.wall_s for r in runs]),
        "tokens_per_s": M.spread(_tok_s(runs)),
        "tokens_per_step": M.tokens_per_step(accepted),
        "tokens_per_step_per_repetition": [M.tokens_per_step(r.accepted) for r in runs],
        "tokens_per_step_histogram": M.tokens_per_step_histogram(accepted, draft_len),
        "acceptance_rate_per_depth": M.acceptance_per_depth(accepted, draft_len),
        "generation_steps": runs[0].num_steps,
        "new_tokens": runs[0].new_tokens,
        "step_time_ms": _step_times(runs, has_phases),
        "cuda_peak_bytes": max(cuda) if cuda else None,
    }


def _summarize_cell(
    cell: _Cell, hf_runs: Sequence[Run], greedy: bool, num_prompts: int, num_batches: int
) -> dict[str, Any]:
    w, d = cell.shape
    plain, spec = cell.runs[PLAIN], cell.runs[SPEC]
    mismatches = []
    for rep, (p, s) in enumerate(zip(plain, spec)):
        if [len(t) for t in p.token_ids] != [len(t) for t in s.token_ids]:
            raise RedrafterError(
                f"B={cell.batch_size} {shape_name(cell.shape)}: plain and "
                "speculative runs produced different lengths; cannot compare speeds"
            )
        mismatches += [
            {"repetition": rep, **m} for m in M.compare_outputs(p.token_ids, s.token_ids)
        ]
    has_phases = cell.timer.has_phases
    rec: dict[str, Any] = {
        "batch_size": cell.batch_size,
        "beam_shape": ADAPTIVE if cell.policy is not None else shape_name(cell.shape),
        "num_beams": w,
        "draft_len": d,
        "num_prompts": num_prompts,
        "num_sequences": cell.batch_size * num_batches,
        "num_batches": num_batches,
        PLAIN: _method_summary(plain, d, has_phases),
        SPEC: _method_summary(spec, d, has_phases),
        "speedup": M.spread([p.wall_s / s.wall_s for p, s in zip(plain, spec)]),
        "plain_over_transformers": (
            M.spread(
                [
                    (p.new_tokens / p.wall_s) / (h.new_tokens / h.wall_s)
                    for p, h in zip(plain, hf_runs)
                ]
            )
            if hf_runs
            else None
        ),
        "greedy": greedy,
        "outputs_identical": not mismatches,
        "mismatches": mismatches[:50],
        "num_mismatches": len(mismatches),
        "memory": {
            "kv_cache_bytes": cell.timer.backend.kv_cache_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_scope": "process lifetime up to the end of this configuration",
        },
        # adaptive: steps of the timed speculative runs per (batch, chosen shape); set with
        # predicted_speedup by redrafter_trt.bench.calibrate.annotate_predictions
        "chosen_shapes": cell.policy.counts() if cell.policy is not None else None,
        "predicted_speedup": None,
    }
    return rec


def _summarize_hf(
    batch_size: int, hf_runs: Sequence[Run], plain: Sequence[Run], greedy: bool
) -> dict[str, Any]:
    same = None
    if greedy and plain:
        diff = M.compare_outputs(plain[0].token_ids, hf_runs[0].token_ids)
        same = len(plain[0].token_ids) - len({m["sequence"] for m in diff})
    cuda = [r.cuda_peak_bytes for r in hf_runs if r.cuda_peak_bytes is not None]
    return {
        "batch_size": batch_size,
        "wall_s": M.spread([r.wall_s for r in hf_runs]),
        "tokens_per_s": M.spread(_tok_s(hf_runs)),
        "new_tokens": hf_runs[0].new_tokens,
        "sequences_identical_to_plain": same,
        "num_sequences": len(hf_runs[0].token_ids),
        "cuda_peak_bytes": max(cuda) if cuda else None,
    }
