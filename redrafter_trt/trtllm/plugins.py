"""The native libraries of the TensorRT-LLM backend.

- ``libredrafter_trt_plugins.so`` (``plugins/``): the IPluginV3 plugins RedrafterBeamSearchStep,
  RedrafterTreePack and RedrafterAccept. Loaded into TensorRT's plugin registry before a network
  is built and before an engine is deserialized.
- ``libredrafter_cuda.so`` (``cpp/``): the CUDA launchers the plugin library links (found
  beside it through its RPATH).

Both are built by ``bash build_scripts/build_plugins.sh`` (into ``plugins/build/`` and
``plugins/build/cpp/``; the Dockerfile does this). ``$REDRAFTER_PLUGIN_LIB`` points to another
build. Field and I/O names come from
``plugins/include/redrafter_plugins/plugin_logic.h`` (checked by tests/test_plugins_logic.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import require
from . import require_trtllm

REPO_ROOT = Path(__file__).resolve().parents[2]
PLUGIN_LIB_ENV = "REDRAFTER_PLUGIN_LIB"
BUILD_COMMAND = "bash build_scripts/build_plugins.sh"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
BEAM_SEARCH = (
    "RedrafterBeamSearchStep"  # fields num_beams, warp_k; inputs logits, beam_scores, vocab_map
)
TREE_PACK = "RedrafterTreePack"  # fields num_beams, beam_len
ACCEPT = "RedrafterAccept"  # fields num_beams, beam_len

_loaded_plugin_lib: Path | None = None


def plugin_library_path() -> Path:
    """``$REDRAFTER_PLUGIN_LIB``, else ``plugins/build/libredrafter_trt_plugins.so``."""
    if os.environ.get(PLUGIN_LIB_ENV):
        return Path(os.environ[PLUGIN_LIB_ENV])
    return REPO_ROOT / "plugins" / "build" / "libredrafter_trt_plugins.so"


def load_plugin_library() -> Path:
    """Register the plugins with TensorRT's plugin registry (once per process)."""
    global _loaded_plugin_lib
    if _loaded_plugin_lib is not None:
        return _loaded_plugin_lib
    trt, _ = require_trtllm("loading the ReDrafter TensorRT plugins")
    path = plugin_library_path()
    require(
        path.is_file(),
        f"{path}: ReDrafter plugin library not found; build it with {BUILD_COMMAND} "
        f"inside the container, or point ${PLUGIN_LIB_ENV} at it",
    )
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(path))
    require(
        handle is not None,
        f"{path}: TensorRT could not load the plugin library (see the TensorRT log)",
    )
    for name in (BEAM_SEARCH, TREE_PACK, ACCEPT):
        require(
            registry.get_creator(name, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None,
            f"{path}: plugin {name} v{PLUGIN_VERSION} is not registered after loading the library",
        )
    _loaded_plugin_lib = path
    return path


def add_plugin(network, name: str, inputs: list, fields: dict[str, int]):
    """Add plugin ``name`` to a TensorRT network (``trt.INetworkDefinition``) with int32 ``fields``;
    returns the layer. ``inputs`` are ``trt.ITensor``."""
    trt, _ = require_trtllm("building a ReDrafter engine")
    load_plugin_library()
    creator = trt.get_plugin_registry().get_creator(name, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    fc = trt.PluginFieldCollection(
        [
            trt.PluginField(k, np.array([v], dtype=np.int32), trt.PluginFieldType.INT32)
            for k, v in fields.items()
        ]
    )
    plugin = creator.create_plugin(name, fc, trt.TensorRTPhase.BUILD)
    require(
        plugin is not None,
        f"plugin {name}: creation failed for fields {fields} (see the TensorRT log)",
    )
    layer = network.add_plugin_v3(inputs, [], plugin)
    require(layer is not None, f"plugin {name}: add_plugin_v3 failed")
    return layer
