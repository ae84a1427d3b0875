"""The fused CPU decoder forward (cpp/src/decoder_cpu.cpp via native.decoder_forward): every layer
in one C++ call gives the per-layer kernel path's exact bits (hidden states and the KV cache it
writes), on prompts and trees, any slots, float32 and bf16 caches, float32 and block weights, one
and two threads; bad inputs are clear errors (its params struct's binding: test_native_abi.py)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.models.base import FUSED_ENV, BaseConfig, BaseModel, Linear
from test_block_weights import quantize

pytestmark = pytest.mark.usefixtures("native_library")

CONFIGS = {
    "llama": BaseConfig("LlamaForCausalLM", 97, 64, 96, 3, 4, 2, 16),
    "qwen2": BaseConfig("QWenForCausalLM", 97, 64, 96, 2, 4, 1, 16, qkv_bias=True),
}


def _model(cfg: BaseConfig, seed: int = 0, blocks: bool = False) -> BaseModel:
    torch.manual_seed(seed)
    m = BaseModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    if blocks:  # every projection the exact expansion of Q4_1 blocks, streamed as blocks
        for mod in m.modules():
            if isinstance(mod, Linear) and mod is not m.lm_head:
                bt = quantize(mod.weight.detach(), "q4_1")
                from redrafter_trt.models.blocks import decode

                with torch.no_grad():
                    mod.weight.copy_(decode(bt))
                mod.attach_blocks(bt)
    m.use_native_linear(True)
    return m


def _step_inputs(b: int, t: int, seed: int):
    """A call of b rows x t new tokens after different cached lengths, in non-contiguous slots,
    with random ancestor-or-self tree masks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (b, t), generator=g)
    lengths = torch.randint(0, 6, (b,), generator=g)
    pos = lengths[:, None] + torch.arange(t)[None]
    block = torch.rand(b, t, t, generator=g) < 0.5
    block = block.tril() | torch.eye(t, dtype=torch.bool)
    slots = torch.randperm(4, generator=g)[:b]
    return ids, pos, slots, lengths, block


def _forward(m: BaseModel, fused: bool, cache: torch.Tensor, inputs, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")
    ids, pos, slots, lengths, block = inputs
    with torch.inference_mode():
        return m(ids, pos, cache, slots, lengths, block)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [False, True])
def test_fused_forward_has_the_per_layer_bits(arch, cache_dtype, blocks, monkeypatch):
    m = _model(CONFIGS[arch], blocks=blocks)
    assert m.fused_layers_apply()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b, t, seed in ((1, 1, 0), (3, 5, 1), (2, 9, 2)):
                inputs = _step_inputs(b, t, seed)
                caches = []
                outs = []
                for fused in (False, True):
                    g = torch.Generator().manual_seed(seed)
                    cache = m.new_cache(4, 24, dtype=cache_dtype)
                    cache.copy_(torch.randn(cache.shape, generator=g).to(cache_dtype))
                    outs.append(_forward(m, fused, cache, inputs, monkeypatch))
                    caches.append(cache)
                assert torch.equal(outs[0], outs[1]), (threads, b, t)
                assert torch.equal(caches[0], caches[1]), (threads, b, t)  # the same KV writes
    finally:
        torch.set_num_threads(before)


def test_fused_forward_agrees_with_the_torch_oracle(monkeypatch):
    """Against the torch path (no kernels at all), to float32 rounding."""
    m = _model(CONFIGS["llama"], seed=3)
    inputs = _step_inputs(3, 5, 7)
    fused = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    m.use_native_linear(False)
    ref = _forward(m, False, m.new_cache(4, 24), inputs, monkeypatch)
    assert torch.allclose(fused, ref, atol=1e-4, rtol=1e-4)


