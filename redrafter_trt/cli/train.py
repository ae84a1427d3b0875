"""``redrafter-train``: distil a base model into a ReDrafter draft head.

Subcommands:

- ``redrafter-train gen-prompts``: the base model writes user requests (more prompts than the
  packaged sets hold; resumable);
- ``redrafter-train gen-data``: the base model writes responses to a prompt set (self-distillation
  data; batched, resumable, cached);
- ``redrafter-train train`` (the default when no subcommand is given): train the head against the
  frozen base and write a drafter directory for ``redrafter-convert --drafter_model_dir``;
- ``redrafter-train eval``: tokens per step of a head through the runtime (greedy, W beams, D steps).
"""

from __future__ import annotations

import argparse
import sys

from ..cmdline import EXIT_USAGE, add_threads_argument, non_negative_int, positive_int, run_main
from ..errors import require
from ..formats.datasets import PACKAGE_SETS
from ..models.hub import DEFAULT_MODEL
from ..train.config import (
    BASE_DTYPES,
    KL_VOCABS,
    LM_HEAD_INITS,
    LOSSES,
    NEW_ROWS,
    PRECISIONS,
)

SUBCOMMANDS = ("train", "gen-prompts", "gen-data", "eval")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redrafter-train",
        description="Train a ReDrafter draft head by distillation from a frozen base model "
        "(subcommands: train, gen-prompts, gen-data, eval; 'train' is the default).",
    )
    sub = p.add_subparsers(dest="command", metavar="{train,gen-prompts,gen-data,eval}")
    for add in (add_train_command, add_gen_prompts_command, add_gen_data_command, add_eval_command):
        add_threads_argument(add(sub))
    return p


def add_train_command(sub) -> argparse.ArgumentParser:
    """``redrafter-train train``: its own flags, then each argument group's."""
    t = sub.add_parser(
        "train",
        help="train a draft head; writes a drafter directory",
        description="Train a draft head against a frozen base model and write an "
        "Apple-format drafter directory (config.json, model.safetensors, "
        "training_report.json).",
    )
    t.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL,
        help=f"Hugging Face base model directory or '{DEFAULT_MODEL}' (default: %(default)s)",
    )
    t.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="training data: gen-data JSONL (self-distillation), ShareGPT JSON/JSONL "
        "conversations ('sharegpt' = the built-in 500), or prompt lists "
        "(JSON/JSONL, or 'writingbench'); a directory stands for the *.jsonl files in it",
    )
    t.add_argument("--output_dir", required=True, help="drafter directory to write")
    for add_group in (
        add_head_arguments,
        add_loss_arguments,
        add_optimisation_arguments,
        add_data_arguments,
        add_checkpoint_arguments,
    ):
        add_group(t)
    return t


def add_head_arguments(t: argparse.ArgumentParser) -> None:
    """``train``: the head's shape and initialisation."""
    g = t.add_argument_group("head")
    g.add_argument(
        "--exit_dim",
        type=positive_int,
        default=None,
        help="head width; smaller than 2 x hidden size adds input_proj (default: 2H)",
    )
    g.add_argument(
        "--num_draft_layers",
        type=non_negative_int,
        default=None,
        help="residual blocks (default: 1). With --init_from: more blocks than the head has "
        "grows it, each new block starting as the identity (the head drafts as before until "
        "trained); default: the head's own",
    )
    g.add_argument("--no_rnn", action="store_true", help="state update s + E(x) instead of the RNN")
    g.add_argument(
        "--init_from",
        default=None,
        help="start from an existing drafter directory (its shape replaces --exit_dim and "
        "--no_rnn; see --num_draft_layers and --draft_vocab_size)",
    )
    g.add_argument(
        "--lm_head_init",
        choices=LM_HEAD_INITS,
        default="random",
        help="random, or base: copy the base model's vocabulary projection into the head's "
        "(needs --exit_dim equal to the base hidden size) and start input_proj as a "
        "pass-through of the context (default: random)",
    )
    g.add_argument(
        "--draft_vocab_size",
        type=int,
        default=None,
        metavar="K",
        help="draft over K token ids only: the EOS ids plus the tokens the base wrote most "
        "often in the training data; the head's final projection gets K rows (the "
        "base's rows of those ids with --lm_head_init base) and the head stores the "
        "id map (draft_vocab). Output stays exact; a token outside the K ids is never "
        "drafted. With --init_from: the head's draft vocabulary becomes these K ids (its "
        "own ids kept first when they fit), trained rows kept, a new id's row the base's "
        "carried by the linear map from the base's rows of the head's ids to its trained "
        "rows (zero when exit_dim is not the base hidden size). Default: the full vocabulary "
        "(with --init_from, the head's own)",
    )
    g.add_argument(
        "--new_rows",
        choices=NEW_ROWS,
        default="mapped",
        help="with --init_from and a wider --draft_vocab_size, where a new id's row starts: "
        "mapped (the base's row carried by the linear map from the base's rows of the head's "
        "ids to its trained rows; the untrained widened head drafts nearly as before) or base (the "
        "base's row as it is: the new rows outscore the trained ones until trained; how the "
        "shipped smollm2 head was widened) (default: mapped)",
    )
    g.add_argument(
        "--freeze_lm_head",
        action="store_true",
        help="do not train the head's final V x exit_dim projection (with --lm_head_init "
        "base: fewer trained parameters, less memorisation on small data)",
    )
    g.add_argument(
        "--draft_len",
        type=positive_int,
        default=4,
        help="D unrolled draft steps trained (use the engine's D; default: 4)",
    )


