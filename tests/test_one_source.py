"""One source per fact: a scan of the whole package fails where a fact is retyped outside the
module that owns it (everything else imports it).

Each rule names its owner and finds the fact's fingerprint in the syntax tree (docstrings are
prose and skipped). Every rule is shown to fire on a synthetic bad snippet, to stay quiet on the
same snippet inside the owner, and to find the fact in its owner (so the rule looks for what the
owner really holds).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "redrafter_trt"

#: Hugging Face / TensorRT-LLM architecture class names (the architecture map's entries)
ARCH_NAMES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "QWenForCausalLM"}
#: the KV layout and relocation names only ops/kv_cache.py defines; ``relocate_kv`` has a C++
#: twin of the same name in native.py, as native mirrors every operator of ops by name
KV_NAMES = {
    "relocate_paged",
    "paged_block_offsets",
    "paged_pool_layout",
    "KvLayout",
    "paged_pool_shape",
    "blocks_per_slot",
    "contiguous_cache_shape",
}
#: what measures peak memory
PEAK_MEMORY_ATTRS = {"ru_maxrss", "getrusage", "max_memory_allocated", "reset_peak_memory_stats"}


def attention_names() -> set[str]:
    from redrafter_trt.trtllm import ATTENTION_INPUTS

    return set(ATTENTION_INPUTS)


def docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                ids.add(id(body[0].value))
    return ids


def strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """Every str constant outside docstrings (f-string parts included)."""
    skip = docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def mask_word_math(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    for n in ast.walk(tree):
        if (
            isinstance(n, ast.BinOp)
            and isinstance(n.op, (ast.FloorDiv, ast.Mod, ast.Div))
            and isinstance(n.right, ast.Constant)
            and n.right.value == 32
        ):
            yield (
                n.lineno,
                f"mask words / bit positions computed inline: {ast.get_source_segment(src, n)}",
            )


def architecture_names(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    for c in strings(tree):
        if c.value in ARCH_NAMES:
            yield c.lineno, f"architecture name {c.value!r} typed out"


def attention_plumbing(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    names = attention_names()
    for c in strings(tree):
        if c.value in names:
            yield c.lineno, f"attention plumbing name {c.value!r} typed out"


def container_name(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    for c in strings(tree):
        if "nvcr.io/" in c.value:
            yield c.lineno, f"container name typed out: {c.value!r}"


def kv_layouts(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in KV_NAMES:
            yield n.lineno, f"KV layout/relocation {n.name} defined again"
        # block arithmetic of the paged layout: t // tokens_per_block, t % tpb, -(-n // tpb)
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.FloorDiv, ast.Mod)):
            right = ast.get_source_segment(src, n.right) or ""
            if "tokens_per_block" in right or right == "tpb":
                yield n.lineno, f"paged block arithmetic inline: {ast.get_source_segment(src, n)}"


def peak_memory(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    for n in ast.walk(tree):
        name = n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name) else None
        if name in PEAK_MEMORY_ATTRS:
            yield n.lineno, f"peak memory measured inline ({name})"


def beams_within_vocab(tree: ast.AST, src: str) -> Iterator[tuple[int, str]]:
    for c in strings(tree):
        if "exceeds the vocabulary size" in c.value:
            yield c.lineno, "W <= vocabulary message typed out"
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare) and any(
            getattr(x, "attr", getattr(x, "id", None)) == "vocab_size" for x in ast.walk(n)
        ):
            sides = [ast.get_source_segment(src, x) or "" for x in (n.left, *n.comparators)]
            # the base vocabulary V (the draft head's own K, ``head_vocab_size``, is another fact)
            if any(re.search(r"\bvocab_size\b", s) for s in sides) and any(
                "beam" in s.lower() for s in sides
            ):
                yield n.lineno, f"W <= vocabulary checked inline: {ast.get_source_segment(src, n)}"


@dataclass(frozen=True)
class Rule:
    fact: str
    owner: str  # path under redrafter_trt/
    find: Callable[[ast.AST, str], Iterator[tuple[int, str]]]
    bad: str  # a snippet that retypes the fact


RULES = [
    Rule("mask word count", "ops/tree.py", mask_word_math, "words = (t + 31) // 32\n"),
    Rule(
        "architecture map",
        "models/base.py",
        architecture_names,
        "hf = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}\n",
    ),
    Rule(
        "attention plumbing names",
        "trtllm/__init__.py",
        attention_plumbing,
        "feed = {'host_past_key_value_lengths': seq}\n",
    ),
    Rule(
        "container name",
        "trtllm/__init__.py",
        container_name,
        "IMAGE = 'nvcr.io/nvidia/tensorrt-llm/release:1.2.1'\n",
    ),
    Rule(
        "KV layouts and relocations",
        "ops/kv_cache.py",
        kv_layouts,
        "def relocate_paged(pool, slots):\n    return pool\n",
    ),
    Rule(
        "KV paged block arithmetic",
        "ops/kv_cache.py",
        kv_layouts,
        "max_blocks = -(-max_seq_len // tokens_per_block)\n",
    ),
    Rule(
        "peak-memory measurement",
        "memory.py",
        peak_memory,
        "import resource\nmb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n",
    ),
    Rule(
        "W <= vocab check",
        "contract.py",
        beams_within_vocab,
        "require(num_beams <= cfg.vocab_size, f'W {num_beams} exceeds the vocabulary size')\n",
    ),
]


def violations(rule: Rule, rel: str, src: str, *, owner_exempt: bool = True) -> list[str]:
    if owner_exempt and rel == rule.owner:
        return []
    tree = parse(src)
    return [
        f"redrafter_trt/{rel}:{line}: {msg} (owner: redrafter_trt/{rule.owner})"
        for line, msg in rule.find(tree, src)
    ]


@functools.cache
def parse(src: str) -> ast.AST:
    return ast.parse(src)


@functools.lru_cache(maxsize=1)
def package_files() -> list[tuple[str, str]]:
    return [
        (p.relative_to(PACKAGE).as_posix(), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))
    ]


@pytest.mark.parametrize("rule", RULES, ids=[r.fact for r in RULES])
def test_fact_has_one_source(rule):
    found = [v for rel, src in package_files() for v in violations(rule, rel, src)]
    assert found == [], (
        f"{rule.fact} retyped; import it from redrafter_trt/{rule.owner}:\n" + "\n".join(found)
    )


@pytest.mark.parametrize("rule", RULES, ids=[r.fact for r in RULES])
def test_rule_fires_on_a_retyped_fact(rule):
    assert violations(rule, "somewhere/else.py", rule.bad), f"{rule.fact}: the bad snippet passes"
    assert violations(rule, rule.owner, rule.bad) == []  # the owner may hold it
    assert violations(rule, "somewhere/else.py", f'"""{rule.bad}"""\n') == []  # prose is no fact


@pytest.mark.parametrize("rule", RULES, ids=[r.fact for r in RULES])
def test_owner_holds_the_fact(rule):
    src = (PACKAGE / rule.owner).read_text()
    assert violations(rule, rule.owner, src, owner_exempt=False), (
        f"redrafter_trt/{rule.owner} does not hold the {rule.fact}: the rule looks for the wrong thing"
    )
