"""The compact base modeling against transformers' own models, and config parsing."""

import json

import pytest
import torch

from conftest import ARCHS, write_tiny_hf
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.hf import hf_base_config, load_hf_base
from redrafter_trt.models.base import BaseModel


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def ours(path):
    cfg, sd = load_hf_base(path)
    m = BaseModel(cfg)
    m.load_state_dict(sd)
    return m.eval()


def causal(t):
    return torch.tril(torch.ones(t, t, dtype=torch.bool))


def full_logits(model, ids):
    b, t = ids.shape
    cache = model.new_cache(b, t)
    h = model(
        ids,
        torch.arange(t).expand(b, t),
        cache,
        torch.arange(b),
        torch.zeros(b, dtype=torch.long),
        causal(t).expand(b, t, t),
    )
    return model.logits(h)


CASES = [
    ("llama", {}),
    ("qwen2", {}),
    ("llama", {"tie": True}),
    (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
]


@pytest.mark.parametrize("arch,over", CASES)
def test_logits_match_transformers(tmp_path, arch, over):
    path = write_tiny_hf(tmp_path / "m", arch, seed=3, **over)
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        want = hf_model(path)(ids).logits
        got = full_logits(ours(path), ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_mistral_directory_loads_as_llama(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
        initializer_range=0.2,
    )
    MistralForCausalLM(cfg).eval().save_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (
            full_logits(ours(tmp_path), ids) - hf_model(tmp_path)(ids).logits
        ).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_cache_and_ragged_rows_equal_full_forward(tiny_dirs, arch):
    """Prefill in pieces with different per-row cache lengths gives the full forward's logits."""
    m = ours(tiny_dirs[arch]).double()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = full_logits(m, ids)
        cache = m.new_cache(3, 32)
        slots = torch.tensor([2, 0])
        # Row 0 prefills 7 tokens, row 1 prefills 11 (padding positions are never read).
        first = torch.tensor([7, 11])
        h = m(
            ids[:, :11],
            torch.arange(11).expand(2, 11),
            cache,
            slots,
            torch.zeros(2, dtype=torch.long),
            causal(11).expand(2, 11, 11),
        )
        assert torch.allclose(m.logits(h)[0, :7], want[0, :7], atol=1e-10)
        assert torch.allclose(m.logits(h)[1, :11], want[1, :11], atol=1e-10)
        rest = torch.stack([ids[0, 7:12], ids[1, 11:16]])
        pos = first[:, None] + torch.arange(5)
        h2 = m(rest, pos, cache, slots, first, causal(5).expand(2, 5, 5))
        assert torch.allclose(m.logits(h2)[0], want[0, 7:12], atol=1e-10)
        assert torch.allclose(m.logits(h2)[1], want[1, 11:16], atol=1e-10)


def test_transformers_4_and_5_rope_config_styles(tmp_path):
    base = write_tiny_hf(tmp_path / "m", "llama", seed=1)
    raw = json.loads((base / "config.json").read_text())
    for style in ("v4", "v5"):
        r = {
            k: v
            for k, v in raw.items()
            if k not in ("rope_parameters", "rope_theta", "rope_scaling")
        }
        if style == "v4":
            r.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
        else:
            r.update(rope_parameters={"rope_theta": 5000.0, "rope_type": "linear", "factor": 2.0})
        (base / "config.json").write_text(json.dumps(r))
        cfg = hf_base_config(base)
        assert cfg.rotary_base == 5000.0
        assert cfg.rotary_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unsupported_architecture_and_rope_are_clear_errors(tmp_path):
    base = write_tiny_hf(tmp_path / "m", "llama", seed=1)
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**raw, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(RedrafterError, match="unsupported architecture"):
        hf_base_config(base)
    (base / "config.json").write_text(
        json.dumps({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    )
    with pytest.raises(RedrafterError, match="unsupported RoPE"):
        hf_base_config(base)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_export_roundtrip(tiny_dirs, tmp_path, arch):
    """trtllm_to_hf + hf_config_dict give back a directory transformers loads to the same logits."""
    from redrafter_trt.formats.hf import hf_config_dict
    from redrafter_trt.formats.names import trtllm_to_hf
    from redrafter_trt.models.io import save_safetensors

    cfg, sd = load_hf_base(tiny_dirs[arch])
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    save_safetensors(
        {k: v.clone() for k, v in trtllm_to_hf(cfg, sd).items()}, tmp_path / "model.safetensors"
    )
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.allclose(
            hf_model(tmp_path)(ids).logits, hf_model(tiny_dirs[arch])(ids).logits, atol=1e-6
        )


def test_sharded_safetensors_directory_loads(tmp_path, tiny_dirs):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["llama"]))
    m.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.allclose(
            full_logits(ours(tmp_path), ids), full_logits(ours(tiny_dirs["llama"]), ids)
        )
    # A shard named by the index but missing is a clear error.
    next(tmp_path.glob("model-*-of-*.safetensors")).unlink()
    with pytest.raises(RedrafterError, match="missing"):
        load_hf_base(tmp_path)


def test_safetensors_files_are_the_same_bytes_from_run_to_run(tmp_path):
    """The library writes a header's metadata in a per-process random order; ours sorts it, so the
    same tensors and metadata give the same file in every process (checkpoints and engines can be
    compared byte for byte), and the file reads back the same."""
    import hashlib
    import subprocess
    import sys

    from safetensors import safe_open

    code = """
import sys, torch
from redrafter_trt.models.io import save_safetensors
t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16),
     "i": torch.tensor([1, -2], dtype=torch.int8), "e": torch.zeros(0)}
save_safetensors(t, sys.argv[1], metadata={k: k * 3 for k in ("format", "rank", "tp_size", "config", "zeta", "alpha")})
"""
    digests = set()
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == {
            k: k * 3 for k in ("format", "rank", "tp_size", "config", "zeta", "alpha")
        }
        assert torch.equal(f.get_tensor("w"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
        assert torch.equal(f.get_tensor("b"), torch.ones(3, dtype=torch.bfloat16))
        assert torch.equal(f.get_tensor("i"), torch.tensor([1, -2], dtype=torch.int8))
        assert f.get_tensor("e").numel() == 0