def add_loss_arguments(t: argparse.ArgumentParser) -> None:
    """``train``: the loss."""
    g = t.add_argument_group("loss")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default="kl",
        help="kl: forward KL from the base's next-token distribution; ce: cross-entropy "
        "on the data tokens; mix: alpha*KL + (1-alpha)*CE; logit_match: for a head "
        "with the base's frozen projection (--lm_head_init base --freeze_lm_head), "
        "KL over the teacher's top-k plus mse_weight x the full-vocabulary logit "
        "MSE, both without forming the V-wide logits (several times faster on CPU) "
        "(default: kl)",
    )
    g.add_argument(
        "--mse_weight",
        type=float,
        default=1.0,
        help="--loss logit_match: weight of the logit MSE term (default: 1)",
    )
    g.add_argument(
        "--kl_vocab",
        choices=KL_VOCABS,
        default="full",
        help="vocabulary of the softmax in the loss: full, or batch = the union of the "
        "batch's teacher top-k tokens (and labels), several times cheaper for a "
        "large vocabulary; evaluation always uses the full one (default: full)",
    )
    g.add_argument(
        "--alpha", type=float, default=None, help="KL weight for --loss mix (default 0.5)"
    )
    g.add_argument(
        "--temperature", type=float, default=1.0, help="distillation temperature (default: 1)"
    )
    g.add_argument(
        "--teacher_topk",
        type=non_negative_int,
        default=32,
        help="truncate the teacher to its top-k tokens (0 = full vocabulary; default: 32)",
    )
    g.add_argument(
        "--depth_weights",
        type=_floats,
        default=None,
        help="per-draft-step loss weights, comma-separated, D values (default: all 1)",
    )
    g.add_argument(
        "--own_path",
        action="store_true",
        help="train depth i > 1 only where the head's own top-1 drafts at depths 1..i-1 equal "
        "the data: the path its own greedy draft takes, which greedy verification accepts "
        "when the data are the base's greedy answers (default: every depth of every position, "
        "teacher forced)",
    )


def add_optimisation_arguments(t: argparse.ArgumentParser) -> None:
    """``train``: the optimiser, its schedule and budget."""
    g = t.add_argument_group("optimisation")
    g.add_argument(
        "--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)"
    )
    g.add_argument(
        "--min_lr_ratio", type=float, default=0.1, help="final lr / peak lr (default: 0.1)"
    )
    g.add_argument(
        "--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)"
    )
    g.add_argument(
        "--warmup_steps",
        type=non_negative_int,
        default=50,
        help="linear warmup steps before the cosine decay (default: 50)",
    )
    g.add_argument(
        "--max_steps", type=positive_int, default=None, help="optimizer steps (default: --epochs)"
    )
    g.add_argument("--epochs", type=float, default=1.0, help="epochs when --max_steps is not given")
    g.add_argument(
        "--time_budget_min",
        type=float,
        default=None,
        help="cap the run at about this many minutes: the number of steps (and the "
        "cosine schedule) is fixed from the measured time of the first steps",
    )
    g.add_argument(
        "--batch_size",
        type=positive_int,
        default=256,
        help="positions per micro-batch per rank; each trains all D steps (default: 256)",
    )
    g.add_argument(
        "--grad_accum",
        type=positive_int,
        default=1,
        help="micro-batches accumulated per optimizer step (default: 1)",
    )
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    g.add_argument("--seed", type=int, default=0, help="seed of init, shuffling and held-out split")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 (fp16 without bf16) autocast on GPU, fp32 on CPU",
    )


