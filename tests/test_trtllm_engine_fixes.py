"""The TensorRT-LLM engine path's build blockers, tested where the CPU allows (no TensorRT here).

What only TensorRT-LLM can run (the network build, the engine, the plugin) is checked by
build_scripts/gpu_selftest.sh inside the container; the parts of it that are plain Python (the
values handed to TensorRT-LLM, the feed, the bias mapping, the XQA support table) are tested here,
and the network's use of TensorRT-LLM's model plumbing is checked on its source (ast), which is all
a machine without TensorRT-LLM can do for it.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from redrafter_trt import contract as C
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import RedrafterCheckpointConfig
from redrafter_trt.models.base import ARCH_LLAMA, ARCH_QWEN2, BaseConfig
from redrafter_trt.models.drafter import DrafterConfig

ROOT = Path(__file__).resolve().parents[1]
NETWORK = ROOT / "redrafter_trt" / "trtllm" / "network.py"


def ckpt_cfg(
    arch=ARCH_LLAMA,
    *,
    head_size=64,
    heads=9,
    kv_heads=3,
    dtype="float16",
    qkv_bias=False,
    dense_bias=False,
    num_beams=4,
    draft_len=4,
) -> RedrafterCheckpointConfig:
    base = BaseConfig(
        architecture=arch,
        vocab_size=512,
        hidden_size=heads * head_size,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_size=head_size,
        qkv_bias=qkv_bias,
        dense_bias=dense_bias,
    )
    drafter = DrafterConfig(512, heads * head_size, 2 * heads * head_size, 1, True)
    return RedrafterCheckpointConfig(
        base=base,
        drafter=drafter,
        num_beams=num_beams,
        draft_len=draft_len,
        greedy_search=True,
        dtype=dtype,
    )


# --------------------------------------------------------------------------- XQA support at build time
def test_xqa_check_accepts_the_common_llama_and_qwen_shapes():
    from redrafter_trt.trtllm.builder import check_xqa_support, xqa_support_problems

    # SmolLM2-135M (64 x 9/3), Llama-3-8B (128 x 32/8), Qwen2-7B (128 x 28/4); bf16 and fp16; sm80+
    for hs, h, kv in ((64, 9, 3), (128, 32, 8), (128, 28, 4)):
        for dt in ("float16", "bfloat16"):
            assert (
                xqa_support_problems(
                    dtype=dt,
                    head_size=hs,
                    num_attention_heads=h,
                    num_key_value_heads=kv,
                    tokens_per_block=64,
                    sm=(9, 0),
                )
                == []
            )
    check_xqa_support(ckpt_cfg(), 64, (8, 0))


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(head_size=72), "head_dim 72"),
        (dict(head_size=320), "head_dim 320"),
        (dict(dtype="float32"), "dtype float32"),
        (dict(heads=64, kv_heads=1), "64 query heads per KV head"),
    ],
)
def test_xqa_check_refuses_what_no_kernel_runs(change, words):
    from redrafter_trt.trtllm.builder import check_xqa_support

    with pytest.raises(RedrafterError) as e:
        check_xqa_support(ckpt_cfg(**change), 64)
    msg = str(e.value)
    assert words in msg and "W x L = 4 x 5" in msg and "--backend torch" in msg


def test_xqa_check_refuses_block_sizes_and_old_gpus():
    from redrafter_trt.trtllm.builder import check_xqa_support

    with pytest.raises(RedrafterError, match="tokens_per_block 8"):
        check_xqa_support(ckpt_cfg(), 8)
    with pytest.raises(RedrafterError, match="compute capability 7.5"):
        check_xqa_support(ckpt_cfg(), 64, (7, 5))


# --------------------------------------------------------------------------- biases TensorRT-LLM reads
def test_attn_bias_maps_the_checkpoint_biases():
    from redrafter_trt.trtllm.network import trtllm_base_config

    assert trtllm_base_config(ckpt_cfg())["attn_bias"] is False
    assert trtllm_base_config(ckpt_cfg(qkv_bias=True, dense_bias=True))["attn_bias"] is True
    qwen = trtllm_base_config(ckpt_cfg(ARCH_QWEN2, qkv_bias=True))
    assert qwen["attn_bias"] is True and qwen["architecture"] == "Qwen2ForCausalLM"
    with pytest.raises(RedrafterError, match="one attn_bias for both"):
        trtllm_base_config(ckpt_cfg(qkv_bias=True, dense_bias=False))
    with pytest.raises(RedrafterError, match="dense_bias=False"):
        trtllm_base_config(ckpt_cfg(ARCH_QWEN2, qkv_bias=True, dense_bias=True))


def test_base_config_keys_are_config_parameters():
    """Every key we hand to LLaMAConfig / QWenConfig is one of its (or PretrainedConfig's) recorded
    parameters, or one TensorRT-LLM stores through **kwargs on purpose (qwen_type, tie/share flags)."""
    import json

    from redrafter_trt.trtllm.network import trtllm_base_config

    sym = json.loads((ROOT / "redrafter_trt" / "trtllm" / "api_manifest.json").read_text())[
        "symbols"
    ]
    pre = set(sym["tensorrt_llm.models.modeling_utils.PretrainedConfig"]["params"])
    # kept as attributes from **kwargs (PretrainedConfig.__init__): qwen_type and seq_length are read
    # by QWenDecoderLayer (qwen/model.py:60, :68)
    stored_as_attrs = {"qwen_type", "seq_length", "share_embedding_table", "tie_word_embeddings"}
    for arch, cls in (
        (ARCH_LLAMA, "tensorrt_llm.models.llama.config.LLaMAConfig"),
        (ARCH_QWEN2, "tensorrt_llm.models.qwen.config.QWenConfig"),
    ):
        keys = set(
            trtllm_base_config(ckpt_cfg(arch, qkv_bias=arch == ARCH_QWEN2, dense_bias=False))
        )
        unknown = keys - pre - set(sym[cls]["params"]) - stored_as_attrs
        assert not unknown, (arch, unknown)


# --------------------------------------------------------------------------- host inputs, spec_decoding_use
def test_host_inputs_are_found_by_name_and_are_the_cpu_tensors_of_the_feed():
    import torch

    from redrafter_trt.trtllm import ATTENTION_INPUTS
    from redrafter_trt.trtllm.cuda_graph import host_input_names
    from redrafter_trt.trtllm.runtime import prepare_step
    from test_trtllm import SHAPE, generation_inputs

    engine_inputs = set(C.INPUTS) | set(ATTENTION_INPUTS)
    host = host_input_names(engine_inputs)
    p = prepare_step(
        generation_inputs([0, 1], [5, 9]),
        SHAPE,
        device=torch.device("cpu"),
        max_blocks=8,
        layers=2,
        kv_len=128,
        pool_ptr=0x1000,
    )
    on_cpu_by_design = {n for n in ATTENTION_INPUTS if n.startswith("host_")} | {
        "spec_decoding_use"
    }
    assert host == on_cpu_by_design and "spec_decoding_use" in host and "host_request_types" in host
    assert host_input_names(engine_inputs - {"host_sink_token_length"}) == host - {
        "host_sink_token_length"
    }
    assert all(n in p.plumbing for n in host)


def test_spec_decoding_use_is_on_only_for_generation_calls_of_two_tokens_or_more():
    """Items 1-2 (gptAttentionPlugin.cpp:702-709, :937-942, :1093; attentionOp.cpp:273-275, :1697)."""
    from redrafter_trt.trtllm.runtime import spec_decoding_use

    assert [spec_decoding_use(False, t) for t in (1, 2, 3, 20)] == [0, 1, 1, 1]
    assert [spec_decoding_use(True, t) for t in (1, 2, 3, 20)] == [0, 0, 0, 0]


def test_a_sequence_of_calls_flips_the_plugin_on_a_generation_call():
    """The plugin starts non-speculative (attentionOp.h:450) and re-prepares its XQA kernels only
    when a generation call sees the mode change (gptAttentionPlugin.cpp:1123-1127): replayed on the
    feed of a context call, a plain-decoding call and a tree call, every flip is on a generation
    call, and no generation call of T >= 2 runs with the mode off or T == 1 with it on."""
    import torch

    from test_trtllm import generation_inputs, prepare

    gen = generation_inputs([0, 1], [5, 9])
    ctx = dict(gen, **{C.REQUEST_TYPES: torch.full((2,), C.CONTEXT, dtype=torch.int32)})
    plain = dict(gen, **{C.INPUT_LENGTHS: torch.ones(2, dtype=torch.int32)})
    mode, flips = 0, []
    for name, inputs in (
        ("ctx", ctx),
        ("tree", gen),
        ("plain", plain),
        ("ctx", ctx),
        ("tree", gen),
    ):
        p = prepare(inputs, bucket=name != "ctx")
        use = int(p.plumbing["spec_decoding_use"][0])
        if not p.is_ctx:
            assert use == int(p.tokens >= 2), (name, p.tokens, use)
        if use != mode:
            flips.append((name, p.is_ctx))
        mode = use
    assert flips and all(not is_ctx for _, is_ctx in flips), flips


# --------------------------------------------------------------------------- items 7-8: build() on a stand-in
class _FakeBuildConfig:
    def __init__(self, plugin_config=None, **kw):
        self.plugin_config = plugin_config
        self.output_timing_cache = "model.cache"  # the field's default (builder.py:523-524)
        self.__dict__.update(kw)


def fake_trtllm(monkeypatch, tmp_path, *, paged_context_fmha_after_build: bool):
    """TensorRT-LLM 1.2's build() as far as build_trtllm_engine sees it: a deep copy of the
    BuildConfig with max_draft_len added to max_seq_len, paged context FMHA possibly switched off
    (builder.py:980, :1027-1035, :1061-1111), the timing cache written to output_timing_cache with
    an assert (:1271-1274)."""
    import copy
    import enum
    import importlib.machinery
    import os
    import sys
    import types

    seen = {}

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    def build(model, build_config):
        bc = copy.deepcopy(build_config)
        bc.max_seq_len += bc.max_draft_len
        bc.plugin_config.use_paged_context_fmha = paged_context_fmha_after_build
        path = Path(bc.output_timing_cache)
        seen["timing_cache"], seen["cwd"] = path, Path(os.getcwd())
        assert path.parent.is_dir(), "Failed to save timing cache."
        path.write_bytes(b"cache")
        engine_config = types.SimpleNamespace(build_config=bc)
        return types.SimpleNamespace(config=engine_config, engine=b"engine-bytes")

    module("tensorrt", __version__="10.14.1")
    trtllm = module("tensorrt_llm", __version__="1.2.1")
    trtllm.builder = module("tensorrt_llm.builder", BuildConfig=_FakeBuildConfig, build=build)
    modes = enum.IntFlag("SpeculativeDecodingMode", {"NONE": 1, "EXPLICIT_DRAFT_TOKENS": 16})
    module("tensorrt_llm.models")
    module("tensorrt_llm.models.modeling_utils", SpeculativeDecodingMode=modes)
    trtllm.plugin = module("tensorrt_llm.plugin", PluginConfig=types.SimpleNamespace)

    import redrafter_trt.trtllm.builder as B
    import redrafter_trt.trtllm.network as N

    cfg = ckpt_cfg()
    model = types.SimpleNamespace(load=lambda shard: None)
    monkeypatch.setattr(B, "load_plugin_library", lambda: None)
    monkeypatch.setattr(B, "load_rank_shards", lambda ckpt: (cfg, [{}]))
    monkeypatch.setattr(N, "build_model", lambda *a, **k: model)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"quantization": null}')
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a build writing into its current directory stays here
    return cfg, ckpt, seen


@pytest.mark.parametrize("after_build", [False, True])
def test_build_records_the_built_engines_paged_context_fmha(monkeypatch, tmp_path, after_build):
    """Item 8: build() may switch paged context FMHA off; the record (which decides chunked
    prefill in the runtime) holds the built engine's value, not the request."""
    import json

    from redrafter_trt.trtllm.builder import build_trtllm_engine

    cfg, ckpt, _ = fake_trtllm(monkeypatch, tmp_path, paged_context_fmha_after_build=after_build)
    out = build_trtllm_engine(
        ckpt, tmp_path / "engine", cfg, max_batch_size=2, max_input_len=16, max_seq_len=64
    )
    record = json.loads((out / "config.json").read_text())["build_config"]
    assert record["use_paged_context_fmha"] is after_build  # requested: enabled (the default)
    tree = cfg.num_beams * (cfg.draft_len + 1)
    assert record["engine_max_seq_len"] == 64 + tree + tree - 1
    assert (out / "rank0.engine").read_bytes() == b"engine-bytes"


def test_build_writes_its_timing_cache_in_its_own_temporary_directory(monkeypatch, tmp_path):
    """Item 7: not model.cache in the current directory (a read-only one made build() assert)."""
    import os

    from redrafter_trt.trtllm.builder import build_trtllm_engine

    cfg, ckpt, seen = fake_trtllm(monkeypatch, tmp_path, paged_context_fmha_after_build=True)
    cwd = tmp_path / "cwd"
    assert Path.cwd() == cwd
    out = build_trtllm_engine(
        ckpt, tmp_path / "engine", cfg, max_batch_size=2, max_input_len=16, max_seq_len=64
    )
    cache = seen["timing_cache"]
    assert cache.is_absolute() and cache.name == "model.cache", cache
    assert cwd not in cache.parents and out not in cache.parents, cache
    assert not cache.exists() and not cache.parent.exists(), "the temporary directory is left"
    assert os.listdir(cwd) == [] and not (out / "model.cache").exists()


# --------------------------------------------------------------------------- the network's source
def engine_class() -> ast.ClassDef:
    tree = ast.parse(NETWORK.read_text())
    return next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ReDrafterEngine"
    )


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)


