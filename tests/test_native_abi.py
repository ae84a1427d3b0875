"""The one binding of the C ABI (redrafter_trt.native, cpp/include/redrafter/c_api.h): every params
struct's ctypes mirror has the library's layout (size, and each field's name, offset, size and
kind, as redrafter_params_layout() exports them from the field lists that declare the structs);
every operator refuses a null struct or one of another size; the CUDA launchers (where
libredrafter_cuda.so is built; no GPU needed) validate the same structs like the CPU references."""

from __future__ import annotations

import ctypes

import pytest
import torch

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.ops.accept import Acceptance

pytestmark = pytest.mark.usefixtures("native_library")


def _operators(signatures: dict) -> list[tuple[str, type]]:
    """(C function, params struct) of every operator in a signature table of the binding."""
    out = []
    for name, (argtypes, restype) in signatures.items():
        struct = getattr(argtypes[0], "_type_", None) if len(argtypes) == 1 else None
        if restype == native._STATUS and struct in native.ABI_STRUCTS.values():
            out.append((name, argtypes[0]._type_))
    return out


CPU_OPERATORS = _operators(native._SIGNATURES)
CUDA_OPERATORS = _operators(native._CUDA_SIGNATURES)


def test_every_params_struct_mirrors_the_c_layout():
    c_side, mirrors = native.c_params_layout(), native.python_params_layout()
    assert sorted(c_side) == sorted(mirrors), "a struct of the C ABI without its mirror (or back)"
    for name, (size, fields) in c_side.items():
        assert mirrors[name][1] == fields, f"{name}: fields (name, offset, size, kind) differ"
        assert mirrors[name][0] == size, f"{name}: sizeof differs"
    # the export covers every struct's every field, typed
    assert len(c_side) == len(native.ABI_STRUCTS) >= 10
    scale = dict((f[0], f) for f in c_side["RedrafterAttentionParams"][1])["scale"]
    assert scale[2:] == (4, "f")


def test_the_layout_check_sees_order_and_type(monkeypatch):
    """A mirror with two fields swapped, or a field of another type of the same size, fails."""
    fields = list(native.LinearParams._fields_)
    swapped = type(
        "Swapped", (ctypes.Structure,), {"_fields_": [fields[0], fields[2], fields[1], *fields[3:]]}
    )
    as_int = [
        (n, ctypes.c_int32 if n == "scale" else t) for n, t in native.AttentionParams._fields_
    ]
    retyped = type("Retyped", (ctypes.Structure,), {"_fields_": as_int})
    c_side = native.c_params_layout()
    for name, bad in (("RedrafterLinearParams", swapped), ("RedrafterAttentionParams", retyped)):
        monkeypatch.setitem(native.ABI_STRUCTS, name, bad)
        assert native.python_params_layout()[name] != c_side[name]


def test_the_binding_binds_every_operator():
    names = {n for n, _ in CPU_OPERATORS}
    assert {
        "redrafter_beam_search_step_cpu",
        "redrafter_tree_pack_cpu",
        "redrafter_accept_cpu",
    } <= names
    assert {"redrafter_kv_relocate_cpu", "redrafter_kv_relocate_strided_cpu"} <= names
    assert {
        "redrafter_draw_tokens_cpu",
        "redrafter_linear_packed_cpu",
        "redrafter_linear_cpu",
    } <= names
    assert {
        "redrafter_attention_cpu",
        "redrafter_embed_blocks_cpu",
        "redrafter_decoder_forward_cpu",
    } <= names
    # each CUDA launcher takes the struct of its CPU twin
    cpu = dict(CPU_OPERATORS)
    for name, struct in CUDA_OPERATORS:
        assert cpu[name.replace("_cuda", "_cpu")] is struct


@pytest.mark.parametrize("name,struct", CPU_OPERATORS, ids=[n for n, _ in CPU_OPERATORS])
def test_operators_refuse_a_null_or_foreign_struct(name, struct):
    with pytest.raises(RedrafterError, match=r"null params \[native status 1\]"):
        native.call(name, None)
    foreign = struct(struct_size=ctypes.sizeof(struct) + 8)
    with pytest.raises(RedrafterError, match=r"params struct of \d+ bytes, this library expects"):
        native.call(name, foreign)


