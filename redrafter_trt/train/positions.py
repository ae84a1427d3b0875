"""Training positions: the held-out split by whole sequences and the deterministic, resumable
order of micro-batches."""

from __future__ import annotations

import torch

from ..errors import require
from .config import TrainConfig
from .features import Features


class PositionSampler:
    """Deterministic micro-batches of training positions: epoch ``e`` is a permutation keyed by
    (seed, e); the state is (epoch, cursor), so a resumed run continues with the same batches."""

    def __init__(
        self, positions: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ):
        self.positions = positions
        self.batch = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.per_epoch = len(positions) // (batch_size * world)
        require(
            self.per_epoch >= 1,
            f"only {len(positions)} training positions: fewer than one batch "
            f"of {batch_size * world}; lower --batch_size or add data",
        )
        self.epoch, self.cursor = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.positions), generator=g)
        return self._perm

    def next(self) -> torch.Tensor:
        if self.cursor >= self.per_epoch:
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        g = self.batch * self.world
        lo = self.cursor * g + self.rank * self.batch
        idx = self._permutation()[lo : lo + self.batch]
        self.cursor += 1
        return self.positions[idx]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, st: dict[str, int]) -> None:
        self.epoch, self.cursor, self._perm = int(st["epoch"]), int(st["cursor"]), None


def split_positions(
    feats: Features, draft_len: int, eval_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, held-out positions): stream positions whose first draft step is valid,
    split by whole sequences (held-out sequences chosen by a seeded permutation)."""
    s = feats.num_tokens
    p = torch.arange(s)
    lab = (p + 2).clamp(max=s - 1)
    usable = (p + 2 < feats.seq_end) & feats.targets[lab]
    seq_of = torch.searchsorted(feats.seq_starts, p, right=True) - 1
    n_seq = feats.num_sequences
    n_eval = int(round(eval_fraction * n_seq))
    if eval_fraction > 0 and n_seq >= 2:
        n_eval = min(max(n_eval, 1), n_seq - 1)
    g = torch.Generator().manual_seed(seed + 7)
    held = torch.zeros(n_seq, dtype=torch.bool)
    held[torch.randperm(n_seq, generator=g)[:n_eval]] = True
    is_eval = held[seq_of]
    return p[usable & ~is_eval], p[usable & is_eval]


def train_and_eval_positions(
    feats: Features, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, held-out positions) of a run: :func:`split_positions`, the held-out
    ones cut to about ``cfg.eval_positions`` (whole sequences, in order)."""
    train_pos, eval_pos = split_positions(feats, cfg.draft_len, cfg.eval_fraction, cfg.seed)
    require(len(train_pos) > 0, "no training positions: every sequence is too short or held out")
    if cfg.eval_positions and len(eval_pos) > cfg.eval_positions:  # whole sequences, in order
        cut = int(feats.seq_end[eval_pos[cfg.eval_positions - 1]])
        eval_pos = eval_pos[eval_pos < cut]
    return train_pos, eval_pos