def add_data_arguments(t: argparse.ArgumentParser) -> None:
    """``train``: the training and held-out data."""
    g = t.add_argument_group("data")
    g.add_argument(
        "--max_seq_len", type=positive_int, default=1024, help="truncate sequences (default: 1024)"
    )
    g.add_argument(
        "--limit_per_source",
        type=positive_int,
        default=None,
        help="use the first N examples of each --data source",
    )
    g.add_argument(
        "--no_chat_template",
        action="store_true",
        help="render conversations as raw text instead of the tokenizer's chat template",
    )
    g.add_argument("--eval_fraction", type=float, default=0.05, help="held-out share of sequences")
    g.add_argument(
        "--eval_positions",
        type=non_negative_int,
        default=4096,
        help="held-out positions evaluated at most (0 = all)",
    )
    g.add_argument(
        "--cache_dir",
        default=None,
        help="where base features are cached (default: the user cache dir)",
    )
    g.add_argument(
        "--base_dtype",
        choices=BASE_DTYPES,
        default="float32",
        help="the frozen base's dtype when it computes the features (default: float32, the "
        "weights as decoding reads them). bfloat16 runs a bfloat16 copy on torch's kernels, for "
        "a CPU with bf16 units (AVX512_BF16 or AMX) or a GPU: 1.7-1.9x faster on a 2-vCPU EPYC "
        "with AVX512_BF16; its features differ a little (the base's top-1 token agrees at about "
        "98%%); cached apart from float32 features",
    )


def add_checkpoint_arguments(t: argparse.ArgumentParser) -> None:
    """``train``: checkpoints, resuming, output and device."""
    g = t.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_dir", default=None, help="default: <output_dir>.checkpoints")
    g.add_argument(
        "--save_every", type=non_negative_int, default=0, help="checkpoint every N steps"
    )
    g.add_argument(
        "--eval_every", type=non_negative_int, default=0, help="held-out eval every N steps"
    )
    g.add_argument(
        "--resume",
        default=None,
        help="'auto' (latest in --checkpoint_dir, if any) or a step-*.pt file",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


def add_gen_prompts_command(sub) -> argparse.ArgumentParser:
    """``redrafter-train gen-prompts``."""
    q = sub.add_parser(
        "gen-prompts",
        help="let the base model write user requests (more prompts)",
        description="Sample user requests from the base model itself: it is given only its "
        "chat template's prefix of a user turn and writes the request (the "
        "Magpie recipe). Keeps distinct, finished, mostly-English requests; "
        "writes a prompt JSONL that gen-data --prompts reads, resumes an "
        "interrupted run. Prints the output path.",
    )
    q.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL,
        help=f"Hugging Face base model directory or '{DEFAULT_MODEL}' (default: %(default)s)",
    )
    q.add_argument("--output", required=True, help="prompt JSONL to write")
    q.add_argument(
        "--num_prompts", type=positive_int, required=True, help="distinct requests to keep"
    )
    q.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default: 1)"
    )
    q.add_argument(
        "--top_p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default: 1)"
    )
    q.add_argument(
        "--max_prompt_tokens",
        type=positive_int,
        default=128,
        help="a request not finished within this many tokens is dropped (default: 128)",
    )
    q.add_argument(
        "--min_words", type=positive_int, default=4, help="drop shorter requests (default: 4)"
    )
    q.add_argument(
        "--batch_size", type=positive_int, default=32, help="samples per batch (default: 32)"
    )
    q.add_argument("--seed", type=int, default=0, help="batch k samples with seed + k (default: 0)")
    q.add_argument(
        "--max_batches",
        type=positive_int,
        default=None,
        help="give up after this many batches (default: 20 x the batches --num_prompts needs)",
    )
    q.add_argument(
        "--overwrite", action="store_true", help="replace an --output made with other settings"
    )
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    q.add_argument("--no_progress", action="store_true", help="no progress bar")
    return q


