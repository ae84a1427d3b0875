"""PyTorch references of the ReDrafter operators (docs/design.md section 9): the oracle for every backend."""

from .accept import Acceptance, accept
from .beam_search import DEFAULT_WARP_K, WARP_FILL, beam_search_step, warped_log_softmax
from .kv_cache import relocate_kv
from .sampling import draw_tokens, inverse_cdf, position_uniforms, target_probs
from .tree import (
    PAD_TOKEN,
    PackedTree,
    StepShape,
    bool_to_packed_mask,
    mask_words,
    pack_tree,
    packed_mask_to_bool,
    root_only_tree,
)

__all__ = [
    "Acceptance",
    "accept",
    "DEFAULT_WARP_K",
    "WARP_FILL",
    "beam_search_step",
    "warped_log_softmax",
    "relocate_kv",
    "draw_tokens",
    "inverse_cdf",
    "position_uniforms",
    "target_probs",
    "PAD_TOKEN",
    "PackedTree",
    "StepShape",
    "bool_to_packed_mask",
    "mask_words",
    "pack_tree",
    "packed_mask_to_bool",
    "root_only_tree",
]
