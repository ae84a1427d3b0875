"""The TensorRT plugins' TensorRT-free logic (plugins/include/redrafter_plugins/plugin_logic.h)
through its C ABI: fields survive serialization, bad fields and shapes are rejected, output
shapes are data-independent, and the plugins' enqueue path (run on the C++ CPU references)
gives the PyTorch references' results."""

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
import torch

from redrafter_trt.ops import accept, pack_tree
from redrafter_trt.ops.beam_search import beam_search_step

ROOT = Path(__file__).resolve().parents[1]
LIB = Path(
    os.environ.get(
        "REDRAFTER_PLUGIN_LOGIC_LIB", ROOT / "plugins" / "build" / "libredrafter_plugin_logic.so"
    )
)
BEAM_SEARCH, TREE_PACK, ACCEPT = 0, 1, 2
F32, F16, I32, BF16 = 0, 1, 3, 7  # nvinfer1::DataType values
FIELD_INT32, FIELD_FLOAT32 = 5, 1  # nvinfer1::PluginFieldType values
MAX_DIMS = 8
_p = ctypes.c_void_p


def _sources_newer_than(lib: Path) -> bool:
    srcs = [
        *(ROOT / "plugins").rglob("*.cpp"),
        *(ROOT / "plugins").rglob("*.h"),
        *(ROOT / "cpp" / "src").glob("*.cpp"),
        *(ROOT / "cpp" / "include").rglob("*.h"),
    ]
    return any(s.stat().st_mtime > lib.stat().st_mtime for s in srcs)


