"""Backends implementing the step contract (:mod:`redrafter_trt.contract`)."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type checker holds every backend to the contract's protocol
    from ..contract import Backend, Measurable
    from ..trtllm.runtime import TrtllmBackend
    from .torch_backend import TorchBackend
    from .tp import TPBackend

    def _implement_the_protocol(
        torch: TorchBackend, trtllm: TrtllmBackend, tp: TPBackend
    ) -> tuple[Backend, Backend, Backend]:
        return torch, trtllm, tp

    def _time_its_own_steps(torch: TorchBackend) -> Measurable:  # for the adaptive policy
        return torch