def test_a_layer_that_is_not_the_plain_llama_layer_runs_its_own_forward(monkeypatch):
    """A projection of another class (a tensor-parallel shard's, which all-reduces) is not what the
    fused forward computes: the model then runs layer by layer, through that projection."""

    class Doubled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    m = _model(CONFIGS["llama"])
    inputs = _step_inputs(2, 3, 4)
    plain = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    old = m.transformer.layers[1].mlp.proj
    new = Doubled(old.in_features, old.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    new.native = True
    m.transformer.layers[1].mlp.proj = new
    assert not m.fused_layers_apply()
    doubled = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    assert not torch.equal(plain, doubled)
    m.transformer.layers[1].mlp.proj = old
    assert m.fused_layers_apply()
    assert torch.equal(_forward(m, True, m.new_cache(4, 24), inputs, monkeypatch), plain)


def test_fused_weights_follow_weight_changes(monkeypatch):
    m = _model(CONFIGS["llama"])
    inputs = _step_inputs(1, 2, 5)
    first = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    with torch.no_grad():
        m.transformer.layers[0].post_layernorm.weight.mul_(1.5)
        m.transformer.layers[1].attention.qkv.weight.add_(0.01)
    second = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    per_layer = _forward(m, False, m.new_cache(4, 24), inputs, monkeypatch)
    assert not torch.equal(first, second)
    assert torch.equal(second, per_layer)


def test_fused_weights_follow_dropped_read_changed_and_dropped_again_weights(monkeypatch):
    """The weights the panels stand in for (dropped by ``use_native_linear(True)``): read back
    (a parameter again, the same panels), changed in place, dropped again, and the kernels off
    and on: the fused table follows each, with the per-layer path's bits."""
    m = _model(CONFIGS["llama"])
    inputs = _step_inputs(2, 3, 8)

    def both():
        per_layer = _forward(m, False, m.new_cache(4, 24), inputs, monkeypatch)
        fused = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)  # leaves it on
        assert torch.equal(fused, per_layer)
        return fused

    layer = m.transformer.layers[1]
    assert layer.attention.qkv._parameters["weight"] is None  # dropped when packed
    first = both()
    table = m._fused_weights()
    w = layer.attention.qkv.weight  # unpacked: a parameter again, the same panels
    assert torch.equal(both(), first) and layer.attention.qkv._parameters["weight"] is w
    assert table is not None and m._fused_weights() is not table  # rebuilt: a new parameter
    with torch.no_grad():
        w.add_(0.01)
        layer.mlp.fc.weight.mul_(0.5)  # one half of the fused gate|up panels
    changed = both()
    assert not torch.equal(changed, first)
    m.use_native_linear(True)  # dropped again: the changed values are what the panels hold
    assert layer.attention.qkv._parameters["weight"] is None
    assert layer.mlp.fc._parameters["weight"] is None
    assert torch.equal(both(), changed)
    m.use_native_linear(False)
    m.use_native_linear(True)
    assert torch.equal(both(), changed)


