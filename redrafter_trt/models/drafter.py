"""The ReDrafter draft head (SPEC section 3), Apple ml-recurrent-drafter checkpoint compatible.

Directory format: ``config.json`` (``vocab_size``, ``hidden_size``, ``exit_dim``,
``num_draft_layers``, ``rnn``) and ``model.safetensors``; a ``.pt``/``.bin`` state dict is read
only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RedrafterError, require
from ..ops.beam_search import DEFAULT_WARP_K, beam_search_step
from .io import atomic_output_dir, load_state_dict_file, save_safetensors

DRAFTER_CONFIG = "config.json"
DRAFTER_WEIGHTS = "model.safetensors"


@dataclass
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    exit_dim: int
    num_draft_layers: int
    rnn: bool = True

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "exit_dim"):
            v = getattr(self, name)
            require(isinstance(v, int) and v > 0, f"drafter {name} must be a positive integer, got {v!r}")
        require(isinstance(self.num_draft_layers, int) and self.num_draft_layers >= 0,
                f"drafter num_draft_layers must be >= 0, got {self.num_draft_layers!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class Drafter(nn.Module):
    """Recurrent draft head. The base model's input embedding is passed in, never owned."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        if cfg.exit_dim != 2 * cfg.hidden_size:
            self.input_proj = nn.Linear(2 * cfg.hidden_size, cfg.exit_dim, bias=True)
        else:
            self.input_proj = None
        self.lm_head = nn.ModuleList([ResBlock(cfg.exit_dim) for _ in range(cfg.num_draft_layers)]
                                     + [nn.Linear(cfg.exit_dim, cfg.vocab_size, bias=False)])
        if cfg.rnn:
            self.rnn_u = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
            self.rnn_w = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def update_state(self, state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """``s_t = SiLU(rnn_w(E(x)) + rnn_u(s_{t-1}))`` with rnn, else ``s_{t-1} + E(x)``."""
        if self.config.rnn:
            return F.silu(self.rnn_w(token_embedding) + self.rnn_u(state))
        return state + token_embedding

    def logits(self, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft logits [..., V] from context [..., H] and state [..., H]."""
        x = torch.cat([context, state], dim=-1)
        if self.input_proj is not None:
            x = self.input_proj(x)
        for layer in self.lm_head:
            x = layer(x)
        return x

    @torch.no_grad()
    def beam_search(self, embedding: nn.Embedding, context: torch.Tensor, root: torch.Tensor,
                    num_beams: int, draft_len: int, warp_k: int = DEFAULT_WARP_K) -> torch.Tensor:
        """D-step beam search from the root token (SPEC section 4).

        Args:
            embedding: the base model's input embedding (shared).
            context: [B, H] base hidden state at the last accepted token.
            root: [B] int, g0 (the base model's own token).
            num_beams: W; draft_len: D.
        Returns:
            beams: [B, W, D+1] int32 sorted by score, best first; ``beams[:, :, 0] == root``.
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
            scores, parent, token = beam_search_step(self.logits(ctx, state), scores, warp_k)
            beams = beams[rows, parent]
            state = state[rows, parent]
            beams[:, :, d] = token
        return beams.to(torch.int32)


def init_drafter(cfg: DrafterConfig, seed: int = 0, std: float = 0.02) -> Drafter:
    """A randomly initialised head (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    d = Drafter(cfg)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return d


def validate_against_base(cfg: DrafterConfig, hidden_size: int, vocab_size: int,
                          embedding_shape: tuple[int, int], where: str) -> None:
    """The drafter must match the base: hidden size, vocab size and embedding shape."""
    require(cfg.hidden_size == hidden_size,
            f"{where}: drafter hidden_size {cfg.hidden_size} != base hidden_size {hidden_size}; "
            "the draft head must be trained for this base model")
    require(cfg.vocab_size == vocab_size,
            f"{where}: drafter vocab_size {cfg.vocab_size} != base vocab_size {vocab_size}")
    require(tuple(embedding_shape) == (vocab_size, hidden_size),
            f"{where}: base embedding shape {tuple(embedding_shape)} != "
            f"(vocab_size, hidden_size) = {(vocab_size, hidden_size)}")


def expected_drafter_shapes(cfg: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the Apple-format state dict."""
    return {k: tuple(v.shape) for k, v in Drafter(cfg).to("meta").state_dict().items()}


def read_drafter_config(path: str | os.PathLike) -> DrafterConfig:
    path = Path(path)
    cfg_file = path / DRAFTER_CONFIG
    require(cfg_file.is_file(), f"{path}: no {DRAFTER_CONFIG}; expected a drafter directory "
            f"with {DRAFTER_CONFIG} and {DRAFTER_WEIGHTS}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RedrafterError(f"{cfg_file}: not valid JSON ({e})") from e
    missing = [k for k in ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers") if k not in raw]
    require(not missing, f"{cfg_file}: missing keys {missing}")
    cfg = DrafterConfig(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                        exit_dim=raw["exit_dim"], num_draft_layers=raw["num_draft_layers"],
                        rnn=bool(raw.get("rnn", False)))
    cfg.validate()
    return cfg


def load_drafter(path: str | os.PathLike) -> Drafter:
    """Load a drafter directory (Apple format); every tensor is checked for name, shape, finiteness."""
    path = Path(path)
    cfg = read_drafter_config(path)
    candidates = [path / DRAFTER_WEIGHTS, path / "pytorch_model.bin", path / "model.pt"]
    weights = next((c for c in candidates if c.is_file()), None)
    require(weights is not None, f"{path}: no {DRAFTER_WEIGHTS} (or pytorch_model.bin / model.pt)")
    sd = load_state_dict_file(weights)
    model = Drafter(cfg)
    load_checked(model, sd, str(weights))
    return model


def load_checked(model: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Load ``sd`` into ``model`` requiring exactly its keys, shapes and finite values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    require(not missing, f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    require(not unexpected, f"{where}: unexpected tensors {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}")
    for k, v in sd.items():
        require(tuple(v.shape) == tuple(expected[k].shape),
                f"{where}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        require(v.is_floating_point(), f"{where}: tensor {k} has dtype {v.dtype}, expected a float")
        require(bool(torch.isfinite(v).all()), f"{where}: tensor {k} has non-finite values (NaN/inf)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


def save_drafter(model: Drafter, path: str | os.PathLike, overwrite: bool = False,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (nothing half-written)."""
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        (tmp / DRAFTER_CONFIG).write_text(json.dumps(
            {**model.config.to_dict(), "model_type": "recurrent_drafting_drafter"}, indent=2))
        save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                         tmp / DRAFTER_WEIGHTS)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)
