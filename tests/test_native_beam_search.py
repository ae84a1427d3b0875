"""The C++ beam-search reference (cpp/, via redrafter_trt.native) equals the PyTorch reference.

Integer outputs (parent, token) must match bit for bit, ties included: duplicated logits inside a
row (at the warp boundary too), duplicated beams with equal scores, dead beams, constant rows.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.ops.beam_search import beam_search_step, beam_search_step_naive

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("native_library")


def make_case(seed: int, b: int, w: int, v: int, ties: str, dtype: torch.dtype):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(b, w, v)).astype(np.float32)
    scores = rng.normal(0.0, 2.0, size=(b, w)).astype(np.float32)
    if ties == "dup_values":  # equal logits inside rows, also around the warp boundary
        for _ in range(max(1, v // 3)):
            i, j = rng.integers(0, v, size=2)
            logits[:, :, j] = logits[:, :, i]
    elif ties == "dup_rows":  # identical beams with equal scores: ties across beams
        logits[:, :] = logits[:, :1]
        scores[:, :] = scores[:, :1]
    elif ties == "constant":
        logits[:] = 1.5
    elif ties == "first_step":
        scores[:, 0] = 0.0
        scores[:, 1:] = -np.inf
    elif ties == "equal_scores":
        scores[:] = 0.25
    elif ties == "dead_beams":
        scores[:, rng.random(w) < 0.5] = -np.inf
    return torch.from_numpy(logits).to(dtype), torch.from_numpy(scores)


def assert_same(native_out, ref_out):
    scores, parent, token = native_out
    rs, rp, rt = ref_out
    assert torch.equal(parent, rp.to(torch.int32)), (parent, rp)
    assert torch.equal(token, rt.to(torch.int32)), (token, rt)
    torch.testing.assert_close(scores, rs, rtol=2e-6, atol=2e-5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    b=st.integers(1, 3),
    w=st.integers(1, 8),
    extra_v=st.integers(0, 60),
    ties=st.sampled_from(
        ["none", "dup_values", "dup_rows", "constant", "first_step", "equal_scores", "dead_beams"]
    ),
    warp=st.sampled_from(["off", "1", "2", "5", "50", "v-1", "v", "v+3"]),
    dtype=st.sampled_from(DTYPES),
)
def test_matches_pytorch_reference(seed, b, w, extra_v, ties, warp, dtype):
    v = w + extra_v
    named = {"off": 0, "v-1": v - 1, "v": v, "v+3": v + 3}
    warp_k = named[warp] if warp in named else int(warp)
    logits, scores = make_case(seed, b, w, v, ties, dtype)
    out = native.beam_search_step(logits, scores, warp_k)
    assert_same(out, beam_search_step(logits, scores, warp_k))
    assert_same(out, beam_search_step_naive(logits, scores, warp_k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "w,v,warp_k", [(4, 32000, 50), (8, 4099, 0), (64, 1000, 50), (1, 152064, 50)]
)
def test_large_vocab(dtype, w, v, warp_k):
    logits, scores = make_case(7, 1, w, v, "dup_values", dtype)
    assert_same(
        native.beam_search_step(logits, scores, warp_k), beam_search_step(logits, scores, warp_k)
    )


def test_fillers_rank_by_token_id():
    """W > warp_k: warped-out tokens (all WARP_FILL) fill the top W, lowest ids first."""
    logits = torch.tensor([[[0.0, 5.0, 1.0, 4.0, 2.0, 3.0]]]).repeat(1, 4, 1)
    scores = torch.tensor([[0.0, -1.0, -1.0, -2.0]])
    out = native.beam_search_step(logits, scores, 2)
    assert_same(out, beam_search_step(logits, scores, 2))
    assert out[2][0, :2].tolist() == [1, 3]


@pytest.mark.parametrize(
    "shape,scores_shape,warp_k,needle",
    [
        ((1, 5, 3), (1, 5), 0, "exceeds vocab size"),
        ((1, 65, 100), (1, 65), 0, "num_beams W must be in [1, 64]"),
        ((1, 0, 4), (1, 0), 0, "num_beams W must be in [1, 64]"),
        ((1, 2, 4), (1, 2), -1, "warp_k must be >= 0"),
    ],
)
def test_bad_parameters_raise_with_message(shape, scores_shape, warp_k, needle):
    with pytest.raises(RedrafterError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        native.beam_search_step(torch.zeros(shape), torch.zeros(scores_shape), warp_k)


def test_bad_shapes_raise_before_the_call():
    with pytest.raises(RedrafterError, match=r"beam_scores: expected shape \[2, 3\]"):
        native.beam_search_step(torch.zeros(2, 3, 10), torch.zeros(3, 2))


def _raw_call(logits, dtype, scores, b, w, v, k, outs):
    lib = native.load_library()
    msg = ctypes.create_string_buffer(256)
    addr = lambda buf: None if buf is None else ctypes.addressof(buf)  # noqa: E731
    new_scores, parent, token = (addr(o) for o in outs)
    p = native.BeamSearchParams(
        logits=addr(logits),
        dtype=dtype,
        beam_scores=addr(scores),
        new_scores=new_scores,
        parent=parent,
        token=token,
        batch=b,
        num_beams=w,
        vocab=v,
        warp_k=k,
    )
    status = lib.redrafter_beam_search_step_cpu(p, msg, 256)
    return status, msg.value.decode()


def test_null_pointers_and_overflow_return_status():
    buf = (ctypes.c_float * 64)()
    ints = (ctypes.c_int32 * 64)()
    status, msg = _raw_call(None, 0, buf, 1, 2, 4, 0, (buf, ints, ints))
    assert status == 1 and "null pointer" in msg
    status, msg = _raw_call(buf, 0, buf, 1, 2, 2**31, 0, (buf, ints, ints))
    assert status == 1 and "vocab size V" in msg
    status, msg = _raw_call(buf, 0, buf, 1, 64, 2**30, 0, (buf, ints, ints))
    assert status == 2 and "overflows int32" in msg
    status, msg = _raw_call(buf, 7, buf, 1, 2, 4, 0, (buf, ints, ints))
    assert status == 1 and "dtype" in msg


def test_missing_library_names_the_build_script(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv(native.LIB_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(RedrafterError, match="build_scripts/build_cpp.sh"):
        native.beam_search_step(torch.zeros(1, 1, 4), torch.zeros(1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_map_gives_full_ids(dtype):
    """A reduced draft vocabulary: column k of the [B, W, K] logits is full id vocab_map[k]."""
    logits, scores = make_case(3, 2, 4, 300, "dup_values", dtype)
    ids = torch.randperm(5000, generator=torch.Generator().manual_seed(1))[:300].to(torch.int32)
    want = beam_search_step(logits, scores, 50, ids)
    got = native.beam_search_step(logits, scores, 50, ids)
    assert_same(got, want)
    with pytest.raises(RedrafterError, match=r"vocab_map: expected shape \[300\]"):
        native.beam_search_step(logits, scores, 50, ids[:299])
