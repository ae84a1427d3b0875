"""Backends implementing the step contract (:mod:`redrafter_trt.contract`)."""
