"""A reduced draft vocabulary (K < V ids, ``draft_vocab``) through the PyTorch layers.

Properties: the beam-search step over K columns maps to full ids and is otherwise the K-column
search; drafted tokens are always draft-vocabulary ids; greedy output equals plain decoding and
seeded sampling gives the same tokens with and without speculation, also when the draft
vocabulary misses every token the base emits (then no draft token is ever accepted); head files
and checkpoints keep the map (int32) and reject bad maps with an error naming the file, writing
nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ARCHS
from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import (
    REDRAFTER_DRAFT_VOCAB_SIZE,
    RedrafterCheckpointConfig,
    convert_checkpoint,
    load_checkpoint_models,
)
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.formats.names import CKPT_DRAFT_VOCAB
from redrafter_trt.formats.sharding import tp_merge, tp_shard
from redrafter_trt.models.base import BaseModel
from redrafter_trt.models.drafter import (
    DRAFT_VOCAB,
    DRAFTER_CONFIG,
    DRAFTER_WEIGHTS,
    DrafterConfig,
    init_drafter,
    load_drafter,
    save_drafter,
)
from redrafter_trt.ops.beam_search import beam_search_step, beam_search_step_naive
from redrafter_trt.runtime import Generator

PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def head_cfg(v: int, h: int, k: int | None) -> DrafterConfig:
    return DrafterConfig(v, h, 2 * h, 1, True, draft_vocab_size=k)


def generator(model_dir, w, d, ids: torch.Tensor | None, seed: int = 0) -> Generator:
    cfg, sd = load_hf_base(model_dir)
    base = BaseModel(cfg)
    base.load_state_dict(sd)
    drafter = init_drafter(
        head_cfg(cfg.vocab_size, cfg.hidden_size, None if ids is None else len(ids)),
        seed=seed,
        std=0.5,
        draft_vocab=ids,
    )
    return Generator(
        TorchBackend(
            base.double(),
            drafter.double(),
            w,
            d,
            max_batch_size=16,
            max_input_len=256,
            max_seq_len=512,
        )
    )


# --------------------------------------------------------------------------- beam-search op
@pytest.mark.parametrize("warp_k", [0, 3, 50])
def test_step_over_k_columns_maps_to_full_ids(warp_k):
    g = torch.Generator().manual_seed(0)
    b, w, k = 3, 4, 40
    logits = torch.randn(b, w, k, generator=g) * 3
    logits[:, :, 7] = logits[:, :, 3]  # ties inside a row
    logits[1] = logits[1, :1]  # identical beams: ties across beams
    scores = torch.randn(b, w, generator=g)
    scores[1] = scores[1, 0]
    scores[2, 1:] = float("-inf")
    ids = torch.randperm(1000, generator=g)[:k].to(torch.int32)  # not sorted: order matters
    s0, p0, t0 = beam_search_step_naive(logits, scores, warp_k)  # the K-column search, unmapped
    for fn in (beam_search_step, beam_search_step_naive):
        s, p, t = fn(logits, scores, warp_k, ids)
        assert torch.equal(s, s0) and torch.equal(p, p0)
        assert torch.equal(t, ids.long()[t0])


def test_drafted_tokens_are_draft_vocabulary_ids():
    v, h, k = 97, 16, 9
    ids = torch.tensor([90, 2, 50, 13, 77, 4, 61, 33, 8], dtype=torch.int32)
    head = init_drafter(head_cfg(v, h, k), seed=1, std=0.5, draft_vocab=ids)
    emb = torch.nn.Embedding(v, h)
    beams = head.beam_search(emb, torch.randn(5, h), torch.tensor([1, 2, 3, 96, 0]), 4, 3)
    assert beams.shape == (5, 4, 4) and beams.dtype == torch.int32
    assert set(beams[:, :, 1:].flatten().tolist()) <= set(ids.tolist())
    assert beams[:, :, 0].tolist() == [[r] * 4 for r in (1, 2, 3, 96, 0)]


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_plain_with_k_below_v(tiny_dirs, arch):
    plain = generator(tiny_dirs[arch], 3, 3, None).generate(
        PROMPTS, max_new_tokens=17, speculative=False
    )
    emitted = sorted({t for r in plain for t in r.token_ids})
    others = [t for t in range(97) if t not in emitted]
    counts = torch.bincount(torch.tensor([t for r in plain for t in r.token_ids]), minlength=97)
    covering = torch.argsort(counts, descending=True, stable=True)[:6].to(torch.int32)
    missing = torch.tensor(others[:12], dtype=torch.int32)  # none of the tokens the base emits
    accepted = {}
    for name, ids in (("covering", covering), ("missing", missing)):
        spec = generator(tiny_dirs[arch], 3, 3, ids).generate(
            PROMPTS, max_new_tokens=17, speculative=True
        )
        for p, s in zip(plain, spec):
            assert s.token_ids == p.token_ids
        accepted[name] = sum(a - 1 for s in spec for a in s.accepted_per_step)
    assert accepted["missing"] == 0  # acceptance stops at a token the head cannot draft
    assert accepted["covering"] > 0  # and the mapped drafts do get verified and accepted


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampling_same_tokens_with_and_without_speculation(tiny_dirs, arch):
    ids = torch.tensor(list(range(0, 97, 5)), dtype=torch.int32)  # K = 20 of V = 97
    gen = generator(tiny_dirs[arch], 3, 3, ids, seed=2)
    for seed, (temp, k, p) in enumerate([(1.0, 0, 1.0), (0.7, 20, 0.9)]):
        kw = dict(max_new_tokens=15, temperature=temp, top_k=k, top_p=p, seed=seed)
        plain = gen.generate(PROMPTS, speculative=False, **kw)
        spec = gen.generate(PROMPTS, speculative=True, **kw)
        assert [s.token_ids for s in spec] == [q.token_ids for q in plain]
        # and at least one sampled token is outside the draft vocabulary (acceptance stops there)
        assert any(t not in ids.tolist() for q in plain for t in q.token_ids)


# --------------------------------------------------------------------------- head files
def test_head_dir_round_trip_keeps_int32_map(tmp_path):
    ids = torch.tensor([5, 0, 96, 40], dtype=torch.int32)
    head = init_drafter(head_cfg(97, 8, 4), seed=3, draft_vocab=ids)
    save_drafter(head, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / DRAFTER_CONFIG).read_text())
    assert cfg["draft_vocab_size"] == 4
    sd = load_file(str(tmp_path / "h" / DRAFTER_WEIGHTS))
    assert sd[DRAFT_VOCAB].dtype == torch.int32 and sd[DRAFT_VOCAB].tolist() == ids.tolist()
    assert sd["lm_head.1.weight"].shape == (4, 16)
    back = load_drafter(tmp_path / "h")
    assert torch.equal(back.vocab_map, ids)
    # Apple's format: no key, no map, V rows.
    save_drafter(init_drafter(head_cfg(97, 8, None)), tmp_path / "apple")
    assert "draft_vocab_size" not in json.loads((tmp_path / "apple" / DRAFTER_CONFIG).read_text())
    assert load_drafter(tmp_path / "apple").vocab_map is None


def _write_head(path, cfg_over: dict, sd_over: dict):
    head = init_drafter(
        head_cfg(97, 8, 4), draft_vocab=torch.tensor([5, 0, 96, 40], dtype=torch.int32)
    )
    save_drafter(head, path)
    cfg = json.loads((path / DRAFTER_CONFIG).read_text())
    cfg.update(cfg_over)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / DRAFTER_CONFIG).write_text(json.dumps(cfg))
    sd = {**head.state_dict(), **sd_over}
    save_file(
        {k: v.contiguous() for k, v in sd.items() if v is not None}, str(path / DRAFTER_WEIGHTS)
    )


@pytest.mark.parametrize(
    "cfg_over,sd_over,needle",
    [
        (
            {},
            {DRAFT_VOCAB: torch.tensor([5, 0, 97, 40], dtype=torch.int32)},
            "id 97 outside the vocabulary [0, 97)",
        ),
        ({}, {DRAFT_VOCAB: torch.tensor([5, -1, 9, 40], dtype=torch.int32)}, "id -1 outside"),
        ({}, {DRAFT_VOCAB: torch.tensor([5, 0, 5, 40], dtype=torch.int32)}, "repeats id 5"),
        ({}, {DRAFT_VOCAB: torch.tensor([5.0, 0, 6, 40])}, "expected int32 token ids"),
        (
            {},
            {DRAFT_VOCAB: torch.tensor([5, 0, 6], dtype=torch.int32)},
            "expected (4,) (draft_vocab_size K = 4)",
        ),
        (
            {"draft_vocab_size": 98},
            {},
            "draft_vocab_size must be an integer in [1, vocab_size=97], got 98",
        ),
        (
            {"draft_vocab_size": 5},
            {DRAFT_VOCAB: torch.tensor([5, 0, 6, 40, 41], dtype=torch.int32)},
            "lm_head.1.weight has 4 rows but draft_vocab_size K is 5",
        ),
        (
            {"draft_vocab_size": None},
            {},
            "has a draft_vocab tensor but the config sets no draft_vocab_size",
        ),
        ({}, {DRAFT_VOCAB: None}, "there is no draft_vocab tensor"),
    ],
)
def test_bad_draft_vocab_is_a_clear_error_naming_the_file(tmp_path, cfg_over, sd_over, needle):
    path = tmp_path / "h"
    _write_head(path, cfg_over, sd_over)
    with pytest.raises(RedrafterError) as e:
        load_drafter(path)
    assert needle in str(e.value) and str(path) in str(e.value)


# --------------------------------------------------------------------------- checkpoint
def test_checkpoint_keeps_map_and_k_rows(tiny_dirs, tmp_path):
    cfg, sd = load_hf_base(tiny_dirs["llama"])
    ids = torch.tensor([3, 1, 4, 15, 9, 26, 5], dtype=torch.int32)
    head = init_drafter(head_cfg(cfg.vocab_size, cfg.hidden_size, 7), seed=4, draft_vocab=ids)
    out = convert_checkpoint(
        cfg, sd, head, tmp_path / "ckpt", dtype="float16", num_beams=4, draft_len=2
    )
    conf = json.loads((out / "config.json").read_text())
    assert conf[REDRAFTER_DRAFT_VOCAB_SIZE] == 7
    rank0 = load_file(str(out / "rank0.safetensors"))
    assert (
        rank0[CKPT_DRAFT_VOCAB].dtype == torch.int32
        and rank0[CKPT_DRAFT_VOCAB].tolist() == ids.tolist()
    )
    assert rank0["drafter.lm_head.weight"].shape == (7, 2 * cfg.hidden_size)
    _, _, drafter = load_checkpoint_models(out)
    assert torch.equal(drafter.vocab_map, ids)
    # tensor parallelism: the map is replicated, the K-row projection padded and trimmed back
    ccfg = RedrafterCheckpointConfig.from_dict(
        {**conf, "mapping": {"world_size": 2, "tp_size": 2, "pp_size": 1}}, "test"
    )
    shards = [tp_shard(rank0, ccfg, r) for r in range(2)]
    assert all(torch.equal(s[CKPT_DRAFT_VOCAB], ids) for s in shards)
    assert [s["drafter.lm_head.weight"].shape[0] for s in shards] == [4, 4]
    merged = tp_merge(shards, ccfg)
    assert torch.equal(merged["drafter.lm_head.weight"], rank0["drafter.lm_head.weight"])
    assert torch.equal(merged[CKPT_DRAFT_VOCAB], ids)


def test_checkpoint_rejects_bad_map_and_writes_nothing(tiny_dirs, tmp_path):
    cfg, sd = load_hf_base(tiny_dirs["llama"])
    head = init_drafter(head_cfg(cfg.vocab_size, cfg.hidden_size, 3))
    with torch.no_grad():
        head.vocab_map.copy_(torch.tensor([1, 1, 2]))
    with pytest.raises(RedrafterError, match="drafter: draft_vocab repeats id 1"):
        convert_checkpoint(cfg, sd, head, tmp_path / "ckpt", num_beams=2, draft_len=2)
    assert not (tmp_path / "ckpt").exists()
    head = init_drafter(head_cfg(cfg.vocab_size, cfg.hidden_size, 3))
    with pytest.raises(
        RedrafterError, match=r"redrafter_num_beams 4 exceeds the draft head's vocabulary"
    ):
        convert_checkpoint(cfg, sd, head, tmp_path / "ckpt", num_beams=4, draft_len=2)
    assert list(tmp_path.iterdir()) == []
    # a checkpoint whose map is bad names its file when loaded
    good = init_drafter(
        head_cfg(cfg.vocab_size, cfg.hidden_size, 3), draft_vocab=torch.tensor([7, 8, 9])
    )
    out = convert_checkpoint(cfg, sd, good, tmp_path / "ok", num_beams=2, draft_len=2)
    rank0 = load_file(str(out / "rank0.safetensors"))
    rank0[CKPT_DRAFT_VOCAB] = torch.tensor([7, 8, 97], dtype=torch.int32)
    save_file(rank0, str(out / "rank0.safetensors"))
    with pytest.raises(RedrafterError, match=r"rank0.safetensors: draft_vocab holds id 97 outside"):
        load_checkpoint_models(out)


@pytest.mark.parametrize("what", ["k_over_v", "rows", "map_length", "map_missing"])
def test_checkpoint_bad_k_names_the_file(tiny_dirs, tmp_path, what):
    """A checkpoint whose config K exceeds V, or whose K disagrees with the projection rows or the
    map's length, is refused naming the file that is wrong."""
    cfg, sd = load_hf_base(tiny_dirs["llama"])
    head = init_drafter(
        head_cfg(cfg.vocab_size, cfg.hidden_size, 3), draft_vocab=torch.tensor([7, 8, 9])
    )
    out = convert_checkpoint(cfg, sd, head, tmp_path / "ok", num_beams=2, draft_len=2)
    conf_path, rank0_path = out / "config.json", out / "rank0.safetensors"
    conf, rank0 = json.loads(conf_path.read_text()), load_file(str(rank0_path))
    if what == "k_over_v":
        conf[REDRAFTER_DRAFT_VOCAB_SIZE] = cfg.vocab_size + 1
        needle, where = (
            f"draft_vocab_size must be an integer in [1, vocab_size={cfg.vocab_size}]",
            conf_path,
        )
    elif what == "rows":
        rank0["drafter.lm_head.weight"] = torch.cat([rank0["drafter.lm_head.weight"]] * 2)
        needle, where = "has 6 rows but draft_vocab_size K is 3", rank0_path
    elif what == "map_length":
        rank0[CKPT_DRAFT_VOCAB] = torch.tensor([7, 8, 9, 10], dtype=torch.int32)
        needle, where = "has shape (4,), expected (3,) (draft_vocab_size K = 3)", rank0_path
    else:
        del rank0[CKPT_DRAFT_VOCAB]
        needle, where = "no draft_vocab tensor", rank0_path
    conf_path.write_text(json.dumps(conf))
    save_file(rank0, str(rank0_path))
    with pytest.raises(RedrafterError) as e:
        load_checkpoint_models(out)
    assert str(where) in str(e.value) and needle in str(e.value), str(e.value)
