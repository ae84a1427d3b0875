"""The runtime loop, written once against the step contract."""

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
