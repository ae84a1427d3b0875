"""Judge a trained head the way it will be used: tokens per step through the runtime.

Runs the project's own ``Generator`` over a ``TorchBackend`` (base + head, W beams, D draft
steps) on a prompt set rendered with the chat template, greedy, and reports tokens per step
(``GenerationStats.tokens_per_step``), the accepted-length histogram and the wall time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..models.drafter import load_drafter, validate_against_base
from .data import load_base_tokenizer, render_prompt
from .frozen_base import eos_ids, load_frozen_base


def runtime_tokens_per_step(
    model_dir: str | os.PathLike,
    drafter_dir: str | os.PathLike,
    prompts: Sequence[str],
    *,
    num_beams: int = 4,
    draft_len: int = 4,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    chat_template: bool = True,
    plain_check: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy speculative generation over ``prompts``; returns the measured statistics.

    With ``plain_check`` the prompts are also decoded without speculation and the outputs are
    compared token for token (they must be identical).
    """
    from ..backends.torch_backend import TorchBackend
    from ..runtime.generator import Generator

    base = load_frozen_base(model_dir, device)
    head = load_drafter(drafter_dir, base_lm_head=base.lm_head.weight)
    validate_against_base(
        head.config,
        base.config.hidden_size,
        base.config.vocab_size,
        tuple(base.embedding.weight.shape),
        f"--drafter_model_dir {drafter_dir}",
    )
    tok = load_base_tokenizer(model_dir)
    ids = [render_prompt(tok, p, chat_template) for p in prompts]
    backend = TorchBackend(
        base,
        head.to(device),
        num_beams,
        draft_len,
        max_batch_size=batch_size,
        max_input_len=max(len(x) for x in ids),
        max_seq_len=max(len(x) for x in ids) + max_new_tokens + 1,
    )
    gen = Generator(backend, tokenizer=tok, eos_token_ids=eos_ids(base, tok))
    hist = [0] * (draft_len + 2)
    per_prompt: list[dict[str, int]] = []
    tokens = steps = calls = 0
    phases: dict[str, float] = {}
    same = True
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(
        total=len(ids), unit="prompt", desc="runtime eval", disable=not progress, file=sys.stderr
    )
    with torch.inference_mode():
        for lo in range(0, len(ids), batch_size):
            chunk = ids[lo : lo + batch_size]
            res = gen.generate(chunk, max_new_tokens=max_new_tokens, speculative=True)
            st = gen.last_stats
            tokens += st.generated_tokens
            steps += st.row_steps
            calls += st.num_steps
            for k, v in st.step_timings.items():
                phases[k] = phases.get(k, 0.0) + v
            for r in res:
                for a in r.accepted_per_step[1:]:
                    hist[min(a, draft_len + 1)] += 1
                # as in the totals: the tokens the steps after the prompt's own call added
                per_prompt.append(
                    {"tokens": sum(r.accepted_per_step[1:]), "steps": len(r.accepted_per_step) - 1}
                )
            if plain_check:
                plain = gen.generate(chunk, max_new_tokens=max_new_tokens, speculative=False)
                same &= all(p.token_ids == r.token_ids for p, r in zip(plain, res))
            bar.update(len(chunk))
            bar.set_postfix(tokens_per_step=f"{tokens / max(steps, 1):.3f}")
    bar.close()
    out = {
        "prompts": len(ids),
        "num_beams": num_beams,
        "draft_len": draft_len,
        "max_new_tokens": max_new_tokens,
        "tokens_per_step": tokens / max(steps, 1),
        "generated_tokens": tokens,
        "steps": steps,
        "tokens_per_step_histogram": {str(k): v for k, v in enumerate(hist) if k},
        # one entry per prompt, in the order given (its tokens over its steps is its tokens/step)
        "per_prompt": per_prompt,
        # the speculative generation's time per phase (draft = the head's beam search; the
        # prompts' calls included) over its generation calls of up to batch_size rows
        "ms_per_call": {k: 1e3 * v / max(calls, 1) for k, v in sorted(phases.items())},
        "wall_s": time.perf_counter() - t0,
    }
    if plain_check:
        out["identical_to_plain"] = same
    return out
