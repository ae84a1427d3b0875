"""redrafter_trt: ReDrafter (Recurrent Drafter) speculative decoding, from PyTorch to TensorRT-LLM.

Stages: checkpoint (:mod:`.checkpoint`) -> build (:mod:`.engine`) -> engine step
(:mod:`.backends`, contract in :mod:`.contract`) -> runtime loop (:mod:`.runtime`).
"""

__version__ = "0.1.0"


def load(engine_dir, device=None, dtype=None, proposer=None, adaptive="auto"):
    """Open an engine directory; returns a :class:`~redrafter_trt.runtime.Generator`
    (``adaptive``: see :func:`redrafter_trt.engine.load`)."""
    from .engine import load as _load

    return _load(engine_dir, device=device, dtype=dtype, proposer=proposer, adaptive=adaptive)


__all__ = ["load", "__version__"]
