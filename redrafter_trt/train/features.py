"""Frozen-base features, computed once per data set and cached: the base model is never run
inside the training loop.

For the concatenation of all examples (a flat stream of ``N`` tokens, no padding):

- ``tokens`` [N] int64, ``targets`` [N] bool (token is a training target),
- ``seq_end`` [N] int64: exclusive end of the token's own sequence in the stream,
- ``hidden`` [N, H] (stored float16, used float32): the base hidden state after the final norm,
  i.e. the drafting context ``c`` at that position,
- ``topk_values`` [N, K] float32 / ``topk_ids`` [N, K] int64: the base's K largest next-token
  logits at that position (the distillation teacher), when K > 0.

The base forward runs over length-bucketed batches (examples sorted by length, batches filled up
to a token budget), so little compute goes to padding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import native
from ..errors import RedrafterError, require
from ..models.base import BaseModel
from ..models.hub import cache_root
from ..models.io import atomic_output_dir, load_state_dict_file, save_safetensors
from .config import FEATURE_BATCH_TOKENS
from .data import Example, examples_fingerprint

FEATURES_FILE = "features.safetensors"
FEATURES_META = "features.json"
FORMAT_VERSION = 1


@dataclass
class Features:
    tokens: torch.Tensor  # [N] int64
    targets: torch.Tensor  # [N] bool
    seq_end: torch.Tensor  # [N] int64
    hidden: torch.Tensor  # [N, H] float16/float32
    topk_values: torch.Tensor  # [N, K] float32 (K may be 0)
    topk_ids: torch.Tensor  # [N, K] int64
    seq_starts: torch.Tensor  # [S] int64, start of each sequence

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.seq_starts.shape[0])

    @property
    def teacher_topk(self) -> int:
        return int(self.topk_ids.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokens,
            "targets": self.targets.to(torch.uint8),
            "seq_end": self.seq_end,
            "hidden": self.hidden,
            "topk_values": self.topk_values.to(torch.float16),
            "topk_ids": self.topk_ids.to(torch.int32),
            "seq_starts": self.seq_starts,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], where: str) -> Features:
        missing = [
            k
            for k in (
                "tokens",
                "targets",
                "seq_end",
                "hidden",
                "topk_values",
                "topk_ids",
                "seq_starts",
            )
            if k not in t
        ]
        require(not missing, f"{where}: feature file lacks {missing}; delete it to recompute")
        return cls(
            tokens=t["tokens"].to(torch.int64),
            targets=t["targets"].to(torch.bool),
            seq_end=t["seq_end"].to(torch.int64),
            hidden=t["hidden"],
            topk_values=t["topk_values"].to(torch.float32),
            topk_ids=t["topk_ids"].to(torch.int64),
            seq_starts=t["seq_starts"].to(torch.int64),
        )


def length_buckets(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group example indices (sorted by length) into batches whose padded size
    ``len(batch) * longest`` stays within ``max_batch_tokens`` (a lone longer example is its own
    batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def base_forward(base: BaseModel, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Final-norm hidden states [B, T, H] of a batch of right-padded sequences (causal, fresh cache)."""
    dev = base.lm_head.weight_device
    b, t = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros((b, t), dtype=torch.int64, device=dev)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(list(s), dtype=torch.int64)
    ar = torch.arange(t, device=dev)
    cache = base.new_cache(b, t)
    causal = (ar[None, :] <= ar[:, None])[None].expand(b, t, t)
    split = native.torch_ops_on_one_thread() if base.native_linear else contextlib.nullcontext()
    with split:
        return base(
            ids,
            ar[None].expand(b, t),
            cache,
            torch.arange(b, device=dev),
            torch.zeros(b, dtype=torch.int64, device=dev),
            causal,
        )


