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
from redrafter_trt.checkpoint import convert_checkpoint, load_hf_base, read_checkpoint_config
from redrafter_trt.cli import build as build_cli
from redrafter_trt.engine import build_engine, load
from redrafter_trt.errors import RedrafterError
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.trtllm import TRTLLM_CONTAINER, trtllm_importable

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["redrafter_trt.trtllm", "redrafter_trt.trtllm.plugins", "redrafter_trt.trtllm.network",
           "redrafter_trt.trtllm.build", "redrafter_trt.trtllm.runtime"]
absent = pytest.mark.skipif(trtllm_importable(), reason="TensorRT-LLM is installed: gpu_selftest.sh covers it")


def test_modules_import_without_tensorrt():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES) +
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_llm')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_contract_names_are_imported_not_retyped():
    """The engine's I/O names come from redrafter_trt.contract; no module of the package spells one."""
    names = {getattr(C, k) for k in dir(C) if k.isupper() and isinstance(getattr(C, k), str)}
    for path in (ROOT / "redrafter_trt" / "trtllm").glob("*.py"):
        literals = set(re.findall(r"[\"']([a-z_]+)[\"']", path.read_text()))
        assert not (literals & names), f"{path.name} retypes contract names {sorted(literals & names)}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm")
    cfg, sd = load_hf_base(write_tiny_hf(root / "hf", "llama", seed=3))
    drafter = init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, 2 * cfg.hidden_size, 1, True), seed=1)
    return convert_checkpoint(cfg, sd, drafter, root / "ckpt", dtype="float16", num_beams=2, draft_len=2)


def assert_names_container(excinfo):
    assert TRTLLM_CONTAINER in str(excinfo.value)


@absent
def test_build_trtllm_names_the_container(ckpt, tmp_path):
    with pytest.raises(RedrafterError) as e:
        build_engine(ckpt, tmp_path / "engine", backend="trtllm", max_batch_size=1, max_input_len=8, max_seq_len=32)
    assert_names_container(e)
    assert not (tmp_path / "engine").exists()
    from redrafter_trt.trtllm.build import build_trtllm_engine

    with pytest.raises(RedrafterError) as e:
        build_trtllm_engine(ckpt, tmp_path / "engine", read_checkpoint_config(ckpt), max_batch_size=1,
                            max_input_len=8, max_seq_len=32)
    assert_names_container(e)


@absent
def test_build_cli_exits_with_the_message(ckpt, tmp_path, capsys):
    code = build_cli.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "e"), "--backend", "trtllm"])
    assert code == 2
    assert TRTLLM_CONTAINER in capsys.readouterr().err


@absent
def test_loading_a_trtllm_engine_names_the_container(ckpt, tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({
        "version": "0", "backend": "trtllm",
        "pretrained_config": json.loads((ckpt / "config.json").read_text()),
        "build_config": {"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 32}}))
    with pytest.raises(RedrafterError) as e:
        load(engine)
    assert_names_container(e)


@absent
def test_native_entry_points_name_the_container():
    from redrafter_trt.trtllm import require_trtllm
    from redrafter_trt.trtllm.network import build_model
    from redrafter_trt.trtllm.plugins import add_plugin, load_plugin_library

    for call in (require_trtllm, load_plugin_library, lambda: add_plugin(None, "RedrafterTreePack", [], {}),
                 lambda: build_model(None, 0)):
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
    from redrafter_trt.trtllm.runtime import relocate_paged

    g = torch.Generator().manual_seed(0)
    layers, slots, heads, tpb, blocks, hd, l = 3, 5, 2, 4, 6, 3, 4
    cache = torch.randn(layers, 2, slots, heads, tpb * blocks, hd, generator=g)
    pool = to_pool(cache, tpb)
    row_slots = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    cache_len = torch.tensor([2, 7, 13, 0], dtype=torch.int32)     # crossing block borders
    path = torch.tensor([[0, 1, 4, 6], [0, 2, 3, 3], [0, 3, 5, 9], [0, 0, 0, 0]], dtype=torch.int32)
    n = torch.tensor([3, 2, 3, 0], dtype=torch.int32)
    relocate_kv(cache, row_slots, cache_len, path, n)
    relocate_paged(pool, row_slots, cache_len, path, n, max_blocks=blocks, kv_heads=heads,
                   tokens_per_block=tpb, head_dim=hd)
    assert torch.equal(pool, to_pool(cache, tpb))


def test_block_offsets_address_each_slots_blocks():
    import torch

    from redrafter_trt.trtllm.runtime import paged_block_offsets

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