def add_gen_data_command(sub) -> argparse.ArgumentParser:
    """``redrafter-train gen-data``."""
    d = sub.add_parser(
        "gen-data",
        help="let the base model write responses (self-distillation data)",
        description="Generate the base model's own responses to a prompt set, batched, "
        "through the project's runtime; appends JSONL as batches finish and "
        "resumes an interrupted run. Prints the output path.",
    )
    d.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL,
        help=f"Hugging Face base model directory or '{DEFAULT_MODEL}' (default: %(default)s)",
    )
    d.add_argument(
        "--prompts",
        nargs="+",
        default=["sharegpt"],
        help="prompt sources: a built-in set of human-written requests read from its installed "
        f"package ({', '.join(s for s in PACKAGE_SETS if PACKAGE_SETS[s].train)}; mt-bench, the "
        "evaluation set, is refused), a prompt JSON/JSONL file (gen-data output written without "
        "--refs_only included: its prompts), a directory of such *.jsonl files, or a ShareGPT "
        "file (first user turns) (default: sharegpt)",
    )
    d.add_argument(
        "--limit", type=positive_int, default=None, help="first N prompts of each source"
    )
    d.add_argument(
        "--output",
        default=None,
        help="JSONL to write (default: the user cache dir, keyed by model, prompts and settings)",
    )
    d.add_argument(
        "--max_new_tokens",
        type=positive_int,
        default=256,
        help="tokens the base writes per prompt at most (default: 256)",
    )
    d.add_argument(
        "--batch_size", type=positive_int, default=16, help="prompts per batch (default: 16)"
    )
    d.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed with --temperature > 0")
    d.add_argument(
        "--max_prompt_len",
        type=positive_int,
        default=512,
        help="skip prompts longer than this many tokens (default: 512)",
    )
    d.add_argument(
        "--drafter_model_dir",
        default=None,
        help="speed generation up with a trained head (greedy output is identical)",
    )
    d.add_argument(
        "--no_chat_template",
        action="store_true",
        help="feed prompts as raw text instead of a chat user turn",
    )
    d.add_argument(
        "--refs_only",
        action="store_true",
        help="write each prompt as a reference to its record in the installed package "
        "(set, package, version, record id, hash) instead of its text and token ids; the "
        "trainer rebuilds the prompt from the package. Needs every --prompts source to be a "
        "built-in package set",
    )
    d.add_argument(
        "--overwrite", action="store_true", help="replace an --output made with other settings"
    )
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    d.add_argument("--no_progress", action="store_true", help="no progress bar")
    return d


def add_eval_command(sub) -> argparse.ArgumentParser:
    """``redrafter-train eval``."""
    e = sub.add_parser(
        "eval",
        help="tokens per step of a head through the runtime (greedy)",
        description="Generate greedily with base + head through the runtime's torch "
        "backend and print tokens per step as JSON.",
    )
    e.add_argument(
        "--model_dir",
        default=DEFAULT_MODEL,
        help=f"Hugging Face base model directory or '{DEFAULT_MODEL}' (default: %(default)s)",
    )
    e.add_argument("--drafter_model_dir", required=True, help="the draft head directory to measure")
    e.add_argument(
        "--prompts",
        nargs="+",
        default=["mt-bench"],
        help="prompt sources (default: mt-bench first turns)",
    )
    e.add_argument(
        "--limit", type=positive_int, default=None, help="first N prompts of each source"
    )
    e.add_argument(
        "--max_new_tokens",
        type=positive_int,
        default=128,
        help="new tokens per prompt (default: 128)",
    )
    e.add_argument(
        "--redrafter_num_beams", type=positive_int, default=4, help="W beams (default: 4)"
    )
    e.add_argument(
        "--redrafter_draft_len_per_beam",
        type=positive_int,
        default=4,
        help="D draft tokens per beam (default: 4)",
    )
    e.add_argument(
        "--batch_size", type=positive_int, default=8, help="rows per engine call (default: 8)"
    )
    e.add_argument(
        "--plain_check",
        action="store_true",
        help="also decode without speculation and check the outputs are identical",
    )
    e.add_argument(
        "--no_chat_template",
        action="store_true",
        help="feed prompts as raw text instead of a chat user turn",
    )
    e.add_argument("--output", default=None, help="also write the JSON here")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    e.add_argument("--no_progress", action="store_true", help="no progress bar")
    return e


def check_paths(args: argparse.Namespace) -> None:
    """Every directory flag names itself when it is missing or holds the wrong kind of directory,
    and --device is a device this torch can use, before any model is read."""
    from ..formats.checkpoint import require_model_dir
    from ..models.hub import DEFAULT_MODEL
    from ..runtime.loader import resolve_device

    if getattr(args, "model_dir", DEFAULT_MODEL) != DEFAULT_MODEL:
        require_model_dir(args.model_dir, "--model_dir", "base")
    for flag in ("drafter_model_dir", "init_from"):
        if getattr(args, flag, None) is not None:
            require_model_dir(getattr(args, flag), f"--{flag}", "drafter")
    if getattr(args, "device", None) is not None:
        resolve_device(args.device)


