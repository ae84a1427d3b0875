"""The benchmark's outputs: one JSON document (stable keys), a Markdown table and a plot.

JSON document (``schema`` = :data:`SCHEMA`); top-level keys :data:`TOP_KEYS`:

- ``environment``: machine, CPU, GPU, OS, Python / torch / transformers / numpy versions,
  torch threads, load average before and after the run.
- ``engine``: engine directory, backend, device, dtype, the engine's own beam shape, limits,
  whether the draft head is random.
- ``settings``: data set, prompts, lengths, sampling, repetitions, warm-up, sweep, and the
  comparison rules (``ignore_eos``, interleaving).
- ``configs``: one record per (batch size, beam shape) with keys :data:`CONFIG_KEYS`; ``plain``
  and ``speculative`` hold :data:`METHOD_KEYS`. Spreads are ``{median, min, max, q1, q3,
  values}`` over repetitions; tokens per step, its histogram and the acceptance rates pool the
  generation steps of all repetitions (definitions in :mod:`redrafter_trt.bench.metrics`);
  ``step_time_ms`` is the median over repetitions of time per generation step.
- ``hf_baseline``: per batch size, transformers' ``generate`` on the same prompts and lengths.
- ``llama_cpp``: llama.cpp on the built-in model's GGUF (:mod:`redrafter_trt.bench.llamacpp_baseline`):
  ``compared`` and, when false, ``reason``; when true, the GGUF, llama-cpp-python's version,
  threads, ``plain`` (batch-1 greedy tokens/s, the engine's plain over it paired by repetition,
  ``identical_tokens`` for information only) and ``t_k`` (one row per k = 1..33: llama.cpp's
  t(k) beside the engine's cost model's, ``engine_measured`` false where interpolated).
- ``cost_model``: where the machine's cost model came from (``source``) and, when there is one,
  :func:`redrafter_trt.bench.calibrate.cost_section`: the t(k)/t(1) curve, draft cost per step,
  the bandwidth floor of a plain step, and the (beams, depth) the adaptive policy picks per batch
  size with its predicted speed-up. Each config's ``predicted_speedup`` is the cost model's
  prediction from that config's measured tokens per step; the ``adaptive`` config (one per batch
  size) lists the shapes it chose in ``chosen_shapes``.
- ``flags``: ``greedy_outputs_differ`` and human-readable ``messages``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import require

SCHEMA = "redrafter-bench/1"
TOP_KEYS = (
    "schema",
    "created_utc",
    "environment",
    "engine",
    "settings",
    "configs",
    "hf_baseline",
    "llama_cpp",
    "cost_model",
    "flags",
)
CONFIG_KEYS = (
    "batch_size",
    "beam_shape",
    "num_beams",
    "draft_len",
    "num_prompts",
    "num_sequences",
    "num_batches",
    "plain",
    "speculative",
    "speedup",
    "plain_over_transformers",
    "greedy",
    "outputs_identical",
    "mismatches",
    "num_mismatches",
    "memory",
    "chosen_shapes",
    "predicted_speedup",
)
METHOD_KEYS = (
    "wall_s",
    "tokens_per_s",
    "tokens_per_step",
    "tokens_per_step_per_repetition",
    "tokens_per_step_histogram",
    "acceptance_rate_per_depth",
    "generation_steps",
    "new_tokens",
    "step_time_ms",
    "cuda_peak_bytes",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    """The machine and software the numbers were measured on."""
    import numpy

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_bytes": _mem_total_bytes(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "numpy": numpy.__version__,
        "redrafter_trt": __version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "load_average_end": None,
    }


def build_report(
    environment_info: dict[str, Any],
    engine: dict[str, Any],
    settings: dict[str, Any],
    sweep: dict[str, Any],
) -> dict[str, Any]:
    configs = sweep["configs"]
    env = dict(environment_info, load_average_end=load_average())
    messages = []
    for c in configs:
        if c["greedy"] and not c["outputs_identical"]:
            messages.append(
                f"B={c['batch_size']} {c['beam_shape']}: greedy speculative output differs "
                f"from plain decoding in {c['num_mismatches']} sequence-repetitions "
                f"(first: {c['mismatches'][0]})"
            )
    return {
        "schema": SCHEMA,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": env,
        "engine": engine,
        "settings": settings,
        "configs": configs,
        "hf_baseline": sweep["hf_baseline"],
        "llama_cpp": sweep.get("llama_cpp", {"compared": False, "reason": "not run"}),
        "cost_model": sweep.get("cost_model", {"source": "not measured"}),
        "flags": {"greedy_outputs_differ": bool(messages), "messages": messages},
    }


# --------------------------------------------------------------------------- Markdown
def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _range(s: dict[str, Any] | None, digits: int = 2) -> str:
    if s is None:
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def machine_line(report: dict[str, Any]) -> str:
    e, g = report["environment"], report["engine"]
    gpu = ", ".join(e["gpus"]) if e["gpus"] else "no GPU"
    return (
        f"{e['cpu']} ({e['cpus_usable']} usable CPUs), {gpu}; {g['backend']} backend on "
        f"{g['device']}, {g['dtype']}, {e['torch_threads']} torch threads; torch {e['torch']}, "
        f"transformers {e['transformers']}, Python {e['python']}, redrafter_trt "
        f"{e['redrafter_trt']}; load average {e['load_average_start']} -> {e['load_average_end']}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown section: context lines and one table row per configuration."""
    s, g = report["settings"], report["engine"]
    lines = [
        f"Engine: `{g['engine_dir']}` ({g['model']}, engine beam shape {g['engine_beam_shape']}"
        f"{', random draft head' if g['random_drafter'] else ''}).",
        f"Machine: {machine_line(report)}.",
        f"Prompts: {s['num_prompts']} from `{s['dataset']}` (chat template: "
        f"{'yes' if s['chat_template'] else 'no'}; {s['prompt_tokens']['min']}-"
        f"{s['prompt_tokens']['max']} tokens), {s['max_new_tokens']} new tokens each "
        f"(end-of-sequence ignored so every method generates the same lengths), "
        f"{'greedy' if s['temperature'] == 0 else 'temperature ' + str(s['temperature'])}; "
        f"{s['warmup']} warm-up, median (min-max) of {s['repetitions']} interleaved repetitions.",
        "",
        "| batch | beams WxD | tokens/step | acceptance by depth | plain tok/s | speculative tok/s "
        "| speed-up | predicted | plain / transformers | spec step ms (verify/accept/draft/pack) | identical |",
        "|---:|:---:|---:|:---|---:|---:|---:|---:|---:|:---|:---:|",
    ]
    for c in report["configs"]:
        p, sp = c["plain"], c["speculative"]
        st = sp["step_time_ms"]
        split = (
            "/".join(_fmt(st[k], 1) for k in ("verify", "accept", "draft", "pack"))
            if st["verify"] is not None
            else "n/a"
        )
        identical = (
            ("yes" if c["outputs_identical"] else f"**NO ({c['num_mismatches']})**")
            if c["greedy"]
            else ("yes" if c["outputs_identical"] else "no") + " (sampled)"
        )
        lines.append(
            f"| {c['batch_size']} | {c['beam_shape']} | {sp['tokens_per_step']:.2f} | "
            f"{' '.join(f'{a:.2f}' for a in sp['acceptance_rate_per_depth'])} | "
            f"{_range(p['tokens_per_s'], 1)} | {_range(sp['tokens_per_s'], 1)} | "
            f"{_range(c['speedup'])}x | {_fmt(c['predicted_speedup'])}{'x' if c['predicted_speedup'] else ''} | "
            f"{_range(c['plain_over_transformers'])} | "
            f"{_fmt(st['step'], 1)} ({split}) | {identical} |"
        )
    if report["hf_baseline"]:
        lines += [
            "",
            "transformers `generate` (same weights, prompts and lengths): "
            + "; ".join(
                f"B={h['batch_size']}: {_range(h['tokens_per_s'], 1)} tok/s"
                + (
                    f", {h['sequences_identical_to_plain']}/{h['num_sequences']} sequences identical to plain"
                    if h["sequences_identical_to_plain"] is not None
                    else ""
                )
                for h in report["hf_baseline"]
            )
            + ".",
        ]
    adaptive = [c for c in report["configs"] if c["chosen_shapes"]]
    if adaptive:
        lines += [
            "",
            "Shapes the adaptive configuration chose (batch: WxD x steps; 1x0 = plain): "
            + "; ".join(
                f"B={c['batch_size']}: "
                + ", ".join(
                    f"{x['shape']} x{x['steps']}"
                    + (f" (at {x['batch']} rows)" if x["batch"] != c["batch_size"] else "")
                    for x in c["chosen_shapes"]
                )
                for c in adaptive
            )
            + ".",
        ]
    from .calibrate import cost_markdown
    from .llamacpp_baseline import markdown_lines

    lines += ["", *markdown_lines(report["llama_cpp"])]
    lines += ["", cost_markdown(report["cost_model"]).rstrip("\n")]
    for m in report["flags"]["messages"]:
        lines += ["", f"**WARNING:** {m}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot
def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Tokens per step and speed-up against batch size, one line per beam shape (PNG)."""
    require(
        importlib.util.find_spec("matplotlib") is not None,
        "the plot needs matplotlib: pip install matplotlib (or pass --no_plot)",
    )
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    shapes = list(dict.fromkeys(c["beam_shape"] for c in report["configs"]))
    batch_sizes = sorted({c["batch_size"] for c in report["configs"]})
    for shape in shapes:
        cs = sorted(
            (c for c in report["configs"] if c["beam_shape"] == shape),
            key=lambda c: c["batch_size"],
        )
        bs = [c["batch_size"] for c in cs]
        ax1.plot(bs, [c["speculative"]["tokens_per_step"] for c in cs], "o-", label=shape)
        med = [c["speedup"]["median"] for c in cs]
        err = [
            [m - c["speedup"]["min"] for m, c in zip(med, cs)],
            [c["speedup"]["max"] - m for m, c in zip(med, cs)],
        ]
        ax2.errorbar(bs, med, yerr=err, fmt="o-", capsize=3, label=shape)
    ceiling = max(c["draft_len"] for c in report["configs"]) + 1
    ax1.set_ylim(0.9, ceiling + 0.1)  # from plain decoding's 1 up to the most a step can add
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax, title in (
        (ax1, "tokens per step (max D+1)"),
        (ax2, "speed-up over plain decoding (min-max)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.legend(title="beams WxD")
        ax.grid(alpha=0.3)
    g = report["engine"]
    fig.suptitle(f"{g['model']} - {g['backend']} on {g['device']} ({g['dtype']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(
    report: dict[str, Any], output_dir: str | Path, make_plot: bool = True
) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and (unless ``make_plot`` is False) ``bench.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    if make_plot:
        paths["plot"] = plot(report, out / "bench.png")
    return paths
