"""Tensor-parallel checkpoints: every rank's tensors have TensorRT-LLM's names, shapes and dtypes,
and the ranks concatenate back to the tp_size 1 tensors exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_hf
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import (
    convert_checkpoint,
    load_checkpoint_models,
    load_rank_shards,
    rank_file,
    read_checkpoint_config,
)
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.formats.sharding import padded_vocab_size, tp_merge
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime.engine import build_engine

# tiny models: V=97 (padded for tp 2 and 4), H=32, I=64, 4 heads of 8, 2 KV heads (replicated
# across ranks at tp 4), exit_dim 24 < 2H (input_proj present), 2 layers.
H, I, NH, NKV, HD, V, EXIT = 32, 64, 4, 2, 8, 97, 24


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_hf")
    return {
        arch: load_hf_base(write_tiny_hf(root / arch, arch, seed=11 + i))
        for i, arch in enumerate(("llama", "qwen2"))
    }


def convert(base, out, tp, dtype="float32"):
    cfg, sd = base
    drafter = init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, EXIT, 2, True), seed=5)
    return convert_checkpoint(
        cfg, sd, drafter, out, dtype=dtype, num_beams=3, draft_len=2, tp_size=tp
    )


def expected_rank_shape(name: str, full: tuple, tp: int) -> tuple:
    """The rank shape TensorRT-LLM's layers expect for a full tensor of shape ``full``."""
    if tp == 1:
        return full
    if name in ("lm_head.weight", "drafter.lm_head.weight"):
        return (padded_vocab_size(V, tp) // tp, *full[1:])
    if name.startswith("drafter."):
        return (full[0] // tp, *full[1:])
    if ".attention.qkv." in name:
        kv_heads = max(NKV // tp, 1)
        return ((NH // tp + 2 * kv_heads) * HD, *full[1:])
    if name.endswith((".attention.dense.weight", ".mlp.proj.weight")):
        return (full[0], full[1] // tp)
    if ".mlp.fc." in name or ".mlp.gate." in name:
        return (full[0] // tp, *full[1:])
    return full


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_split_concatenates_back(bases, tmp_path, arch, tp):
    ref_dir = convert(bases[arch], tmp_path / "tp1", 1)
    ref = load_file(str(ref_dir / rank_file(0)))
    out = ref_dir if tp == 1 else convert(bases[arch], tmp_path / f"tp{tp}", tp)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert (
        cfg["architecture"] == {"llama": "ReDrafterForLLaMALM", "qwen2": "ReDrafterForQWenLM"}[arch]
    )
    assert cfg["vocab_size"] == V  # the unpadded vocabulary; ranks hold the padded one
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == sorted(
        rank_file(r) for r in range(tp)
    )

    ckpt_cfg, shards = load_rank_shards(out)
    assert ckpt_cfg.tp_size == tp
    for rank, shard in enumerate(shards):
        assert set(shard) == set(ref), f"rank {rank} tensor names differ"
        for name, t in shard.items():
            assert t.dtype == torch.float32, name
            assert tuple(t.shape) == expected_rank_shape(name, tuple(ref[name].shape), tp), name
    merged = tp_merge(shards, ckpt_cfg)
    assert set(merged) == set(ref)
    for name, t in ref.items():
        assert torch.equal(merged[name], t), name
    if tp > 1:  # vocabulary padding rows are zeros
        lm = torch.cat([s["lm_head.weight"] for s in shards], 0)
        assert lm.shape[0] == padded_vocab_size(V, tp) and not lm[V:].any()


def test_qkv_shard_holds_its_heads(bases, tmp_path):
    """Rank r of tp 2 holds q heads 2r, 2r+1 and KV head r; at tp 4 KV heads are shared."""
    cfg, sd = bases["qwen2"]
    full = sd["transformer.layers.1.attention.qkv.bias"]
    q, k, v = full.split([NH * HD, NKV * HD, NKV * HD])
    for tp, kv_of_rank in ((2, [0, 1]), (4, [0, 0, 1, 1])):
        out = convert(bases["qwen2"], tmp_path / f"tp{tp}", tp)
        _, shards = load_rank_shards(out)
        qh = NH // tp
        for rank, shard in enumerate(shards):
            got = shard["transformer.layers.1.attention.qkv.bias"]
            h = kv_of_rank[rank]
            want = torch.cat(
                [
                    q[rank * qh * HD : (rank + 1) * qh * HD],
                    k[h * HD : (h + 1) * HD],
                    v[h * HD : (h + 1) * HD],
                ]
            )
            assert torch.equal(got, want), (tp, rank)
            # row-parallel biases and norms are replicated
            assert torch.equal(
                shard["transformer.layers.1.post_layernorm.weight"],
                sd["transformer.layers.1.post_layernorm.weight"],
            )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tp_split_keeps_dtype(bases, tmp_path, dtype):
    out = convert(bases["llama"], tmp_path / "ckpt", 2, dtype=dtype)
    _, shards = load_rank_shards(out)
    for shard in shards:
        assert {t.dtype for t in shard.values()} == {getattr(torch, dtype)}


def test_bad_tp_size_names_the_flag(bases, tmp_path):
    with pytest.raises(RedrafterError, match="--tp_size 3"):
        convert(bases["llama"], tmp_path / "ckpt", 3)
    assert not (tmp_path / "ckpt").exists()


def test_tp_checkpoints_build_one_rank_file_per_rank(bases, tmp_path):
    """The tp_size 1 loader refuses a tp_size 2 checkpoint (naming how to run it); a torch
    engine built from it carries every rank's file, identical to the checkpoint's."""
    out = convert(bases["llama"], tmp_path / "ckpt", 2)
    assert read_checkpoint_config(out).tp_size == 2
    with pytest.raises(RedrafterError, match="--tp_size 2"):
        load_checkpoint_models(out)
    engine = build_engine(
        out,
        tmp_path / "engine",
        backend="torch",
        max_batch_size=1,
        max_input_len=8,
        max_seq_len=32,
    )
    assert sorted(p.name for p in engine.glob("rank*")) == [rank_file(0), rank_file(1)]
    for r in range(2):
        assert (engine / rank_file(r)).read_bytes() == (out / rank_file(r)).read_bytes()
