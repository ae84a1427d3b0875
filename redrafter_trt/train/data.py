"""Training data for the draft head: token sequences with a loss mask.

Every source becomes a list of :class:`Example` (``ids`` [T] token ids, ``targets`` [T] bool:
token j is a training target). Sources:

- self-distillation records written by :func:`redrafter_trt.train.gen_data.generate_data`
  (JSONL, ``prompt_ids`` + ``response_ids``): used as they are, targets = the response;
- ShareGPT-format conversations (JSON list or JSONL of ``{"conversations": [{"from", "value"}]}``
  or ``{"messages": [{"role", "content"}]}``), rendered with the base model's chat template;
  targets = the assistant turns;
- plain prompt lists (JSON list of strings, JSONL of ``{"prompt": ...}``, or a built-in set such
  as ``writingbench``), each rendered as one user turn; targets = every token.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RedrafterError, require
from ..formats.datasets import (
    BUILTIN,
    is_jsonl,
    load_conversations,
    load_prompts,
    package_file,
    read_data_text,
    read_first_line,
    read_json_list,
    require_training_source,
    resolve_prompt_ref,
)


@dataclass
class Example:
    ids: list[int]
    targets: list[bool]

    def __post_init__(self):
        assert len(self.ids) == len(self.targets)


# --------------------------------------------------------------------------- tokenizer
def load_base_tokenizer(model_dir: str | os.PathLike):
    """The Hugging Face tokenizer saved in the base model directory."""
    model_dir = Path(model_dir)
    require(
        (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file(),
        f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer.model); text data needs the "
        "base model's tokenizer (self-distillation JSONL with token ids needs none)",
    )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise RedrafterError(f"{model_dir}: cannot load the tokenizer ({e})") from e


def require_chat_template(tokenizer, model_dir) -> None:
    require(
        getattr(tokenizer, "chat_template", None),
        f"{model_dir}: the tokenizer has no chat template (tokenizer_config.json "
        "'chat_template' or chat_template.jinja), so conversations cannot be rendered the way "
        "the model sees them; add the template, or pass --no_chat_template to train on the "
        "raw text of the turns",
    )


def _as_ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(t) for t in x]


def render_prompt(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """One user turn with the generation prompt (what the runtime's --use_chat_template feeds)."""
    if chat_template:
        return _as_ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        )
    return _as_ids(tokenizer(prompt, add_special_tokens=True))


def render_conversation(
    tokenizer, conv: list[dict[str, str]], chat_template: bool = True
) -> Example | None:
    """Token ids of a whole conversation; targets = the tokens of the assistant turns.

    The assistant spans come from rendering growing prefixes of the conversation as text and
    mapping character spans to tokens through the tokenizer's offsets, so any template works as
    long as rendering a prefix gives a prefix of the whole text.
    """
    if not any(t["role"] == "assistant" for t in conv):
        return None
    if chat_template:
        full = tokenizer.apply_chat_template(conv, tokenize=False)
        spans = []
        for k, turn in enumerate(conv):
            if turn["role"] != "assistant":
                continue
            pre = (
                tokenizer.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True)
                if k
                else ""
            )
            post = tokenizer.apply_chat_template(conv[: k + 1], tokenize=False)
            if not (full.startswith(post) and post.startswith(pre)):
                return None  # a template that rewrites earlier turns: no clean spans
            spans.append((len(pre), len(post)))
        add_special = False
    else:
        parts, spans, pos = [], [], 0
        for turn in conv:
            text = turn["content"] + "\n\n"
            if turn["role"] == "assistant":
                spans.append((pos, pos + len(text)))
            parts.append(text)
            pos += len(text)
        full = "".join(parts)
        add_special = True
    enc = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = [int(t) for t in enc["input_ids"]]
    offsets = enc["offset_mapping"]
    targets = [any(a <= s < b for a, b in spans) and e > s for s, e in offsets]
    return Example(ids, targets)


# --------------------------------------------------------------------------- sources
def _read_items(path: Path) -> list:
    return read_json_list(path, "data file")


def expand_sources(sources: Sequence[str], flag: str = "--data") -> list[str]:
    """The data sources with every directory replaced by the ``*.jsonl`` and ``*.jsonl.gz``
    files in it (sorted by name; ``.meta.json`` records are not data). Each file stays a source
    of its own, so its cached base features are shared with runs that name the file directly.
    ``flag`` names the option in errors; a directory holding both ``x.jsonl`` and ``x.jsonl.gz``
    (the same data twice, most likely) is refused."""
    out: list[str] = []
    for src in sources:
        path = Path(src)
        if src not in BUILTIN and path.is_dir():
            found = [f for f in path.iterdir() if f.is_file() and is_jsonl(f)]
            files = sorted(str(f) for f in found)
            require(files, f"{flag} {src}: a directory with no *.jsonl or *.jsonl.gz files")
            both = sorted(
                f.name for f in found if f.suffix == ".jsonl" and (path / f"{f.name}.gz").is_file()
            )
            require(
                not both,
                f"{flag} {src}: holds {', '.join(both[:3])} both plain and gzip-compressed "
                "(.jsonl.gz); keep one of each, or every example would be read twice",
            )
            out.extend(files)
        else:
            out.append(src)
    return out


