"""redrafter_trt: ReDrafter (Recurrent Drafter) speculative decoding, from PyTorch to TensorRT-LLM.

The flow: checkpoint (:mod:`.formats.checkpoint`) -> build (:mod:`.runtime.engine`) -> engine
step (:mod:`.backends`, :mod:`.trtllm`; contract in :mod:`.contract`) -> runtime loop
(:mod:`.runtime`, which opens engine directories in :mod:`.runtime.loader`). Each folder is one
stage of the import order that ``tests/test_layering.py`` checks; nothing inside the package
imports this root module.
"""

from ._version import __version__


def load(
    engine_dir,
    device=None,
    dtype=None,
    proposer=None,
    adaptive="auto",
    tp_size=None,
    tp_timeout=None,
):
    """Open an engine directory; returns a :class:`~redrafter_trt.runtime.Generator`
    (``adaptive``, ``tp_size``, ``tp_timeout``: see :func:`redrafter_trt.runtime.loader.load`)."""
    from .runtime.loader import load as _load

    return _load(
        engine_dir,
        device=device,
        dtype=dtype,
        proposer=proposer,
        adaptive=adaptive,
        tp_size=tp_size,
        tp_timeout=tp_timeout,
    )


__all__ = ["load", "__version__"]
