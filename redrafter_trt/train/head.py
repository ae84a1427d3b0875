"""The draft head a run trains: its reduced draft vocabulary (``--draft_vocab_size``) and its
initial weights (random, ``--init_from`` a drafter directory, or the base's projection)."""

from __future__ import annotations

import torch

from ..errors import require
from ..models.drafter import (
    Drafter,
    DrafterConfig,
    init_drafter,
    load_drafter,
    validate_against_base,
)
from .config import TrainConfig
from .features import Features


def choose_draft_vocab(feats: Features, vocab_size: int, k: int, always: list[int]) -> torch.Tensor:
    """``--draft_vocab_size K``: the ``always`` ids (the EOS ids), then the most frequent tokens
    the base itself wrote in the data (the target tokens: self-distilled answers), ties to the
    lower id, then the lowest unused ids if the data have fewer than K distinct tokens.

    Returns: [K] int32 distinct ids in [0, V), ascending.
    """
    require(
        1 <= k <= vocab_size,
        f"--draft_vocab_size {k} must be in [1, V={vocab_size}] (the base's vocabulary)",
    )
    counts = torch.bincount(feats.tokens[feats.targets].to(torch.int64), minlength=vocab_size).to(
        torch.float64
    )
    counts[torch.tensor([t for t in always if 0 <= t < vocab_size], dtype=torch.int64)] = float(
        "inf"
    )
    # stable descending sort: equal counts keep ascending id order
    order = torch.sort(counts, descending=True, stable=True).indices[:k]
    return torch.sort(order).values.to(torch.int32)


def make_drafter(
    cfg: TrainConfig,
    hidden_size: int,
    vocab_size: int,
    base_lm_head: torch.Tensor | None = None,
    draft_vocab: torch.Tensor | None = None,
) -> Drafter:
    """The head to train: loaded (``init_from``), random, or with the base's vocabulary projection.

    ``lm_head_init="base"`` (needs ``exit_dim == H``) copies the base model's ``lm_head`` weight
    [V, H] into the head's final projection and starts ``input_proj`` as ``[I | 0]`` (the context
    half passes through) with the residual blocks near identity, so the untrained head already
    maps into the base's output space; only the small layers in front must learn the shift by
    one token per draft step. With ``freeze_lm_head`` the V x H projection is not trained, which
    on small data sets stops the head from memorising through its largest matrix. With
    ``draft_vocab`` [K] the projection has K rows (the base's rows of those ids with ``base``).
    """
    if cfg.init_from:
        d = load_drafter(cfg.init_from, base_lm_head=base_lm_head)
        validate_against_base(
            d.config,
            hidden_size,
            vocab_size,
            (vocab_size, hidden_size),
            f"--init_from {cfg.init_from}",
        )
        d = d.float()
    else:
        exit_dim = cfg.exit_dim or 2 * hidden_size
        if cfg.lm_head_init == "base":
            require(
                exit_dim == hidden_size,
                f"--lm_head_init base copies the base's [V, H] projection, so --exit_dim must be the "
                f"base hidden size {hidden_size} (got {exit_dim})",
            )
            require(
                base_lm_head is not None and tuple(base_lm_head.shape) == (vocab_size, hidden_size),
                f"--lm_head_init base: the base lm_head has shape "
                f"{None if base_lm_head is None else tuple(base_lm_head.shape)}, expected "
                f"{(vocab_size, hidden_size)}",
            )
        dcfg = DrafterConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            exit_dim=exit_dim,
            num_draft_layers=cfg.num_draft_layers,
            rnn=cfg.rnn,
            draft_vocab_size=None if draft_vocab is None else int(draft_vocab.numel()),
        )
        d = init_drafter(dcfg, seed=cfg.seed, draft_vocab=draft_vocab)
        if cfg.lm_head_init == "base":
            rows = base_lm_head.detach().float()
            if draft_vocab is not None:
                rows = rows[draft_vocab.to(rows.device, torch.int64)]
            with torch.no_grad():
                d.projection.weight.copy_(rows)
                proj = d.input_proj.weight  # [H, 2H]
                proj[:, :hidden_size] += torch.eye(hidden_size)
    if cfg.freeze_lm_head:
        d.projection.weight.requires_grad_(False)
    return d
