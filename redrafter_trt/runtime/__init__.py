"""The runtime: engine directories built (:mod:`.engine`, ``redrafter-build``) and opened
(:mod:`.loader`, the one place that picks a backend), and the runtime loop (:mod:`.scheduler`,
:mod:`.generator`, :mod:`.adaptive`), written once against the step contract."""

from .generator import GenerationResult, GenerationStats, Generator, StreamEvent
from .scheduler import QueueFull, Request, SamplingParams, Scheduler, SchedulerClosed

__all__ = [
    "Generator",
    "GenerationResult",
    "GenerationStats",
    "StreamEvent",
    "Scheduler",
    "SamplingParams",
    "Request",
    "QueueFull",
    "SchedulerClosed",
]
