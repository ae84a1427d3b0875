"""Distillation trainer for the ReDrafter draft head (``redrafter-train``).

Stages: data (:mod:`.data`, :mod:`.gen_data` for self-distillation) -> frozen base features
(:mod:`.features`) -> unrolled head and losses (:mod:`.losses`) -> settings (:mod:`.config`),
positions (:mod:`.positions`), the head to train (:mod:`.head`), one step (:mod:`.step`),
held-out evaluation (:mod:`.evaluation`), checkpoints and resume (:mod:`.resume`) -> the training
loop and drafter directory (:mod:`.loop`). ``redrafter_trt.bench.train_step`` times one step of each loss path.
"""

from .config import TrainConfig
from .evaluation import evaluate
from .gen_data import generate_data, read_prompt_sources
from .loop import train_drafter
from .losses import distill_loss, gather_batch, greedy_chain_tokens_per_step, unrolled_logits

__all__ = [
    "TrainConfig",
    "train_drafter",
    "evaluate",
    "generate_data",
    "read_prompt_sources",
    "distill_loss",
    "gather_batch",
    "unrolled_logits",
    "greedy_chain_tokens_per_step",
]
