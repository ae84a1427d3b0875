"""Self-distillation data: the base model writes the responses to a prompt set.

Drafting is judged on the base model's own outputs, so the best training text is what the base
model itself generates. Generation runs through the project's own runtime (``Generator`` over a
``TorchBackend``, plain decoding, or speculative with a given head: greedy output is identical),
in batches, and appends one JSONL record per prompt as each batch completes:

``{"index", "prompt", "prompt_ids", "response_ids", "response", "finish_reason"}``

A ``<file>.meta.json`` beside it records the settings key (model fingerprint, prompts, settings);
rerunning with the same settings resumes where the file ends, and a file made with different
settings is an error unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import RedrafterError, require
from ..formats.datasets import (
    PACKAGE_SETS,
    load_conversations,
    load_prompts,
    package_prompts,
    prompt_ref,
    require_training_source,
    shares_text_with_eval,
)
from ..models.drafter import DrafterConfig, init_drafter, load_drafter, validate_against_base
from ..models.hub import cache_root
from .data import (
    expand_sources,
    load_base_tokenizer,
    model_fingerprint,
    render_prompt,
    require_chat_template,
    source_kind,
)
from .frozen_base import eos_ids, load_frozen_base

META_SUFFIX = ".meta.json"


def read_prompt_entries(
    sources: Sequence[str],
    limit_per_source: int | None = None,
    dedupe: bool = True,
    training: bool = False,
) -> list[tuple[str, dict | None]]:
    """``(prompt, reference)`` from built-in sets, prompt files, or ShareGPT files (first user
    turn of each); the reference (:func:`prompt_ref`) names a built-in set's record, None for a
    file's prompt.

    Repeated prompts are dropped (greedy answers to them would only repeat one example; the
    built-in ``sharegpt`` set has 52 distinct first turns among its 500 conversations).
    ``training``: an evaluation set (MT-Bench) is refused, and a prompt sharing an 8-word run
    with one of its turns is dropped."""
    entries: list[tuple[str, dict | None]] = []
    seen: set[str] = set()
    for src in expand_sources(sources, "--prompts"):
        got: list[tuple[str, dict | None]]
        if training:
            require_training_source(src, "--prompts")
        if src in PACKAGE_SETS:
            got = [(t, prompt_ref(src, rid)) for rid, t in package_prompts(src)]
        elif source_kind(src) == "conversations":
            firsts = [
                next((t["content"] for t in c if t["role"] == "user"), None)
                for c in load_conversations(src)
            ]
            got = [(p, None) for p in firsts if p]
        else:
            got = [(p, None) for p in load_prompts(src)]
        require(got, f"--prompts {src}: no prompts found")
        if training:
            got = [(p, ref) for p, ref in got if not shares_text_with_eval(p)]
        if dedupe:
            fresh = []
            for p, ref in got:
                if p not in seen:
                    seen.add(p)
                    fresh.append((p, ref))
            got = fresh
        entries.extend(got[:limit_per_source] if limit_per_source else got)
    return entries


def read_prompt_sources(
    sources: Sequence[str], limit_per_source: int | None = None, dedupe: bool = True
) -> list[str]:
    """The prompts of :func:`read_prompt_entries`, without their references."""
    return [p for p, _ in read_prompt_entries(sources, limit_per_source, dedupe)]


def settings_key(model_fp: str, prompts: Sequence[str], settings: dict) -> str:
    h = hashlib.sha256()
    h.update(model_fp.encode())
    h.update(json.dumps(list(prompts)).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def claim_output(out: Path, meta_path: Path, key: str, overwrite: bool) -> dict | None:
    """The settings record of an earlier run into ``out`` made with settings ``key`` (its work can
    be resumed), or None when there is none. Output made with other settings is an error, or is
    deleted with ``overwrite``; a compressed ``out`` (``.gz``) is an error (runs append to it)."""
    require(
        out.suffix != ".gz",
        f"--output {out}: gen-data appends to a plain JSONL file, so that an interrupted run "
        "resumes where it stopped; write .jsonl and compress it afterwards (gzip -n) if you "
        "like: every reader of gen-data files takes .jsonl.gz",
    )
    if not (out.exists() or meta_path.exists()):
        return None
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("key") == key:
        return meta
    require(
        overwrite,
        f"{out}: exists and was made with other settings or another model "
        f"(key {meta.get('key')} != {key}); pass --overwrite or choose another --output",
    )
    out.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    return None


def write_meta(meta_path: Path, meta: dict) -> None:
    """Replace the settings record atomically."""
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)


def default_output(key: str) -> Path:
    return cache_root() / "train_data" / f"selfdistill-{key}.jsonl"


def _done_indices(path: Path) -> set[int]:
    """Indices already written; a torn last line (interrupted write) is cut off."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    done, good = set(), 0
    for line in lines:
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            done.add(int(rec["index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break
        good += len(line) + 1
    good = min(good, len(raw))
    if good < len(raw):
        with path.open("r+b") as f:
            f.truncate(good)
    return done


def _record(index: int, result, ref: dict | None, prompt: tuple[str, list[int]] | None) -> dict:
    """One output line: the answer, its prompt's reference (when it has one) and, unless
    ``prompt`` is None (``refs_only``), the prompt's text and ids and the answer's text."""
    rec: dict = {"index": index}
    rec.update({"prompt_ref": ref} if ref else {})
    if prompt is not None:
        rec.update({"prompt": prompt[0], "prompt_ids": prompt[1]})
    rec["response_ids"] = result.token_ids
    if prompt is not None:
        rec["response"] = result.text
    rec["finish_reason"] = result.finish_reason
    return rec


def generate_data(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    output: str | os.PathLike | None = None,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    max_prompt_len: int = 512,
    chat_template: bool = True,
    drafter_dir: str | os.PathLike | None = None,
    refs: Sequence[dict | None] | None = None,
    refs_only: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write (or finish writing) the self-distillation JSONL for ``prompts``; returns its path.

    Prompts are processed in a fixed order (by token length, then index) and in fixed batches, so
    an interrupted run resumes exactly; batch ``k`` samples with seed ``seed + k``.
    ``refs`` (one per prompt, or None) are written as each record's ``prompt_ref``; with
    ``refs_only`` a record holds the reference and the answer's token ids but neither the prompt's
    text nor its ids (the trainer rebuilds them from the installed package), so a file to keep in a
    repository carries no third-party text.
    """
    from ..backends.torch_backend import TorchBackend
    from ..runtime.generator import Generator

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    require(len(prompts) > 0, "gen-data: no prompts")
    require(
        max_new_tokens >= 1 and batch_size >= 1,
        "gen-data: max_new_tokens and batch_size must be >= 1",
    )
    require(
        refs is None or len(refs) == len(prompts),
        f"gen-data: {len(prompts)} prompts but {len(refs or [])} references",
    )
    require(
        not refs_only or (refs is not None and all(refs)),
        "gen-data: --refs_only needs every prompt from a built-in package set "
        f"({', '.join(s for s in PACKAGE_SETS if PACKAGE_SETS[s].train)})",
    )
    tok = load_base_tokenizer(model_dir)
    if chat_template:
        require_chat_template(tok, model_dir)
    settings = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "batch_size": batch_size,
        "max_prompt_len": max_prompt_len,
        "chat_template": chat_template,
        "refs_only": refs_only,
    }
    key = settings_key(model_fingerprint(model_dir), prompts, settings)
    out = Path(output) if output else default_output(key)
    meta_path = out.with_name(out.name + META_SUFFIX)
    claimed = claim_output(out, meta_path, key, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if claimed is None:
        write_meta(
            meta_path,
            {"key": key, "model_dir": str(model_dir), "num_prompts": len(prompts), **settings},
        )

    encoded = [render_prompt(tok, p, chat_template) for p in prompts]
    order = sorted(
        (i for i in range(len(prompts)) if len(encoded[i]) <= max_prompt_len),
        key=lambda i: (len(encoded[i]), i),
    )
    skipped = len(prompts) - len(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    done = _done_indices(out)
    pending = [(k, b) for k, b in enumerate(batches) if not set(b) <= done]
    if skipped:
        log(f"[gen-data] skipping {skipped} prompt(s) longer than {max_prompt_len} tokens")
    if not pending:
        log(f"[gen-data] {out}: complete ({len(done)} responses)")
        return out
    log(
        f"[gen-data] {out}: {len(order) - sum(len(b) for _, b in pending)} done, "
        f"{sum(len(b) for _, b in pending)} to generate"
    )

    base = load_frozen_base(model_dir, device)
    if drafter_dir is not None:
        drafter = load_drafter(drafter_dir, base_lm_head=base.lm_head.weight)
        validate_against_base(
            drafter.config,
            base.config.hidden_size,
            base.config.vocab_size,
            tuple(base.embedding.weight.shape),
            f"--drafter_model_dir {drafter_dir}",
        )
        w, d = 4, 4
    else:  # plain decoding never calls the head; a 1-wide stand-in satisfies the backend
        drafter = init_drafter(
            DrafterConfig(base.config.vocab_size, base.config.hidden_size, 1, 0, False)
        )
        w, d = 1, 1
    backend = TorchBackend(
        base,
        drafter.to(device),
        w,
        d,
        max_batch_size=batch_size,
        max_input_len=max_prompt_len,
        max_seq_len=max_prompt_len + max_new_tokens + 1,
    )
    gen = Generator(backend, tokenizer=tok, eos_token_ids=eos_ids(base, tok))
    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(b) for _, b in pending),
        unit="prompt",
        disable=not progress,
        desc="gen-data",
        file=sys.stderr,
    )
    n_tok, t0 = 0, time.perf_counter()
    with out.open("a") as f, torch.inference_mode():
        for k, batch in pending:
            results = gen.generate(
                [encoded[i] for i in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed + k,
                speculative=drafter_dir is not None,
            )
            for i, r in zip(batch, results):
                ref = refs[i] if refs is not None else None
                rec = _record(i, r, ref, None if refs_only else (prompts[i], encoded[i]))
                f.write(json.dumps(rec) + "\n")
                n_tok += len(r.token_ids)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.1f}")
    bar.close()
    log(f"[gen-data] wrote {n_tok} tokens in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


__all__ = [
    "generate_data",
    "read_prompt_sources",
    "read_prompt_entries",
    "default_output",
    "claim_output",
    "write_meta",
    "RedrafterError",
]
