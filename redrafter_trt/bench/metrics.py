"""Pure functions from generation results to benchmark numbers (no timing, no I/O).

Definitions (one place; the report and the tests import them):

- A *generation step* of a row is every backend call after the prompt's own call;
  ``accepted_per_step[0]`` (the prompt's call, always 1 token) is excluded everywhere.
- *Tokens per step* = tokens added by generation steps / generation steps, summed over rows:
  exactly :attr:`~redrafter_trt.runtime.generator.GenerationStats.tokens_per_step`.
- *Acceptance rate at depth k* (k = 1..D) = fraction of generation steps that accepted at least k
  draft tokens, i.e. added at least k + 1 tokens. A row's last step can be cut short by
  ``max_new_tokens``; it counts as it was emitted (as in tokens per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def generation_steps(accepted_per_step: Sequence[Sequence[int]]) -> list[int]:
    """Tokens added by each generation step, all rows pooled (prompt calls dropped)."""
    return [a for row in accepted_per_step for a in list(row)[1:]]


def tokens_per_step(accepted_per_step: Sequence[Sequence[int]]) -> float:
    """Mean tokens added per generation step, pooled over rows (0.0 when no step ran)."""
    steps = generation_steps(accepted_per_step)
    return sum(steps) / len(steps) if steps else 0.0


def tokens_per_step_histogram(
    accepted_per_step: Sequence[Sequence[int]], draft_len: int
) -> dict[str, int]:
    """Counts of generation steps by tokens added, keys ``"1"`` .. ``str(draft_len + 1)``."""
    steps = generation_steps(accepted_per_step)
    hist = {str(k): 0 for k in range(1, draft_len + 2)}
    for a in steps:
        hist[str(a)] = hist.get(str(a), 0) + 1
    return hist


def acceptance_per_depth(accepted_per_step: Sequence[Sequence[int]], draft_len: int) -> list[float]:
    """[D] fraction of generation steps that accepted >= k draft tokens, for k = 1..D."""
    steps = np.asarray(generation_steps(accepted_per_step), dtype=np.int64)
    if steps.size == 0:
        return [0.0] * draft_len
    return [float(np.mean(steps - 1 >= k)) for k in range(1, draft_len + 1)]


def spread(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Median and spread of repeated measurements: median, min, max, q1, q3 and the values."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {
            "median": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "q1": float("nan"),
            "q3": float("nan"),
            "values": [],
        }
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "median": float(med),
        "min": float(v.min()),
        "max": float(v.max()),
        "q1": float(q1),
        "q3": float(q3),
        "values": [float(x) for x in v],
    }


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where token lists differ (length included), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(
    reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]
) -> list[dict[str, int]]:
    """Sequences whose tokens differ: ``[{"sequence": i, "first_diff": pos}]`` (empty = identical)."""
    if len(reference) != len(candidate):
        raise ValueError(
            f"compare_outputs: {len(reference)} reference vs {len(candidate)} candidate sequences"
        )
    out = []
    for i, (a, b) in enumerate(zip(reference, candidate)):
        pos = first_difference(list(a), list(b))
        if pos is not None:
            out.append({"sequence": i, "first_diff": pos})
    return out
