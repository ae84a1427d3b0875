"""A loaded engine whose weights stream as GGUF blocks holds no float32 copy of them (no
parameter, no decoded copy, no checkpoint tensor read), and everything that wants the float32
values still gets exactly the float32 checkpoint's: reading ``.weight``, the torch path, another
dtype, ``state_dict``, a draft head sharing the base's projection. Plus the converter's default
(blocks kept where they fit) and the builder's check that the blocks and the float32 file agree.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import load_checkpoint_models
from redrafter_trt.formats.names import CKPT_DRAFT_PROJECTION, EMBEDDING, LM_HEAD
from redrafter_trt.models import blocks as B
from redrafter_trt.models.base import StoredWeight
from redrafter_trt.models.drafter import DrafterConfig, init_drafter, save_drafter
from test_block_weights import _rewrite, cli_convert, tiny_gguf_like_base

pytestmark = pytest.mark.usefixtures("native_library")

PROMPTS = [[1, 2, 3, 4], [7, 5, 3]]


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def streaming(model) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, StoredWeight) and m.streams_blocks()
    ]


def shared_head(base_dir: Path, out: Path, draft_vocab: torch.Tensor | None = None) -> Path:
    """A draft head whose final projection is the base's (tied) vocabulary projection, all of
    it or the rows of ``draft_vocab`` (what --freeze_lm_head training leaves)."""
    cfg = json.loads((base_dir / "config.json").read_text())
    v, h = cfg["vocab_size"], cfg["hidden_size"]
    k = None if draft_vocab is None else int(draft_vocab.numel())
    head = init_drafter(DrafterConfig(v, h, h, 1, True, k), draft_vocab=draft_vocab)
    emb = load_file(str(base_dir / "model.safetensors"))["model.embed_tokens.weight"]
    with torch.no_grad():
        head.lm_head[-1].weight.copy_(emb if draft_vocab is None else emb[draft_vocab.long()])
    return save_drafter(head, out)


def convert_with_head(base_dir: Path, head: Path, out: Path, *extra: str) -> Path:
    from redrafter_trt.cli import convert as convert_cli

    argv = ["--model_dir", str(base_dir), "--drafter_model_dir", str(head)]
    assert convert_cli.main([*argv, "--output_dir", str(out), "--dtype", "float32", *extra]) == 0
    return out


def test_a_loaded_engine_holds_no_float32_copy_and_greedy_tokens_do_not_change(tmp_path):
    from redrafter_trt.runtime.engine import build_engine
    from redrafter_trt.runtime.loader import load

    base_dir = tiny_gguf_like_base(tmp_path)
    head = shared_head(base_dir, tmp_path / "head")
    out = {}
    for name, extra in (("plain", ("--no_keep_blocks",)), ("kept", ())):
        ckpt = convert_with_head(base_dir, head, tmp_path / name, *extra)
        engine = build_engine(ckpt, tmp_path / f"engine_{name}", backend="torch")
        gen = load(engine, device="cpu", adaptive="off")
        base, drafter = gen.backend.base, gen.backend.drafter
        out[name] = (
            [
                [r.token_ids for r in gen.generate(PROMPTS, max_new_tokens=12, speculative=s)]
                for s in (False, True)
            ],
            base,
            drafter,
        )
    (plain_tokens, base_p, head_p), (kept_tokens, base_k, head_k) = out["plain"], out["kept"]
    assert kept_tokens == plain_tokens and kept_tokens[0] == kept_tokens[1]
    assert streaming(base_p) == [] and streaming(head_p) == []
    # after loading and generating: every block weight still streams, none was decoded
    layers = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
    want = {f"transformer.layers.{i}.{n}" for i in range(2) for n in layers}
    assert set(streaming(base_k)) == want | {"transformer.vocab_embedding", "lm_head"}
    assert streaming(head_k) == ["lm_head.1"]  # the head's projection is the base's blocks
    held = {n for n, _ in base_k.named_parameters()}
    assert not any(n.endswith(tuple(f"{x}.weight" for x in want)) for n in held)
    assert EMBEDDING not in held and LM_HEAD not in held
    # the float32 engine holds no float32 parameter either: its kernel panels stand in
    for model in (base_p, head_p, base_k, head_k):
        assert not [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    assert base_p.embedding.streams_panels()  # its rows looked up in the tied lm_head's panels
    # one set of blocks and one set of kernel panels for the base's and the head's projection
    assert head_k.lm_head[-1].blocks is base_k.lm_head.blocks
    assert head_k.lm_head[-1].packed_weight() is base_k.lm_head.packed_weight()


def test_reading_the_weight_decodes_it_exactly_and_keeps_the_tie(tmp_path):
    base_dir = tiny_gguf_like_base(tmp_path)
    _, base_p, _ = load_checkpoint_models(cli_convert(base_dir, tmp_path / "p", "--no_keep_blocks"))
    _, base_k, _ = load_checkpoint_models(cli_convert(base_dir, tmp_path / "k"))
    # state_dict holds the decoded values (copies; the layers keep streaming)
    sd_p, sd_k = base_p.state_dict(), base_k.state_dict()
    assert sd_p.keys() == sd_k.keys()
    assert all(same_bits(sd_p[n], sd_k[n]) for n in sd_p)
    assert "lm_head" in streaming(base_k)
    w = base_k.lm_head.weight  # decoded on the first read, kept, tied again
    assert same_bits(w, base_p.lm_head.weight)
    assert base_k.transformer.vocab_embedding.weight is w
    assert not base_k.lm_head.streams_blocks()
    base_k.use_native_linear(True)
    assert base_k.lm_head.packed_weight().fmt == "q8_0"  # the blocks still stand for it
    with torch.no_grad():
        w[3, 1] += 1.0  # a changed weight: the kernel follows it, never stale blocks
    assert base_k.lm_head.packed_weight().fmt is None
    from redrafter_trt import native

    x = torch.randn(2, base_k.config.hidden_size)
    with torch.no_grad():
        assert same_bits(base_k.lm_head(x), native.linear(x, w))
        assert same_bits(base_k.embedding(torch.tensor([3, 0])), w[[3, 0]])


def test_the_torch_path_another_dtype_and_a_loaded_state_get_the_float32_values(tmp_path):
    from redrafter_trt.backends.torch_backend import TorchBackend

    base_dir = tiny_gguf_like_base(tmp_path)
    plain = cli_convert(base_dir, tmp_path / "p", "--no_keep_blocks")
    kept = cli_convert(base_dir, tmp_path / "k")
    _, base_p, head_p = load_checkpoint_models(plain)
    _, base_k, head_k = load_checkpoint_models(kept)
    ids = torch.tensor([[1, 5, 9, 2]])
    outs = []
    for base, head in ((base_p, head_p), (base_k, head_k)):
        backend = TorchBackend(base, head, 2, 2, native_linear=False)  # REDRAFTER_CPU_LINEAR=torch
        cache = base.new_cache(1, 16)
        with torch.no_grad():
            hid = base(
                ids,
                torch.arange(4)[None],
                cache,
                torch.tensor([0]),
                torch.tensor([0]),
                torch.tril(torch.ones(1, 4, 4, dtype=torch.bool)),
            )
            outs.append(base.logits(hid, float32=True))
        assert not backend.native_linear
    assert same_bits(outs[0], outs[1])
    assert streaming(base_k) == []  # the torch path read every weight: all decoded, exactly
    # another dtype decodes first, then converts: the float32 model's float64 values
    _, base_k2, _ = load_checkpoint_models(kept)
    assert "lm_head" in streaming(base_k2)
    sd64 = base_k2.to(torch.float64).state_dict()
    ref64 = base_p.to(torch.float64).state_dict()
    assert all(torch.equal(sd64[n], ref64[n]) for n in ref64)
    # the CPU float32 'move' is no move: nothing decoded
    _, base_k3, _ = load_checkpoint_models(kept)
    base_k3.to("cpu").to(torch.float32)
    assert "lm_head" in streaming(base_k3)
    # a state loaded into a streaming layer replaces its blocks
    name = "transformer.layers.0.mlp.proj.weight"
    new = {**base_k3.state_dict(), name: torch.zeros_like(base_p.state_dict()[name])}
    base_k3.load_state_dict(new)
    lin = base_k3.transformer.layers[0].mlp.proj
    assert not lin.streams_blocks() and torch.count_nonzero(lin.weight) == 0
    base_k3.use_native_linear(True)
    assert lin.packed_weight().fmt is None


def test_a_checkpoint_read_in_another_dtype_ignores_the_blocks(tmp_path):
    base_dir = tiny_gguf_like_base(tmp_path)
    _, base_p, _ = load_checkpoint_models(cli_convert(base_dir, tmp_path / "p", "--no_keep_blocks"))
    _, base_b, _ = load_checkpoint_models(
        cli_convert(base_dir, tmp_path / "k"), dtype=torch.bfloat16
    )
    assert streaming(base_b) == []
    ref = base_p.to(torch.bfloat16).state_dict()
    assert all(torch.equal(v, ref[n]) for n, v in base_b.state_dict().items())


def test_a_head_over_a_draft_vocabulary_streams_the_rows_of_the_base_projection(tmp_path):
    base_dir = tiny_gguf_like_base(tmp_path)
    ids = torch.tensor([5, 0, 96, 17, 40, 41, 3, 60], dtype=torch.int32)
    head = shared_head(base_dir, tmp_path / "head", draft_vocab=ids)
    kept = convert_with_head(base_dir, head, tmp_path / "k")
    stored = B.load_blocks(kept / B.BLOCKS_FILE)
    assert stored[CKPT_DRAFT_PROJECTION].n == 8
    emb = stored[EMBEDDING]
    assert torch.equal(B.decode(stored[CKPT_DRAFT_PROJECTION]), B.decode(emb)[ids.long()])
    _, _, head_k = load_checkpoint_models(kept)
    _, _, head_p = load_checkpoint_models(
        convert_with_head(base_dir, head, tmp_path / "p", "--no_keep_blocks")
    )
    assert streaming(head_k) == ["lm_head.1"]
    head_k.use_native_linear(True)
    head_p.use_native_linear(True)
    x = torch.randn(3, head_k.config.exit_dim)
    with torch.no_grad():
        assert same_bits(head_k.lm_head[-1](x), head_p.lm_head[-1](x))
    # a head with its own projection gets no blocks
    random_kept = cli_convert(base_dir, tmp_path / "r")
    assert CKPT_DRAFT_PROJECTION not in B.load_blocks(random_kept / B.BLOCKS_FILE)


def test_the_build_refuses_blocks_that_disagree_with_the_float32_file(tmp_path):
    from redrafter_trt.runtime.engine import build_engine

    kept = cli_convert(tiny_gguf_like_base(tmp_path), tmp_path / "k")
    name = "transformer.layers.1.attention.qkv.weight"
    _rewrite(kept / B.BLOCKS_FILE, edit_tensors=lambda t: t[f"{name}.q4_1.qs"].view(-1)[:1].add_(1))
    with pytest.raises(RedrafterError, match=rf"tensor {name}: its q4_1 blocks do not decode") as e:
        build_engine(kept, tmp_path / "engine", backend="torch")
    assert str(kept / B.BLOCKS_FILE) in str(e.value) and "rank0.safetensors" in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_the_converter_keeps_blocks_by_default_where_they_fit(tmp_path, capsys):
    from redrafter_trt.cli import convert as convert_cli

    base_dir = tiny_gguf_like_base(tmp_path)
    assert (cli_convert(base_dir, tmp_path / "default") / B.BLOCKS_FILE).is_file()
    assert "keeping the base's GGUF block weights" in capsys.readouterr().err
    assert not (
        cli_convert(base_dir, tmp_path / "off", "--no_keep_blocks") / B.BLOCKS_FILE
    ).exists()
    argv = ["--model_dir", str(base_dir), "--random_drafter", "--dtype", "bfloat16"]
    assert convert_cli.main([*argv, "--output_dir", str(tmp_path / "bf16")]) == 0
    assert not (tmp_path / "bf16" / B.BLOCKS_FILE).exists()
    err = capsys.readouterr().err
    assert "block weights are not kept (--dtype bfloat16;" in err, err
    assert convert_cli.main([*argv, "--output_dir", str(tmp_path / "x"), "--keep_blocks"]) == 2
    assert "only in a float32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_loading_a_blocks_engine_costs_a_fraction_of_the_float32_memory(tmp_path):
    """Resident memory measured in a child process around the load (and the kernels' packing):
    the float32 engine holds its weights once, as the kernels' panels (``held``: the same
    engine keeping its parameters beside them, as every load did before), the blocks engine
    only its block panels."""
    from redrafter_trt.runtime.engine import build_engine

    base_dir = tiny_gguf_like_base(
        tmp_path, vocab=16384, hidden_size=256, intermediate_size=512, num_attention_heads=4
    )
    code = """
import sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
from redrafter_trt.models import base
from redrafter_trt.runtime.loader import load
if sys.argv[2] == "held":
    base._stream_held = lambda tied: False
before = rss()
gen = load(sys.argv[1], device="cpu", adaptive="off")
gen.generate([[1, 2, 3]], max_new_tokens=4)
print(rss() - before)
"""
    grown = {}
    for name, extra in (("plain", ("--no_keep_blocks",)), ("kept", ())):
        ckpt = cli_convert(base_dir, tmp_path / name, "--redrafter_exit_dim", "64", *extra)
        engine = build_engine(ckpt, tmp_path / f"engine_{name}", backend="torch")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
        for how in ("dropped", "held") if name == "plain" else ("dropped",):
            res = subprocess.run(
                [sys.executable, "-c", code, str(engine), how],
                capture_output=True,
                text=True,
                env=env,
            )
            assert res.returncode == 0, res.stderr
            grown[name if how == "dropped" else how] = int(res.stdout.split()[-1])
    table = 16384 * 256 * 4  # 16 MiB of float32 (the tied embedding and vocabulary projection)
    assert grown["held"] - grown["plain"] > table, grown  # every float32 weight held once less
    assert grown["plain"] - grown["kept"] > 0.5 * table, grown  # float32 panels against Q8_0
    print(f"resident memory added by the load: {grown}")


def test_blocks_attached_beside_a_held_weight_stream_until_the_weight_changes():
    from redrafter_trt.models.base import Linear
    from test_block_weights import quantize

    lin = Linear(64, 40, bias=False)
    bt = quantize(torch.randn(40, 64), "q4_1")
    with torch.no_grad():
        lin.weight.copy_(B.decode(bt))
    lin.attach_blocks(bt)
    lin.native = True
    assert not lin.streams_blocks() and lin.packed_weight().fmt == "q4_1"
    x = torch.randn(3, 64)
    with torch.no_grad():
        from redrafter_trt import native

        assert same_bits(lin(x), native.linear(x, lin.weight))
        lin.weight[0, 0] += 1.0
        assert lin.packed_weight().fmt is None and same_bits(lin(x), native.linear(x, lin.weight))
