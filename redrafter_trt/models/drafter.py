"""The ReDrafter draft head (docs/design.md section 3), Apple ml-recurrent-drafter checkpoint compatible.

Directory format: ``config.json`` (``vocab_size``, ``hidden_size``, ``exit_dim``,
``num_draft_layers``, ``rnn``) and ``model.safetensors``; a ``.pt``/``.bin`` state dict is read
only with ``torch.load(weights_only=True)``.

Reduced draft vocabulary (optional, as EAGLE-3 / FR-Spec): ``config.json`` carries
``draft_vocab_size`` K and ``model.safetensors`` a ``draft_vocab`` int32 tensor [K] of distinct
full-vocabulary ids; the final projection ``lm_head.{n}.weight`` is then [K, exit_dim] and the
beam search maps its columns back to full ids. Verification reads the base's full-vocabulary
logits, so output is unchanged; a draft token outside the K ids is simply never proposed. A head
without them (Apple's format) is the K = V case.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RedrafterError, require
from ..ops.beam_search import DEFAULT_WARP_K, beam_search_step
from .base import Linear, set_native_linear
from .io import atomic_output_dir, load_state_dict_file, save_safetensors

DRAFTER_CONFIG = "config.json"
DRAFTER_WEIGHTS = "model.safetensors"
#: Name of the optional id map [K] int32 (Apple-format name; ``drafter.draft_vocab`` in checkpoints).
DRAFT_VOCAB = "draft_vocab"


@dataclass
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    exit_dim: int
    num_draft_layers: int
    rnn: bool = True
    #: K, the rows of the final projection when the head drafts over a reduced vocabulary;
    #: None = the full vocabulary (Apple's format).
    draft_vocab_size: int | None = None

    @property
    def head_vocab_size(self) -> int:
        """Columns of the draft logits: K with a draft vocabulary, else V."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "exit_dim"):
            v = getattr(self, name)
            require(
                isinstance(v, int) and v > 0,
                f"drafter {name} must be a positive integer, got {v!r}",
            )
        require(
            isinstance(self.num_draft_layers, int) and self.num_draft_layers >= 0,
            f"drafter num_draft_layers must be >= 0, got {self.num_draft_layers!r}",
        )
        k = self.draft_vocab_size
        require(
            k is None
            or (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.vocab_size),
            f"drafter draft_vocab_size must be an integer in [1, vocab_size={self.vocab_size}], got {k!r}",
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["draft_vocab_size"] is None:  # Apple's format has no such key
            del d["draft_vocab_size"]
        return d


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, dim, bias=True)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class Drafter(nn.Module):
    """Recurrent draft head. The base model's input embedding is passed in, never owned."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        if cfg.exit_dim != 2 * cfg.hidden_size:
            self.input_proj = Linear(2 * cfg.hidden_size, cfg.exit_dim, bias=True)
        else:
            self.input_proj = None
        self.lm_head = nn.ModuleList(
            [ResBlock(cfg.exit_dim) for _ in range(cfg.num_draft_layers)]
            + [Linear(cfg.exit_dim, cfg.head_vocab_size, bias=False)]
        )
        if cfg.draft_vocab_size is not None:  # full id of each projection row; set by loading
            self.register_buffer(DRAFT_VOCAB, torch.arange(cfg.draft_vocab_size, dtype=torch.int32))
        if cfg.rnn:
            self.rnn_u = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
            self.rnn_w = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    @property
    def projection(self) -> Linear:
        """The final vocabulary projection ``lm_head.{n}`` (weight [K or V, exit_dim])."""
        return cast(Linear, self.lm_head[-1])

    def use_native_linear(self, on: bool = True) -> None:
        """Run the head's linear layers on the batch-invariant CPU kernel (``on``) or torch."""
        set_native_linear(self, on)

    @property
    def native_linear(self) -> bool:
        """True when the head's linear layers run on the CPU kernel (see :meth:`use_native_linear`)."""
        return any(getattr(m, "native", False) for m in self.modules() if isinstance(m, Linear))

    def update_state(self, state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """``s_t = SiLU(rnn_w(E(x)) + rnn_u(s_{t-1}))`` with rnn, else ``s_{t-1} + E(x)``."""
        if self.config.rnn:
            return F.silu(self.rnn_w(token_embedding) + self.rnn_u(state))
        return state + token_embedding

    @property
    def vocab_map(self) -> torch.Tensor | None:
        """[K] int32 full-vocabulary id of each draft-logit column, or None (K = V, identity)."""
        return getattr(self, DRAFT_VOCAB, None)

    def set_draft_vocab(self, ids: torch.Tensor, where: str = "draft_vocab") -> None:
        """Install the id map [K] (checked: integer, K distinct ids in [0, V))."""
        require(
            self.vocab_map is not None,
            f"{where}: this head has no draft vocabulary (draft_vocab_size unset)",
        )
        check_draft_vocab(ids, self.config, where)
        with torch.no_grad():
            self.vocab_map.copy_(ids.to(torch.int32))

    def logits(self, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., K] (K = V without a draft vocabulary) from context [..., H] and
        state [..., H]; column k is full-vocabulary token ``vocab_map[k]``."""
        x = torch.cat([context, state], dim=-1)
        if self.input_proj is not None:
            x = self.input_proj(x)
        for layer in self.lm_head:
            x = layer(x)
        return x

    @torch.no_grad()
    def beam_search(
        self,
        embedding: nn.Embedding,
        context: torch.Tensor,
        root: torch.Tensor,
        num_beams: int,
        draft_len: int,
        warp_k: int = DEFAULT_WARP_K,
        step: Callable | None = None,
    ) -> torch.Tensor:
        """D-step beam search from the root token (docs/design.md section 4).

        Args:
            embedding: the base model's input embedding (shared).
            context: [B, H] base hidden state at the last accepted token.
            root: [B] int, g0 (the base model's own token).
            num_beams: W; draft_len: D.
            step: the per-depth top-W step, ``(logits [B, W, K], scores [B, W], warp_k,
                vocab_map) -> (scores, parent, token)``; default the PyTorch reference
                :func:`beam_search_step` (the CUDA backend passes the cpp/ kernel).
        Returns:
            beams: [B, W, D+1] int32 full-vocabulary ids, sorted by score, best first;
            ``beams[:, :, 0] == root``. With a draft vocabulary the search runs over its K
            columns and every drafted token is one of its ids.
        """
        b = context.shape[0]
        w, dev = num_beams, context.device
        beams = torch.empty((b, w, draft_len + 1), dtype=torch.int64, device=dev)
        beams[:, :, 0] = root.to(torch.int64)[:, None]
        scores = torch.full((b, w), float("-inf"), dtype=torch.float32, device=dev)
        scores[:, 0] = 0.0
        ctx = context[:, None, :].expand(b, w, context.shape[-1])
        state = torch.zeros_like(ctx)
        rows = torch.arange(b, device=dev)[:, None]
        for d in range(1, draft_len + 1):
            state = self.update_state(state, embedding(beams[:, :, d - 1]).to(state.dtype))
            scores, parent, token = (step or beam_search_step)(
                self.logits(ctx, state), scores, warp_k, self.vocab_map
            )
            beams = beams[rows, parent]
            state = state[rows, parent]
            beams[:, :, d] = token
        return beams.to(torch.int32)


def init_drafter(
    cfg: DrafterConfig, seed: int = 0, std: float = 0.02, draft_vocab: torch.Tensor | None = None
) -> Drafter:
    """A randomly initialised head (deterministic in ``seed``); ``draft_vocab`` [K] sets the id
    map of a head with ``cfg.draft_vocab_size`` (default: ids 0..K-1)."""
    gen = torch.Generator().manual_seed(seed)
    d = Drafter(cfg)
    if draft_vocab is not None:
        d.set_draft_vocab(draft_vocab)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return d


def validate_against_base(
    cfg: DrafterConfig,
    hidden_size: int,
    vocab_size: int,
    embedding_shape: tuple[int, ...],
    where: str,
) -> None:
    """The drafter must match the base: hidden size, vocab size and embedding shape."""
    require(
        cfg.hidden_size == hidden_size,
        f"{where}: drafter hidden_size {cfg.hidden_size} != base hidden_size {hidden_size}; "
        "the draft head must be trained for this base model",
    )
    require(
        cfg.vocab_size == vocab_size,
        f"{where}: drafter vocab_size {cfg.vocab_size} != base vocab_size {vocab_size}",
    )
    require(
        tuple(embedding_shape) == (vocab_size, hidden_size),
        f"{where}: base embedding shape {tuple(embedding_shape)} != "
        f"(vocab_size, hidden_size) = {(vocab_size, hidden_size)}",
    )


def check_draft_vocab(ids: torch.Tensor, cfg: DrafterConfig, where: str) -> None:
    """A draft vocabulary must be K = ``cfg.draft_vocab_size`` distinct integer ids in [0, V)."""
    k, v = cfg.draft_vocab_size, cfg.vocab_size
    require(
        not ids.is_floating_point() and not ids.is_complex() and ids.dtype != torch.bool,
        f"{where}: {DRAFT_VOCAB} has dtype {ids.dtype}, expected int32 token ids",
    )
    require(
        tuple(ids.shape) == (k,),
        f"{where}: {DRAFT_VOCAB} has shape {tuple(ids.shape)}, expected "
        f"({k},) (draft_vocab_size K = {k})",
    )
    lo, hi = int(ids.min()), int(ids.max())
    require(
        lo >= 0 and hi < v,
        f"{where}: {DRAFT_VOCAB} holds id {lo if lo < 0 else hi} outside the vocabulary [0, {v})",
    )
    uniq, counts = torch.unique(ids.to(torch.int64), return_counts=True)
    if uniq.numel() != k:
        raise RedrafterError(
            f"{where}: {DRAFT_VOCAB} repeats id {int(uniq[counts > 1][0])} "
            f"({k - uniq.numel()} repeated entries); every id must appear once"
        )


def load_drafter_state(
    model: Drafter, sd: dict[str, torch.Tensor], where: str, provided: Collection[str] = ()
) -> None:
    """:func:`load_checked` for a draft head, with the draft-vocabulary rules spelt out
    (``provided``: as :func:`load_checked`'s)."""
    cfg = model.config
    n = cfg.num_draft_layers
    if cfg.draft_vocab_size is None:
        require(
            DRAFT_VOCAB not in sd,
            f"{where}: has a {DRAFT_VOCAB} tensor but the config sets no "
            "draft_vocab_size; add it (the map's length K) to the config",
        )
    else:
        require(
            DRAFT_VOCAB in sd,
            f"{where}: the config sets draft_vocab_size {cfg.draft_vocab_size} but "
            f"there is no {DRAFT_VOCAB} tensor (the [K] int32 map of the head's token ids)",
        )
        check_draft_vocab(sd[DRAFT_VOCAB], cfg, where)
        proj = sd.get(f"lm_head.{n}.weight")
        require(
            proj is None or proj.shape[0] == cfg.draft_vocab_size,
            f"{where}: lm_head.{n}.weight has {None if proj is None else proj.shape[0]} rows but "
            f"draft_vocab_size K is {cfg.draft_vocab_size}; the projection must have one row per draft id",
        )
    load_checked(model, sd, where, provided)


def read_drafter_config(path: str | os.PathLike) -> DrafterConfig:
    path = Path(path)
    cfg_file = path / DRAFTER_CONFIG
    require(
        cfg_file.is_file(),
        f"{path}: no {DRAFTER_CONFIG}; expected a drafter directory "
        f"with {DRAFTER_CONFIG} and {DRAFTER_WEIGHTS}",
    )
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RedrafterError(f"{cfg_file}: not valid JSON ({e})") from e
    missing = [
        k for k in ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers") if k not in raw
    ]
    require(not missing, f"{cfg_file}: missing keys {missing}")
    cfg = DrafterConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        exit_dim=raw["exit_dim"],
        num_draft_layers=raw["num_draft_layers"],
        rnn=bool(raw.get("rnn", False)),
        draft_vocab_size=raw.get("draft_vocab_size"),
    )
    try:
        cfg.validate()
    except RedrafterError as e:
        raise RedrafterError(f"{cfg_file}: {e}") from e
    return cfg


#: ``config.json`` key of a head whose final projection is its base model's own ``lm_head`` and is
#: not stored in ``model.safetensors``; the value is :func:`projection_digest` of that base weight.
LM_HEAD_FROM_BASE = "lm_head_from_base"


def projection_digest(weight: torch.Tensor) -> str:
    """``sha256:<hex>`` of a [V, H] projection's float32 values (identifies the base it belongs to)."""
    import hashlib

    data = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_drafter(path: str | os.PathLike, base_lm_head: torch.Tensor | None = None) -> Drafter:
    """Load a drafter directory (Apple format); every tensor is checked for name, shape, finiteness.

    ``base_lm_head`` [V, H] is the base model's output projection: needed only for a head whose
    ``config.json`` has ``lm_head_from_base`` (its final projection is the base's, not stored
    twice; with a draft vocabulary, the base's rows of those ids), and checked to be that base's.
    """
    path = Path(path)
    cfg = read_drafter_config(path)
    candidates = [path / DRAFTER_WEIGHTS, path / "pytorch_model.bin", path / "model.pt"]
    weights = next((c for c in candidates if c.is_file()), None)
    require(weights is not None, f"{path}: no {DRAFTER_WEIGHTS} (or pytorch_model.bin / model.pt)")
    sd = load_state_dict_file(weights)
    shared = json.loads((path / DRAFTER_CONFIG).read_text()).get(LM_HEAD_FROM_BASE)
    if shared is not None:
        name = f"lm_head.{cfg.num_draft_layers}.weight"
        cfg_file = path / DRAFTER_CONFIG
        require(
            name not in sd,
            f"{weights}: holds {name}, but {cfg_file} says the head uses its "
            f"base model's projection ({LM_HEAD_FROM_BASE}); remove one of the two",
        )
        require(
            base_lm_head is not None,
            f"{path}: this head shares its vocabulary projection with its base model "
            f"({LM_HEAD_FROM_BASE} in {DRAFTER_CONFIG}), so it loads only together with that "
            f"base (e.g. redrafter-convert --model_dir BASE --drafter_model_dir {path})",
        )
        require(
            tuple(base_lm_head.shape) == (cfg.vocab_size, cfg.hidden_size),
            f"{path}: the base projection has shape {tuple(base_lm_head.shape)}, the head needs "
            f"{(cfg.vocab_size, cfg.hidden_size)}",
        )
        found = projection_digest(base_lm_head)
        require(
            found == shared,
            f"{path}: the head was trained on a base whose lm_head is {shared}, "
            f"but this base's is {found}: give the base model the head was trained for",
        )
        rows = base_lm_head.detach()
        if DRAFT_VOCAB in sd:
            check_draft_vocab(sd[DRAFT_VOCAB], cfg, f"{weights}: {DRAFT_VOCAB}")
            rows = rows[sd[DRAFT_VOCAB].long()]
        sd[name] = rows
    model = Drafter(cfg)
    load_drafter_state(model, sd, str(weights))
    return model


def load_checked(
    model: nn.Module, sd: dict[str, torch.Tensor], where: str, provided: Collection[str] = ()
) -> None:
    """Load ``sd`` into ``model`` requiring exactly its keys, shapes and finite values.

    ``provided``: keys of ``model`` whose values come from elsewhere (GGUF block weights, which
    the caller hands the layers next); they must not be in ``sd`` and are left as they are."""
    expected = model.state_dict()
    stray = sorted(set(provided) - set(expected))
    require(not stray, f"{where}: {stray[0] if stray else ''} is not a tensor of this model")
    twice = sorted(set(provided) & set(sd))
    require(not twice, f"{where}: {twice[0] if twice else ''} is given twice")
    missing = sorted(set(expected) - set(sd) - set(provided))
    unexpected = sorted(set(sd) - set(expected))
    require(
        not missing, f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}"
    )
    require(
        not unexpected,
        f"{where}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}",
    )
    for k, v in sd.items():
        require(
            tuple(v.shape) == tuple(expected[k].shape),
            f"{where}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}",
        )
        if not expected[k].is_floating_point():  # an index buffer (the draft vocabulary)
            require(
                not v.is_floating_point(),
                f"{where}: tensor {k} has dtype {v.dtype}, expected int32",
            )
            continue
        require(v.is_floating_point(), f"{where}: tensor {k} has dtype {v.dtype}, expected a float")
        require(
            bool(torch.isfinite(v).all()), f"{where}: tensor {k} has non-finite values (NaN/inf)"
        )
    result = model.load_state_dict(
        {k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=not provided
    )
    require(
        set(result.missing_keys) <= set(provided) and not result.unexpected_keys,
        f"{where}: tensors {sorted(set(result.missing_keys) - set(provided))[:8]} not loaded",
    )


def save_drafter(
    model: Drafter,
    path: str | os.PathLike,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (nothing half-written)."""
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        (tmp / DRAFTER_CONFIG).write_text(
            json.dumps(
                {**model.config.to_dict(), "model_type": "recurrent_drafting_drafter"}, indent=2
            )
        )
        save_safetensors(
            {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            tmp / DRAFTER_WEIGHTS,
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)
