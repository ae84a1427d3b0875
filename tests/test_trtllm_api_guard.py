"""API guard: every TensorRT-LLM / TensorRT name, keyword and enum member that
redrafter_trt/trtllm/*.py uses must be one that redrafter_trt/trtllm/api_manifest.json records
from TensorRT-LLM's and TensorRT's source (TensorRT-LLM 1.3.0rc3 pre-removal copy for the 1.2
engine flow, TensorRT v10.14). Runs without either installed: the code is parsed with ``ast``.

What is resolved: ``import``/``from ... import`` of tensorrt / tensorrt_llm (with aliases), the
modules ``require_trtllm()`` returns, and values assigned from them (``x = F.shape(...)``,
``a if c else b``, ``self.x = ...``); attribute chains and calls on those. A call's keywords are
checked against the recorded parameters (unless the callee takes ``**kwargs``), an enum's
attribute against its members, and a name the manifest marks ``forbidden`` fails with the reason.
"""

from __future__ import annotations

import ast
import enum
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRTLLM_DIR = ROOT / "redrafter_trt" / "trtllm"
MANIFEST = TRTLLM_DIR / "api_manifest.json"
ROOT_MODULES = ("tensorrt", "tensorrt_llm")
#: redrafter_trt.trtllm.require_trtllm returns (tensorrt, tensorrt_llm) (see its docstring).
PROJECT_CALLS = {"require_trtllm": ("tensorrt", "tensorrt_llm")}


def load_symbols() -> dict:
    return json.loads(MANIFEST.read_text())["symbols"]


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    checked_calls: int = 0
    checked_attrs: int = 0


class Guard:
    """Resolves names against the manifest's ``symbols`` (qualified name -> entry)."""

    def __init__(self, symbols: dict):
        self.sym = symbols

    # -- entries
    def entry(self, q: str) -> tuple[str, dict] | None:
        seen = set()
        while q in self.sym and self.sym[q].get("kind") == "alias" and q not in seen:
            seen.add(q)
            q = self.sym[q]["ref"]
        return (q, self.sym[q]) if q in self.sym else None

    def class_chain(self, q: str):
        todo, seen = [q], set()
        while todo:
            c = todo.pop(0)
            if c in seen or c not in self.sym:
                continue
            seen.add(c)
            yield c, self.sym[c]
            todo += self.sym[c].get("bases", [])

    def instance(self, q: str) -> tuple[str, dict] | None:
        """An instance of class ``q`` (attributes as the class's; calling it calls ``forward``)."""
        r = self.entry(q)
        return (r[0], {"kind": "instance", "of": r[0]}) if r else None

    def member(self, value: tuple[str, dict], name: str) -> tuple[list, str | None]:
        """(resolved values of ``value.name``, error or None)."""
        q, e = value
        kind = e.get("kind")
        if kind == "module":
            r = self.entry(f"{q}.{name}")
            if r is None:
                return [], f"{q}.{name}: not a name the manifest records"
            return [r], self.forbidden(r)
        if kind == "enum":
            if name not in e.get("members", []):
                return [], f"{q}.{name}: not a member of {q} (members: {', '.join(e['members'])})"
            return [], None
        if kind in ("class", "instance"):
            for cq, ce in self.class_chain(q):
                a = ce.get("attrs", {}).get(name)
                if a is not None:
                    err = f"{cq}.{name}: {a['forbidden']}" if a.get("forbidden") else None
                    if a.get("ref"):
                        r = self.entry(a["ref"]) if a.get("is_class") else self.instance(a["ref"])
                        return ([r] if r else []), err
                    return ([(f"{cq}.{name}", a)] if a.get("kind") == "function" else []), err
            return [], f"{q}.{name}: not an attribute the manifest records for {q}"
        return [], None  # attribute / function values: nothing recorded beyond them

    def forbidden(self, r: tuple[str, dict]) -> str | None:
        q, e = r
        return f"{q}: {e['forbidden']}" if e.get("forbidden") else None

    @staticmethod
    def bad_keywords(q: str, params, var_kw: bool, keywords: list[str]) -> str | None:
        if params is None or var_kw:
            return None  # signature not recorded, or **kwargs (they flow to a base / are stored)
        bad = [k for k in keywords if k not in params]
        return f"{q}(): keyword(s) {bad} not among its parameters {params}" if bad else None

    def call(self, value: tuple[str, dict], keywords: list[str]) -> tuple[list, str | None]:
        q, e = value
        kind = e.get("kind")
        if kind == "instance":  # Module.__call__ -> forward
            for cq, ce in self.class_chain(e["of"]):
                if "call_params" in ce:
                    return [], self.bad_keywords(
                        f"{cq}.forward", ce["call_params"], False, keywords
                    )
            return [], None
        if kind not in ("function", "class"):
            return [], None
        err = self.bad_keywords(q, e.get("params"), e.get("var_kwargs", False), keywords)
        if kind == "class":
            return [self.instance(q)], err
        r = self.instance(e["returns"]) if e.get("returns") else None
        return ([r] if r else []), err


