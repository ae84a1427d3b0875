"""The Hugging Face <-> TensorRT-LLM name table: every name round-trips both ways, the table is a
bijection, and its two ends are exactly transformers' and the modeling's parameter names."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_config
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.hf import hf_base_config
from redrafter_trt.formats.names import (
    BASE_NAME_TABLE,
    HF_LAYER,
    LM_HEAD,
    TRTLLM_LAYER,
    base_name_pairs,
    hf_to_trtllm,
    trtllm_to_hf,
)
from redrafter_trt.models.base import BaseModel

# (arch, tie, config overrides): plain Llama, Llama with every bias, Qwen2 (q/k/v biases), tied.
CASES = [
    ("llama", False, {}),
    ("llama", False, {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", False, {}),
    ("llama", True, {}),
    ("qwen2", True, {}),
]


def hf_model_and_config(tmp_path, arch, tie, overrides):
    """A tiny transformers model (the reference for Hugging Face names), its directory's
    :class:`BaseConfig`, and its tensors with distinct random values."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    model = cls(tiny_hf_config(arch, tie=tie, **overrides))
    model.save_pretrained(str(tmp_path))
    cfg = hf_base_config(tmp_path)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    if tie:
        sd[LM_HEAD] = sd["model.embed_tokens.weight"]
    return cfg, sd


def modeling_names(cfg) -> set[str]:
    with torch.device("meta"):
        return set(BaseModel(cfg).state_dict())


@pytest.mark.parametrize("arch,tie,overrides", CASES)
def test_every_name_round_trips(tmp_path, arch, tie, overrides):
    cfg, hf = hf_model_and_config(tmp_path, arch, tie, overrides)
    trt = hf_to_trtllm(cfg, hf, "tiny")
    # the TensorRT-LLM end of the table is exactly the modeling's parameter names
    assert set(trt) == modeling_names(cfg)
    back = trtllm_to_hf(cfg, trt)
    # the Hugging Face end is exactly transformers' (its lm_head is the embedding when tied)
    assert set(back) == set(hf) - ({LM_HEAD} if tie else set())
    for name, t in back.items():
        assert torch.equal(t, hf[name]), name
    again = hf_to_trtllm(cfg, back, "round trip")
    assert set(again) == set(trt)
    for name, t in again.items():
        assert torch.equal(t, trt[name]), name
    if tie:
        assert trt[LM_HEAD] is trt["transformer.vocab_embedding.weight"]


@pytest.mark.parametrize("arch,tie,overrides", CASES)
def test_the_table_is_a_bijection(tmp_path, arch, tie, overrides):
    cfg, _ = hf_model_and_config(tmp_path, arch, tie, overrides)
    pairs = list(base_name_pairs(cfg, all_biases=True))
    hf_names = [n for p in pairs for n in p.hf]
    trt_names = [p.trtllm for p in pairs]
    assert len(set(hf_names)) == len(hf_names)
    assert len(set(trt_names)) == len(trt_names)
    # every row is used, once per layer when it is per-layer
    n = cfg.num_hidden_layers
    per_row = sum((n if "{}" in r.trtllm else 1) * (2 if r.bias else 1) for r in BASE_NAME_TABLE)
    assert len(pairs) == per_row


def test_a_missing_tensor_is_named(tmp_path):
    cfg, hf = hf_model_and_config(tmp_path, "llama", False, {})
    del hf["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(
        RedrafterError, match=r"tiny: missing tensor model\.layers\.1\.self_attn\.k_proj\.weight"
    ):
        hf_to_trtllm(cfg, hf, "tiny")
    cfg, hf = hf_model_and_config(tmp_path, "llama", False, {})
    del hf[LM_HEAD]
    with pytest.raises(RedrafterError, match="tiny: missing lm_head.weight"):
        hf_to_trtllm(cfg, hf, "tiny")


def test_per_layer_rows_use_the_layer_prefixes():
    # fp8 derives its per-layer linear names by stripping these prefixes
    for row in BASE_NAME_TABLE:
        if "{}" in row.trtllm:
            assert row.trtllm.startswith(TRTLLM_LAYER) and all(
                h.startswith(HF_LAYER) for h in row.hf
            ), row
