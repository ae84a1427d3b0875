"""The TensorRT-LLM backend where TensorRT-LLM is absent: everything imports without it, and every
entry point that needs it fails with a RedrafterError naming the container to run in.

(Inside the container, build_scripts/gpu_selftest.sh exercises the backend itself.)"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_hf
from redrafter_trt import contract as C
from redrafter_trt.cli import build as build_cli
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import convert_checkpoint, read_checkpoint_config
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime.engine import build_engine
from redrafter_trt.runtime.loader import load
from redrafter_trt.trtllm import TRTLLM_CONTAINER, trtllm_importable

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "redrafter_trt.trtllm",
    "redrafter_trt.trtllm.plugins",
    "redrafter_trt.trtllm.network",
    "redrafter_trt.trtllm.builder",
    "redrafter_trt.trtllm.runtime",
    "redrafter_trt.trtllm.cuda_graph",
]
absent = pytest.mark.skipif(
    trtllm_importable(), reason="TensorRT-LLM is installed: gpu_selftest.sh covers it"
)


@pytest.mark.full
def test_modules_import_without_tensorrt():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_llm', 'cuda')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_contract_names_are_imported_not_retyped():
    """The engine's I/O names come from redrafter_trt.contract; no module of the package spells one."""
    names = {getattr(C, k) for k in dir(C) if k.isupper() and isinstance(getattr(C, k), str)}
    for path in (ROOT / "redrafter_trt" / "trtllm").glob("*.py"):
        literals = set(re.findall(r"[\"']([a-z_]+)[\"']", path.read_text()))
        assert not (literals & names), (
            f"{path.name} retypes contract names {sorted(literals & names)}"
        )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm")
    cfg, sd = load_hf_base(write_tiny_hf(root / "hf", "llama", seed=3))
    drafter = init_drafter(
        DrafterConfig(cfg.vocab_size, cfg.hidden_size, 2 * cfg.hidden_size, 1, True), seed=1
    )
    return convert_checkpoint(
        cfg, sd, drafter, root / "ckpt", dtype="float16", num_beams=2, draft_len=2
    )


def assert_names_container(excinfo):
    assert TRTLLM_CONTAINER in str(excinfo.value)


@absent
def test_build_trtllm_names_the_container(ckpt, tmp_path):
    with pytest.raises(RedrafterError) as e:
        build_engine(
            ckpt,
            tmp_path / "engine",
            backend="trtllm",
            max_batch_size=1,
            max_input_len=8,
            max_seq_len=32,
        )
    assert_names_container(e)
    assert not (tmp_path / "engine").exists()
    from redrafter_trt.trtllm.builder import build_trtllm_engine

    with pytest.raises(RedrafterError) as e:
        build_trtllm_engine(
            ckpt,
            tmp_path / "engine",
            read_checkpoint_config(ckpt),
            max_batch_size=1,
            max_input_len=8,
            max_seq_len=32,
        )
    assert_names_container(e)


@absent
def test_build_cli_exits_with_the_message(ckpt, tmp_path, capsys):
    code = build_cli.main(
        ["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"), "--backend", "trtllm"]
    )
    assert code == 2
    assert TRTLLM_CONTAINER in capsys.readouterr().err


