"""The backends (and rank 0's tensor-parallel wrapper) implement :class:`redrafter_trt.contract.Backend` structurally.

The TensorRT-LLM backend cannot be constructed here (no GPU, no TensorRT), so the check is on the
classes: every protocol method exists with the protocol's parameters, every property is a
property, and every data attribute is a class attribute or assigned as ``self.<name>`` in
``__init__`` (read from the source with ``ast``). The torch backend is also checked on an instance.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from redrafter_trt import contract as C
from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.backends.tp import TPBackend
from redrafter_trt.trtllm.runtime import TrtllmBackend


def protocol_members(proto: type) -> tuple[dict[str, inspect.Signature], set[str], set[str]]:
    """(methods -> signature, properties, data attributes) that ``proto`` declares."""
    methods, props = {}, set()
    for name, v in vars(proto).items():
        if name.startswith("_"):
            continue
        if isinstance(v, property):
            props.add(name)
        elif inspect.isfunction(v):
            methods[name] = inspect.signature(v)
    data = {n for n in proto.__annotations__ if not n.startswith("_")}
    return methods, props, data


def init_assignments(cls: type) -> set[str]:
    """Names assigned as ``self.<name> = ...`` (or annotated) in ``cls.__init__``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    names = set()
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AnnAssign, ast.AugAssign))
            else []
        )
        for t in targets:
            for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                if (
                    isinstance(el, ast.Attribute)
                    and isinstance(el.value, ast.Name)
                    and el.value.id == "self"
                ):
                    names.add(el.attr)
    return names


def missing_members(cls: type, proto: type = C.Backend) -> list[str]:
    """What ``cls`` lacks of ``proto`` (empty: it satisfies the protocol structurally)."""
    methods, props, data = protocol_members(proto)
    assigned = init_assignments(cls)
    problems = []
    for name, sig in methods.items():
        impl = getattr(cls, name, None)
        if not callable(impl):
            problems.append(f"method {name} missing")
            continue
        want = [p.name for p in sig.parameters.values()]
        got = [p.name for p in inspect.signature(impl).parameters.values()]
        if got[: len(want)] != want or any(
            p.default is inspect.Parameter.empty
            for p in list(inspect.signature(impl).parameters.values())[len(want) :]
        ):
            problems.append(f"method {name}{inspect.signature(impl)} does not take {sig}")
    for name in props:
        if (
            not isinstance(inspect.getattr_static(cls, name, None), property)
            and name not in assigned
        ):
            problems.append(f"property {name} missing")
    for name in data:
        if name not in assigned and not hasattr(cls, name):
            problems.append(f"attribute {name} missing")
    return problems


def test_protocol_declares_what_the_runtime_and_bench_use():
    methods, props, data = protocol_members(C.Backend)
    assert {"reserve", "step", "reshaped"} <= set(methods)
    assert {"vocab_size", "base", "kv_cache_bytes", "warp_k", "timings"} <= props
    assert {
        "name",
        "shape",
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "mixed_request_types",
        "device",
        "dtype",
    } <= data


@pytest.mark.parametrize("cls", [TorchBackend, TrtllmBackend, TPBackend])
def test_backend_satisfies_the_protocol(cls):
    assert missing_members(cls) == []


def test_the_check_finds_a_missing_member_and_a_wrong_signature():
    class Partial:
        name = "partial"

        def __init__(self):
            self.shape = C.StepShape(1, 1)

        def step(self, batch):  # wrong parameter name
            return batch

    problems = missing_members(Partial)
    assert "method reserve missing" in problems
    assert any(p.startswith("method step") for p in problems)
    assert "property vocab_size missing" in problems and "property timings missing" in problems
    assert "attribute shape missing" not in problems and "attribute name missing" not in problems


def test_torch_backend_instance_has_every_member(tiny_dirs):
    from conftest import tiny_generator

    be = tiny_generator(tiny_dirs["llama"], 2, 2).backend
    methods, props, data = protocol_members(C.Backend)
    for name in [*methods, *props, *data]:
        assert hasattr(be, name), name
    assert be.kv_cache_bytes is None or be.kv_cache_bytes > 0
    be.reserve(2, 16)
    assert be.kv_cache_bytes == be.cache.numel() * be.cache.element_size()
    other = be.reshaped(3, 1)
    assert (other.shape.num_beams, other.shape.draft_len) == (3, 1) and other.base is be.base