class Scanner(ast.NodeVisitor):
    """Checks one module: resolves bindings first (to a fixpoint), then every attribute and call."""

    def __init__(self, guard: Guard, filename: str):
        self.g, self.filename = guard, filename
        self.report = Report()

    def scan(self, tree: ast.AST) -> Report:
        for fn in [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ] + [tree]:
            if isinstance(fn, ast.Module):
                body_nodes = [
                    n for n in fn.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))
                ]
                nodes = [x for b in body_nodes for x in ast.walk(b)]
            else:
                nodes = list(ast.walk(fn))
            self.check_scope(fn, nodes)
        return self.report

    # -- bindings
    def bind_imports(self, env: dict, nodes) -> None:
        for n in nodes:
            if isinstance(n, ast.Import):
                for a in n.names:
                    if a.name.split(".")[0] in ROOT_MODULES:
                        r = self.g.entry(a.name)
                        if r is None:
                            self.error(n, f"import {a.name}: not a module the manifest records")
                        elif a.asname:
                            env[a.asname] = [r]
                        else:
                            env[a.name.split(".")[0]] = [self.g.entry(a.name.split(".")[0])]
            elif (
                isinstance(n, ast.ImportFrom)
                and n.module
                and n.module.split(".")[0] in ROOT_MODULES
                and not n.level
            ):
                for a in n.names:
                    r = self.g.entry(f"{n.module}.{a.name}")
                    if r is None:
                        self.error(
                            n, f"from {n.module} import {a.name}: not a name the manifest records"
                        )
                        continue
                    f = self.g.forbidden(r)
                    if f:
                        self.error(n, f)
                    env[a.asname or a.name] = [r]

    def resolve(self, node, env: dict) -> list:
        if isinstance(node, ast.Name):
            return env.get(node.id, [])
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return env.get(f"self.{node.attr}", [])
            out = []
            for v in self.resolve(node.value, env):
                out += self.g.member(v, node.attr)[0]
            return out
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in PROJECT_CALLS:
                return [
                    (
                        "tuple",
                        {
                            "kind": "tuple",
                            "items": [self.g.entry(m) for m in PROJECT_CALLS[node.func.id]],
                        },
                    )
                ]
            out = []
            kws = [k.arg for k in node.keywords if k.arg]
            for v in self.resolve(node.func, env):
                out += self.g.call(v, kws)[0]
            return out
        if isinstance(node, ast.IfExp):
            return self.resolve(node.body, env) + self.resolve(node.orelse, env)
        return []

    def assign(self, target, values: list, env: dict) -> bool:
        if isinstance(target, ast.Name):
            key = target.id
        elif (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
        ):
            key = f"self.{target.attr}"
        elif isinstance(target, ast.Tuple):
            changed = False
            for v in values:
                if v[1].get("kind") == "tuple":
                    for t, item in zip(target.elts, v[1]["items"]):
                        changed |= self.assign(t, [item], env)
            return changed
        else:
            return False
        new = [v for v in values if v not in env.get(key, [])]
        if new:
            env[key] = env.get(key, []) + new
        return bool(new)

    def check_scope(self, scope, nodes) -> None:
        env: dict = {}
        self.bind_imports(env, nodes)
        for _ in range(4):  # fixpoint over assignments (a value may depend on a later-resolved one)
            changed = False
            for n in nodes:
                if isinstance(n, ast.Assign):
                    vals = self.resolve(n.value, env)
                    if vals:
                        for t in n.targets:
                            changed |= self.assign(t, vals, env)
            if not changed:
                break
        for n in nodes:
            if isinstance(n, ast.Attribute):
                on_self = isinstance(n.value, ast.Name) and n.value.id == "self"
                for v in [] if on_self else self.resolve(n.value, env):
                    self.report.checked_attrs += 1
                    err = self.g.member(v, n.attr)[1]
                    if err:
                        self.error(n, err)
            elif isinstance(n, ast.Call):
                kws = [k.arg for k in n.keywords if k.arg]
                for v in self.resolve(n.func, env):
                    if v[1].get("kind") in ("function", "class", "instance"):
                        self.report.checked_calls += 1
                    err = self.g.call(v, kws)[1]
                    if err:
                        self.error(n, err)
                    for k in n.keywords:  # an enum-typed (pydantic) field given a string
                        ftype = v[1].get("field_types", {}).get(k.arg)
                        if (
                            ftype
                            and isinstance(k.value, ast.Constant)
                            and isinstance(k.value.value, str)
                        ):
                            self.error(
                                n,
                                f"{v[0]}({k.arg}={k.value.value!r}): the field is typed {ftype}; "
                                "pass its member, not a string",
                            )

    def error(self, node, msg: str) -> None:
        line = f"{self.filename}:{getattr(node, 'lineno', 0)}: {msg}"
        if line not in self.report.errors:
            self.report.errors.append(line)


