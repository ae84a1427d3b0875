"""The runtime loop, written once against the step contract."""

from .generator import GenerationResult, GenerationStats, Generator, StreamEvent

__all__ = ["Generator", "GenerationResult", "GenerationStats", "StreamEvent"]
