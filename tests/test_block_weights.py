"""GGUF block weights kept as stored (models/blocks.py): exact decoding against the float32
conversion of the built-in model, the blocks.safetensors layout and its errors, and a
checkpoint that carries the blocks and loads them into the torch backend."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_tiny_hf
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import convert_checkpoint, load_checkpoint_models
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.models import blocks as B
from redrafter_trt.models.drafter import DrafterConfig, init_drafter

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w: torch.Tensor, fmt: str) -> B.BlockTensor:
    """A block tensor close to ``w`` (a test fixture: any blocks decode to exact float32)."""
    n, k = w.shape
    wb = w.reshape(n, k // 32, 32).to(torch.float32)
    if fmt == "q8_0":
        d = (wb.abs().amax(-1) / 127).clamp_min(1e-4).to(torch.float16)
        q = torch.round(wb / d.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return B.BlockTensor(fmt, n, k, q.reshape(n, k), d)
    lo, hi = wb.amin(-1), wb.amax(-1)
    d = ((hi - lo) / 15).clamp_min(1e-4).to(torch.float16)
    m = lo.to(torch.float16)
    q = torch.round((wb - m.float().unsqueeze(-1)) / d.float().unsqueeze(-1)).clamp(0, 15)
    q = q.to(torch.uint8)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2)
    return B.BlockTensor(fmt, n, k, qs, d, m)


def test_decode_q4_1_nibble_order_and_rounding():
    d = torch.tensor([[0.1]], dtype=torch.float16)
    m = torch.tensor([[-0.7]], dtype=torch.float16)
    qs = torch.arange(16, dtype=torch.uint8).reshape(1, 16) | (
        (15 - torch.arange(16, dtype=torch.uint8)) << 4
    ).reshape(1, 16)
    w = B.decode(B.BlockTensor("q4_1", 1, 32, qs, d, m))
    q = torch.cat([torch.arange(16), 15 - torch.arange(16)]).to(torch.float32)
    want = d.float() * q + m.float()  # two float32 roundings, as gguf's numpy code
    assert torch.equal(w[0], want[0])


def smollm2_paths():
    pytest.importorskip("gguf")
    from redrafter_trt.models.hub import SMOLLM2_DIR, cache_root, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except RedrafterError as e:
        pytest.skip(str(e))
    conv = cache_root() / SMOLLM2_DIR
    if not (conv / "model.safetensors").is_file():
        pytest.skip(f"{conv}: the built-in model is not converted yet")
    return gguf, conv


def test_smollm2_blocks_decode_to_the_float32_conversion_bit_for_bit(tmp_path):
    from redrafter_trt.models.hub import write_smollm2_blocks

    gguf, conv = smollm2_paths()
    (tmp_path / "config.json").write_bytes((conv / "config.json").read_bytes())
    blocks = B.load_blocks(write_smollm2_blocks(tmp_path, gguf))  # as the converter writes them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.safetensors", "config.json"]
    sd = load_file(str(conv / "model.safetensors"))
    counts = {f: sum(b.fmt == f for b in blocks.values()) for f in B.FORMATS}
    assert counts == {"q4_1": 210, "q8_0": 1}, counts
    assert 90e6 < sum(b.nbytes() for b in blocks.values()) < 100e6
    for name, bt in blocks.items():
        assert torch.equal(B.decode(bt).view(torch.int32), sd[name].view(torch.int32)), name
    # the check can fail: q_proj's rows without transformers' reverse permutation differ
    q = "model.layers.0.self_attn.q_proj.weight"
    raw = B.read_gguf_blocks(gguf, 1, 1)[q]  # n_head 1: a different row order
    assert not torch.equal(B.decode(raw), sd[q])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    blocks = {
        "a.weight": quantize(torch.randn(8, 64), "q4_1"),
        "b.weight": quantize(torch.randn(4, 32), "q8_0"),
    }
    B.save_blocks(blocks, tmp_path / B.BLOCKS_FILE)
    back = B.load_blocks(tmp_path / B.BLOCKS_FILE)
    assert set(back) == set(blocks)
    for name, bt in blocks.items():
        assert torch.equal(B.decode(back[name]), B.decode(bt))


def _rewrite(path: Path, edit_tensors=None, edit_meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        m = json.loads(meta["redrafter_blocks"])
        edit_meta(m)
        meta["redrafter_blocks"] = json.dumps(m)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "case, edit_tensors, edit_meta, message",
    [
        (
            "wrong shape",
            lambda t: t.__setitem__("a.weight.q4_1.d", torch.zeros(8, 3, dtype=torch.float16)),
            None,
            r"a\.weight\.q4_1\.d: expected torch\.float16 \[8, 2\], found torch\.float16 \[8, 3\]",
        ),
        (
            "unknown format",
            None,
            lambda m: m.__setitem__("a.weight", ["q5_k", 8, 64]),
            r"tensor a\.weight: unknown block format 'q5_k'",
        ),
        (
            "missing part",
            lambda t: t.pop("a.weight.q4_1.m"),
            None,
            r"tensor a\.weight: q4_1 part a\.weight\.q4_1\.m is missing",
        ),
    ],
)
def test_bad_blocks_file_names_tensor_and_file(tmp_path, case, edit_tensors, edit_meta, message):
    path = tmp_path / B.BLOCKS_FILE
    B.save_blocks({"a.weight": quantize(torch.randn(8, 64), "q4_1")}, path)
    _rewrite(path, edit_tensors, edit_meta)
    with pytest.raises(RedrafterError, match=message) as e:
        B.load_blocks(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("mapped", [False, True])
def test_truncated_blocks_file_is_a_clear_error(tmp_path, mapped):
    path = tmp_path / B.BLOCKS_FILE
    B.save_blocks({"a.weight": quantize(torch.randn(8, 64), "q4_1")}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(RedrafterError, match="truncated or corrupt") as e:
        B.load_blocks(path, mapped=mapped)
    assert str(path) in str(e.value)


def test_mapped_blocks_are_views_of_the_file_with_the_same_values(tmp_path):
    path = tmp_path / B.BLOCKS_FILE
    blocks = {
        "a.weight": quantize(torch.randn(8, 64), "q4_1"),
        "b.weight": quantize(torch.randn(40, 96), "q8_0"),
    }
    B.save_blocks(blocks, path)
    mapped = B.load_blocks(path, mapped=True)
    for name, bt in blocks.items():
        m = mapped[name]
        assert m.mapping is not None and torch.equal(B.decode(m), B.decode(bt))
        base = m.mapping.base
        assert all(base <= t.data_ptr() < base + path.stat().st_size for t in m.parts().values())
        B.release_pages(m)  # dropped pages are read again from the file: same values
        assert torch.equal(B.decode(m), B.decode(bt))
    assert all(bt.mapping is None for bt in B.load_blocks(path).values())


def test_non_finite_scales_are_refused_naming_tensor_and_file(tmp_path):
    path = tmp_path / B.BLOCKS_FILE
    bt = quantize(torch.randn(8, 64), "q8_0")
    B.save_blocks({"a.weight": bt}, path)
    _rewrite(path, edit_tensors=lambda t: t["a.weight.q8_0.d"].view(-1)[3:4].fill_(float("nan")))
    for mapped in (False, True):
        with pytest.raises(RedrafterError, match=r"tensor a\.weight\.q8_0\.d: non-finite scales"):
            B.load_blocks(path, mapped=mapped)


def tiny_gguf_like_base(tmp_path, **cfg) -> Path:
    """A tiny llama HF directory as a GGUF conversion leaves it: its linears Q4_1 blocks and its
    embedding Q8_0 in blocks.safetensors, model.safetensors their float32 expansion (``cfg``:
    config overrides, sizes multiples of 32)."""
    d = write_tiny_hf(tmp_path / "hf", "llama", tie=True, **cfg)
    sd = load_file(str(d / "model.safetensors"))
    blocks = {}
    for name in sd:
        if name.endswith(tuple(f"{p}.weight" for p in LINEARS)):
            blocks[name] = quantize(sd[name], "q4_1")
        elif name == "model.embed_tokens.weight":
            blocks[name] = quantize(sd[name], "q8_0")
    for name, bt in blocks.items():
        sd[name] = B.decode(bt)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    B.save_blocks(blocks, d / B.BLOCKS_FILE)
    return d


def cli_convert(base: Path, out: Path, *extra: str) -> Path:
    from redrafter_trt.cli import convert as convert_cli

    argv = ["--model_dir", str(base), "--random_drafter", "--output_dir", str(out)]
    assert convert_cli.main([*argv, "--dtype", "float32", *extra]) == 0
    return out


def test_checkpoint_keeps_blocks_and_the_torch_backend_loads_them(tmp_path):
    base = tiny_gguf_like_base(tmp_path)
    plain = cli_convert(base, tmp_path / "plain", "--no_keep_blocks")
    kept = cli_convert(base, tmp_path / "kept", "--keep_blocks")
    assert (kept / B.BLOCKS_FILE).is_file() and not (plain / B.BLOCKS_FILE).exists()
    stored = B.load_blocks(kept / B.BLOCKS_FILE)
    qkv = "transformer.layers.1.attention.qkv.weight"
    assert stored[qkv].fmt == "q4_1" and stored[qkv].n == 32 + 2 * 16  # q, k, v fused
    assert stored["transformer.vocab_embedding.weight"].fmt == "q8_0"
    assert len(stored) == 1 + 2 * 5
    # rank0 keeps the float32 expansion for every other reader, bit for bit
    rank_p = load_file(str(plain / "rank0.safetensors"))
    rank_k = load_file(str(kept / "rank0.safetensors"))
    assert rank_p.keys() == rank_k.keys()
    for name, bt in stored.items():
        assert torch.equal(B.decode(bt), rank_k[name]), name
    _, base_p, _ = load_checkpoint_models(plain)
    _, base_k, _ = load_checkpoint_models(kept)
    for (n, a), (_, b) in zip(base_p.state_dict().items(), base_k.state_dict().items()):
        assert torch.equal(a, b), n
    # the weights do come from blocks.safetensors: change one nibble, the loaded weight moves
    name = "transformer.layers.0.mlp.gate.weight"
    _rewrite(
        kept / B.BLOCKS_FILE,
        edit_tensors=lambda t: t[f"{name}.q4_1.qs"].view(-1)[:1].bitwise_xor_(1),
    )
    _, base_x, _ = load_checkpoint_models(kept)
    assert not torch.equal(base_x.state_dict()[name], base_p.state_dict()[name])


def test_blocks_that_match_no_weight_write_nothing(tmp_path):
    cfg, sd = load_hf_base(tiny_gguf_like_base(tmp_path))
    name = "transformer.layers.1.attention.dense.weight"
    n, k = sd[name].shape
    drafter = init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, 24, 2, True))
    out = tmp_path / "ckpt"
    bad = {name: quantize(torch.randn(n * 2, k), "q4_1")}
    with pytest.raises(RedrafterError, match=rf"src\.safetensors: tensor {name}: q4_1"):
        convert_checkpoint(
            cfg, sd, drafter, out, dtype="float32", blocks=bad, blocks_source="src.safetensors"
        )
    assert not out.exists()
    good = {name: quantize(sd[name], "q4_1")}
    with pytest.raises(RedrafterError, match="only in a float32"):
        convert_checkpoint(cfg, sd, drafter, out, dtype="float16", blocks=good)
    assert not out.exists()


def test_loader_rejects_blocks_of_the_wrong_shape(tmp_path):
    kept = cli_convert(tiny_gguf_like_base(tmp_path), tmp_path / "kept", "--keep_blocks")
    name = "transformer.layers.0.mlp.proj.weight"
    B.save_blocks({name: quantize(torch.randn(33, 64), "q4_1")}, kept / B.BLOCKS_FILE)
    with pytest.raises(RedrafterError, match=rf"blocks\.safetensors: tensor {name}: q4_1"):
        load_checkpoint_models(kept)


def test_keep_blocks_needs_a_gguf_base(tmp_path, tiny_dirs, capsys):
    from redrafter_trt.cli import convert as convert_cli

    argv = ["--model_dir", str(tiny_dirs["llama"]), "--random_drafter", "--dtype", "float32"]
    assert convert_cli.main([*argv, "--output_dir", str(tmp_path / "o"), "--keep_blocks"]) == 2
    err = capsys.readouterr().err
    assert "--keep_blocks: " in err and "has no blocks.safetensors" in err, err
    assert not (tmp_path / "o").exists()