@pytest.fixture(scope="module")
def lib():
    if "REDRAFTER_PLUGIN_LOGIC_LIB" not in os.environ and (
        not LIB.is_file() or _sources_newer_than(LIB)
    ):
        # Builds the CPU part only (no TensorRT needed); fails the test loudly if it cannot.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("TensorRT_ROOT", "TensorRT_INCLUDE_DIR")
        }
        subprocess.run(
            ["bash", str(ROOT / "build_scripts" / "build_plugins.sh")],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    L = ctypes.CDLL(str(LIB))
    i32, i64 = ctypes.c_int32, ctypes.c_int64
    signatures = {  # name: (restype, argtypes), as in plugin_logic_c_api.h
        "redrafter_plugin_name": (ctypes.c_char_p, [i32]),
        "redrafter_plugin_num_fields": (i32, [i32]),
        "redrafter_plugin_field_name": (ctypes.c_char_p, [i32, i32]),
        "redrafter_plugin_num_inputs": (i32, [i32]),
        "redrafter_plugin_num_outputs": (i32, [i32]),
        "redrafter_plugin_serialize_fields": (i32, [i32, _p, _p, _p, _p, _p, _p, i64]),
        "redrafter_plugin_parse_fields": (i32, [i32, _p, _p, _p, _p, i32, _p, _p, i64]),
        "redrafter_plugin_output_shapes": (i32, [i32, _p, _p, i32, _p, i32, _p, i64]),
        "redrafter_plugin_output_rule": (i32, [i32, _p, i32, _p]),
        "redrafter_plugin_supports_type": (i32, [i32, _p, i32, _p, i32]),
        "redrafter_plugin_output_types": (i32, [i32, _p, _p, i32, _p, i32, _p, i64]),
        "redrafter_plugin_workspace_bytes": (ctypes.c_size_t, [i32, _p, _p, i32]),
        "redrafter_plugin_enqueue_cpu": (i32, [i32, _p, _p, _p, i32, _p, _p, _p, i64]),
    }
    for name, (res, args) in signatures.items():
        fn = getattr(L, name)
        fn.restype, fn.argtypes = res, args
    return L


def i32s(values):
    return (ctypes.c_int32 * len(values))(*values)


def dims_arg(shapes):
    flat = []
    for s in shapes:
        flat += [len(s), *s, *([0] * (MAX_DIMS - len(s)))]
    return (ctypes.c_int64 * max(len(flat), 1))(*flat)


def call(fn, *args):
    msg = ctypes.create_string_buffer(512)
    code = fn(*args, msg, len(msg))
    return code, msg.value.decode()


def serialize(lib, kind, values):
    n = lib.redrafter_plugin_num_fields(kind)
    names = (ctypes.c_char_p * n)()
    types, lengths, data = (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
    code, msg = call(
        lib.redrafter_plugin_serialize_fields, kind, i32s(values), names, types, lengths, data
    )
    assert code == 0, msg
    return [
        (
            names[i].decode(),
            FIELD_INT32 if types[i] == FIELD_INT32 else types[i],
            lengths[i],
            data[i],
        )
        for i in range(n)
    ]


def parse(lib, kind, fields):
    """fields: (name, type, length, value or list of int32 values or None)."""
    n = len(fields)
    names = (ctypes.c_char_p * max(n, 1))(
        *[f[0].encode() if f[0] is not None else None for f in fields]
    )
    keep = []
    ptrs = (_p * max(n, 1))()
    for i, f in enumerate(fields):
        if f[3] is None:
            ptrs[i] = None
            continue
        vals = f[3] if isinstance(f[3], list) else [f[3]]
        buf = (ctypes.c_float * len(vals))(*vals) if f[1] == FIELD_FLOAT32 else i32s(vals)
        keep.append(buf)
        ptrs[i] = ctypes.cast(buf, _p)
    types = i32s([f[1] for f in fields] or [0])
    lengths = i32s([f[2] for f in fields] or [0])
    out = (ctypes.c_int32 * 2)()
    code, msg = call(lib.redrafter_plugin_parse_fields, kind, names, ptrs, types, lengths, n, out)
    return code, msg, list(out)


def output_shapes(lib, kind, values, in_shapes):
    n_out = lib.redrafter_plugin_num_outputs(kind)
    out = (ctypes.c_int64 * (n_out * (MAX_DIMS + 1)))()
    code, msg = call(
        lib.redrafter_plugin_output_shapes,
        kind,
        i32s(values),
        dims_arg(in_shapes),
        len(in_shapes),
        out,
        n_out,
    )
    shapes = (
        [tuple(out[o * 9 + 1 : o * 9 + 1 + out[o * 9]]) for o in range(n_out)]
        if code == 0
        else None
    )
    return code, msg, shapes


# ------------------------------------------------------------------------------------ metadata
def test_plugin_names_and_fields(lib):
    assert [lib.redrafter_plugin_name(k).decode() for k in range(3)] == [
        "RedrafterBeamSearchStep",
        "RedrafterTreePack",
        "RedrafterAccept",
    ]
    fields = [
        [
            lib.redrafter_plugin_field_name(k, i).decode()
            for i in range(lib.redrafter_plugin_num_fields(k))
        ]
        for k in range(3)
    ]
    assert fields == [["num_beams", "warp_k"], ["num_beams", "beam_len"], ["num_beams", "beam_len"]]
    assert [
        (lib.redrafter_plugin_num_inputs(k), lib.redrafter_plugin_num_outputs(k)) for k in range(3)
    ] == [(3, 3), (1, 5), (8, 5)]
    assert lib.redrafter_plugin_name(3) is None


# ------------------------------------------------------------------------------------ fields
@pytest.mark.parametrize(
    "kind,values",
    [
        (BEAM_SEARCH, [1, 0]),
        (BEAM_SEARCH, [4, 50]),
        (BEAM_SEARCH, [64, 1 << 30]),
        (TREE_PACK, [1, 1]),
        (TREE_PACK, [3, 4]),
        (TREE_PACK, [64, 64]),
        (ACCEPT, [5, 2]),
        (ACCEPT, [64, 64]),
    ],
)
def test_serialize_then_parse_gives_the_same_fields(lib, kind, values):
    fields = serialize(lib, kind, values)
    assert [(f[1], f[2]) for f in fields] == [(FIELD_INT32, 1)] * 2
    code, msg, parsed = parse(lib, kind, fields)
    assert code == 0, msg
    assert parsed == values
    # TensorRT may hand the fields back in any order
    code, msg, parsed = parse(lib, kind, fields[::-1])
    assert code == 0 and parsed == values, msg


@pytest.mark.parametrize(
    "kind,fields,error",
    [
        (TREE_PACK, [("num_beams", 5, 1, 3)], "missing field beam_len"),
        (TREE_PACK, [], "missing field num_beams"),
        (
            TREE_PACK,
            [("num_beams", 5, 1, 3), ("beam_len", 5, 1, 4), ("num_beam", 5, 1, 3)],
            "unknown field 'num_beam'",
        ),
        (TREE_PACK, [("num_beams", 5, 1, 3), ("num_beams", 5, 1, 3)], "given twice"),
        (
            TREE_PACK,
            [("num_beams", FIELD_FLOAT32, 1, 3.0), ("beam_len", 5, 1, 4)],
            "must be one int32",
        ),
        (TREE_PACK, [("num_beams", 5, 2, [3, 3]), ("beam_len", 5, 1, 4)], "must be one int32"),
        (TREE_PACK, [("num_beams", 5, 1, None), ("beam_len", 5, 1, 4)], "must be one int32"),
        (TREE_PACK, [(None, 5, 1, 3), ("beam_len", 5, 1, 4)], "has no name"),
        (
            TREE_PACK,
            [("num_beams", 5, 1, 0), ("beam_len", 5, 1, 4)],
            "num_beams must be in [1, 64], got 0",
        ),
        (
            ACCEPT,
            [("num_beams", 5, 1, 65), ("beam_len", 5, 1, 4)],
            "num_beams must be in [1, 64], got 65",
        ),
        (
            ACCEPT,
            [("num_beams", 5, 1, 2), ("beam_len", 5, 1, 65)],
            "beam_len (L = D + 1) must be in [1, 64], got 65",
        ),
        (
            ACCEPT,
            [("num_beams", 5, 1, 2), ("beam_len", 5, 1, 0)],
            "beam_len (L = D + 1) must be in [1, 64], got 0",
        ),
        (BEAM_SEARCH, [("num_beams", 5, 1, 2), ("warp_k", 5, 1, -1)], "warp_k must be >= 0"),
        (BEAM_SEARCH, [("num_beams", 5, 1, 2), ("beam_len", 5, 1, 3)], "unknown field 'beam_len'"),
    ],
)
def test_bad_fields_are_rejected(lib, kind, fields, error):
    code, msg, _ = parse(lib, kind, fields)
    assert code == 1
    assert error in msg
    assert lib.redrafter_plugin_name(kind).decode() in msg


# ------------------------------------------------------------------------------------ shapes
def test_output_shapes_are_padded_and_data_independent(lib):
    # tree pack: N = W*L, mask words ceil(N/32)
    for (w, l), b in (((3, 4), 5), ((4, 9), 2), ((64, 64), 1)):
        n = w * l
        code, msg, shapes = output_shapes(lib, TREE_PACK, [w, l], [(b, w, l)])
        assert code == 0, msg
        assert shapes == [(b, n), (b,), (b, w, l), (b, n), (b, n, (n + 31) // 32)]
    code, msg, shapes = output_shapes(lib, BEAM_SEARCH, [4, 50], [(7, 4, 1000), (7, 4), (1000,)])
    assert code == 0 and shapes == [(7, 4)] * 3, msg
    acc_in = [(2, 12, 97), (2, 3, 4), (2, 3, 4), (2,), (2,), (2,), (2,), (2, 4)]
    code, msg, shapes = output_shapes(lib, ACCEPT, [3, 4], acc_in)
    assert code == 0 and shapes == [(2,), (2,), (2,), (2, 4), (2, 4)], msg
    # dynamic dims (-1, as at build time) are copied, constants stay constants
    code, msg, shapes = output_shapes(lib, TREE_PACK, [3, 4], [(-1, 3, 4)])
    assert code == 0 and shapes == [(-1, 12), (-1,), (-1, 3, 4), (-1, 12), (-1, 12, 1)], msg
    code, msg, shapes = output_shapes(
        lib, ACCEPT, [3, 4], [(-1, -1, -1)] + [(-1, 3, 4)] * 2 + [(-1,)] * 4 + [(-1, 4)]
    )
    assert code == 0 and shapes == [(-1,), (-1,), (-1,), (-1, 4), (-1, 4)], msg


def test_output_rules_copy_only_the_batch(lib):
    rules = (ctypes.c_int64 * 12)()
    nd = lib.redrafter_plugin_output_rule(TREE_PACK, i32s([3, 4]), 4, rules)
    assert nd == 3
    assert list(rules[:9]) == [0, 0, 0, -1, 0, 12, -1, 0, 1]  # [in0.d0, const 12, const 1]


@pytest.mark.parametrize(
    "kind,values,shapes,error",
    [
        (TREE_PACK, [3, 4], [(2, 3, 5)], "beams dim 2 (L) is 5, expected 4"),
        (TREE_PACK, [3, 4], [(2, 2, 4)], "beams dim 1 (W) is 2, expected 3"),
        (TREE_PACK, [3, 4], [(2, 12)], "input beams must have rank 3, got 2"),
        (TREE_PACK, [3, 4], [(2, 3, 4), (2, 3, 4)], "expected 1 inputs, got 2"),
        (
            BEAM_SEARCH,
            [4, 50],
            [(7, 4, 3), (7, 4), (3,)],
            "logits dim 2 (V >= W) is 3, expected >= 4",
        ),
        (
            BEAM_SEARCH,
            [4, 50],
            [(7, 4, 100), (6, 4), (100,)],
            "beam_scores dim 0 (B) is 6, expected 7",
        ),
        (
            BEAM_SEARCH,
            [4, 50],
            [(7, 4, 100), (7, 4), (99,)],
            "vocab_map dim 0 is 99, expected logits dim 2 (the head's draft vocabulary K) 100",
        ),
        (BEAM_SEARCH, [4, 50], [(7, 4, 100), (7, 4)], "expected 3 inputs, got 2"),
        (
            ACCEPT,
            [3, 4],
            [(2, 12, 97), (2, 3, 4), (2, 3, 4), (2,), (2,), (3,), (2,), (2, 4)],
            "top_k dim 0 (B) is 3",
        ),
        (
            ACCEPT,
            [3, 4],
            [(2, 12, 97), (2, 3, 4), (2, 3, 4), (2,), (2,), (2,), (2,), (2, 5)],
            "uniforms dim 1 (L)",
        ),
        (
            ACCEPT,
            [3, 4],
            [(2, 0, 97), (2, 3, 4), (2, 3, 4), (2,), (2,), (2,), (2,), (2, 4)],
            "logits dim 1 (nodes) is 0",
        ),
    ],
)
def test_bad_input_shapes_are_rejected(lib, kind, values, shapes, error):
    code, msg, _ = output_shapes(lib, kind, values, shapes)
    assert code == 1
    assert error in msg


# ------------------------------------------------------------------------------------ types
def test_types_and_formats(lib):
    f = i32s([3, 4])
    for logits_type, ok in ((F32, 1), (F16, 1), (BF16, 1), (I32, 0)):
        assert lib.redrafter_plugin_supports_type(ACCEPT, f, 0, i32s([logits_type]), 1) == ok
        assert (
            lib.redrafter_plugin_supports_type(BEAM_SEARCH, i32s([3, 0]), 0, i32s([logits_type]), 1)
            == ok
        )
    acc = [BF16, I32, I32, I32, F32, I32, F32, F32, I32, I32, I32, I32, I32]
    for pos in range(13):
        assert lib.redrafter_plugin_supports_type(ACCEPT, f, pos, i32s(acc), pos + 1) == 1, pos
        bad = list(acc)
        bad[pos] = F16 if acc[pos] != F16 else I32
        if pos > 0:
            assert lib.redrafter_plugin_supports_type(ACCEPT, f, pos, i32s(bad), pos + 1) == 0, pos
    assert (
        lib.redrafter_plugin_supports_type(TREE_PACK, f, 6, i32s([I32] * 7), 7) == 0
    )  # no position 6
    out = (ctypes.c_int32 * 3)()
    code, msg = call(
        lib.redrafter_plugin_output_types,
        BEAM_SEARCH,
        i32s([3, 0]),
        i32s([F16, F32, I32]),
        3,
        out,
        3,
    )
    assert code == 0 and list(out) == [F32, I32, I32], msg
    code, msg = call(
        lib.redrafter_plugin_output_types,
        BEAM_SEARCH,
        i32s([3, 0]),
        i32s([F16, F16, I32]),
        3,
        out,
        3,
    )
    assert code == 1 and "beam_scores has type float16" in msg
    code, msg = call(
        lib.redrafter_plugin_output_types,
        BEAM_SEARCH,
        i32s([3, 0]),
        i32s([F16, F32, F32]),
        3,
        out,
        3,
    )
    assert code == 1 and "vocab_map has type float32" in msg


def test_workspace_sizes(lib):
    def ws(kind, values, shapes):
        return lib.redrafter_plugin_workspace_bytes(
            kind, i32s(values), dims_arg(shapes), len(shapes)
        )

    assert ws(TREE_PACK, [3, 4], [(8, 3, 4)]) == 0
    acc_in = [(8, 12, 97), (8, 3, 4), (8, 3, 4), (8,), (8,), (8,), (8,), (8, 4)]
    assert ws(ACCEPT, [3, 4], acc_in) == 8 * 12 * 4
    small, big = (
        ws(BEAM_SEARCH, [4, 50], [(1, 4, 49152), (1, 4), (49152,)]),
        ws(BEAM_SEARCH, [4, 50], [(8, 4, 49152), (8, 4), (49152,)]),
    )
    assert 0 < small < big


# ------------------------------------------------------------------------------------ enqueue
def enqueue(lib, kind, values, inputs, out_specs):
    """Runs the plugin's enqueue path on the CPU references; inputs are contiguous CPU tensors."""
    types = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.int32: I32}
    outs = [torch.full(s, -7, dtype=d) for s, d in out_specs]
    in_ptrs = (_p * len(inputs))(*[t.data_ptr() for t in inputs])
    out_ptrs = (_p * len(outs))(*[t.data_ptr() for t in outs])
    code, msg = call(
        lib.redrafter_plugin_enqueue_cpu,
        kind,
        i32s(values),
        dims_arg([tuple(t.shape) for t in inputs]),
        i32s([types[t.dtype] for t in inputs]),
        len(inputs),
        in_ptrs,
        out_ptrs,
    )
    return code, msg, outs


def test_tree_pack_enqueue_matches_spec_example(lib):
    beams = torch.tensor(
        [[[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]]], dtype=torch.int32
    )
    code, msg, shapes = output_shapes(lib, TREE_PACK, [3, 4], [tuple(beams.shape)])
    code, msg, (tokens, length, unpacker, offsets, mask) = enqueue(
        lib, TREE_PACK, [3, 4], [beams], [(s, torch.int32) for s in shapes]
    )
    assert code == 0, msg
    assert length.tolist() == [7]
    assert tokens[0, :7].tolist() == [91, 92, 93, 95, 94, 96, 97]
    assert unpacker.tolist() == [[[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]]]
    assert offsets[0, :7].tolist() == [0, 1, 2, 3, 2, 3, 3]
    ref = pack_tree(beams)
    assert torch.equal(mask, ref.packed_mask) and torch.equal(tokens, ref.tokens)


@pytest.mark.parametrize("mapped", [False, True])
def test_beam_search_enqueue_matches_torch(lib, mapped):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = torch.randn(3, 4, 300, generator=g).to(dtype)
        scores = torch.randn(3, 4, generator=g)
        scores[0, 1:] = float("-inf")
        # the head's draft vocabulary (K = 300 ids of a larger vocabulary), or the identity
        vocab_map = (torch.randperm(4000, generator=g)[:300] if mapped else torch.arange(300)).to(
            torch.int32
        )
        code, msg, (new_scores, parent, token) = enqueue(
            lib,
            BEAM_SEARCH,
            [4, 20],
            [logits, scores, vocab_map],
            [((3, 4), torch.float32), ((3, 4), torch.int32), ((3, 4), torch.int32)],
        )
        assert code == 0, msg
        ref_scores, ref_parent, ref_token = beam_search_step(
            logits, scores, 20, vocab_map if mapped else None
        )
        assert torch.equal(parent, ref_parent.to(torch.int32)) and torch.equal(
            token, ref_token.to(torch.int32)
        )
        torch.testing.assert_close(new_scores, ref_scores.to(torch.float32))


def test_accept_enqueue_matches_torch(lib):
    g = torch.Generator().manual_seed(1)
    b, w, l, v = 4, 3, 3, 50
    beams = torch.randint(0, v, (b, w, l), generator=g, dtype=torch.int32)
    beams[:, :, 0] = beams[:, :1, 0]
    beams[:, 1, 1] = beams[:, 0, 1]  # shared prefixes
    tree = pack_tree(beams)
    logits = torch.randn(b, w * l, v, generator=g)
    for row in range(b):  # make the drafts partly right so acceptance walks the tree
        for d in range(l - 1):
            logits[row, tree.unpacker[row, row % w, d], beams[row, row % w, d + 1]] += 10 * (
                d < row % l
            )
    temperature = torch.tensor([0.0, 0.0, 0.8, 1.3])
    top_k = torch.tensor([0, 0, 5, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0])
    uniforms = torch.rand(b, l, generator=g)
    inputs = [logits, beams, tree.unpacker, tree.lengths, temperature, top_k, top_p, uniforms]
    code, msg, outs = enqueue(
        lib, ACCEPT, [w, l], inputs, [((b,), torch.int32)] * 3 + [((b, l), torch.int32)] * 2
    )
    assert code == 0, msg
    ref = accept(logits, beams, tree.unpacker, temperature, top_k, top_p, uniforms)
    for got, want in zip(
        outs, (ref.num_accepted, ref.best_beam, ref.bonus, ref.accepted_indices, ref.emitted)
    ):
        assert torch.equal(got, want.to(torch.int32))


def test_enqueue_rejects_what_the_fields_forbid(lib):
    beams = torch.zeros(2, 3, 4, dtype=torch.int32)
    code, msg, _ = enqueue(lib, TREE_PACK, [3, 5], [beams], [((2, 15), torch.int32)] * 5)
    assert code == 1 and "beams dim 2 (L) is 4, expected 5" in msg
    logits = torch.zeros(2, 3, 10, dtype=torch.int32)
    code, msg, _ = enqueue(
        lib,
        BEAM_SEARCH,
        [3, 0],
        [logits, torch.zeros(2, 3), torch.arange(10, dtype=torch.int32)],
        [((2, 3), torch.int32)] * 3,
    )
    assert code == 1 and "logits has type int32" in msg
