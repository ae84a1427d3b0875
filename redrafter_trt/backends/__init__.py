"""Backends implementing the step contract (:mod:`redrafter_trt.contract`): the torch backend
(:mod:`.torch_backend`, which also times its own steps for the adaptive policy) and rank 0's
tensor-parallel backend (:mod:`.tp`); the carried slot state (:mod:`.slot_state`) and the phase
timer (:mod:`.timing`) the TensorRT-LLM backend above (:mod:`redrafter_trt.trtllm`) shares."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type checker holds every backend to the contract's protocol
    from ..contract import Backend, Measurable
    from .torch_backend import TorchBackend
    from .tp import TPBackend

    def _implement_the_protocol(torch: TorchBackend, tp: TPBackend) -> tuple[Backend, Backend]:
        return torch, tp

    def _time_its_own_steps(torch: TorchBackend) -> Measurable:  # for the adaptive policy
        return torch
