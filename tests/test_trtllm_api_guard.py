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

from redrafter_trt.models.base import ARCH_LLAMA, ARCH_QWEN2

ROOT = Path(__file__).resolve().parents[1]
TRTLLM_DIR = ROOT / "redrafter_trt" / "trtllm"
MANIFEST = TRTLLM_DIR / "api_manifest.json"
ROOT_MODULES = ("tensorrt", "tensorrt_llm")
#: redrafter_trt.trtllm.require_trtllm returns (tensorrt, tensorrt_llm) (see its docstring).
PROJECT_CALLS = {"require_trtllm": ("tensorrt", "tensorrt_llm")}


def load_symbols() -> dict:
    return json.loads(MANIFEST.read_text())["symbols"]


def load_rules() -> dict:
    return json.loads(MANIFEST.read_text())["rules"]


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
    upstream = ("tensorrt_llm/", "python/")
    for q, e in load_symbols().items():
        src = e.get("source", "")
        assert src.startswith(upstream), (q, src)
        for a, ae in e.get("attrs", {}).items():
            assert ae.get("source", "").startswith(upstream), (q, a, ae)
        for a, src in e.get("sets", {}).items():
            assert src.startswith(upstream), (q, a, src)
        for a, r in e.get("reads", {}).items():
            assert r["source"].startswith(upstream), (q, a, r)
    rules = {k: v for k, v in load_rules().items() if k != "about"}
    assert rules
    for name, rule in rules.items():
        assert rule["sources"], name
        for src in rule["sources"]:
            assert src.startswith(("tensorrt_llm/", "cpp/tensorrt_llm/")), (name, src)


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
    from redrafter_trt.trtllm.builder import build_config_kwargs

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
    from redrafter_trt.trtllm.builder import kv_block_dims

    record = {
        "max_seq_len": 2028,
        "kv_max_seq_len": 2048,
        "engine_max_seq_len": 2067,
        "tokens_per_block": 64,
    }
    assert kv_block_dims(record) == (2067, 33)
    with pytest.raises(RedrafterError, match="rebuild"):
        kv_block_dims({"max_seq_len": 2028, "kv_max_seq_len": 2048, "tokens_per_block": 64})


# --------------------------------------------------------------------------- item 3: config attributes
def config_sets(guard: Guard, q: str) -> dict[str, str]:
    """Attributes the config class ``q``'s constructor assigns (its bases' included)."""
    out: dict[str, str] = {}
    for _, e in guard.class_chain(q):
        out.update(e.get("sets", {}))
    return out


LAYER_READS = {
    # config class -> the classes whose constructors read that config when the engine is built
    "tensorrt_llm.models.llama.config.LLaMAConfig": (
        "tensorrt_llm.models.llama.config.LLaMAConfig",
        "tensorrt_llm.models.modeling_utils.DecoderModelForCausalLM",
        "tensorrt_llm.layers.attention.Attention",
    ),
    "tensorrt_llm.models.qwen.config.QWenConfig": (
        "tensorrt_llm.models.qwen.config.QWenConfig",
        "tensorrt_llm.models.modeling_utils.DecoderModelForCausalLM",
        "tensorrt_llm.layers.attention.Attention",
    ),
}


def unset_config_reads(config: dict, config_cls: str, symbols: dict | None = None) -> list[str]:
    """The attributes upstream constructors read from a ``config_cls(**config)`` that neither
    the class sets nor ``config`` passes (each an AttributeError while the network is built)."""
    sym = symbols or load_symbols()
    have = set(config_sets(Guard(sym), config_cls)) | set(config)
    missing = []
    for reader in LAYER_READS[config_cls]:
        for name, r in sym[reader].get("reads", {}).items():
            when = r.get("when", {})
            if any(k in config and config[k] not in vals for k, vals in when.items()):
                continue  # read only for other model types
            if name not in have:
                missing.append(f"{config_cls.rsplit('.', 1)[1]}.{name} (read at {r['source']})")
    return missing


