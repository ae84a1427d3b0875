"""Benchmark prompts: a built-in set or a file, as token ids that fit the engine.

A file may hold text prompts (anything :func:`redrafter_trt.formats.datasets.load_prompts` reads) or
token-id prompts: a JSON list of token-id lists, or JSONL with one token-id list per line (for
engines without a tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RedrafterError, require
from ..formats.datasets import BUILTIN, is_jsonl, load_prompts, read_data_text
from ..runtime.generator import Generator


def _token_id_file(path: Path) -> list[list[int]] | None:
    """The file's token-id prompts, or None when it holds text prompts."""
    try:
        text = read_data_text(path, "prompt file")
        items = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if is_jsonl(path)
            else json.loads(text)
        )
    except (RedrafterError, json.JSONDecodeError):
        return None
    is_ids = (
        isinstance(items, list)
        and items
        and all(
            isinstance(r, list)
            and r
            and all(isinstance(t, int) and not isinstance(t, bool) for t in r)
            for r in items
        )
    )
    return items if is_ids else None


def load_raw_prompts(dataset: str) -> list[str | list[int]]:
    """Every prompt of ``dataset`` (built-in name or file path), text or token ids, in order."""
    if dataset not in BUILTIN:
        path = Path(dataset)
        require(path.is_file(), f"--dataset {dataset}: neither a built-in set {BUILTIN} nor a file")
        ids = _token_id_file(path)
        if ids is not None:
            return list(ids)
    return list(load_prompts(dataset))


def encode_prompts(
    gen: Generator,
    raw: list[str | list[int]],
    num_prompts: int,
    use_chat_template: bool,
    max_new_tokens: int,
    max_prompt_len: int | None = None,
) -> tuple[list[list[int]], int]:
    """The first ``num_prompts`` prompts that fit, as token ids; returns (prompts, skipped).

    A prompt fits when it has at most ``max_prompt_len`` (default: the engine's
    ``max_input_len``) tokens and leaves room for ``max_new_tokens`` under ``max_seq_len``, so
    every row generates exactly ``max_new_tokens`` tokens. Longer prompts are skipped, not cut.
    """
    be = gen.backend
    limit = min(be.max_input_len, be.max_seq_len - max_new_tokens)
    require(
        limit >= 1,
        f"--max_new_tokens {max_new_tokens} leaves no room for a prompt under the "
        f"engine's max_seq_len {be.max_seq_len}",
    )
    if max_prompt_len is not None:
        limit = min(limit, max_prompt_len)
    needs_text = any(isinstance(p, str) for p in raw)
    require(
        not needs_text or gen.tokenizer is not None,
        "this engine has no tokenizer: give --dataset a JSON/JSONL file of token-id lists",
    )
    out: list[list[int]] = []
    skipped = 0
    for p in raw:
        if len(out) == num_prompts:
            break
        ids = gen.encode(p, use_chat_template and isinstance(p, str))
        if len(ids) > limit:
            skipped += 1
            continue
        out.append(ids)
    require(
        out,
        f"no prompt has at most {limit} tokens (engine max_input_len {be.max_input_len}, "
        f"max_seq_len {be.max_seq_len} minus --max_new_tokens {max_new_tokens}"
        f"{', --max_prompt_len ' + str(max_prompt_len) if max_prompt_len else ''})",
    )
    return out, skipped
