"""Loading an engine for serving: the generator, the scheduler that owns its KV slots, and the
state the routes share (:class:`~redrafter_trt.serve.app.ServeState`). Used by
``redrafter-serve`` and the serving benchmark; needs the 'serve' extra only for the state itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import require

if TYPE_CHECKING:
    from ..runtime.generator import Generator
    from .app import ServeState

#: ``--prefill_chunk`` default (prompt tokens per step) where the engine supports chunked prefill
DEFAULT_PREFILL_CHUNK = 256


def load_state(
    engine_dir: str | Path,
    *,
    device: str | None = None,
    adaptive: str = "auto",
    tp_size: int | None = None,
    tp_timeout: float | None = None,
    max_batch_size: int | None = None,
    max_seq_len: int | None = None,
    max_queue: int = 64,
    prefill_chunk: int | None = None,
    max_prefill_tokens: int | None = None,
    served_model_name: str | None = None,
    speculative: bool = True,
) -> tuple[ServeState, Generator]:
    """Load ``engine_dir`` and build the scheduler and the server's state.

    ``max_batch_size`` / ``max_seq_len`` (default: the engine's) size the KV slots; a
    ``prefill_chunk`` of None chooses :data:`DEFAULT_PREFILL_CHUNK` where the engine can continue
    a prompt's cache, else whole-prompt prefill; errors name ``redrafter-serve``'s flags."""
    from ..runtime.loader import load
    from ..runtime.scheduler import Scheduler
    from .app import ServeState

    gen = load(engine_dir, device=device, adaptive=adaptive, tp_size=tp_size, tp_timeout=tp_timeout)
    be = gen.backend
    slots = max_batch_size or be.max_batch_size
    tokens = max_seq_len or be.max_seq_len
    require(
        slots <= be.max_batch_size,
        f"--max_batch_size {slots} exceeds the engine's max_batch_size {be.max_batch_size}",
    )
    require(
        tokens <= be.max_seq_len,
        f"--max_seq_len {tokens} exceeds the engine's max_seq_len {be.max_seq_len}",
    )
    chunk = prefill_chunk
    can_chunk = bool(be.chunked_context)
    kind = getattr(be, "name", type(be).__name__)
    require(
        not chunk or can_chunk,
        f"--prefill_chunk {chunk}: the {engine_dir} engine ({kind}) cannot continue a prompt's "
        "cache in a context row (a trtllm engine needs paged context FMHA); use --prefill_chunk 0",
    )
    if chunk is None:
        chunk = DEFAULT_PREFILL_CHUNK if can_chunk else 0
    require(
        not (chunk and max_prefill_tokens),
        "--max_prefill_tokens applies to whole-prompt prefill only: pass --prefill_chunk 0 with it",
    )
    sched = Scheduler(
        be,
        gen.tokenizer,
        gen.eos_token_ids,
        max_queue=max_queue,
        max_slots=slots,
        tokens_per_slot=tokens,
        max_prefill_tokens=max_prefill_tokens,
        prefill_chunk=chunk or None,
    )
    sched.policy = gen.policy  # adaptive speculation (None: the fixed shape)
    name = served_model_name or Path(engine_dir).resolve().name
    return ServeState(sched, name, speculative=speculative), gen
