"""``redrafter-convert``: base LLM + draft head -> TensorRT-LLM style ReDrafter checkpoint."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from pathlib import Path

from ..cmdline import add_threads_argument, non_negative_int, positive_int, run_main
from ..contract import check_num_beams
from ..errors import RedrafterError, require
from ..formats.checkpoint import (
    DTYPES,
    convert_checkpoint,
    read_checkpoint_config,
    require_model_dir,
)
from ..formats.hf import load_hf_base
from ..formats.names import EMBEDDING, LM_HEAD, base_name_pairs
from ..heads import builtin_head
from ..models.blocks import BLOCKS_FILE, concat_rows, load_blocks
from ..models.drafter import DrafterConfig, init_drafter, load_drafter, validate_against_base
from ..models.hub import DEFAULT_MODEL, resolve_base_model_dir
from .run import read_ids_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-convert",
        description="Convert a Hugging Face base model (Llama family or Qwen2) and a ReDrafter "
        "draft head (Apple ml-recurrent-drafter format) into one TensorRT-LLM style "
        "checkpoint directory: config.json + rank0.safetensors (+ tokenizer files, + "
        "blocks.safetensors for a base converted from a GGUF: see --keep_blocks).",
    )
    p.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL,
        help=f"Hugging Face base model directory, or '{DEFAULT_MODEL}' for the built-in "
        "SmolLM2-135M-Instruct (default: %(default)s)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--drafter_model_dir",
        help="draft head directory (config.json + model.safetensors), e.g. from "
        f"redrafter-train; optional with --model_dir {DEFAULT_MODEL}, which then "
        "uses the head shipped with the toolkit (redrafter_trt/heads/smollm2)",
    )
    src.add_argument(
        "--random_drafter",
        action="store_true",
        help="initialise a random draft head instead (for plumbing tests and demos; "
        "it accepts almost no draft tokens)",
    )
    p.add_argument("--output_dir", required=True, help="checkpoint directory to write")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto"] + sorted(DTYPES),
        help="weight dtype of the checkpoint; auto = bfloat16 where bf16 matrix units "
        "exist (a CUDA GPU with bf16, or a CPU with avx512_bf16 or amx_bf16 in "
        "/proc/cpuinfo), else float32; the choice is printed (default: %(default)s)",
    )
    p.add_argument(
        "--redrafter_num_beams",
        type=positive_int,
        default=4,
        help="W, beams drafted per step (default: %(default)s)",
    )
    p.add_argument(
        "--redrafter_draft_len_per_beam",
        type=positive_int,
        default=4,
        help="D, draft tokens per beam (default: %(default)s)",
    )
    p.add_argument(
        "--redrafter_no_greedy_search",
        action="store_true",
        help="record that the engine is meant for sampling (the torch backend serves "
        "greedy and sampling either way)",
    )
    p.add_argument(
        "--tp_size",
        type=positive_int,
        default=1,
        help="tensor-parallel ranks: writes rank{i}.safetensors split as TensorRT-LLM "
        "expects; the torch backend runs them on tp_size ranks (redrafter-run --tp_size N)",
    )
    p.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="fp8: store the base's attention and MLP linears in FP8 (e4m3, per-tensor "
        "scale = amax / 448; embedding, lm_head, norms and the draft head keep "
        "--dtype); needs --calib_input_ids_file for the static activation scales "
        "TensorRT-LLM's FP8 GEMMs take. An FP8 base (--model_dir with float8_e4m3fn "
        "weights and per-tensor weight_scale) is converted as FP8 without this flag",
    )
    blk = p.add_mutually_exclusive_group()
    blk.add_argument(
        "--keep_blocks",
        dest="keep_blocks",
        action="store_const",
        const=True,
        default=None,
        help="keep the base's GGUF block weights (Q4_1, Q8_0) as stored, in blocks.safetensors "
        "next to rank0.safetensors, or fail: needs a base converted from a GGUF (--model_dir "
        "smollm2), --dtype float32, --tp_size 1 and no FP8. Without either flag they are kept "
        "whenever these hold (the converter says when they do not). The torch backend's CPU "
        "kernels stream the blocks and hold no float32 copy of those weights (the same bits); "
        "rank0.safetensors always holds their float32 expansion, which is what TensorRT-LLM, "
        "tensor parallelism and every other dtype read",
    )
    blk.add_argument(
        "--no_keep_blocks",
        dest="keep_blocks",
        action="store_const",
        const=False,
        help="write only the float32 expansion of a GGUF base's block weights (no "
        "blocks.safetensors): the torch backend then holds every weight in float32",
    )
    p.add_argument(
        "--calib_input_ids_file",
        default=None,
        help="JSON list of token-id lists run through the base to measure the FP8 "
        "activation scales (amax / 448 of each linear's input), for --quantize fp8 "
        "or an FP8 base without input_scale tensors",
    )
    p.add_argument(
        "--redrafter_num_layers",
        type=non_negative_int,
        default=2,
        help="with --random_drafter: residual blocks of the head (default: %(default)s)",
    )
    p.add_argument(
        "--redrafter_exit_dim",
        type=positive_int,
        default=None,
        help="with --random_drafter: width of the head (default: 2 x base hidden size)",
    )
    p.add_argument(
        "--redrafter_no_rnn",
        action="store_true",
        help="with --random_drafter: a head without the recurrent state update",
    )
    p.add_argument("--seed", type=int, default=0, help="with --random_drafter: init seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    add_threads_argument(p)  # the FP8 calibration runs the base model
    return p


def require_base_dir(model_dir: str) -> Path:
    """``--model_dir`` as a Hugging Face base directory; a path that does not exist says so, and
    a name close to the built-in default's (``smollm``, ``SmolLM2``) suggests it."""
    p = Path(model_dir)
    if not p.exists():
        close = difflib.get_close_matches(model_dir.lower(), [DEFAULT_MODEL], n=1, cutoff=0.6)
        raise RedrafterError(
            f"--model_dir {model_dir}: no such directory; expected a Hugging Face base model "
            f"directory or '{DEFAULT_MODEL}' for the built-in default"
            + (f" (did you mean '{DEFAULT_MODEL}'?)" if close else "")
        )
    return require_model_dir(p, "--model_dir", "base")


