"""The draft head a run trains: its reduced draft vocabulary (``--draft_vocab_size``) and its
initial weights (random, ``--init_from`` a drafter directory, or the base's projection)."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import require
from ..models.drafter import (
    DRAFT_VOCAB,
    Drafter,
    DrafterConfig,
    init_drafter,
    load_drafter,
    load_drafter_state,
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


def load_init_head(
    path: str,
    hidden_size: int,
    vocab_size: int,
    base_lm_head: torch.Tensor | None,
    num_blocks: int | None = None,
) -> Drafter:
    """The ``--init_from`` head, checked against the base and, with ``num_blocks``
    (``--num_draft_layers``), against the blocks asked for; in float32."""
    d = load_drafter(path, base_lm_head=base_lm_head)
    validate_against_base(
        d.config, hidden_size, vocab_size, (vocab_size, hidden_size), f"--init_from {path}"
    )
    if num_blocks is not None:
        require_more_blocks(d, num_blocks, path)
    return d.float()


def make_drafter(
    cfg: TrainConfig,
    hidden_size: int,
    vocab_size: int,
    base_lm_head: torch.Tensor | None = None,
    draft_vocab: torch.Tensor | None = None,
    init: Drafter | None = None,
) -> Drafter:
    """The head to train: loaded (``init_from``), random, or with the base's vocabulary projection.

    ``init``: the ``init_from`` head when the caller has already loaded it
    (:func:`load_init_head`), so that it is not read twice.

    ``lm_head_init="base"`` (needs ``exit_dim == H``) copies the base model's ``lm_head`` weight
    [V, H] into the head's final projection and starts ``input_proj`` as ``[I | 0]`` (the context
    half passes through) with the residual blocks near identity, so the untrained head already
    maps into the base's output space; only the small layers in front must learn the shift by
    one token per draft step. With ``freeze_lm_head`` the V x H projection is not trained, which
    on small data sets stops the head from memorising through its largest matrix. With
    ``draft_vocab`` [K] the projection has K rows (the base's rows of those ids with ``base``).
    """
    if cfg.init_from:
        d = (
            init
            if init is not None
            else load_init_head(
                cfg.init_from, hidden_size, vocab_size, base_lm_head, cfg.num_draft_layers
            )
        )
        if draft_vocab is not None:
            d = with_draft_vocab(d, draft_vocab, base_lm_head, cfg.new_rows == "mapped")
        if cfg.num_draft_layers is not None and cfg.num_draft_layers != d.config.num_draft_layers:
            d = with_more_blocks(d, cfg.num_draft_layers, cfg.init_from)
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
            num_draft_layers=1 if cfg.num_draft_layers is None else cfg.num_draft_layers,
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


def head_ids(d: Drafter) -> torch.Tensor:
    """The full-vocabulary id of each row of ``d``'s projection: its draft vocabulary, or 0..V-1."""
    if d.vocab_map is not None:
        return d.vocab_map.to(torch.int64).cpu()
    return torch.arange(d.config.vocab_size, dtype=torch.int64)


def with_draft_vocab(
    d: Drafter, draft_vocab: torch.Tensor, base_lm_head: torch.Tensor | None, mapped: bool = True
) -> Drafter:
    """``d`` (an ``--init_from`` head) drafting over ``draft_vocab`` [K] instead of its own ids.

    Every weight but the projection is kept; an id the head had keeps its trained row. When
    exit_dim is the base hidden size, a new id's row is the base's row of that id carried into
    the trained head's output space by :func:`row_map` (training moves a head started from the
    base's rows far from them: the shipped head's rows have cosine 0.41 with the base's, and the
    map fitted on the other rows predicts a held-out row at cosine 0.94); with ``mapped`` False
    (``--new_rows base``) the base's row as it is. Else a zero row (logit 0 until trained)."""
    cfg = d.config
    old_ids, ids = head_ids(d), draft_vocab.to(torch.int64).cpu()
    row_of = torch.full((cfg.vocab_size,), -1, dtype=torch.int64)
    row_of[old_ids] = torch.arange(len(old_ids))
    rows = torch.zeros(len(ids), cfg.exit_dim)
    trained = d.projection.weight.detach().float().cpu()
    had = row_of[ids] >= 0
    rows[had] = trained[row_of[ids][had]]
    new_ids = ids[~had]
    if len(new_ids) and base_lm_head is not None and cfg.exit_dim == cfg.hidden_size:
        base = base_lm_head.detach().float().cpu()
        rows[~had] = base[new_ids] @ row_map(base[old_ids], trained) if mapped else base[new_ids]
    state = {k: v.detach().cpu() for k, v in d.state_dict().items()}
    state[f"lm_head.{cfg.num_draft_layers}.weight"] = rows
    state[DRAFT_VOCAB] = draft_vocab.to(torch.int32).cpu()
    new = Drafter(dataclasses.replace(cfg, draft_vocab_size=int(draft_vocab.numel())))
    load_drafter_state(new, state, "--draft_vocab_size with --init_from")
    return new


def row_map(base_rows: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    """The [H, H] linear map M that best carries the base's projection rows of a head's ids onto
    the head's trained rows (least squares, ``base_rows @ M ~ head_rows``), pulled slightly
    towards the identity so that it is defined with fewer rows than H: a head whose rows are
    still the base's gets the identity."""
    x, y = base_rows.double(), head_rows.double()
    h = x.shape[1]
    eye = torch.eye(h, dtype=torch.float64)
    lam = 1e-4 * float((x * x).sum()) / h + 1e-12
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ y + lam * eye).float()


def require_more_blocks(d: Drafter, num_blocks: int, where: str) -> None:
    """``--num_draft_layers`` with ``--init_from``: at least the head's own blocks."""
    n = d.config.num_draft_layers
    require(
        num_blocks >= n,
        f"--num_draft_layers {num_blocks}: the --init_from head {where} has {n} residual blocks; "
        f"a head can be given more blocks, not fewer",
    )


def with_more_blocks(d: Drafter, num_blocks: int, where: str) -> Drafter:
    """``d`` (an ``--init_from`` head) with ``num_blocks`` residual blocks: its own blocks kept
    first, each new one appended before the projection with zero weight and bias, so that it is
    the identity (``x + SiLU(0) = x``) and the grown head drafts exactly as ``d`` did until
    trained (SiLU's slope 1/2 at 0 passes the gradient to the new weights)."""
    n = d.config.num_draft_layers
    require_more_blocks(d, num_blocks, where)
    state = {k: v.detach().cpu() for k, v in d.state_dict().items()}
    proj = state.pop(f"lm_head.{n}.weight")
    for i in range(n, num_blocks):
        state[f"lm_head.{i}.linear.weight"] = torch.zeros(d.config.exit_dim, d.config.exit_dim)
        state[f"lm_head.{i}.linear.bias"] = torch.zeros(d.config.exit_dim)
    state[f"lm_head.{num_blocks}.weight"] = proj
    new = Drafter(dataclasses.replace(d.config, num_draft_layers=num_blocks))
    load_drafter_state(new, state, f"--num_draft_layers {num_blocks} with --init_from {where}")
    return new