@torch.no_grad()
def compute_features(
    base: BaseModel,
    examples: Sequence[Example],
    teacher_topk: int = 32,
    max_batch_tokens: int = FEATURE_BATCH_TOKENS,
    hidden_dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> Features:
    """Run the frozen base once over every example; see the module docstring for the layout."""
    require(len(examples) > 0, "no examples to compute features for")
    lengths = [len(e.ids) for e in examples]
    starts = torch.tensor([0] + lengths[:-1], dtype=torch.int64).cumsum(0)
    n = sum(lengths)
    h, v = base.config.hidden_size, base.config.vocab_size
    k = min(teacher_topk, v)
    hidden = torch.empty((n, h), dtype=hidden_dtype)
    topv = torch.empty((n, k), dtype=torch.float32)
    topi = torch.empty((n, k), dtype=torch.int64)
    from tqdm import tqdm

    bar = tqdm(total=n, unit="tok", desc="base features", disable=not progress, file=sys.stderr)
    for batch in length_buckets(lengths, max_batch_tokens):
        out = base_forward(base, [examples[i].ids for i in batch])  # [B, T, H]
        for j, i in enumerate(batch):
            s, l = int(starts[i]), lengths[i]
            hs = out[j, :l]
            hidden[s : s + l] = hs.to("cpu", hidden_dtype)
            if k:
                for c in range(0, l, 512):  # bound the [rows, V] logits buffer
                    vals, idx = base.logits(hs[c : c + 512]).float().topk(k, dim=-1)
                    topv[s + c : s + c + len(vals)] = vals.cpu()
                    topi[s + c : s + c + len(vals)] = idx.cpu()
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    tokens = torch.tensor([t for e in examples for t in e.ids], dtype=torch.int64)
    targets = torch.tensor([bool(t) for e in examples for t in e.targets], dtype=torch.bool)
    seq_end = torch.repeat_interleave(starts + torch.tensor(lengths), torch.tensor(lengths))
    require(
        int(tokens.max()) < v and int(tokens.min()) >= 0,
        f"data has token ids outside the base vocabulary [0, {v}); was it made for another model?",
    )
    return Features(tokens, targets, seq_end, hidden, topv, topi, starts)


def concat_features(parts: Sequence[Features]) -> Features:
    """One stream from several (per-source) feature sets."""
    if len(parts) == 1:
        return parts[0]
    offsets, total = [], 0
    for f in parts:
        offsets.append(total)
        total += f.num_tokens
    k = min(f.teacher_topk for f in parts)
    return Features(
        tokens=torch.cat([f.tokens for f in parts]),
        targets=torch.cat([f.targets for f in parts]),
        seq_end=torch.cat([f.seq_end + o for f, o in zip(parts, offsets)]),
        hidden=torch.cat([f.hidden for f in parts]),
        topk_values=torch.cat([f.topk_values[:, :k] for f in parts]),
        topk_ids=torch.cat([f.topk_ids[:, :k] for f in parts]),
        seq_starts=torch.cat([f.seq_starts + o for f, o in zip(parts, offsets)]),
    )


def features_key(
    model_fp: str, examples: Sequence[Example], teacher_topk: int, hidden_dtype: torch.dtype
) -> str:
    h = hashlib.sha256(
        f"{FORMAT_VERSION}:{model_fp}:{examples_fingerprint(examples)}:{teacher_topk}:"
        f"{hidden_dtype}".encode()
    )
    return h.hexdigest()[:16]


def cached_features(
    base: BaseModel | Callable[[], BaseModel],
    examples: Sequence[Example],
    model_fp: str,
    teacher_topk: int,
    cache_dir: str | os.PathLike | None = None,
    max_batch_tokens: int = FEATURE_BATCH_TOKENS,
    hidden_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Features, Path, float]:
    """Features from the cache, computing and storing them on a miss.

    ``base`` may be a function that returns the model: it is called only on a miss (a copy of
    the base made for the features, say, is then not built when every file is cached).

    Returns (features, cache path, seconds spent computing (0 on a hit)).
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    key = features_key(model_fp, examples, teacher_topk, hidden_dtype)
    root = Path(cache_dir) if cache_dir else cache_root() / "train_features"
    path = root / key
    if (path / FEATURES_FILE).is_file():
        try:
            return (
                Features.from_tensors(load_state_dict_file(path / FEATURES_FILE), str(path)),
                path,
                0.0,
            )
        except RedrafterError as e:
            log(f"[train] cached features unreadable ({e}); recomputing")
    if not isinstance(base, BaseModel):
        base = base()
    t0 = time.perf_counter()
    feats = compute_features(base, examples, teacher_topk, max_batch_tokens, hidden_dtype, progress)
    secs = time.perf_counter() - t0
    feats = Features.from_tensors(feats.tensors(), str(path))  # exactly what a cache hit reads
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_safetensors(feats.tensors(), tmp / FEATURES_FILE)
        (tmp / FEATURES_META).write_text(
            json.dumps(
                {
                    "format_version": FORMAT_VERSION,
                    "num_tokens": feats.num_tokens,
                    "num_sequences": feats.num_sequences,
                    "teacher_topk": teacher_topk,
                    "seconds": secs,
                    "tokens_per_s": feats.num_tokens / max(secs, 1e-9),
                },
                indent=2,
            )
        )
    log(
        f"[train] base features for {feats.num_tokens} tokens in {secs:.0f} s "
        f"({feats.num_tokens / max(secs, 1e-9):.0f} tok/s), cached at {path}"
    )
    return feats, path, secs