def source_kind(source: str) -> str:
    """``selfdistill`` | ``conversations`` | ``prompts`` for a data source (file or built-in)."""
    if source == "sharegpt":
        return "conversations"
    if source in BUILTIN:
        return "prompts"
    path = Path(source)
    if path.is_file() and is_jsonl(path):
        first = read_first_line(path, "data file")
        try:
            head = json.loads(first) if first else None
        except json.JSONDecodeError as e:
            raise RedrafterError(f"{path}: not valid JSONL ({e})") from e
        items = [head]
    else:
        items = _read_items(path)[:1]
    head = items[0] if items else None
    if isinstance(head, dict) and "response_ids" in head:
        return "selfdistill"
    if isinstance(head, dict) and ("conversations" in head or "messages" in head):
        return "conversations"
    return "prompts"


def _selfdistill_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` of a gen-data file. A torn last line (an interrupted run) is
    dropped; a line that is not JSON anywhere else is an error naming the file and line."""
    lines = read_data_text(path, "gen-data file").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    out = []
    for k, (n, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            require(
                k == len(numbered) - 1,
                f"{path}: line {n} is not valid JSON ({e}); the file is corrupt (only the "
                "last line of an interrupted gen-data run may be torn)",
            )
            continue
        require(isinstance(rec, dict), f"{path}: line {n} is not a JSON object")
        out.append((n, rec))
    return out


def selfdistill_needs_tokenizer(path: str | os.PathLike) -> bool:
    """True when a gen-data file names its prompts by reference (``prompt_ref``, no
    ``prompt_ids``): rebuilding them needs the base model's tokenizer."""
    return any(
        "prompt_ids" not in rec and "prompt_ref" in rec
        for _, rec in _selfdistill_records(Path(path))
    )


def read_selfdistill(
    path: str | os.PathLike, tokenizer=None, chat_template: bool = True
) -> list[Example]:
    """Examples from a gen-data JSONL file: ``prompt_ids`` + ``response_ids``, or a
    ``prompt_ref`` whose prompt is rebuilt from its installed package and rendered with the
    base model's ``tokenizer`` (see :func:`redrafter_trt.formats.datasets.resolve_prompt_ref`)."""
    path = Path(path)
    out = []
    for n, rec in _selfdistill_records(path):
        p, r = rec.get("prompt_ids"), rec.get("response_ids")
        if p is None and "prompt_ref" in rec:
            require(
                tokenizer is not None,
                f"{path}: line {n} names its prompt by reference (prompt_ref); rebuilding it "
                "needs the base model's tokenizer",
            )
            text = resolve_prompt_ref(rec["prompt_ref"], f"{path}: line {n}")
            p = render_prompt(tokenizer, text, chat_template)
        require(
            isinstance(p, list) and isinstance(r, list),
            f"{path}: line {n} lacks prompt_ids (or prompt_ref) and response_ids lists",
        )
        require(
            all(isinstance(t, int) and t >= 0 for t in p + r),
            f"{path}: line {n} holds token ids that are not non-negative integers",
        )
        if r:
            out.append(Example(p + r, [False] * len(p) + [True] * len(r)))
    return out


def load_examples(
    sources: Sequence[str],
    tokenizer=None,
    chat_template: bool = True,
    max_seq_len: int = 1024,
    model_dir: str | os.PathLike = "",
    limit_per_source: int | None = None,
) -> list[Example]:
    """Examples from every source (the first ``limit_per_source`` of each, when given),
    truncated to ``max_seq_len`` tokens.

    Raises a :class:`RedrafterError` when the sources hold no usable turns (no example with at
    least two target tokens after the first token).
    """
    require(len(sources) > 0, "no training data given (--data)")
    examples: list[Example] = []
    for src in sources:
        kind = source_kind(src)
        require_training_source(src, "--data")
        if kind == "selfdistill":
            got = read_selfdistill(src, tokenizer, chat_template)
            got = got[:limit_per_source] if limit_per_source else got
        else:
            require(tokenizer is not None, f"{src}: text data needs the base model's tokenizer")
            if chat_template:
                require_chat_template(tokenizer, model_dir)
            if kind == "conversations":
                convs = load_conversations(package_file("sharegpt") if src == "sharegpt" else src)
                convs = convs[:limit_per_source] if limit_per_source else convs
                got = [
                    e
                    for e in (render_conversation(tokenizer, c, chat_template) for c in convs)
                    if e
                ]
            else:
                try:
                    prompts = load_prompts(src)
                except RedrafterError:
                    prompts = []
                prompts = prompts[:limit_per_source] if limit_per_source else prompts
                got = [
                    Example(ids, [True] * len(ids))
                    for ids in (render_prompt(tokenizer, p, chat_template) for p in prompts)
                ]
        usable = [
            e
            for e in (Example(x.ids[:max_seq_len], x.targets[:max_seq_len]) for x in got)
            if sum(e.targets[2:]) >= 1
        ]
        require(
            usable,
            f"--data {src}: no usable turns ({kind}: {len(got)} item(s) read, none with "
            "target tokens; expected ShareGPT conversations with assistant turns, prompts, or "
            "redrafter-train gen-data output)",
        )
        examples.extend(usable)
    return examples


def examples_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, [int(t) for t in e.targets]]).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A cheap identity of a base model directory: its config and its weight files' sizes,
    heads and tails (no full read of multi-GB files)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
