"""Adaptive speculation: per step, the beams and depth to draft (down to none, plain decoding).

An engine is built for W x D maxima. :class:`AdaptivePolicy` picks ``(num_beams, num_draft_steps)``
for the next tree from

- the batch size,
- a :class:`CostModel` of this machine and engine: ``t(n)``, the time of one base forward over
  ``n`` new tokens in one call (``n = batch x tree tokens``), and the time of one draft step over
  ``n`` beam rows; measured once by :func:`measure_cost_model` (the backend times its own
  steps and names the engine facts the times depend on: the contract's
  :class:`~redrafter_trt.contract.Measurable`) and stored in the engine directory
  (:data:`COST_MODEL_FILE`), re-measured by ``redrafter-bench --calibrate``; a stored model
  from another machine or engine shape is detected (:meth:`CostModel.check`),
- a running estimate of the head's acceptance: for each beam count, the probability that at
  least j draft tokens are accepted (j = 1..D), an exponential moving average over observed steps.

The expected tokens a step adds with w beams and depth d is ``1 + sum_{j<=d} P_w(accepted >= j)``
(one token always); its cost ``t(b (1 + w d)) + d draft(b w)``; plain costs ``t(b)``. The policy
speculates only when the predicted speed-up over plain exceeds ``1 + margin``; so at large batches,
where verification costs grow with the tree, it falls back to plain decoding. Greedy output is
the same for every choice (each shape is exact), so the choice may change on every step.

Use: ``w, d = policy.choose(batch_size)`` before a step, ``policy.observe(w, d, accepted)`` with
the accepted draft tokens per row of the step that verified that tree.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from .. import native
from ..contract import Backend, Measurable
from ..errors import RedrafterError, require

#: Where an engine directory keeps its measured cost model.
COST_MODEL_FILE = "cost_model.json"
COST_MODEL_SCHEMA = "redrafter-cost-model/1"
#: Token counts per call the cost model measures (interpolated in between, linear beyond).
TOKEN_POINTS = (1, 2, 4, 8, 17, 33, 65)
#: Tokens already in the KV cache when :func:`measure_cost_model` times a forward (a prompt's worth).
CACHED_TOKENS = 300


def machine_fingerprint(threads: int | None = None) -> dict[str, Any]:
    """What a cost model's timings depend on besides the engine: CPU model, cores, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads or native.linear_threads(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def _interp(points: dict[int, float], n: float) -> float:
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]] * max(n, 0) / xs[0] if n < xs[0] else points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return points[a] + (points[b] - points[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]  # linear beyond the last point
    return points[b] + (points[b] - points[a]) * (n - b) / (b - a)


@dataclass
class CostModel:
    """Measured step costs (seconds) of one engine on one machine.

    verify: {tokens in one base call: seconds}; draft: {beam rows: seconds per draft step};
    engine: the engine's shape and dtype; machine: :func:`machine_fingerprint`.
    """

    verify: dict[int, float]
    draft: dict[int, float]
    engine: dict[str, Any]
    machine: dict[str, Any]
    measured_at: str = ""
    load_average: float | None = None

    def t(self, tokens: float) -> float:
        """Base forward over ``tokens`` new tokens in one call."""
        return _interp(self.verify, tokens)

    def draft_step(self, rows: float) -> float:
        return _interp(self.draft, rows)

    def step_cost(self, batch: int, num_beams: int, num_draft_steps: int) -> float:
        """Predicted seconds of one step that verifies a (w, d) tree and drafts the next alike."""
        if num_draft_steps == 0:
            return self.t(batch)
        k = 1 + num_beams * num_draft_steps  # tree tokens at most (shared prefixes pack smaller)
        return self.t(batch * k) + num_draft_steps * self.draft_step(batch * num_beams)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["verify"] = {str(k): v for k, v in self.verify.items()}
        d["draft"] = {str(k): v for k, v in self.draft.items()}
        return {"schema": COST_MODEL_SCHEMA, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "cost model") -> CostModel:
        require(
            isinstance(d, dict) and d.get("schema") == COST_MODEL_SCHEMA,
            f"{where}: not a {COST_MODEL_SCHEMA} document",
        )
        try:
            verify = {int(k): float(v) for k, v in d["verify"].items()}
            draft = {int(k): float(v) for k, v in d["draft"].items()}
            engine, machine = dict(d["engine"]), dict(d["machine"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RedrafterError(f"{where}: malformed ({e})") from None
        require(
            len(verify) >= 2
            and len(draft) >= 2
            and all(v > 0 for v in (*verify.values(), *draft.values())),
            f"{where}: needs >= 2 positive timings in verify and draft",
        )
        return cls(
            verify, draft, engine, machine, str(d.get("measured_at", "")), d.get("load_average")
        )

    def check(self, engine: dict[str, Any], machine: dict[str, Any]) -> list[str]:
        """Why this model does not describe ``engine`` on ``machine`` (empty list: it does)."""
        why = [
            f"engine {k}: stored {self.engine.get(k)!r}, now {v!r}"
            for k, v in engine.items()
            if self.engine.get(k) != v
        ]
        why += [
            f"machine {k}: stored {self.machine.get(k)!r}, now {v!r}"
            for k, v in machine.items()
            if k != "torch" and self.machine.get(k) != v
        ]
        return why


#: Beam rows per draft step the cost model measures.
DRAFT_ROWS = (1, 2, 4, 8, 16, 32, 64)


def measure_cost_model(
    backend: Measurable,
    cached_tokens: int = CACHED_TOKENS,
    repeats: int = 5,
    token_points: Sequence[int] = TOKEN_POINTS,
    log=None,
) -> CostModel:
    """The cost model of ``backend`` on this machine: its base forward over ``n`` new tokens
    (one row, ``cached_tokens`` already cached; median of ``repeats``) and one draft step over
    ``n`` beam rows, timed by the backend itself
    (:meth:`~redrafter_trt.contract.Measurable.measure_step_costs`). Minutes on a slow CPU for
    large models; progress through ``log``."""
    verify, draft = backend.measure_step_costs(
        token_points, DRAFT_ROWS, cached_tokens, repeats, log=log
    )
    return CostModel(
        verify,
        draft,
        backend.engine_signature(),
        machine_fingerprint(),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        os.getloadavg()[0],
    )


#: schema of a cost-model file holding one model per machine and engine configuration
COST_MODELS_SCHEMA = "redrafter-cost-models/2"
#: where models are kept for engine directories this user cannot write
CACHE_ENV = "REDRAFTER_CACHE"


def _model_key(model: CostModel) -> str:
    machine = {k: v for k, v in model.machine.items() if k != "torch"}
    return json.dumps([model.engine, machine], sort_keys=True, default=str)


def user_cost_model_path(engine_dir: str | os.PathLike) -> Path:
    """The user-cache file that holds the cost models of an engine directory this user cannot
    write: ``$REDRAFTER_CACHE`` (else ``$XDG_CACHE_HOME/redrafter_trt``, else
    ``~/.cache/redrafter_trt``) ``/cost_models/<hash of the engine's path and config>.json``."""
    import hashlib

    engine_dir = Path(engine_dir).resolve()
    h = hashlib.sha256(str(engine_dir).encode())
    try:
        h.update((engine_dir / "config.json").read_bytes())
    except OSError:
        pass
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "redrafter_trt"
    )
    return Path(root) / "cost_models" / f"{h.hexdigest()[:24]}.json"


def read_cost_models(path: Path) -> list[CostModel]:
    """Every model in a cost-model file (one model, or a list of them); [] when it is absent."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RedrafterError(
            f"{path}: not valid JSON ({e}); delete it or re-measure with redrafter-bench --calibrate"
        ) from None
    if isinstance(doc, dict) and doc.get("schema") == COST_MODELS_SCHEMA:
        models = doc.get("models")
        require(isinstance(models, list), f"{path}: 'models' must be a list")
        return [CostModel.from_json(m, f"{path} (model {i})") for i, m in enumerate(models)]
    return [CostModel.from_json(doc, str(path))]


def save_cost_model(
    model: CostModel, engine_dir: str | os.PathLike, path: Path | None = None
) -> Path:
    """Keep ``model`` in ``engine_dir/cost_model.json`` (or ``path``) beside the models stored
    for other machines, thread counts or engine settings; one for the same ones is replaced.
    Written atomically."""
    path = Path(path) if path is not None else Path(engine_dir) / COST_MODEL_FILE
    try:
        kept = [m for m in read_cost_models(path) if _model_key(m) != _model_key(model)]
    except RedrafterError:
        kept = []  # an unreadable file is replaced
    doc = {"schema": COST_MODELS_SCHEMA, "models": [m.to_json() for m in (*kept, model)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
    return path


def load_cost_model(
    engine_dir: str | os.PathLike, backend: Measurable | None = None, path: Path | None = None
) -> CostModel | None:
    """The stored cost model (None if there is none); with ``backend``, the one measured for
    this machine, thread count and engine, or a :class:`RedrafterError` naming the file and
    saying how every stored one differs."""
    path = Path(path) if path is not None else Path(engine_dir) / COST_MODEL_FILE
    models = read_cost_models(path)
    if not models:
        return None
    if backend is None:
        return models[-1]
    engine, machine = backend.engine_signature(), machine_fingerprint()
    whys = []
    for m in models:
        why = m.check(engine, machine)
        if not why:
            return m
        whys.append("; ".join(why))
    raise RedrafterError(
        f"{path} was measured for another machine or engine ({' | '.join(whys)}); "
        "re-measure with redrafter-bench --calibrate"
    )


@dataclass
class AdaptivePolicy:
    """Chooses (num_beams, num_draft_steps) per step; see the module docstring.

    Args:
        cost: the machine's :class:`CostModel`; max_beams, max_draft_steps: the engine's W, D.
        prior: initial P(accepted >= j) for j = 1..D with max_beams (default 0.6^j).
        margin: speculate only when the predicted speed-up exceeds 1 + margin.
        decay: weight of a new observation in the running estimate.
        probe_every: after this many plain steps in a row, one speculative step refreshes the
            acceptance estimate (0 = never).
    """

    cost: CostModel
    max_beams: int
    max_draft_steps: int
    prior: Sequence[float] | None = None
    margin: float = 0.05
    decay: float = 0.05
    probe_every: int = 64
    survival: dict[int, list[float]] = field(default_factory=dict)
    _plain_run: int = 0

    def __post_init__(self):
        require(self.max_beams >= 1 and self.max_draft_steps >= 1, "policy needs W >= 1 and D >= 1")
        base = (
            list(self.prior)
            if self.prior is not None
            else [0.6**j for j in range(1, self.max_draft_steps + 1)]
        )
        require(
            len(base) == self.max_draft_steps,
            f"prior needs {self.max_draft_steps} values, got {len(base)}",
        )
        for w in self.beam_choices():
            # fewer beams accept less: best-of-w of independent-ish beams, from the W prior
            self.survival.setdefault(
                w, [1 - (1 - p) ** (w / self.max_beams) if p < 1 else 1.0 for p in base]
            )

    def beam_choices(self) -> list[int]:
        return sorted({1, max(1, self.max_beams // 2), self.max_beams})

    def candidates(self) -> list[tuple[int, int]]:
        """Every shape the policy can pick; (1, 0) is plain decoding."""
        return [(1, 0)] + [
            (w, d) for w in self.beam_choices() for d in range(1, self.max_draft_steps + 1)
        ]

    def expected_tokens(self, num_beams: int, num_draft_steps: int) -> float:
        return 1.0 + sum(self.survival[num_beams][:num_draft_steps])

    def predicted_speedup(self, batch: int, num_beams: int, num_draft_steps: int) -> float:
        plain = self.cost.step_cost(batch, 1, 0)
        return (
            self.expected_tokens(num_beams, num_draft_steps)
            * plain
            / self.cost.step_cost(batch, num_beams, num_draft_steps)
        )

    def best(self, batch: int) -> tuple[tuple[int, int], float]:
        """The speculative shape with the highest predicted speed-up at ``batch``, and that speed-up."""
        shapes = [c for c in self.candidates() if c[1] > 0]
        s = max(shapes, key=lambda c: self.predicted_speedup(batch, *c))
        return s, self.predicted_speedup(batch, *s)

    def choose(self, batch_size: int) -> tuple[int, int]:
        """(num_beams, num_draft_steps) for the tree drafted this step; (1, 0) = plain."""
        shape, gain = self.best(batch_size)
        if gain > 1 + self.margin:
            self._plain_run = 0
            return shape
        self._plain_run += 1
        if self.probe_every and self._plain_run >= self.probe_every:
            self._plain_run = 0
            return shape
        return (1, 0)

    def observe(self, num_beams: int, num_draft_steps: int, accepted: Sequence[int]) -> None:
        """Accepted draft tokens per row of a step whose tree was drafted as (w, d)."""
        if num_draft_steps == 0 or not accepted or num_beams not in self.survival:
            return
        s = self.survival[num_beams]
        for j in range(1, num_draft_steps + 1):
            frac = sum(1 for a in accepted if a >= j) / len(accepted)
            s[j - 1] = (1 - self.decay) * s[j - 1] + self.decay * frac


#: ``mode`` values of :func:`stored_policy` (``redrafter_trt.load(adaptive=...)``).
class ShapeLog:
    """Wraps the engine's adaptive policy, counting the (beams, depth) it chooses per step."""

    def __init__(self, policy):
        self.policy = policy
        self.chosen: dict[tuple[int, int], int] = {}

    def choose(self, batch_size: int) -> tuple[int, int]:
        w, d = (int(x) for x in self.policy.choose(batch_size))
        self.chosen[(w, d)] = self.chosen.get((w, d), 0) + 1
        return w, d

    def __getattr__(self, name):  # observe() and anything else: the policy's own
        return getattr(self.policy, name)

    def counts(self) -> list[dict]:
        """[{"shape": "WxD" ("1x0" = a plain step), "steps": n}], most chosen first."""
        return [
            {"shape": f"{w}x{d}", "steps": n}
            for (w, d), n in sorted(self.chosen.items(), key=lambda kv: -kv[1])
        ]


ADAPTIVE_MODES = ("auto", "on", "off")
#: repeats of a cost model measured at load (``redrafter-bench --calibrate`` takes more)
LOAD_REPEATS = 3


def stored_policy(
    backend: Backend, engine_dir: str | os.PathLike, mode: str = "auto", log=None
) -> tuple[AdaptivePolicy | None, str]:
    """The adaptive policy for ``backend``, and a one-line note saying where its cost model
    came from (or why there is none).

    ``mode``: ``"off"`` never; ``"auto"`` (the default) and ``"on"``: the model stored for this
    machine, thread count and engine in ``engine_dir/cost_model.json`` (or, for an engine
    directory this user cannot write, in :func:`user_cost_model_path`); when none matches, one is
    measured now (seconds; progress through ``log``) and stored beside the others. Only the torch
    backend drafts a shape per step: other backends get ``None`` (``"on"`` raises).
    """
    require(mode in ADAPTIVE_MODES, f"adaptive mode {mode!r}: expected one of {ADAPTIVE_MODES}")
    if mode == "off":
        return None, "adaptive speculation off"
    if backend.name != "torch":
        require(mode != "on", f"adaptive speculation needs the torch backend, not {backend.name!r}")
        return None, f"adaptive speculation needs the torch backend ({backend.name})"
    if getattr(backend, "drafter", None) is None:
        require(mode != "on", "adaptive speculation needs an engine with a draft head")
        return None, "adaptive speculation off: the engine has no draft head"
    tb = cast(Measurable, backend)  # the torch backend with a head: it times its own steps
    engine_path = Path(engine_dir) / COST_MODEL_FILE
    user_path = user_cost_model_path(engine_dir)
    stale = []
    for path in (engine_path, user_path):
        try:
            model = load_cost_model(engine_dir, tb, path=path)
        except RedrafterError as e:
            stale.append(str(e).split(" (", 1)[0])
            continue
        if model is not None:
            return (
                AdaptivePolicy(model, tb.shape.num_beams, tb.shape.draft_len),
                f"adaptive speculation from {path} ({model.machine.get('threads')} threads)",
            )
    t0 = time.perf_counter()
    model = measure_cost_model(tb, repeats=LOAD_REPEATS, log=log)
    where = engine_path if os.access(engine_path.parent, os.W_OK) else user_path
    try:
        where = save_cost_model(model, engine_dir, path=where)
        kept = f"stored in {where}"
    except OSError as e:
        kept = f"not stored ({e})"
    why = "none stored" if not stale else "; ".join(stale)
    return (
        AdaptivePolicy(model, tb.shape.num_beams, tb.shape.draft_len),
        f"adaptive speculation from a cost model measured now for "
        f"{model.machine.get('threads')} threads in {time.perf_counter() - t0:.1f} s ({why}); {kept}",
    )