def scan_source(source: str, filename: str = "<snippet>", symbols: dict | None = None) -> Report:
    return Scanner(Guard(symbols or load_symbols()), filename).scan(ast.parse(source))


# --------------------------------------------------------------------------- the project's code
def test_trtllm_package_uses_only_recorded_names():
    total = Report()
    for path in sorted(TRTLLM_DIR.glob("*.py")):
        r = scan_source(path.read_text(), path.name)
        total.errors += r.errors
        total.checked_calls += r.checked_calls
        total.checked_attrs += r.checked_attrs
    assert not total.errors, "\n".join(total.errors)
    # the guard resolved the package's TensorRT-LLM/TensorRT use (not a vacuous pass)
    assert total.checked_calls >= 60 and total.checked_attrs >= 80, (
        total.checked_calls,
        total.checked_attrs,
    )


def test_manifest_sources_are_upstream_paths():
    """Every entry names the upstream file it was read from (repository-relative, no local path)."""
    for q, e in load_symbols().items():
        src = e.get("source", "")
        assert src.startswith(("tensorrt_llm/", "python/")), (q, src)
        for a, ae in e.get("attrs", {}).items():
            assert ae.get("source", "").startswith(("tensorrt_llm/", "python/")), (q, a, ae)


# --------------------------------------------------------------------------- it catches mistakes
def test_guard_rejects_a_bad_keyword():
    r = scan_source(
        textwrap.dedent("""
        def f():
            from tensorrt_llm.builder import BuildConfig
            return BuildConfig(max_batch_size=1, speculative_decoding_modes=16)
    """)
    )
    assert len(r.errors) == 1 and "speculative_decoding_modes" in r.errors[0], r.errors
    good = scan_source(
        textwrap.dedent("""
        def f():
            from tensorrt_llm.builder import BuildConfig
            return BuildConfig(max_batch_size=1, speculative_decoding_mode=16)
    """)
    )
    assert not good.errors and good.checked_calls == 1


def test_guard_rejects_a_string_for_an_enum_typed_field():
    r = scan_source(
        textwrap.dedent("""
        def f():
            from tensorrt_llm.builder import BuildConfig
            return BuildConfig(max_draft_len=3, speculative_decoding_mode="explicit_draft_tokens")
    """)
    )
    assert len(r.errors) == 1 and "SpeculativeDecodingMode" in r.errors[0], r.errors


def test_guard_follows_self_attributes_and_return_types():
    r = scan_source(
        textwrap.dedent("""
        class B:
            def __init__(self, blob, n):
                from tensorrt_llm.runtime import Session
                self.session = Session.from_serialized_engine(blob)
                engine = self.session.engine
                engine.get_tensor_profile_shape(n, profile=0)        # 'profile_index'
                self.session.context.set_input_shapes(n, (1,))      # no such method
    """)
    )
    msgs = "\n".join(r.errors)
    assert "'profile'" in msgs and "set_input_shapes" in msgs and len(r.errors) == 2, msgs


def test_guard_rejects_bad_keywords_through_aliases_and_returns():
    r = scan_source(
        textwrap.dedent("""
        def f(x):
            trt, _ = require_trtllm("x")
            from tensorrt_llm import functional as F
            from tensorrt_llm.layers import ColumnLinear
            t = F.shape(x, 0)
            s = F.slice(t, start=[0])                      # the parameter is 'starts'
            lin = ColumnLinear(4, 4, gather_outputs=True)   # 'gather_output'
            ctx = trt.get_plugin_registry().get_creator("A", "1", namespace="")  # 'plugin_namespace'
    """)
    )
    msgs = "\n".join(r.errors)
    assert "'start'" in msgs and "'gather_outputs'" in msgs and "'namespace'" in msgs, msgs
    assert len(r.errors) == 3, msgs