@pytest.mark.parametrize(
    "arch, config_cls",
    [
        (ARCH_LLAMA, "tensorrt_llm.models.llama.config.LLaMAConfig"),
        (ARCH_QWEN2, "tensorrt_llm.models.qwen.config.QWenConfig"),
    ],
)
def test_base_config_sets_every_attribute_the_upstream_layers_read(arch, config_cls):
    """Item 3: QWenDecoderLayer reads config.seq_length and config.qwen_type, which QWenConfig
    does not define; the network's config must pass them (else AttributeError at build)."""
    from redrafter_trt.trtllm.network import trtllm_base_config
    from test_trtllm_engine_fixes import ckpt_cfg

    sym = load_symbols()
    assert sym[config_cls]["reads"], f"{config_cls}: the manifest records no attribute reads"
    cfg = ckpt_cfg(arch, qkv_bias=arch == ARCH_QWEN2, dense_bias=False)
    config = trtllm_base_config(cfg)
    missing = unset_config_reads(config, config_cls, sym)
    assert not missing, f"{arch}: trtllm_base_config leaves unset: {missing}"


def test_config_read_check_catches_a_missing_attribute():
    """The check itself: the Qwen2 config without seq_length (the build blocker) or qwen_type, and
    a Qwen2-MoE type, whose layers read the MoE sizes the config does not pass."""
    from redrafter_trt.trtllm.network import trtllm_base_config
    from test_trtllm_engine_fixes import ckpt_cfg

    qwen = "tensorrt_llm.models.qwen.config.QWenConfig"
    config = trtllm_base_config(ckpt_cfg(ARCH_QWEN2, qkv_bias=True))
    for key in ("seq_length", "qwen_type"):
        cut = {k: v for k, v in config.items() if k != key}
        missing = unset_config_reads(cut, qwen)
        assert any(
            m.startswith(f"QWenConfig.{key} (read at tensorrt_llm/models/qwen/model.py:")
            for m in missing
        ), missing
    moe = unset_config_reads({**config, "qwen_type": "qwen2_moe"}, qwen)
    assert sorted(m.split(" ")[0] for m in moe) == [
        "QWenConfig.moe_intermediate_size",
        "QWenConfig.moe_shared_expert_intermediate_size",
    ]


# --------------------------------------------------------------------------- items 1-2: spec_decoding_use
def feed_spec_use(lengths: list[int], *, context: bool = False, bucket: bool = False) -> list[int]:
    """``spec_decoding_use`` of the feed prepare_step builds for rows of these token counts."""
    import torch

    from redrafter_trt import contract as C
    from test_trtllm import generation_inputs, prepare

    inputs = generation_inputs(list(range(len(lengths))), [7] * len(lengths))
    inputs[C.INPUT_LENGTHS] = torch.tensor(lengths, dtype=torch.int32)
    if context:
        inputs[C.REQUEST_TYPES] = torch.full((len(lengths),), C.CONTEXT, dtype=torch.int32)
        inputs[C.CACHE_LENGTHS] = torch.zeros(len(lengths), dtype=torch.int32)
    p = prepare(inputs, bucket=bucket)
    assert p.tokens == (max(lengths) if not bucket or context else p.tokens)
    return p.plumbing["spec_decoding_use"].tolist()


def test_spec_decoding_use_follows_the_attention_plugin():
    """Items 1-2: 1 only on generation calls of T >= 2 (T == 1 with it on aborts the process in
    the plugin's noexcept enqueue; a context call with it on flips the plugin's mode where the
    speculative XQA kernels are not prepared)."""
    rule = load_rules()["spec_decoding_use"]
    lo = rule["min_generation_tokens"]
    assert lo == 2 and rule["context"] == 0
    for bucket in (False, True):
        # plain decoding: one token per row (the first CUDA-graph bucket)
        assert feed_spec_use([1, 1], bucket=bucket) == [0], bucket
        assert feed_spec_use([1], bucket=bucket) == [0], bucket
        # trees, and a batch where one row does not speculate: T >= 2
        assert feed_spec_use([lo, 1], bucket=bucket) == [1], bucket
        assert feed_spec_use([5, 6], bucket=bucket) == [1], bucket
    # context calls: 0 whatever the prompt length
    for lengths in ([1], [2, 5], [6, 6]):
        assert feed_spec_use(lengths, context=True) == [rule["context"]], lengths