def calls(fn, dotted: str) -> list[ast.Call]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == dotted]


def test_engine_registers_and_fills_the_rope_tables_itself():
    """Attention.forward asserts rotary_inv_freq / embed_positions_for_gpt_attention; they are
    registered on the top-level model and passed in through AttentionParams
    (DecoderModelForCausalLM does both). Source check: TensorRT-LLM is not installed here."""
    cls = engine_class()
    init, fwd = method(cls, "__init__"), method(cls, "forward")
    reg = calls(init, "Attention.create_attention_const_params")
    assert len(reg) == 1 and ast.unparse(reg[0].args[0]) == "self"
    fill = calls(fwd, "Attention.fill_attention_params")
    assert len(fill) == 1 and ast.unparse(fill[0].args[0]) == "self"
    transformer = calls(fwd, "self.transformer")
    assert len(transformer) == 1 and fill[0].lineno < transformer[0].lineno
    # the filled params are the ones handed to the transformer
    target = (
        next(n for n in ast.walk(fwd) if isinstance(n, ast.Assign) and n.value is fill[0])
        .targets[0]
        .id
    )
    kw = {k.arg: ast.unparse(k.value) for k in transformer[0].keywords}
    assert kw["attention_params"] == target


def test_engine_quantizes_once_and_builds_its_config_directly():
    cls = engine_class()
    post = method(
        cls, "__post_init__"
    )  # overrides PretrainedModel.__post_init__ (quantize + optimize)
    assert not calls(post, "super().__post_init__") and not [
        n for n in ast.walk(post) if isinstance(n, ast.Name) and n.id == "quantize"
    ]
    tree = ast.parse(NETWORK.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "from_dict"]


def test_slices_use_static_starts():
    """Every F.slice gets its starts as a list of ints (the layer's static start), as TensorRT-LLM's
    own ReDrafter does, so no int32 start tensor meets int64 (shape-derived) sizes."""
    tree = ast.parse(NETWORK.read_text())
    slices = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "F.slice"
    ]
    assert len(slices) >= 5
    for s in slices:
        starts = (
            s.args[1] if len(s.args) > 1 else next(k.value for k in s.keywords if k.arg == "starts")
        )
        assert isinstance(starts, ast.List) and all(
            isinstance(e, ast.Constant) for e in starts.elts
        ), ast.unparse(s)


def test_kv_block_dims_refuses_bad_records():
    from redrafter_trt.trtllm.builder import kv_block_dims

    assert kv_block_dims({"engine_max_seq_len": 64, "tokens_per_block": 64}) == (64, 1)
    assert kv_block_dims({"engine_max_seq_len": 65, "tokens_per_block": 64}) == (65, 2)
    with pytest.raises(RedrafterError):
        kv_block_dims({"engine_max_seq_len": 0, "tokens_per_block": 64})
    assert dataclasses.is_dataclass(ckpt_cfg())