def _call_args(m: BaseModel, b=1, t=1):
    cfg = m.config
    cache = m.new_cache(2, 8)
    x = torch.randn(b, t, cfg.hidden_size)
    tab = torch.zeros(b * t, cfg.head_size // 2)
    slots = torch.zeros(b, dtype=torch.int64)
    write_pos = torch.zeros(b, t, dtype=torch.int64)
    mask = torch.ones(b, t, 1, dtype=torch.bool)
    return x, tab, tab, cache, slots, write_pos, mask


def test_bad_inputs_name_what_is_wrong():
    m = _model(CONFIGS["llama"])
    w = m._fused_weights()
    heads, inter, eps = 4, 96, 1e-6
    x, cos, sin, cache, slots, write_pos, mask = _call_args(m)
    native.decoder_forward(x, cos, sin, cache, slots, write_pos, mask, w, heads, inter, eps)
    with pytest.raises(RedrafterError, match=r"slots\[0\] = 5 outside \[0, 2\)"):
        native.decoder_forward(
            x, cos, sin, cache, torch.tensor([5]), write_pos, mask, w, heads, inter, eps
        )
    with pytest.raises(RedrafterError, match=r"write_pos\[0, 0\] = 8 outside the cache"):
        native.decoder_forward(
            x, cos, sin, cache, slots, torch.tensor([[8]]), mask, w, heads, inter, eps
        )
    with pytest.raises(RedrafterError, match="nh % nkv"):
        native.decoder_forward(x, cos, sin, cache, slots, write_pos, mask, w, 3, inter, eps)
    with pytest.raises(RedrafterError, match="x must be a contiguous"):
        native.decoder_forward(
            x.double(), cos, sin, cache, slots, write_pos, mask, w, heads, inter, eps
        )
    with pytest.raises(RedrafterError, match="cos must be"):
        native.decoder_forward(
            x, cos[:, :3], sin, cache, slots, write_pos, mask, w, heads, inter, eps
        )
    with pytest.raises(RedrafterError, match="cache must be"):
        native.decoder_forward(x, cos, sin, cache[:2], slots, write_pos, mask, w, heads, inter, eps)
    # a struct of another size (a binding and a library built from different sources)
    p = native.DecoderParams(struct_size=ctypes.sizeof(native.DecoderParams) - 8)
    with pytest.raises(RedrafterError, match="params struct of .*rebuild"):
        native.call("redrafter_decoder_forward_cpu", p)
    with pytest.raises(RedrafterError, match="null params"):
        native.call("redrafter_decoder_forward_cpu", None)
    # a layer without its weights
    empty = native.DecoderWeights.__new__(native.DecoderWeights)
    empty._keep, empty.array, empty.num_layers = [], (native.DecoderLayerParams * 3)(), 3
    with pytest.raises(RedrafterError, match="layer 0 has a null weight"):
        native.decoder_forward(x, cos, sin, cache, slots, write_pos, mask, empty, heads, inter, eps)


def test_fused_weights_follow_a_data_swap(monkeypatch):
    """``param.data = ...`` (what ``module.to`` does) replaces the storage without bumping the
    version: the fused table is rebuilt all the same."""
    m = _model(CONFIGS["llama"])
    inputs = _step_inputs(1, 2, 6)
    first = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    w = m.transformer.layers[2].input_layernorm.weight
    w.data = w.data * 0.5
    second = _forward(m, True, m.new_cache(4, 24), inputs, monkeypatch)
    assert not torch.equal(first, second)
    assert torch.equal(second, _forward(m, False, m.new_cache(4, 24), inputs, monkeypatch))


def test_the_bandwidth_floor_counts_the_bytes_the_kernels_stream():
    """A plain step's floor (``redrafter-bench --calibrate``) counts block panels for block
    weights, not their float32 expansion, and float32 panels with their padding."""
    from types import SimpleNamespace

    from redrafter_trt.bench.calibrate import weight_bytes

    cfg = CONFIGS["llama"]
    dense, blocks = _model(cfg), _model(cfg, blocks=True)

    def projections(m):
        return [x for x in m.modules() if isinstance(x, Linear) and x is not m.lm_head]

    assert all(x.streamed_format == "q4_1" for x in projections(blocks))
    assert all(x.streamed_format == "float32" for x in projections(dense))
    got_dense = weight_bytes(SimpleNamespace(base=dense))
    got_blocks = weight_bytes(SimpleNamespace(base=blocks))
    embedding = dense.embedding.weight.numel() * 4  # untied: a lookup, not streamed
    # every weight's bytes (the panels stand in for the projections' dropped parameters)
    assert got_dense >= sum(v.numel() * 4 for v in dense.state_dict().values()) - embedding
    assert got_dense - got_blocks == sum(
        x.packed_weight().nbytes for x in projections(dense)
    ) - sum(x.packed_weight().nbytes for x in projections(blocks))
    assert got_blocks < got_dense / 3