def test_guard_rejects_unknown_names_enum_members_and_forbidden_calls():
    r = scan_source(
        textwrap.dedent("""
        def f(engine, n):
            trt, trtllm = require_trtllm("x")
            from tensorrt_llm.functional import slice_tensor
            from tensorrt_llm.models import LLaMAForCausalLM, QWenForCausalLM
            from tensorrt_llm.models.modeling_utils import PretrainedConfig
            mode = trt.TensorIOMode.IN
            cfg = PretrainedConfig.from_dict({"architecture": "ReDrafterStepEngine"})
            base_cls = QWenForCausalLM if n else LLaMAForCausalLM
            cfg2 = base_cls.config_class.from_dict({})
            host = engine.get_tensor_location(n) == trt.TensorLocation.HOST
    """)
    )
    msgs = "\n".join(r.errors)
    assert "slice_tensor" in msgs
    assert "TensorIOMode.IN:" in msgs
    assert sum("MODEL_MAP" in m for m in r.errors) >= 2, msgs  # both from_dict routes
    assert "TensorLocation" in msgs and "by name" in msgs, msgs


def test_guard_checks_calls_of_module_instances_against_forward():
    src = textwrap.dedent("""
        def build(n, cfg):
            from tensorrt_llm.models import LLaMAForCausalLM, QWenForCausalLM
            base_cls = QWenForCausalLM if n else LLaMAForCausalLM

            class Engine:
                def __init__(self):
                    base = base_cls(cfg)
                    self.transformer = base.transformer

                def forward(self, ids, spec, kv, attn):
                    h = self.transformer(ids, use_cache=True, spec_decoding_param=spec, kv_cache_params=kv,
                                         attention_params=attn)
                    e = self.transformer.vocab_embedding(ids)
                    return self.transformer.embedding(ids)
    """)
    msgs = "\n".join(scan_source(src).errors)
    assert msgs.count("spec_decoding_param'") == 2, msgs  # LLaMAModel.forward and QWenModel.forward
    assert "embedding: not an attribute" in msgs and "vocab_embedding" not in msgs, msgs
    net = scan_source((TRTLLM_DIR / "network.py").read_text(), "network.py")
    assert not net.errors


# --------------------------------------------------------------------------- values our code builds
def spec_mode_enum_from_manifest():
    e = load_symbols()["tensorrt_llm.models.modeling_utils.SpeculativeDecodingMode"]
    return enum.IntFlag("SpeculativeDecodingMode", e["values"])


def test_build_config_kwargs_pass_the_enum_member_and_known_fields(tmp_path):
    from redrafter_trt.trtllm.build import build_config_kwargs

    mode = spec_mode_enum_from_manifest()
    kw = build_config_kwargs(
        mode,
        max_batch_size=4,
        max_input_len=100,
        max_seq_len=2028,
        tree_size=20,
        timing_cache=tmp_path / "model.cache",
    )
    v = kw["speculative_decoding_mode"]
    assert isinstance(v, mode) and not isinstance(v, str)
    assert v is mode.EXPLICIT_DRAFT_TOKENS and int(v) == 16  # pydantic accepts 1, 2, 4, 8, 16, ...
    fields = load_symbols()["tensorrt_llm.builder.BuildConfig"]["params"]
    assert set(kw) <= set(fields), set(kw) - set(fields)
    assert kw["max_draft_len"] == 19 and kw["max_seq_len"] == 2048 and kw["max_input_len"] == 100


def test_kv_block_dims_come_from_the_recorded_engine_max_seq_len():
    """S=2028, N=20, 64 tokens per block: the engine's prepare_inputs saw 2028 + 20 + (N-1) = 2067
    positions (build() adds max_draft_len), so its kv_cache_block_offsets has 33 blocks, not the
    ceil(2048 / 64) = 32 a recomputation from the requested length gives."""
    from redrafter_trt.errors import RedrafterError
    from redrafter_trt.trtllm.build import kv_block_dims

    record = {
        "max_seq_len": 2028,
        "kv_max_seq_len": 2048,
        "engine_max_seq_len": 2067,
        "tokens_per_block": 64,
    }
    assert kv_block_dims(record) == (2067, 33)
    with pytest.raises(RedrafterError, match="rebuild"):
        kv_block_dims({"max_seq_len": 2028, "kv_max_seq_len": 2048, "tokens_per_block": 64})
