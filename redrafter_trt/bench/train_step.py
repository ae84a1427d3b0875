"""``python -m redrafter_trt.bench.train_step``: the training-step benchmark, which lives in
:mod:`redrafter_trt.train.train_step` (this name keeps the documented command working)."""

import sys

from ..train.train_step import PATHS, main

__all__ = ["PATHS", "main"]

if __name__ == "__main__":
    sys.exit(main())
