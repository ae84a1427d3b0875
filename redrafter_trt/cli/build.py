"""``redrafter-build``: ReDrafter checkpoint -> engine directory (torch or TensorRT-LLM backend)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cmdline import non_negative_int, positive_int, run_main
from ..runtime.engine import BACKENDS, build_engine

# trtllm-build flags accepted for familiarity: flag -> (help, argparse keywords). Their values are
# checked whatever the backend (a typo fails here, not later in a container); recorded in the build
# config and used by the TensorRT-LLM backend, ignored by the torch backend.
PLUGIN_DTYPES = ("auto", "float16", "bfloat16", "float32")
TRTLLM_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--gemm_plugin": ("GEMM plugin dtype", dict(choices=PLUGIN_DTYPES + ("disable",))),
    "--gpt_attention_plugin": ("GPT attention plugin dtype", dict(choices=PLUGIN_DTYPES)),
    "--kv_cache_type": (
        "KV cache type (the ReDrafter engine needs paged)",
        dict(choices=("continuous", "paged", "disabled")),
    ),
    "--use_paged_context_fmha": ("paged context FMHA", dict(choices=("enable", "disable"))),
    "--max_num_tokens": ("maximum tokens per engine call", dict(type=positive_int)),
    "--workers": ("parallel build workers", dict(type=positive_int)),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-build",
        description="Build an engine directory from a redrafter-convert checkpoint. The torch "
        "backend runs anywhere (CPU or GPU); the trtllm backend builds one fused "
        "TensorRT-LLM engine and needs TensorRT-LLM 1.2 and an NVIDIA GPU. A torch engine "
        "carries the checkpoint's GGUF block weights (blocks.safetensors, checked to decode "
        "to rank0.safetensors bit for bit): its CPU kernels stream them and hold no float32 "
        "copy; the trtllm backend reads the float32 tensors of rank0.safetensors.",
    )
    p.add_argument("--checkpoint_dir", required=True, help="checkpoint from redrafter-convert")
    p.add_argument("--output_dir", required=True, help="engine directory to write")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto = trtllm when TensorRT-LLM and a GPU are present, else torch "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max_batch_size",
        type=positive_int,
        default=8,
        help="rows per engine call (default: %(default)s)",
    )
    p.add_argument(
        "--max_input_len",
        type=positive_int,
        default=1024,
        help="longest prompt in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--max_seq_len",
        type=positive_int,
        default=2048,
        help="longest prompt + output in tokens (default: %(default)s)",
    )
    p.add_argument(
        "--warp_k",
        type=non_negative_int,
        default=50,
        help="top-k warp of the draft head's logits in beam search, 0 = off (default: %(default)s)",
    )
    for flag, (text, kw) in TRTLLM_FLAGS.items():
        choices = f" ({'|'.join(kw['choices'])})" if "choices" in kw else ""
        p.add_argument(flag, default=None, help=f"trtllm backend only: {text}{choices}", **kw)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return p


def run(args: argparse.Namespace) -> int:
    extra = {
        f.lstrip("-"): getattr(args, f.lstrip("-"))
        for f in TRTLLM_FLAGS
        if getattr(args, f.lstrip("-")) is not None
    }
    from ..runtime.engine import resolve_backend

    if extra and resolve_backend(args.backend) == "torch":
        print(
            f"note: {', '.join('--' + k for k in extra)}: used by the trtllm backend only; the "
            "torch backend records and ignores them",
            file=sys.stderr,
        )
    out = build_engine(
        args.checkpoint_dir,
        args.output_dir,
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len,
        warp_k=args.warp_k,
        overwrite=args.overwrite,
        extra_build_config=extra,
    )
    print(f"wrote engine {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
