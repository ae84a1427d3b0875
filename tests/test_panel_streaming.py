"""A linear on the CPU kernels holds only its packed panels: the float32/bf16 parameter is dropped
once packed (``use_native_linear(True)``), a tied embedding looks its rows up in the vocabulary
projection's panels, an MLP's gate_proj and up_proj stand on the halves of their fused panels. The
panels are a permutation of the weight plus padding, so everything that wants the weight gets it
back bit for bit: reading ``.weight`` (the layer then follows that parameter), ``state_dict``,
``load_state_dict``, another dtype, the kernels turned off, a training step, and the greedy
tokens of a loaded engine are those of a model that never dropped its weights."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from redrafter_trt import native
from redrafter_trt.errors import RedrafterError
from redrafter_trt.models import base as base_mod
from redrafter_trt.models.base import (
    BaseConfig,
    BaseModel,
    Linear,
    RMSNorm,
    StoredWeight,
    stream_panels,
)

pytestmark = pytest.mark.usefixtures("native_library")

# tied embeddings; intermediate 96 = 6 panels (the fused gate|up split falls on a panel edge)
TIED = BaseConfig("LlamaForCausalLM", 97, 64, 96, 2, 4, 2, 16, tie_word_embeddings=True)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _model(cfg: BaseConfig = TIED, seed: int = 0, dtype=torch.float32) -> BaseModel:
    torch.manual_seed(seed)
    m = BaseModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.to(dtype)


def _kernels_holding_weights(m: BaseModel) -> BaseModel:
    """A copy on the CPU kernels that keeps its parameters (what every model did before): the
    flags set by hand, nothing packed until used, nothing dropped."""
    ref = copy.deepcopy(m)
    for mod in ref.modules():
        if isinstance(mod, (Linear, RMSNorm)):
            mod.native = True
    return ref


def _step(m: BaseModel, seed: int = 1, b: int = 2, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (b, t), generator=g)
    pos = torch.arange(t)[None].expand(b, t)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None].expand(b, t, t)
    cache = m.new_cache(b, 16)
    with torch.inference_mode():
        hidden = m(ids, pos, cache, torch.arange(b), torch.zeros(b, dtype=torch.long), mask)
        return m.logits(hidden, float32=True)


def held_weights(module) -> list[str]:
    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, StoredWeight) and m._parameters.get("weight") is not None
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 16, 40, 97])
def test_unpacking_gives_the_packed_values_bit_for_bit(dtype, n):
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, 48, generator=g).to(dtype)
    packed = native.pack_linear(w)
    back = native.unpack_linear(packed)
    assert same_bits(back, w) and back.data_ptr() != packed.data.data_ptr()
    ids = torch.tensor([[0, n - 1], [n // 2, 0]])
    assert same_bits(native.packed_rows(packed, ids), w[ids])
    assert native.packed_rows(packed, torch.zeros(0, dtype=torch.long)).shape == (0, 48)
    with pytest.raises(RedrafterError, match=rf"id {n} is outside \[0, {n}\)"):
        native.packed_rows(packed, torch.tensor([n]))  # a padding row is no row
    with pytest.raises(RedrafterError, match=r"id -1 is outside"):
        native.packed_rows(packed, torch.tensor([-1]))
    # rows on panel edges are a packing of their own sharing the memory; others are not
    if n > 16:
        part = native.packed_row_range(packed, 16, n)
        assert part.data.data_ptr() == packed.data.data_ptr() + 16 * 48 * w.element_size()
        assert same_bits(native.unpack_linear(part), w[16:])
        assert native.packed_row_range(packed, 8, n) is None
    if n > 32:
        assert native.packed_row_range(packed, 0, 20) is None
        x = torch.randn(3, 48, generator=g).to(dtype)
        part = native.packed_row_range(packed, 0, 32)
        assert same_bits(native.linear_packed(x, part), native.linear(x, w[:32]))


def test_block_panels_do_not_unpack():
    from test_block_weights import quantize

    with pytest.raises(RedrafterError, match="q4_1 block panels hold no float weight"):
        native.unpack_linear(native.pack_blocks(quantize(torch.randn(16, 64), "q4_1")))


def test_a_kernel_model_holds_only_panels_and_computes_the_same_bits():
    m = _model()
    ref = _kernels_holding_weights(m)
    olds = [weakref.ref(lin.weight) for lin in m.modules() if isinstance(lin, Linear)]
    m.use_native_linear(True)
    # no weight parameter anywhere (the tied embedding's is the lm_head's: gone with it) ...
    assert held_weights(m) == []
    assert all(n.endswith(("norm.weight", "ln_f.weight")) for n, _ in m.named_parameters())
    gc.collect()
    assert all(r() is None for r in olds)  # ... nor kept alive anywhere else
    assert m.embedding.streams_panels() and m.embedding._stored is m.lm_head._stored
    mlp = m.transformer.layers[0].mlp
    fused = mlp._fused[0].data
    for lin in (mlp.fc, mlp.gate):  # the halves of the fused panels, no copy of their own
        assert lin.streams_panels()
        assert lin._stored.data.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert m.lm_head.weight_dtype == torch.float32 and m.lm_head.streamed_format == "float32"
    # the same bits as the kernels on held weights, fused forward and layer by layer, and the
    # embedding rows of the table
    assert same_bits(_step(m), _step(ref))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(base_mod.FUSED_ENV, "0")
        assert same_bits(_step(m, seed=2, b=3, t=1), _step(ref, seed=2, b=3, t=1))
    ids = torch.tensor([[3, 96, 0]])
    with torch.inference_mode():
        assert same_bits(m.embedding(ids), ref.embedding(ids))
    assert held_weights(m) == []  # running read no weight


def test_every_reader_gets_the_weights_back_exactly():
    m = _model()
    ref = _kernels_holding_weights(m)
    m.use_native_linear(True)
    sd, want = m.state_dict(), ref.state_dict()
    assert sd.keys() == want.keys() and all(same_bits(sd[k], want[k]) for k in want)
    assert held_weights(m) == []  # state_dict decodes copies
    # reading the weight unpacks it once, keeps it and the tie, and reuses the panels
    packed = m.lm_head.packed_weight()
    w = m.lm_head.weight
    assert same_bits(w, ref.lm_head.weight) and m.embedding.weight is w
    assert m.lm_head.packed_weight() is packed and m.lm_head.weight is w
    assert same_bits(_step(m), _step(ref))
    # a changed weight: the kernels and the embedding follow it, never the old panels
    with torch.no_grad():
        w[5, 3] += 1.0
        ref.lm_head.weight[5, 3] += 1.0
        m.transformer.layers[1].mlp.gate.weight.mul_(0.5)  # read from half the fused panels
        ref.transformer.layers[1].mlp.gate.weight.mul_(0.5)
    assert m.lm_head.packed_weight() is not packed
    assert same_bits(_step(m), _step(ref))
    # kernels on again: the held weights go back to panels
    m.use_native_linear(True)
    assert held_weights(m) == [] and same_bits(_step(m), _step(ref))
    # a loaded state replaces the weights; the kernels follow
    new = {k: v * 0.75 if k.endswith("qkv.weight") else v for k, v in ref.state_dict().items()}
    m.load_state_dict(new)
    ref.load_state_dict(new)
    assert same_bits(_step(m), _step(ref))
    # a CPU float32 'move' is no move: nothing decoded; another dtype decodes first
    fresh = _model()
    fresh.use_native_linear(True)
    fresh.to("cpu").to(torch.float32)
    assert held_weights(fresh) == []
    sd64 = fresh.to(torch.float64).state_dict()
    want64 = _model().to(torch.float64).state_dict()
    assert sd64.keys() == want64.keys() and all(torch.equal(sd64[k], want64[k]) for k in want64)
    assert (
        fresh.lm_head.weight.dtype == torch.float64
        and fresh.embedding.weight is fresh.lm_head.weight
    )
    # the kernels off: every weight a parameter again, the torch path's bits
    m.use_native_linear(False)
    ref.use_native_linear(False)
    assert held_weights(m) == held_weights(ref)
    assert not any(base_mod._is_panels(x._stored) for x in m.modules() if isinstance(x, Linear))
    assert all(x._packed is None for x in m.modules() if isinstance(x, Linear))
    assert m.lm_head.weight is m.embedding.weight
    sd = m.state_dict()
    assert all(same_bits(sd[k], v) for k, v in ref.state_dict().items())
    assert same_bits(_step(m), _step(ref))


def test_a_bf16_model_streams_bf16_panels():
    m = _model(dtype=torch.bfloat16)
    ref = _kernels_holding_weights(m)
    m.use_native_linear(True)
    assert held_weights(m) == [] and m.lm_head.weight_dtype == torch.bfloat16
    assert m.new_cache(1, 4).dtype == torch.bfloat16
    assert same_bits(_step(m), _step(ref))
    assert same_bits(
        m.transformer.layers[1].attention.dense.weight,
        ref.state_dict()["transformer.layers.1.attention.dense.weight"],
    )
    # float32 from bf16 panels: decoded, converted, repacked as float32
    m.to(torch.float32)
    assert m.lm_head.weight_dtype == torch.float32
    assert same_bits(m.lm_head.weight, ref.lm_head.weight.float())


def test_a_split_inside_a_panel_keeps_gate_and_up_held():
    """intermediate 40: the fused gate|up panels do not split on a panel edge, so those two
    weights stay held (the fused copy is the kernel's); everything else is dropped."""
    cfg = BaseConfig("LlamaForCausalLM", 97, 64, 40, 1, 4, 2, 16)
    m = _model(cfg)
    ref = _kernels_holding_weights(m)
    m.use_native_linear(True)
    assert sorted(held_weights(m)) == [
        "transformer.layers.0.mlp.fc",
        "transformer.layers.0.mlp.gate",
        "transformer.vocab_embedding",  # untied: a lookup table, not a kernel's weight
    ]
    assert same_bits(_step(m), _step(ref))


def test_training_reads_the_weights_and_the_kernels_follow_its_steps():
    """The trainer's path: gradients run on torch (reading a weight gives a parameter that
    requires grad), an optimizer step changes it, and the kernels then compute with it."""
    m = _model()
    m.use_native_linear(True)
    params = [m.lm_head.weight, m.transformer.layers[0].mlp.fc.weight]
    assert all(p.requires_grad for p in params) and held_weights(m) != []
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(3, 64)
    with torch.enable_grad():
        loss = m.lm_head(x).square().mean() + m.transformer.layers[0].mlp(x).square().mean()
        loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    with torch.inference_mode():
        assert same_bits(m.lm_head(x), native.linear(x, params[0].detach()))
        ids = torch.tensor([1, 7])
        assert same_bits(m.embedding(ids), params[0].detach()[ids])  # the tie followed
    # an embedding standing on panels still gives gradients (it reads the weight)
    m.use_native_linear(True)
    with torch.enable_grad():
        m.embedding(torch.tensor([2, 4])).sum().backward()
    assert m.embedding.weight.grad is not None and m.embedding.weight.grad[2].abs().sum() > 0


def test_a_drafter_on_the_kernels_holds_only_panels():
    from redrafter_trt.models.drafter import DrafterConfig, init_drafter

    d = init_drafter(DrafterConfig(97, 64, 96, 2, True))
    ref = copy.deepcopy(d)
    for mod in ref.modules():
        if isinstance(mod, Linear):
            mod.native = True
    d.use_native_linear(True)
    assert held_weights(d) == []
    ctx, state = torch.randn(2, 64), torch.randn(2, 64)
    with torch.inference_mode():
        assert same_bits(d.logits(ctx, state), ref.logits(ctx, state))
    assert stream_panels(d) == 0  # nothing left to drop


def test_a_loaded_float32_engine_holds_only_panels_and_decodes_the_same_tokens(
    tmp_path, monkeypatch
):
    """The whole load (checkpoint, backend, kernels on): no weight parameter in the base or the
    head, and greedy tokens, plain and speculative, equal to the same engine loaded keeping its
    parameters (the panels' drop turned off)."""
    from redrafter_trt.runtime.engine import build_engine
    from redrafter_trt.runtime.loader import load
    from test_block_weights import cli_convert, tiny_gguf_like_base

    ckpt = cli_convert(tiny_gguf_like_base(tmp_path), tmp_path / "ck", "--no_keep_blocks")
    engine = build_engine(ckpt, tmp_path / "engine", backend="torch")
    prompts = [[1, 2, 3, 4], [7, 5, 3]]
    runs = {}
    for name in ("kept", "dropped"):
        with monkeypatch.context() as mp:
            if name == "kept":
                mp.setattr(base_mod, "_stream_held", lambda tied: False)
            gen = load(engine, device="cpu", adaptive="off")
            runs[name] = [
                [r.token_ids for r in gen.generate(prompts, max_new_tokens=12, speculative=s)]
                for s in (False, True)
            ]
            be = gen.backend
            held = held_weights(be.base) + held_weights(be.drafter)
            if name == "kept":
                assert len(held) > 10
            else:
                assert held == [], held
                assert be.base.embedding.streams_panels()
    assert runs["dropped"] == runs["kept"] and runs["dropped"][0] == runs["dropped"][1]


def test_a_head_sharing_the_base_projection_shares_its_panels(tmp_path):
    """A float32 engine whose head's projection is the base's vocabulary projection (stored
    under the head's name too): the loader ties the two, the kernels pack it once, and neither
    model holds it; a head with a projection of its own keeps its own."""
    from redrafter_trt.formats.checkpoint import share_base_projection
    from redrafter_trt.runtime.engine import build_engine
    from redrafter_trt.runtime.loader import load
    from test_block_streaming import convert_with_head, shared_head
    from test_block_weights import tiny_gguf_like_base

    base_dir = tiny_gguf_like_base(tmp_path)
    head = shared_head(base_dir, tmp_path / "head")
    ckpt = convert_with_head(base_dir, head, tmp_path / "ck", "--no_keep_blocks")
    gen = load(build_engine(ckpt, tmp_path / "engine", backend="torch"), adaptive="off")
    base, drafter = gen.backend.base, gen.backend.drafter
    assert drafter.projection._stored is base.lm_head._stored is base.embedding._stored
    assert held_weights(base) == [] and held_weights(drafter) == []
    tokens = [
        [r.token_ids for r in gen.generate([[1, 2, 3, 4]], max_new_tokens=10, speculative=s)]
        for s in (False, True)
    ]
    assert tokens[0] == tokens[1]
    # reading gives the weight back in each model (the base's tie kept; the models, dropped one
    # after the other, each get a copy of their own)
    assert same_bits(drafter.projection.weight, base.lm_head.weight)
    assert base.lm_head.weight is base.embedding.weight
    # only the same bits tie: one changed bit (a zero's sign) keeps them apart
    m, d = _model(), copy.deepcopy(drafter)
    m2 = _model()
    d.lm_head[-1] = Linear(64, 97, bias=False)
    with torch.no_grad():
        d.lm_head[-1].weight.copy_(m.lm_head.weight)
    assert share_base_projection(m, d) and d.projection.weight is m.lm_head.weight
    d.lm_head[-1] = Linear(64, 97, bias=False)
    with torch.no_grad():
        w = m2.lm_head.weight.clone()
        w[0, 0] = 0.0
        m2.lm_head.weight[0, 0] = -0.0
        d.lm_head[-1].weight.copy_(w)
    assert not share_base_projection(m2, d)