# --------------------------------------------------------------------------- item 4: RoPE tables
def test_build_refuses_positions_past_the_rope_tables(tmp_path):
    """Item 4: positions reach max_seq_len + L - 1; the tables have max_position_embeddings rows."""
    from redrafter_trt.errors import RedrafterError
    from redrafter_trt.trtllm.builder import build_trtllm_engine, check_rope_positions
    from test_trtllm_engine_fixes import ckpt_cfg

    rule = load_rules()["rope_positions"]
    assert rule["max_position"] == "max_seq_len + beam_len - 1"
    cfg = ckpt_cfg(draft_len=4)  # L = 5
    mpe = cfg.base.max_position_embeddings
    beam_len = cfg.draft_len + 1
    check_rope_positions(cfg, mpe - beam_len)  # last position mpe - 1: the table's last row
    for too_long in (mpe - beam_len + 1, mpe, mpe + 100):
        with pytest.raises(RedrafterError) as e:
            check_rope_positions(cfg, too_long)
        msg = str(e.value)
        assert (
            f"max_position_embeddings {mpe}" in msg and f"--max_seq_len <= {mpe - beam_len}" in msg
        )
    # redrafter-build refuses before it needs TensorRT-LLM (so here, without it, too)
    with pytest.raises(RedrafterError, match="max_position_embeddings"):
        build_trtllm_engine(
            tmp_path / "ckpt",
            tmp_path / "engine",
            cfg,
            max_batch_size=1,
            max_input_len=8,
            max_seq_len=mpe,
        )
    assert not (tmp_path / "engine").exists()


# --------------------------------------------------------------------------- items 5-7: values handed over
def test_runtime_perf_knobs_turn_multi_block_mode_on():
    """Item 6: all -1 leaves multi-block mode off (the attention op reads knob 0 == 1)."""
    from test_trtllm import generation_inputs, prepare

    rule = load_rules()["runtime_perf_knobs"]
    for bucket in (False, True):
        knobs = prepare(generation_inputs([0, 1], [5, 9]), bucket=bucket).plumbing[
            "host_runtime_perf_knobs"
        ]
        assert str(knobs.dtype) == "torch.int64" and knobs.shape == (rule["size"],)
        want = [rule["default"]] * rule["size"]
        for i, v in rule["set"].items():
            want[int(i)] = v
        assert knobs.tolist() == want


def test_graph_signature_leaves_out_the_host_inputs_no_plugin_reads():
    """Item 5: host_kv_cache_block_offsets is bound but never read at enqueue."""
    from redrafter_trt.trtllm.cuda_graph import HOST_INPUTS, UNREAD_HOST_INPUTS

    rule = load_rules()["unread_host_inputs"]
    assert set(rule["names"]) == set(UNREAD_HOST_INPUTS) and set(rule["names"]) <= HOST_INPUTS


def test_timing_cache_goes_to_the_given_directory_not_the_default(tmp_path):
    """Item 7: BuildConfig's output_timing_cache default is relative (the current directory)."""
    from redrafter_trt.trtllm.builder import build_config_kwargs

    default = load_symbols()["tensorrt_llm.builder.BuildConfig"]["defaults"]["output_timing_cache"]
    assert not Path(default["value"]).is_absolute()
    kw = build_config_kwargs(
        spec_mode_enum_from_manifest(),
        max_batch_size=1,
        max_input_len=8,
        max_seq_len=32,
        tree_size=6,
        timing_cache=tmp_path / "model.cache",
    )
    assert kw["output_timing_cache"] == str(tmp_path / "model.cache")