def run(args: argparse.Namespace) -> int:
    check_paths(args)
    if args.command == "gen-data":
        return _gen_data(args)
    if args.command == "gen-prompts":
        return _gen_prompts(args)
    if args.command == "eval":
        return _eval(args)
    return _train(args)


def _gen_prompts(args) -> int:
    from ..models.hub import resolve_base_model_dir
    from ..train.gen_prompts import generate_prompts

    out = generate_prompts(
        resolve_base_model_dir(args.model_dir),
        args.output,
        args.num_prompts,
        temperature=args.temperature,
        top_p=args.top_p,
        max_prompt_tokens=args.max_prompt_tokens,
        min_words=args.min_words,
        batch_size=args.batch_size,
        seed=args.seed,
        max_batches=args.max_batches,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
    )
    print(out)
    return 0


def _gen_data(args) -> int:
    from ..models.hub import resolve_base_model_dir
    from ..train.gen_data import generate_data, read_prompt_entries

    require(args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}")
    model_dir = resolve_base_model_dir(args.model_dir)
    entries = read_prompt_entries(args.prompts, args.limit, training=True)
    out = generate_data(
        model_dir,
        [p for p, _ in entries],
        args.output,
        refs=[r for _, r in entries],
        refs_only=args.refs_only,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        seed=args.seed,
        max_prompt_len=args.max_prompt_len,
        chat_template=not args.no_chat_template,
        drafter_dir=args.drafter_model_dir,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
    )
    print(out)
    return 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    from ..models.hub import resolve_base_model_dir
    from ..train.gen_data import read_prompt_sources
    from ..train.measure import runtime_tokens_per_step

    model_dir = resolve_base_model_dir(args.model_dir)
    prompts = read_prompt_sources(args.prompts, args.limit)
    res = runtime_tokens_per_step(
        model_dir,
        args.drafter_model_dir,
        prompts,
        num_beams=args.redrafter_num_beams,
        draft_len=args.redrafter_draft_len_per_beam,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=not args.no_chat_template,
        plain_check=args.plain_check,
        device=args.device,
        progress=not args.no_progress,
    )
    res.update(
        {"drafter_model_dir": str(args.drafter_model_dir), "prompt_sources": list(args.prompts)}
    )
    text = json.dumps(res, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    require(res.get("identical_to_plain", True), "speculative output differs from plain decoding")
    return 0


def _train(args) -> int:
    from ..train.config import TrainConfig
    from ..train.loop import train_drafter

    cfg = TrainConfig(
        model_dir=args.model_dir,
        data=list(args.data),
        output_dir=args.output_dir,
        exit_dim=args.exit_dim,
        num_draft_layers=args.num_draft_layers,
        rnn=not args.no_rnn,
        init_from=args.init_from,
        lm_head_init=args.lm_head_init,
        freeze_lm_head=args.freeze_lm_head,
        draft_vocab_size=args.draft_vocab_size,
        new_rows=args.new_rows,
        draft_len=args.draft_len,
        loss=args.loss,
        mse_weight=args.mse_weight,
        kl_vocab=args.kl_vocab,
        alpha=args.alpha,
        temperature=args.temperature,
        teacher_topk=args.teacher_topk,
        depth_weights=args.depth_weights,
        own_path=args.own_path,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_steps=args.max_steps,
        epochs=args.epochs,
        time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        grad_clip=args.grad_clip,
        seed=args.seed,
        precision=args.precision,
        max_seq_len=args.max_seq_len,
        limit_per_source=args.limit_per_source,
        chat_template=not args.no_chat_template,
        eval_fraction=args.eval_fraction,
        eval_positions=args.eval_positions,
        cache_dir=args.cache_dir,
        base_dtype=args.base_dtype,
        checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every,
        eval_every=args.eval_every,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        progress=not args.no_progress,
    )
    import os

    out = train_drafter(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        # 'train' takes no positional arguments, so a leading word is a mistyped subcommand
        near = [c for c in SUBCOMMANDS if c.replace("-", "_") == argv[0].replace("-", "_").lower()]
        print(
            f"redrafter-train: error: unknown subcommand {argv[0]!r}; expected one of "
            f"{', '.join(SUBCOMMANDS)}" + (f" (did you mean {near[0]!r}?)" if near else ""),
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not argv or argv[0] not in SUBCOMMANDS + ("-h", "--help", "--version"):
        argv = ["train"] + argv  # 'train' is the default subcommand
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