def trained_draft_len(drafter_dir: Path) -> int | None:
    """D the head was trained for, from the training_report.json redrafter-train writes."""
    try:
        report = json.loads((drafter_dir / "training_report.json").read_text())
        d = report["settings"]["draft_len"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return d if isinstance(d, int) and not isinstance(d, bool) else None


def blocks_to_trtllm(cfg, hf_blocks: dict, base_dir: Path) -> dict:
    """The base's block weights (Hugging Face names) under the checkpoint's names, q/k/v fused
    in the checkpoint's order; a weight whose parts are not all blocks stays float32 only."""
    where = str(base_dir / BLOCKS_FILE)
    out = {}
    for pair in base_name_pairs(cfg):
        if pair.trtllm.endswith(".weight") and all(h in hf_blocks for h in pair.hf):
            out[pair.trtllm] = concat_rows(pair.trtllm, [hf_blocks[h] for h in pair.hf], where)
    return out


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.model_dir != DEFAULT_MODEL:  # a mistyped base is named before the head is asked for
        require_base_dir(args.model_dir)
    if not args.random_drafter and args.drafter_model_dir is None:
        shipped = builtin_head(args.model_dir) if isinstance(args.model_dir, str) else None
        require(
            shipped is not None,
            f"--model_dir {args.model_dir}: give the draft head with --drafter_model_dir (no "
            f"head ships for it; only --model_dir {DEFAULT_MODEL} has a built-in head), or "
            "--random_drafter for plumbing tests",
        )
        say(f"[convert] using the draft head shipped for {args.model_dir}: {shipped}")
        args.drafter_model_dir = str(shipped)
    drafter_dir = (
        None
        if args.random_drafter
        else require_model_dir(args.drafter_model_dir, "--drafter_model_dir", "drafter")
    )
    calibration = (
        read_ids_file(args.calib_input_ids_file, "--calib_input_ids_file")
        if args.calib_input_ids_file
        else None
    )
    if args.dtype == "auto":
        from ..backends.torch_backend import auto_dtype

        args.dtype, why = auto_dtype()
        say(f"--dtype auto: {args.dtype} ({why})")
    base_dir = require_model_dir(resolve_base_model_dir(args.model_dir), "--model_dir", "base")
    base_cfg, base_sd = load_hf_base(base_dir)
    say(
        f"[convert] read base {base_dir} ({base_cfg.architecture}, "
        f"{sum(t.numel() for t in base_sd.values()) / 1e6:.0f}M weight values) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if args.random_drafter:
        cfg = DrafterConfig(
            vocab_size=base_cfg.vocab_size,
            hidden_size=base_cfg.hidden_size,
            exit_dim=args.redrafter_exit_dim or 2 * base_cfg.hidden_size,
            num_draft_layers=args.redrafter_num_layers,
            rnn=not args.redrafter_no_rnn,
        )
        drafter = init_drafter(cfg, seed=args.seed)
    else:
        drafter = load_drafter(drafter_dir, base_lm_head=base_sd[LM_HEAD])
        trained = trained_draft_len(drafter_dir)
        if trained is not None and trained != args.redrafter_draft_len_per_beam:
            say(
                f"warning: --drafter_model_dir {drafter_dir} was trained for D={trained} draft "
                f"steps but --redrafter_draft_len_per_beam is {args.redrafter_draft_len_per_beam}"
                + (
                    ": draft steps past the trained ones are rarely accepted and cost verify work; "
                    f"use --redrafter_draft_len_per_beam {trained}, or train with --draft_len "
                    f"{args.redrafter_draft_len_per_beam}"
                    if args.redrafter_draft_len_per_beam > trained
                    else ": the deeper trained steps go unused"
                )
            )
    validate_against_base(
        drafter.config,
        base_cfg.hidden_size,
        base_cfg.vocab_size,
        tuple(base_sd[EMBEDDING].shape),
        f"--drafter_model_dir {args.drafter_model_dir}",
    )
    check_num_beams(args.redrafter_num_beams, base_cfg.vocab_size, "--redrafter_num_beams")
    blocks = None
    has_blocks = (base_dir / BLOCKS_FILE).is_file()
    if args.keep_blocks:
        require(
            has_blocks,
            f"--keep_blocks: {base_dir} has no {BLOCKS_FILE} (only a base converted from a GGUF "
            f"has block weights, e.g. --model_dir {DEFAULT_MODEL})",
        )
    keep = args.keep_blocks
    if keep is None and has_blocks:  # the default for a GGUF base: keep them where they fit
        unfit = [
            reason
            for reason, applies in (
                (f"--dtype {args.dtype}", args.dtype != "float32"),
                (f"--tp_size {args.tp_size}", args.tp_size != 1),
                (f"--quantize {args.quantize}", args.quantize is not None),
            )
            if applies
        ]
        keep = not unfit
        if unfit:
            say(
                f"[convert] the base's GGUF block weights are not kept ({', '.join(unfit)}; "
                "blocks are kept only in float32, tp_size 1, unquantized checkpoints): "
                "rank0.safetensors holds every weight expanded"
            )
    if keep:
        blocks = blocks_to_trtllm(base_cfg, load_blocks(base_dir / BLOCKS_FILE), base_dir)
        say(
            f"[convert] keeping the base's GGUF block weights ({len(blocks)} matrices) in "
            f"{BLOCKS_FILE} for the torch backend's CPU kernels; rank0.safetensors holds their "
            "float32 expansion (TensorRT-LLM, other dtypes); --no_keep_blocks leaves them out"
        )
    out = convert_checkpoint(
        base_cfg,
        base_sd,
        drafter,
        args.output_dir,
        dtype=args.dtype,
        num_beams=args.redrafter_num_beams,
        draft_len=args.redrafter_draft_len_per_beam,
        greedy_search=not args.redrafter_no_greedy_search,
        tp_size=args.tp_size,
        tokenizer_dir=base_dir,
        random_drafter=args.random_drafter,
        overwrite=args.overwrite,
        quantize=args.quantize,
        calibration=calibration,
        blocks=blocks,
        blocks_source=str(base_dir / BLOCKS_FILE),
    )
    quant = read_checkpoint_config(out).quant_algo
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    secs = time.perf_counter() - t0
    say(
        f"wrote ReDrafter checkpoint {out} ({base_cfg.architecture}, W={args.redrafter_num_beams}, "
        f"D={args.redrafter_draft_len_per_beam}, {args.dtype}"
        f"{', FP8 base linears' if quant else ''}; {size / 1e6:.0f} MB in {secs:.1f} s)"
    )
    return 0


def main(argv=None) -> int:
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