def test_another_abi_version_is_refused(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION - 1)
    with pytest.raises(RedrafterError, match="speaks C ABI version .* rebuild it"):
        native.load_library()


def test_a_struct_of_another_kind_is_refused_by_ctypes():
    p = native.TreePackParams()
    with pytest.raises(ctypes.ArgumentError):
        native.call("redrafter_beam_search_step_cpu", p)


@pytest.fixture
def cuda_lib():
    try:
        return native.load_cuda_library()
    except RedrafterError as e:
        pytest.skip(f"CUDA library unavailable: {e}")


def _bad_cases():
    """(CPU function, params) pairs whose params the checks refuse before any launch."""
    x, s = torch.zeros(1, 2, 8), torch.zeros(1, 2)
    i2 = torch.zeros(1, 2, dtype=torch.int32)
    beam = native.beam_search_params(x, s, 0, None, s, i2, i2)
    beam.num_beams = 65
    beams = torch.zeros(1, 2, 3, dtype=torch.int32)
    tree = native.TreePackParams(beams=beams.data_ptr(), batch=1, num_beams=2, beam_len=65)
    rows = torch.zeros(1)
    ints = torch.zeros(1, 3, dtype=torch.int32)
    out = Acceptance(
        *(torch.zeros(s, dtype=torch.int32) for s in ((1,), (1,), (1,), (1, 3), (1, 3)))
    )
    acc = native.accept_params(
        torch.zeros(1, 6, 8), beams, beams, rows, i2[0, :1], rows, ints.float(), out
    )
    acc.dtype = 7
    cache, one = torch.zeros(1, 2, 2, 1, 8, 4), torch.zeros(1, dtype=torch.int32)
    dims = dict(num_layers=1, num_slots=2, kv_heads=1, max_seq=8, head_dim=4)
    kv = native.kv_relocate_params(cache, one, one, ints, one, one, **dims, elem_bytes=3)
    strided = native.kv_relocate_params(
        cache, one, one, ints, one, one, **dims, cache_elems=cache.numel()
    )
    return [
        ("redrafter_beam_search_step_cpu", beam, "num_beams W must be in"),
        ("redrafter_tree_pack_cpu", tree, "65"),
        ("redrafter_accept_cpu", acc, "dtype"),
        ("redrafter_kv_relocate_cpu", kv, "element size"),
        ("redrafter_kv_relocate_strided_cpu", strided, "tokens_per_block must be in"),
    ]


def test_cuda_launchers_validate_like_the_cpu_references(cuda_lib):
    """The same struct, refused with the same message by the CPU reference and (before any
    launch, so without a GPU) by the CUDA launcher."""
    for name, params, needle in _bad_cases():
        with pytest.raises(RedrafterError, match=needle) as cpu:
            native.call(name, params)
        with pytest.raises(RedrafterError) as cuda:
            native.call(name.replace("_cpu", "_cuda"), params, lib=cuda_lib)
        assert str(cuda.value) == str(cpu.value)
    for name, struct in CUDA_OPERATORS:
        with pytest.raises(RedrafterError, match="null params"):
            native.call(name, None, lib=cuda_lib)
        with pytest.raises(RedrafterError, match="params struct of"):
            native.call(name, struct(struct_size=8), lib=cuda_lib)


def test_cuda_workspace_queries_read_the_struct(cuda_lib):
    x, s = torch.zeros(2, 3, 50), torch.zeros(2, 3)
    i = torch.zeros(2, 3, dtype=torch.int32)
    p = native.beam_search_params(x, s, 8, None, s, i, i)
    assert cuda_lib.redrafter_beam_search_workspace_bytes(p) > 0
    assert cuda_lib.redrafter_beam_search_workspace_bytes(None) == 0
    p.struct_size = 8
    assert cuda_lib.redrafter_beam_search_workspace_bytes(p) == 0
    a = native.AcceptParams(batch=3, num_nodes=5)
    assert cuda_lib.redrafter_accept_workspace_bytes(a) == 3 * 5 * 4
