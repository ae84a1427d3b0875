"""The CPU linear kernel on GGUF block weights (Q4_1, Q8_0 decoded in registers): the bits of
the float32 path on the exact expansion, invariant to M, the row's place, threads and path."""

import pytest
import torch

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.models import blocks as B
from test_block_weights import quantize

pytestmark = pytest.mark.usefixtures("native_library")

FORMATS = ("q4_1", "q8_0")


def same_bits(a, b) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(576, 576), (70, 96), (17, 32), (1, 1536)])
def test_blocks_give_the_float32_paths_bits_for_every_m_place_thread_and_path(fmt, n, k):
    g = torch.Generator().manual_seed(n + k)
    bt = quantize(torch.randn(n, k, generator=g), fmt)
    x, bias = torch.randn(13, k, generator=g), torch.randn(n, generator=g)
    float_packed = native.pack_linear(B.decode(bt))
    ref = native.linear_packed(x, float_packed, bias, threads=1)
    blk = native.pack_blocks(bt)
    assert blk.nbytes < float_packed.nbytes / 2.5  # block panels stream far fewer bytes
    for threads in (1, 2, 3):
        for force_scalar in (False, True):
            y = native.linear_packed(x, blk, bias, threads=threads, force_scalar=force_scalar)
            assert same_bits(y, ref), (threads, force_scalar)
    for lo, hi in ((0, 1), (5, 6), (2, 9), (12, 13)):  # any sub-batch, any place
        assert same_bits(native.linear_packed(x[lo:hi], blk, bias), ref[lo:hi])
    yb = native.linear_packed(x.to(torch.bfloat16), blk, bias, out_dtype=torch.bfloat16)
    assert torch.equal(yb, native.linear_packed(x.to(torch.bfloat16), float_packed, bias))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_avx2_path_gives_the_same_bits(fmt, monkeypatch, tmp_path):
    """$REDRAFTER_NO_AVX512 is read once per process: run the AVX2 path in a child."""
    import subprocess
    import sys

    if native.simd_level() < 1:
        pytest.skip("no AVX2 on this CPU")
    code = f"""
import torch, sys
sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
from test_block_weights import quantize
from redrafter_trt import native
from redrafter_trt.models import blocks as B
assert native.simd_level() == 1
g = torch.Generator().manual_seed(3)
bt = quantize(torch.randn(70, 128, generator=g), {fmt!r})
x = torch.randn(7, 128, generator=g)
torch.save(native.linear_packed(x, native.pack_blocks(bt), threads=2), {str(tmp_path / "y.pt")!r})
"""
    env = {**__import__("os").environ, "REDRAFTER_NO_AVX512": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    g = torch.Generator().manual_seed(3)
    bt = quantize(torch.randn(70, 128, generator=g), fmt)
    x = torch.randn(7, 128, generator=g)
    ref = native.linear_packed(x, native.pack_linear(B.decode(bt)), threads=1)
    assert same_bits(torch.load(tmp_path / "y.pt"), ref)


def test_the_check_sees_a_changed_block():
    """The bit comparison can fail: one nibble changed in the blocks changes an output."""
    g = torch.Generator().manual_seed(1)
    bt = quantize(torch.randn(32, 64, generator=g), "q4_1")
    x = torch.randn(2, 64, generator=g)
    ref = native.linear_packed(x, native.pack_linear(B.decode(bt)))
    bt.qs[5, 3] ^= 0x10
    assert not same_bits(native.linear_packed(x, native.pack_blocks(bt)), ref)


def test_block_pack_bad_inputs_name_what_is_wrong():
    bt = quantize(torch.randn(4, 64), "q8_0")
    with pytest.raises(RedrafterError, match="unknown block format 'q5_k'"):
        native.pack_blocks(B.BlockTensor("q5_k", 4, 64, bt.qs, bt.d))
    with pytest.raises(RedrafterError, match=r"q8_0 weight \[4, 48\] cannot be packed"):
        native.pack_blocks(B.BlockTensor("q8_0", 4, 48, bt.qs, bt.d))
    with pytest.raises(RedrafterError, match=r"weight\.q8_0\.qs: expected torch\.int8 \[8, 64\]"):
        native.pack_blocks(B.BlockTensor("q8_0", 8, 64, bt.qs, bt.d))  # parts of 4 rows
    with pytest.raises(RedrafterError, match="disagree"):
        native.linear_packed(torch.randn(1, 32), native.pack_blocks(bt))


def test_a_loaded_checkpoint_streams_blocks_with_the_float32_bits(tmp_path):
    """A --keep_blocks checkpoint: its linears pack the blocks (a fifth of the bytes), and
    every linear gives the float32 checkpoint's bits."""
    from redrafter_trt.formats.checkpoint import load_checkpoint_models
    from redrafter_trt.models.base import Linear, set_native_linear
    from test_block_weights import cli_convert, tiny_gguf_like_base

    base_dir = tiny_gguf_like_base(tmp_path)
    plain = cli_convert(base_dir, tmp_path / "plain", "--no_keep_blocks")
    kept = cli_convert(base_dir, tmp_path / "kept", "--keep_blocks")
    _, base_p, _ = load_checkpoint_models(plain)
    _, base_k, _ = load_checkpoint_models(kept)
    set_native_linear(base_p, True)
    set_native_linear(base_k, True)
    fmts = [m.packed_weight().fmt for m in base_k.modules() if isinstance(m, Linear)]
    assert fmts.count("q4_1") == 2 * 5 and fmts.count("q8_0") == 1  # + the tied lm_head
    assert all(m.packed_weight().fmt is None for m in base_p.modules() if isinstance(m, Linear))
    for mp, mk in zip(base_p.modules(), base_k.modules()):
        if isinstance(mp, Linear):
            x = torch.randn(5, mp.in_features)
            with torch.no_grad():
                assert same_bits(mp(x), mk(x))
    # a changed weight drops the blocks: the kernel follows the weight, never stale blocks
    lin = base_k.transformer.layers[0].mlp.fc
    with torch.no_grad():
        lin.weight[0, 0] += 1.0
    assert lin.packed_weight().fmt is None


def test_a_torch_engine_carries_the_blocks_and_greedy_tokens_do_not_change(tmp_path):
    from redrafter_trt.models.base import Linear
    from redrafter_trt.runtime.engine import build_engine
    from redrafter_trt.runtime.loader import load
    from test_block_weights import cli_convert, tiny_gguf_like_base

    base_dir = tiny_gguf_like_base(tmp_path)
    tokens = {}
    for name, extra in (("plain", ("--no_keep_blocks",)), ("kept", ())):
        ckpt = cli_convert(base_dir, tmp_path / name, *extra)
        engine = build_engine(ckpt, tmp_path / f"engine_{name}", backend="torch")
        assert (engine / B.BLOCKS_FILE).is_file() == (name == "kept")
        gen = load(engine, device="cpu", adaptive="off")
        base = gen.backend.base
        linears = [m for m in base.modules() if isinstance(m, Linear)]
        assert all(m.native for m in linears)  # the CPU kernel runs them
        fmts = {m.packed_weight().fmt for m in linears}
        assert fmts == ({"q4_1", "q8_0"} if name == "kept" else {None}), fmts
        prompts = [[1, 2, 3, 4], [7, 5, 3]]
        tokens[name] = [
            [r.token_ids for r in gen.generate(prompts, max_new_tokens=12, speculative=s)]
            for s in (False, True)
        ]
    assert tokens["kept"] == tokens["plain"]
    assert tokens["kept"][0] == tokens["kept"][1]  # speculative == plain on blocks too


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows_are_the_decoded_rows_bit_for_bit(fmt):
    """native.embed_blocks (cpp/src/embed_cpu.cpp) against models/blocks.py decode: any ids, in
    any shape, repeated, first and last row; and the weight the block linear kernel multiplies
    by (a one-hot input picks out a column of the decoded table)."""
    g = torch.Generator().manual_seed(11)
    bt = quantize(torch.randn(300, 96, generator=g) * 3, fmt)
    table = B.decode(bt)
    ids = torch.tensor([[0, 299, 7, 7], [150, 3, 0, 298]])
    rows = native.embed_blocks(bt, ids)
    assert rows.shape == (2, 4, 96) and rows.dtype == torch.float32
    assert same_bits(rows, table[ids])
    assert same_bits(native.embed_blocks(bt, torch.arange(300)), table)
    assert native.embed_blocks(bt, torch.zeros(0, dtype=torch.int64)).shape == (0, 96)
    onehot = torch.zeros(1, 96)
    onehot[0, 40] = 1.0
    col = native.linear_packed(onehot, native.pack_blocks(bt))[0]
    assert torch.equal(col, table[:, 40])  # == (a -0.0 weight sums to +0.0 in the chain)
    # the comparison can fail: one changed byte of the table moves its row
    bt.qs[7, 5] ^= 0x11
    assert not same_bits(native.embed_blocks(bt, ids), rows)


def test_embedding_bad_inputs_name_what_is_wrong():
    bt = quantize(torch.randn(8, 64), "q8_0")
    with pytest.raises(RedrafterError, match=r"id 8 at position 1 is outside \[0, 8\)"):
        native.embed_blocks(bt, torch.tensor([3, 8]))
    with pytest.raises(RedrafterError, match=r"id -1 at position 0"):
        native.embed_blocks(bt, torch.tensor([-1]))
    with pytest.raises(RedrafterError, match="unknown block format 'q5_k'"):
        native.embed_blocks(B.BlockTensor("q5_k", 8, 64, bt.qs, bt.d), torch.tensor([0]))
    with pytest.raises(RedrafterError, match=r"weight\.q8_0\.qs: expected torch\.int8 \[9, 64\]"):
        native.embed_blocks(B.BlockTensor("q8_0", 9, 64, bt.qs, bt.d), torch.tensor([0]))
    with pytest.raises(
        RedrafterError, match=r"weight\.q4_1\.m: expected torch\.float16 \[8, 2\], found nothing"
    ):
        q = quantize(torch.randn(8, 64), "q4_1")
        native.embed_blocks(B.BlockTensor("q4_1", 8, 64, q.qs, q.d), torch.tensor([0]))
    with pytest.raises(RedrafterError, match="ids must be an integer CPU tensor"):
        native.embed_blocks(bt, torch.tensor([0.0]))
