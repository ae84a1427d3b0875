"""``redrafter-bench``: tokens per step and wall-clock speed-up against plain decoding.

- :mod:`.metrics`: results -> tokens per step, acceptance by depth, spreads, output comparison.
- :mod:`.prompts`: data set -> token-id prompts that fit the engine.
- :mod:`.runner`: the interleaved sweep over batch sizes and beam shapes.
- :mod:`.hf_baseline`: transformers' own ``generate`` on the engine's base weights.
- :mod:`.llamacpp_baseline`: llama.cpp (when ``llama_cpp`` imports) on the built-in model's GGUF.
- :mod:`.report`: JSON document, Markdown table, plot.
- :mod:`.calibrate`: the cost model of the adaptive policy, measured and checked.

Benchmarks of their own (``python -m``): :mod:`.serving` (``redrafter-serve`` under concurrent
clients), :mod:`.train_step` (one optimizer step per loss path), :mod:`.draft_vocab` and
:mod:`.gpu_check`.

:func:`run_benchmark` ties them together; the command line is :mod:`redrafter_trt.cli.bench`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import require
from ..models.base import BaseModel
from ..runtime.generator import Generator
from .prompts import encode_prompts, load_raw_prompts
from .report import SCHEMA, build_report, environment, markdown, write_outputs
from .runner import BenchSettings, check_sweep_settings, parse_beam_shapes, run_sweep, shape_name


def engine_info(engine_dir: str | Path | None, gen: Generator) -> dict[str, Any]:
    """What the report says about the engine (``engine_dir`` None: a generator built in Python)."""
    be = gen.backend
    pre: dict[str, Any] = {}
    if engine_dir is not None:
        from ..runtime.loader import read_engine_config

        pre = read_engine_config(engine_dir)["pretrained_config"]
    elif isinstance(be.base, BaseModel):  # the torch backend's weights (engines have none)
        from ..formats.hf import hf_config_dict

        hf = hf_config_dict(be.base.config)
        pre = {"base_model_architecture": hf["architectures"][0], **hf}
    return {
        "engine_dir": None if engine_dir is None else str(engine_dir),
        "backend": be.name,
        "device": str(be.device),
        "dtype": str(be.dtype).replace("torch.", ""),
        "model": f"{pre.get('base_model_architecture', '?')} {pre.get('num_hidden_layers', '?')} layers, "
        f"hidden {pre.get('hidden_size', '?')}, vocab {pre.get('vocab_size', '?')}",
        "engine_beam_shape": shape_name((be.shape.num_beams, be.shape.draft_len)),
        "random_drafter": bool(gen.random_drafter),
        "max_batch_size": be.max_batch_size,
        "max_input_len": be.max_input_len,
        "max_seq_len": be.max_seq_len,
        "warp_k": be.warp_k,
        "tokenizer": gen.tokenizer is not None,
    }


def hf_baseline_model(gen: Generator, hf_model_dir: str | None = None) -> tuple[Any, str]:
    """The transformers model for the outside baseline, and where it came from."""
    from .hf_baseline import hf_model_from_base, hf_model_from_dir

    be = gen.backend
    if hf_model_dir:
        return hf_model_from_dir(
            hf_model_dir, be.dtype, be.device
        ), f"--hf_model_dir {hf_model_dir}"
    if be.base is not None:
        return hf_model_from_base(be.base), "rebuilt from the engine's base weights"
    return None, (
        f"skipped: the {be.name} backend has no torch weights; "
        "pass --hf_model_dir with the Hugging Face base model"
    )


def run_benchmark(
    gen: Generator,
    engine_dir: str | Path | None,
    dataset: str,
    settings: BenchSettings,
    *,
    num_prompts: int = 8,
    chat_template: str = "auto",
    max_prompt_len: int | None = None,
    hf_model_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Benchmark ``gen`` (from :func:`redrafter_trt.load`) on ``dataset``; returns the report."""
    require(
        chat_template in ("auto", "yes", "no"),
        f"--chat_template {chat_template!r}: expected auto, yes or no",
    )
    check_sweep_settings(gen, settings.batch_sizes, settings.beam_shapes, settings.repetitions)
    env = environment()  # before the run: the load average at the start
    raw = load_raw_prompts(dataset)
    use_chat = (
        gen.tokenizer is not None
        and getattr(gen.tokenizer, "chat_template", None) is not None
        and chat_template != "no"
        and any(isinstance(p, str) for p in raw)
    )
    require(
        chat_template != "yes" or use_chat,
        "--chat_template yes: the engine's tokenizer has no chat template (or the prompts are token ids)",
    )
    prompts, skipped = encode_prompts(
        gen, raw, num_prompts, use_chat, settings.max_new_tokens, max_prompt_len
    )
    hf_model, hf_source = (None, "disabled (--no_hf_baseline)")
    if settings.hf_baseline:
        hf_model, hf_source = hf_baseline_model(gen, hf_model_dir)
    lengths = sorted(len(p) for p in prompts)
    settings_rec = {
        "dataset": dataset,
        "num_prompts": len(prompts),
        "num_prompts_requested": num_prompts,
        "prompts_skipped_too_long": skipped,
        "prompt_tokens": {
            "min": lengths[0],
            "median": lengths[len(lengths) // 2],
            "max": lengths[-1],
        },
        "chat_template": use_chat,
        "max_new_tokens": settings.max_new_tokens,
        "ignore_eos": True,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "repetitions": settings.repetitions,
        "warmup": settings.warmup,
        "batch_sizes": list(settings.batch_sizes),
        "beam_shapes": [shape_name(s) for s in settings.beam_shapes]
        if settings.beam_shapes
        else [shape_name((gen.backend.shape.num_beams, gen.backend.shape.draft_len))],
        "hf_baseline": hf_source,
        "method": "per batch size, every repetition runs each method once on the same prompt "
        "batches (prompts cycled to fill the last batch), order alternating between "
        "repetitions; warm-up calls on the first batch are not timed; tokens/s = new "
        "tokens / wall time of the generate calls (prefill included); speed-up = plain "
        "wall / speculative wall of the same repetition; predicted speed-up = the "
        "configuration's measured tokens per step x t(batch) / the cost model's step "
        "cost of its shapes (prefill not modelled)",
    }
    cost, cost_source = None, "not measured (adaptive off)"
    if settings.adaptive:
        from .calibrate import bench_cost_model

        cost, cost_source = bench_cost_model(
            gen.backend, None if engine_dir is None else str(engine_dir), log=log
        )
    settings_rec["adaptive"] = settings.adaptive and cost is not None
    llama, llama_sec = None, {"compared": False, "reason": "skipped with --no_llama_cpp"}
    if settings.llama_cpp:
        from .llamacpp_baseline import open_baseline

        llama, llama_sec = open_baseline(
            gen.backend, prompts, settings.max_new_tokens, torch.get_num_threads(), log
        )
    if not llama_sec["compared"] and log:
        log(f"[bench] llama.cpp not compared: {llama_sec['reason']}")
    try:
        sweep = run_sweep(
            gen, prompts, settings, hf_model=hf_model, log=log, cost_model=cost, llama=llama
        )
        llama_plain = sweep.pop("llama_cpp_plain")
        if llama is not None:
            from .llamacpp_baseline import TOKEN_COUNTS, t_section

            llama_sec["plain"] = llama_plain
            if llama_plain is None:
                llama_sec["plain_note"] = (
                    "not measured: --batch_sizes has no 1 (llama.cpp's side runs batch 1)"
                )
            if log:
                log(f"[bench] llama.cpp: t(k) for k = 1..{TOKEN_COUNTS[-1]}")
            llama_t = llama.t_of_k(TOKEN_COUNTS, repeats=settings.repetitions)
            llama_sec["t_k"] = t_section(llama_t, cost, cost_source, settings.repetitions)
    finally:
        if llama is not None:
            llama.close()
    sweep["llama_cpp"] = llama_sec
    if settings.adaptive:
        from .calibrate import annotate_predictions, cost_section

        if cost is not None:
            annotate_predictions(sweep["configs"], cost)
        sweep["cost_model"] = cost_section(
            cost, cost_source, gen.backend, sweep["configs"], settings.batch_sizes
        )
    else:
        sweep["cost_model"] = {"source": cost_source}
    return build_report(env, engine_info(engine_dir, gen), settings_rec, sweep)


__all__ = [
    "BenchSettings",
    "SCHEMA",
    "run_benchmark",
    "parse_beam_shapes",
    "markdown",
    "write_outputs",
    "engine_info",
]