@absent
def test_loading_a_trtllm_engine_names_the_container(ckpt, tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(
        json.dumps(
            {
                "version": "0",
                "backend": "trtllm",
                "pretrained_config": json.loads((ckpt / "config.json").read_text()),
                "build_config": {"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 32},
            }
        )
    )
    with pytest.raises(RedrafterError) as e:
        load(engine)
    assert_names_container(e)


@absent
def test_native_entry_points_name_the_container():
    from redrafter_trt.trtllm import require_trtllm
    from redrafter_trt.trtllm.network import build_model
    from redrafter_trt.trtllm.plugins import add_plugin, load_plugin_library

    for call in (
        require_trtllm,
        load_plugin_library,
        lambda: add_plugin(None, "RedrafterTreePack", [], {}),
        lambda: build_model(None, 0),
    ):
        with pytest.raises(RedrafterError) as e:
            call()
        assert_names_container(e)


# ------------------------------------------------------------------ paged KV cache (pure torch)
def to_pool(cache, tpb):
    """Contiguous [layers, 2, slots, H, seq, D] -> paged pool [slots*blocks, layers, 2, H*tpb*D]."""
    ly, _, s, h, seq, d = cache.shape
    mb = seq // tpb
    x = cache.reshape(ly, 2, s, h, mb, tpb, d).permute(2, 4, 0, 1, 3, 5, 6)
    return x.reshape(s * mb, ly, 2, h * tpb * d).contiguous()


def test_paged_relocation_equals_the_reference():
    import torch

    from redrafter_trt.ops import relocate_kv
    from redrafter_trt.ops.kv_cache import relocate_paged

    g = torch.Generator().manual_seed(0)
    layers, slots, heads, tpb, blocks, hd = 3, 5, 2, 4, 6, 3
    cache = torch.randn(layers, 2, slots, heads, tpb * blocks, hd, generator=g)
    pool = to_pool(cache, tpb)
    row_slots = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    cache_len = torch.tensor([2, 7, 13, 0], dtype=torch.int32)  # crossing block borders
    path = torch.tensor([[0, 1, 4, 6], [0, 2, 3, 3], [0, 3, 5, 9], [0, 0, 0, 0]], dtype=torch.int32)
    n = torch.tensor([3, 2, 3, 0], dtype=torch.int32)
    relocate_kv(cache, row_slots, cache_len, path, n)
    relocate_paged(
        pool,
        row_slots,
        cache_len,
        path,
        n,
        max_blocks=blocks,
        kv_heads=heads,
        tokens_per_block=tpb,
        head_dim=hd,
    )
    assert torch.equal(pool, to_pool(cache, tpb))


def test_block_offsets_address_each_slots_blocks():
    import torch

    from redrafter_trt.ops.kv_cache import paged_block_offsets

    layers, mb = 3, 4
    slots = torch.tensor([2, 0], dtype=torch.int32)
    off = paged_block_offsets(slots, mb, layers)
    assert off.shape == (1, 2, 2, mb) and off.dtype == torch.int32
    for row, s in enumerate(slots.tolist()):
        for kv in range(2):
            for j in range(mb):
                for layer in range(layers):  # TensorRT-LLM: layer pointer = pool + layer * 2 blocks
                    flat = int(off[0, row, kv, j]) + 2 * layer
                    assert flat == ((s * mb + j) * layers + layer) * 2 + kv


# ------------------------------------------------------------------ step feed and CUDA-graph plan (pure torch)
SHAPE = C.StepShape(num_beams=2, draft_len=2)  # L = 3, N = 6
LAYERS, MAX_BLOCKS, KV_LEN, POOL = 3, 64, 1024, 0x7F0000001000  # 16 tokens per block


def generation_inputs(slots, cache_lens, beams_seed=0, draft_steps=2):
    """Generation-call inputs as the Generator builds them: the previous call's packed trees."""
    import torch

    from redrafter_trt.ops.tree import pack_tree

    g = torch.Generator().manual_seed(beams_seed)
    b, w, l = len(slots), SHAPE.num_beams, SHAPE.beam_len
    beams = torch.randint(0, 50, (b, w, l), generator=g, dtype=torch.int32)
    beams[:, :, 0] = beams[:, :1, 0]  # one root per row
    beams[0, 1, :2] = beams[0, 0, :2]  # a shared prefix: a shorter tree
    tree = pack_tree(beams)
    i32 = dict(dtype=torch.int32)
    return {
        C.REQUEST_TYPES: torch.full((b,), C.GENERATION, **i32),
        C.SLOT_IDS: torch.tensor(slots, **i32),
        C.CACHE_LENGTHS: torch.tensor(cache_lens, **i32),
        C.INPUT_IDS: tree.tokens.to(torch.int32),
        C.INPUT_LENGTHS: tree.lengths.to(torch.int32),
        C.POSITION_OFFSETS: tree.offsets.to(torch.int32),
        C.PACKED_MASK: tree.packed_mask.to(torch.int32),
        C.DRAFT_TOKENS: beams,
        C.DRAFT_INDICES: tree.unpacker.to(torch.int32),
        C.TEMPERATURE: torch.zeros(b),
        C.TOP_K: torch.zeros(b, **i32),
        C.TOP_P: torch.ones(b),
        C.UNIFORMS: torch.rand(b, l, generator=g),
        C.NUM_DRAFT_STEPS: torch.tensor(draft_steps, **i32),
    }


def prepare(inputs, bucket=False, pool=POOL):
    import torch

    from redrafter_trt.trtllm.runtime import prepare_step

    C.check_inputs(inputs, SHAPE)
    return prepare_step(
        inputs,
        SHAPE,
        device=torch.device("cpu"),
        max_blocks=MAX_BLOCKS,
        layers=LAYERS,
        kv_len=KV_LEN,
        pool_ptr=pool,
        bucket=bucket,
    )


def test_prepared_feed_matches_the_network_inputs():
    """The feed is exactly the contract's inputs plus the attention plumbing network.py declares, with
    the shapes it declares."""
    import torch

    from redrafter_trt.ops.tree import packed_mask_to_bool
    from redrafter_trt.trtllm import ATTENTION_INPUTS

    inputs = generation_inputs([2, 0, 1], [10, 0, 33])
    p = prepare(inputs)
    lengths = inputs[C.INPUT_LENGTHS]
    assert int(lengths[0]) < SHAPE.tree_size  # the shared prefix packed away
    b, t = 3, int(lengths.max())
    assert (p.is_ctx, p.batch, p.tokens) == (False, b, t)
    assert set(p.plumbing) == set(ATTENTION_INPUTS)
    assert set(p.x) == set(C.INPUTS) - {C.NUM_DRAFT_STEPS}
    everything = set(C.INPUTS) | set(ATTENTION_INPUTS)
    assert set(p.feed(everything)) == everything - {C.NUM_DRAFT_STEPS}
    words = (SHAPE.tree_size + 31) // 32
    assert p.x[C.INPUT_IDS].shape == (b, t) and p.x[C.PACKED_MASK].shape == (b, t, words)
    a = p.plumbing
    assert a["kv_cache_block_offsets"].shape == (1, b, 2, MAX_BLOCKS)
    assert a["host_max_attention_window_sizes"].tolist() == [KV_LEN] * LAYERS
    assert a["host_kv_cache_pool_pointers"].tolist() == [[POOL, 0]]
    assert a["host_kv_cache_pool_mapping"].shape == (LAYERS, 2)
    assert a["cache_indirection"].shape == (b, 1, KV_LEN)
    assert a["host_past_key_value_lengths"].tolist() == [10 + t, t, 33 + t]
    assert a["host_request_types"].tolist() == [C.GENERATION] * b and a[
        "spec_decoding_use"
    ].tolist() == [1]
    assert (
        a["spec_decoding_generation_lengths"].tolist()
        == [t] * b
        == a["host_context_lengths"].tolist()
    )
    # real nodes keep the tree mask; padding nodes see only themselves
    got = packed_mask_to_bool(p.x[C.PACKED_MASK], t)
    want = packed_mask_to_bool(inputs[C.PACKED_MASK], SHAPE.tree_size)[:, :t, :t]
    for r in range(b):
        n = int(lengths[r])
        assert torch.equal(got[r, :n, :n], want[r, :n, :n]) and not got[r, :n, n:].any()
        assert torch.equal(got[r, n:, :], torch.eye(t, dtype=torch.bool)[n:])
    # a context call of the same rows: whole prompts (nothing cached yet) ...
    ctx = dict(
        inputs,
        **{
            C.REQUEST_TYPES: torch.full((b,), C.CONTEXT, dtype=torch.int32),
            C.CACHE_LENGTHS: torch.zeros(b, dtype=torch.int32),
        },
    )
    pc = prepare(ctx, bucket=True)  # context calls are never bucketed
    assert (
        pc.is_ctx
        and pc.tokens == t
        and pc.plumbing["host_past_key_value_lengths"].tolist() == [t] * b
    )
    assert pc.x[C.CACHE_LENGTHS].tolist() == [0] * b and pc.plumbing[
        "spec_decoding_use"
    ].tolist() == [0]  # context calls ignore the spec inputs (see runtime.spec_decoding_use)
    assert pc.plumbing["host_request_types"].tolist() == [C.CONTEXT] * b
    # ... and prompt chunks continuing their slots' caches (chunked prefill): the plugin's past KV
    # length is sequence_length - context_lengths = the tokens cached already
    chunk = dict(ctx, **{C.CACHE_LENGTHS: torch.tensor([10, 0, 33], dtype=torch.int32)})
    pk = prepare(chunk)
    assert pk.x[C.CACHE_LENGTHS].tolist() == [10, 0, 33]
    assert pk.plumbing["sequence_length"].tolist() == [10 + t, t, 33 + t]
    assert pk.plumbing["host_past_key_value_lengths"].tolist() == [10 + t, t, 33 + t]
    assert (
        pk.plumbing["context_lengths"].tolist()
        == [t] * b
        == pk.plumbing["host_context_lengths"].tolist()
    )
    mixed = dict(
        inputs,
        **{
            C.REQUEST_TYPES: torch.tensor(
                [C.CONTEXT, C.GENERATION, C.GENERATION], dtype=torch.int32
            )
        },
    )
    with pytest.raises(RedrafterError):
        prepare(mixed)


def test_token_buckets():
    from redrafter_trt.trtllm.cuda_graph import bucket_tokens, token_buckets

    assert (
        token_buckets(6) == (1, 2, 4, 6)
        and token_buckets(8) == (1, 2, 4, 8)
        and token_buckets(1) == (1,)
    )
    assert [bucket_tokens(t, 6, 6) for t in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert bucket_tokens(3, 6, 3) == 3  # never wider than the call's input
    assert bucket_tokens(9, 6, 12) == 9  # not a tree: unbucketed
    for bad in (0, 7):
        with pytest.raises(RedrafterError):
            bucket_tokens(bad, 6, 6)


def test_bucketed_feed_only_adds_padding_nodes():
    import torch

    inputs = generation_inputs([0, 1], [5, 7], beams_seed=3)
    inputs[C.INPUT_LENGTHS][:] = torch.tensor([3, 2], dtype=torch.int32)  # trees of 3 and 2 nodes
    plain, padded = prepare(inputs), prepare(inputs, bucket=True)
    assert (plain.tokens, padded.tokens) == (3, 4)
    for name in (C.INPUT_IDS, C.POSITION_OFFSETS, C.PACKED_MASK):
        assert torch.equal(padded.x[name][:, :3], plain.x[name])
    for name in set(C.INPUTS) - {C.NUM_DRAFT_STEPS, C.INPUT_IDS, C.POSITION_OFFSETS, C.PACKED_MASK}:
        assert torch.equal(padded.x[name], plain.x[name]), name
    assert padded.plumbing["sequence_length"].tolist() == [5 + 4, 7 + 4]
    assert padded.out_shapes == plain.out_shapes  # no output depends on T


def test_kv_length_rounding_follows_tensorrt_llm():
    from redrafter_trt.trtllm.cuda_graph import KV_LEN_ROUND, round_kv_length

    assert KV_LEN_ROUND == 256
    assert [round_kv_length(n, 4096) for n in (0, 1, 256, 257, 4000)] == [256, 256, 256, 512, 4096]
    assert round_kv_length(300, 300) == 300 and round_kv_length(10, 100, 64) == 64
    for kv in (1, 100, 256, 1000):
        for n in range(0, kv + 1, 7):
            r = round_kv_length(n, kv)
            assert n <= r <= kv
    with pytest.raises(RedrafterError):
        round_kv_length(101, 100)


def test_host_inputs_decide_replay_or_update():
    """Steps of the same rows replay one graph until a host input the plugins read at enqueue changes:
    the rounded KV length, the pool, or the call's width. Other slots change only the block offsets,
    which the plugin reads from device memory (the static buffer a replay reads): no re-capture."""
    from redrafter_trt.trtllm import ATTENTION_INPUTS
    from redrafter_trt.trtllm.cuda_graph import (
        HOST_INPUTS,
        GraphEntry,
        ShapeKey,
        capture_host_values,
        graph_action,
        host_signature,
    )

    assert HOST_INPUTS <= set(ATTENTION_INPUTS) and "spec_decoding_use" in HOST_INPUTS
    assert all(n.startswith("host_") for n in HOST_INPUTS - {"spec_decoding_use"})

    def sig(slots, lens, pool=POOL, kv_len=KV_LEN):
        p = prepare(generation_inputs(slots, lens), bucket=True, pool=pool)
        host = capture_host_values(p.feed(set(p.x) | set(p.plumbing)), HOST_INPUTS, kv_len)
        assert set(host) == HOST_INPUTS
        real = p.plumbing["host_past_key_value_lengths"]
        assert (
            host["host_past_key_value_lengths"] >= real.max()
        ).all()  # captured with an upper bound
        assert (host["host_past_key_value_lengths"] <= kv_len).all()
        return ShapeKey(p.batch, p.tokens), host_signature(host)

    key0, s0 = sig([2, 0], [10, 40])
    entry = GraphEntry(buffers=None, exec_=object(), signature=s0)
    assert graph_action(None, s0) == "capture" and graph_action(GraphEntry(None), s0) == "capture"
    for lens in ([13, 44], [100, 200], [240, 100]):  # lengths grow within one 256 window
        key, s = sig([2, 0], lens)
        assert key == key0 and graph_action(entry, s) == "replay", lens
    assert graph_action(entry, sig([2, 0], [255, 40])[1]) == "update"  # 255 + T crosses 256
    # other slots: other (host and device) block offsets, the same graph
    assert graph_action(entry, sig([0, 2], [10, 40])[1]) == "replay"
    assert graph_action(entry, sig([5, 7], [100, 40])[1]) == "replay"
    assert graph_action(entry, sig([2, 0], [10, 40], pool=POOL + 4096)[1]) == "update"
    assert sig([2, 0, 1], [10, 40, 5])[0] != key0  # another batch: another shape key


def test_static_buffers_keep_their_addresses():
    import torch

    from redrafter_trt.trtllm import ATTENTION_INPUTS
    from redrafter_trt.trtllm.cuda_graph import (
        HOST_INPUTS,
        StaticBuffers,
        buffer_plan,
        capture_host_values,
    )

    engine_inputs = (set(C.INPUTS) - {C.NUM_DRAFT_STEPS, C.SLOT_IDS}) | set(ATTENTION_INPUTS)
    p0 = prepare(generation_inputs([2, 0], [10, 40], beams_seed=1), bucket=True)
    feed0 = p0.feed(engine_inputs)
    assert C.SLOT_IDS not in feed0
    plan = buffer_plan(feed0, p0.out_shapes, HOST_INPUTS)
    by_name = {s.name: s for s in plan}
    assert set(by_name) == set(feed0) | set(p0.out_shapes) and len(plan) == len(by_name)
    assert {s.name for s in plan if s.host} == HOST_INPUTS
    assert all(
        s.dtype == torch.int32 and s.shape == p0.out_shapes[s.name] for s in plan if s.output
    )
    assert by_name[C.TEMPERATURE].dtype == torch.float32 and by_name[C.INPUT_IDS].shape == (
        2,
        p0.tokens,
    )

    bufs = StaticBuffers(plan, torch.device("cpu"))
    ptrs = {n: t.data_ptr() for n, t in bufs.tensors.items()}
    host0 = capture_host_values(feed0, HOST_INPUTS, KV_LEN)
    bufs.load_host(host0)
    for seed, lens in ((1, [10, 40]), (2, [12, 41])):  # two steps with the same shape key
        p = prepare(generation_inputs([2, 0], lens, beams_seed=seed), bucket=True)
        feed = p.feed(engine_inputs)
        assert bufs.matches(feed, p.out_shapes)
        bufs.load_device(feed)
        assert {n: t.data_ptr() for n, t in bufs.tensors.items()} == ptrs
        for n, t in bufs.inputs().items():  # device inputs: this step's values
            want = host0[n] if n in HOST_INPUTS else feed[n]  # host inputs: the capture's
            assert torch.equal(t, want), n
    assert set(bufs.outputs()) == set(p0.out_shapes)
    other = prepare(generation_inputs([2, 0, 1], [1, 2, 3]), bucket=True)
    assert not bufs.matches(other.feed(engine_inputs), other.out_shapes)


def test_lru_cache_evicts_and_releases():
    from redrafter_trt.trtllm.cuda_graph import LruCache

    dropped = []
    c = LruCache(2, dropped.append)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # "b" is now the oldest
    c.put("c", 3)
    assert dropped == [2] and c.keys() == ["a", "c"] and c.get("b") is None
    c.put("a", 4)  # replacing releases the old value
    assert dropped == [2, 1] and c.get("a") == 4
    c.clear()
    assert sorted(dropped) == [1, 2, 3, 4] and len(c) == 0
    with pytest.raises(RedrafterError):
        LruCache(0)


def test_cuda_graph_setting(monkeypatch):
    from redrafter_trt.trtllm.cuda_graph import CUDA_GRAPH_ENV, cuda_graph_setting

    monkeypatch.delenv(CUDA_GRAPH_ENV, raising=False)
    assert cuda_graph_setting() == (True, "default")
    for raw, on in (("0", False), ("off", False), ("1", True), ("TRUE", True)):
        monkeypatch.setenv(CUDA_GRAPH_ENV, raw)
        assert cuda_graph_setting()[0] is on
    monkeypatch.setenv(CUDA_GRAPH_ENV, "0")
    assert cuda_graph_setting(True)[0] is True  # the constructor argument wins
    monkeypatch.setenv(CUDA_GRAPH_ENV, "maybe")
    with pytest.raises(RedrafterError):
        cuda_graph_setting()
