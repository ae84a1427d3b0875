"""Prompts written by the base model itself, for self-distillation beyond the packaged prompt sets.

An instruction-tuned model, given only its chat template's prefix of a user turn (everything the
template renders before the user's text), writes a plausible user request and closes the turn.
Sampling that prefix many times gives as many varied requests as wanted, in the base model's own
idea of what users ask, with no third-party text (the "Magpie" recipe of Xu et al., 2024). The
base then answers them with ``gen-data`` like any prompt file.

Output: JSONL, one ``{"index", "batch", "prompt"}`` per kept request (the format ``--prompts``
reads), and ``<file>.meta.json`` with the settings key and the number of finished batches. Batch
``k`` samples with seed ``seed + k``, so an interrupted run resumes exactly: the batch after the
finished ones is sampled again and its requests already in the file (always the first ones it
keeps, in order) are skipped as repeats. The file holds exactly ``--num_prompts`` requests: the
batch that reaches the count is cut there, and a later run asking for more continues from it as
one longer run would have.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import require
from ..formats.datasets import is_english
from .data import load_base_tokenizer, model_fingerprint, require_chat_template
from .frozen_base import eos_ids, load_frozen_base
from .gen_data import META_SUFFIX, claim_output, settings_key, write_meta

_SENTINEL = "\u2063REDRAFTER-USER-TEXT\u2063"


def user_turn_prefix(tokenizer, model_dir) -> list[int]:
    """Token ids the chat template renders before a user's text (system prompt included)."""
    require_chat_template(tokenizer, model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    cut = text.find(_SENTINEL)
    require(
        cut > 0,
        f"{model_dir}: the chat template does not render the user's text verbatim, so the "
        f"prefix of a user turn cannot be found",
    )
    prefix = text[:cut]
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    require(
        len(ids) > 0 and full[: len(ids)] == ids,
        f"{model_dir}: the user-turn prefix {prefix!r} does not end on a token boundary",
    )
    return [int(i) for i in ids]


def acceptable(text: str, min_words: int) -> bool:
    """A usable request: enough words, mostly ASCII letters, no leftover template markup."""
    t = text.strip()
    return len(t.split()) >= min_words and is_english(t) and "<|" not in t and "|>" not in t


def _resume(out: Path, meta_path: Path, key: str, overwrite: bool) -> tuple[int, list[dict]]:
    """(finished batches, kept records) of an earlier run with the same settings."""
    meta = claim_output(out, meta_path, key, overwrite)
    if meta is None:
        return 0, []
    done = int(meta.get("batches_done", 0))
    kept = []
    if out.is_file():
        for line in out.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if int(rec.get("batch", done)) > done:
                break
            kept.append(rec)  # records of batch `done` (unfinished): the first ones it keeps
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))  # cut a torn line
    return done, kept


def generate_prompts(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    num_prompts: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int = 128,
    min_words: int = 4,
    batch_size: int = 32,
    seed: int = 0,
    max_batches: int | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write (or finish writing) ``num_prompts`` distinct base-written requests to ``output``
    (the batch reaching the count is cut there and not counted as finished, so a run extended to
    more prompts later samples it again and continues exactly as one longer run would have).

    A sample is kept when the model closed the user turn itself (an end-of-turn token within
    ``max_prompt_tokens``), it passes :func:`acceptable`, and it is not a repeat (case and
    surrounding space ignored). Stops after ``max_batches`` (default: 20 x the batches that
    ``num_prompts`` needs) even when fewer were kept.
    """
    from ..backends.torch_backend import TorchBackend
    from ..runtime.generator import Generator

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    require(
        num_prompts >= 1 and batch_size >= 1 and max_prompt_tokens >= 1,
        "gen-prompts: --num_prompts, --batch_size and --max_prompt_tokens must be >= 1",
    )
    require(
        temperature > 0,
        f"gen-prompts: --temperature must be > 0 (greedy would write one "
        f"request), got {temperature}",
    )
    require(0 < top_p <= 1, f"gen-prompts: --top_p must be in (0, 1], got {top_p}")
    tok = load_base_tokenizer(model_dir)
    prefix = user_turn_prefix(tok, model_dir)
    settings = {
        "kind": "gen-prompts",
        "temperature": temperature,
        "top_p": top_p,
        "max_prompt_tokens": max_prompt_tokens,
        "min_words": min_words,
        "batch_size": batch_size,
        "seed": seed,
    }
    key = settings_key(model_fingerprint(model_dir), [], settings)
    out = Path(output)
    meta_path = out.with_name(out.name + META_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, kept = _resume(out, meta_path, key, overwrite)
    seen = {r["prompt"].strip().lower() for r in kept}
    limit = max_batches or 20 * (-(-num_prompts // batch_size))
    if len(kept) >= num_prompts:
        if len(kept) > num_prompts:  # an earlier run asked for more: keep the first num_prompts
            kept = kept[:num_prompts]
            out.write_text("".join(json.dumps(r) + "\n" for r in kept))
            log(
                f"[gen-prompts] {out}: kept the first {num_prompts} prompts of an earlier, larger run"
            )
        log(f"[gen-prompts] {out}: complete ({len(kept)} prompts)")
        return out
    log(f"[gen-prompts] {out}: {len(kept)} kept from {done} batches; sampling up to {num_prompts}")
    base = load_frozen_base(model_dir, device)
    # plain decoding only: no draft head
    backend = TorchBackend(
        base,
        None,
        1,
        1,
        max_batch_size=batch_size,
        max_input_len=len(prefix),
        max_seq_len=len(prefix) + max_prompt_tokens + 1,
    )
    gen = Generator(backend, tokenizer=tok, eos_token_ids=eos_ids(base, tok))
    from tqdm import tqdm

    bar = tqdm(
        total=num_prompts,
        initial=len(kept),
        unit="prompt",
        desc="gen-prompts",
        disable=not progress,
        file=sys.stderr,
    )
    sampled, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while len(kept) < num_prompts and done < limit:
            results = gen.generate(
                [prefix] * batch_size,
                max_new_tokens=max_prompt_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + done,
                speculative=False,
            )
            new: list[dict] = []
            finished_batch = True
            for r in results:
                if len(kept) + len(new) == num_prompts:
                    # the batch is cut here and stays unfinished: a longer run resumes it
                    finished_batch = False
                    break
                text = r.text.strip()
                norm = text.lower()
                if r.finish_reason == "eos" and acceptable(text, min_words) and norm not in seen:
                    seen.add(norm)
                    new.append({"index": len(kept) + len(new), "batch": done, "prompt": text})
            with out.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
            kept.extend(new)
            done += int(finished_batch)
            sampled += len(results)
            write_meta(
                meta_path,
                {
                    "key": key,
                    "model_dir": str(model_dir),
                    "batches_done": done,
                    "kept": len(kept),
                    **settings,
                },
            )
            bar.update(len(new))
            bar.set_postfix(kept=f"{len(kept)}/{done * batch_size}")
    bar.close()
    log(
        f"[gen-prompts] kept {len(kept)} prompts ({sampled} sampled this run, "
        f"{time.perf_counter() - t0:.0f} s) -> {out}"
    )
    if len(kept) < num_prompts:
        log(
            f"[gen-prompts] warning: stopped after {done} batches with {len(kept)} < {num_prompts} prompts "
            f"kept; the model rarely writes an acceptable request with these settings"
        )
    return out
