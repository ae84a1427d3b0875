"""The outside baseline: transformers' own ``generate`` on the engine's base weights.

The Hugging Face model is rebuilt from the weights the engine runs (TensorRT-LLM names ->
Hugging Face names with :func:`~redrafter_trt.formats.names.trtllm_to_hf`), so it is the same model
at the same dtype, not a separate download. Prompts are left-padded into one batch with an
attention mask; end-of-sequence stopping is switched off so every row generates exactly
``max_new_tokens`` tokens, the same lengths the runtime produces with ``ignore_eos=True``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import RedrafterError, require
from ..formats.hf import hf_config_dict
from ..formats.names import trtllm_to_hf


def hf_model_from_base(base: Any) -> Any:
    """A transformers ``*ForCausalLM`` with the weights of ``base`` (a :class:`BaseModel`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = base.config
    p = base.lm_head.weight
    conf = AutoConfig.for_model(**hf_config_dict(cfg))
    model = AutoModelForCausalLM.from_config(conf, dtype=p.dtype)
    sd = trtllm_to_hf(cfg, {k: v for k, v in base.state_dict().items()})
    res = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    bad = (set(res.missing_keys) - allowed_missing) | set(res.unexpected_keys)
    require(
        not bad,
        f"transformers baseline: weights do not fit {type(model).__name__}: "
        f"missing {sorted(set(res.missing_keys) - allowed_missing)[:5]}, "
        f"unexpected {sorted(res.unexpected_keys)[:5]}",
    )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = None  # fixed lengths; see generate_fixed_length
    return model.to(p.device).eval()


def hf_model_from_dir(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> Any:
    """A transformers model from a Hugging Face directory (for engines without torch weights)."""
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    require(path.is_dir(), f"--hf_model_dir {path}: not a directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except Exception as e:
        raise RedrafterError(f"--hf_model_dir {path}: transformers cannot load it ({e})") from e
    model.generation_config.eos_token_id = None
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers types to() oddly


def pad_left(
    prompts: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id prompts: (input_ids [B, T] int64, attention_mask [B, T] int64)."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), t), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.tensor(list(p), dtype=torch.int64)
        mask[i, t - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def generate_fixed_length(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[list[list[int]], float]:
    """One batched ``model.generate`` call; returns (new token ids per prompt, wall seconds).

    Greedy when ``temperature == 0``, else sampling with the same temperature / top-k / top-p.
    Every row gets exactly ``max_new_tokens`` tokens (no end-of-sequence stop); raises if not.
    """
    from transformers import GenerationConfig

    ids, mask = pad_left(prompts)
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    sample = temperature > 0
    gc = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        eos_token_id=None,
        pad_token_id=0,
        num_beams=1,
        use_cache=True,
        **(dict(temperature=temperature, top_k=top_k or None, top_p=top_p) if sample else {}),
    )
    if sample:
        torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    new = out[:, ids.shape[1] :].tolist()
    lengths = {len(r) for r in new}
    require(
        lengths == {max_new_tokens},
        f"transformers baseline produced {sorted(lengths)} new tokens per row, expected "
        f"{max_new_tokens}; the lengths must match the runtime's to compare speeds",
    )
    return new, wall
