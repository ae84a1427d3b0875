"""The ReDrafter checkpoint (TensorRT-LLM style): its config, writing one from a base + drafter
(:func:`convert_checkpoint`), reading its tensors and building the models from it
(:func:`load_checkpoint_models`), and telling the project's directory kinds apart.

Checkpoint directory (docs/design.md section 10): ``config.json`` + ``rank{i}.safetensors`` + the base's
tokenizer files when it has them. Tensor names are :mod:`.names`'s; reading a Hugging Face base is
:mod:`.hf`; splitting tensors across tensor-parallel ranks is :mod:`.sharding`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..contract import check_num_beams
from ..errors import RedrafterError, require
from ..models.base import (
    ARCH_LLAMA,
    ARCH_QWEN2,
    HF_ARCHITECTURE,
    HF_ARCHITECTURES,
    BaseConfig,
    BaseModel,
    StoredWeight,
    stream_blocks,
    weights_uninitialized,
)
from ..models.blocks import (
    BLOCKS_FILE,
    BlockTensor,
    check_block_tensor,
    decode,
    load_blocks,
    parts_equal,
    release_pages,
    rows,
    save_blocks,
)
from ..models.drafter import (
    Drafter,
    DrafterConfig,
    check_draft_vocab,
    load_checked,
    load_drafter_state,
    validate_against_base,
)
from ..models.io import (
    atomic_output_dir,
    load_state_dict_file,
    read_json,
    safetensors_shapes,
    save_safetensors,
)
from . import fp8
from .names import (
    CKPT_DRAFT_PROJECTION,
    EMBEDDING,
    LM_HEAD,
    drafter_from_checkpoint_names,
    drafter_to_checkpoint_names,
)
from .sharding import check_tp_size, tp_shard

CHECKPOINT_CONFIG = "config.json"
#: An engine directory's config file (written by :mod:`redrafter_trt.runtime.engine` /
#: :mod:`redrafter_trt.trtllm.builder`, read by :mod:`redrafter_trt.runtime.loader`;
#: :func:`model_dir_kind` tells the two kinds apart by their keys).
ENGINE_CONFIG = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REDRAFTER_ARCHITECTURES = {ARCH_LLAMA: "ReDrafterForLLaMALM", ARCH_QWEN2: "ReDrafterForQWenLM"}
#: Base config fields written at the top level of the checkpoint config (TensorRT-LLM names).
_BASE_KEYS = [f for f in BaseConfig.__dataclass_fields__ if f != "architecture"]


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def config_digest(config: dict[str, Any]) -> str:
    """``sha256:<hex>`` of a checkpoint config (key order and layout ignored): recorded in every
    rank file's metadata so that rank files of different conversions are told apart."""
    import hashlib

    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


#: safetensors metadata of every rank file: the config digest, the rank and the tp_size.
RANK_META_CONFIG, RANK_META_RANK, RANK_META_TP_SIZE = (
    "redrafter_config_sha256",
    "redrafter_rank",
    "redrafter_tp_size",
)


#: Checkpoint config key of the draft head's reduced vocabulary K (absent: K = V).
REDRAFTER_DRAFT_VOCAB_SIZE = "redrafter_draft_vocab_size"


# --------------------------------------------------------------------------- checkpoint
@dataclass
class RedrafterCheckpointConfig:
    base: BaseConfig
    drafter: DrafterConfig
    num_beams: int
    draft_len: int
    greedy_search: bool
    dtype: str
    tp_size: int = 1
    random_drafter: bool = False
    #: None, or "FP8": base linears in float8_e4m3fn with per-tensor scales (:mod:`.fp8`)
    quant_algo: str | None = None

    def to_dict(self) -> dict[str, Any]:
        base = self.base.to_dict()
        hf_arch = HF_ARCHITECTURE[self.base.architecture]
        return {
            "architecture": REDRAFTER_ARCHITECTURES[self.base.architecture],
            "base_model_architecture": hf_arch,
            "dtype": self.dtype,
            "logits_dtype": "float32",
            "hidden_act": "silu",
            "position_embedding_type": "rope_gpt_neox",
            **{k: base[k] for k in _BASE_KEYS},
            **({"qwen_type": "qwen2"} if self.base.architecture == ARCH_QWEN2 else {}),
            "redrafter_num_beams": self.num_beams,
            "redrafter_draft_len_per_beam": self.draft_len,
            "redrafter_greedy_search": self.greedy_search,
            "redrafter_num_layers": self.drafter.num_draft_layers,
            "redrafter_hidden_size": self.drafter.hidden_size,
            "redrafter_exit_dim": self.drafter.exit_dim,
            "redrafter_is_rnn": self.drafter.rnn,
            **(
                {REDRAFTER_DRAFT_VOCAB_SIZE: self.drafter.draft_vocab_size}
                if self.drafter.draft_vocab_size is not None
                else {}
            ),
            "redrafter_random_init": self.random_drafter,
            "mapping": {"world_size": self.tp_size, "tp_size": self.tp_size, "pp_size": 1},
            "quantization": fp8.quantization_config(self.quant_algo),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> RedrafterCheckpointConfig:
        try:
            require(
                d.get("architecture") in REDRAFTER_ARCHITECTURES.values(),
                f"architecture {d.get('architecture')!r} is not a ReDrafter checkpoint "
                f"({sorted(REDRAFTER_ARCHITECTURES.values())})",
            )
            base_arch = HF_ARCHITECTURES.get(d.get("base_model_architecture", ""))
            require(
                base_arch is not None,
                f"unsupported base_model_architecture {d.get('base_model_architecture')!r}",
            )
            base = BaseConfig.from_dict(
                {**{k: d[k] for k in _BASE_KEYS if k in d}, "architecture": base_arch}
            )
            for key in (
                "redrafter_num_beams",
                "redrafter_draft_len_per_beam",
                "redrafter_num_layers",
                "redrafter_exit_dim",
                "dtype",
            ):
                require(key in d, f"missing key {key!r}")
            drafter = DrafterConfig(
                vocab_size=base.vocab_size,
                hidden_size=d.get("redrafter_hidden_size", base.hidden_size),
                exit_dim=d["redrafter_exit_dim"],
                num_draft_layers=d["redrafter_num_layers"],
                rnn=bool(d.get("redrafter_is_rnn", True)),
                draft_vocab_size=d.get(REDRAFTER_DRAFT_VOCAB_SIZE),
            )
            drafter.validate()
            cfg = cls(
                base=base,
                drafter=drafter,
                num_beams=d["redrafter_num_beams"],
                draft_len=d["redrafter_draft_len_per_beam"],
                greedy_search=bool(d.get("redrafter_greedy_search", True)),
                dtype=d["dtype"],
                tp_size=int(d.get("mapping", {}).get("tp_size", 1)),
                random_drafter=bool(d.get("redrafter_random_init", False)),
                quant_algo=(d.get("quantization") or {}).get("quant_algo"),
            )
            cfg.validate()
        except RedrafterError as e:
            raise RedrafterError(f"{where}: {e}") from e
        return cfg

    def validate(self) -> None:
        require(
            isinstance(self.num_beams, int) and self.num_beams >= 1,
            f"redrafter_num_beams (--redrafter_num_beams) must be >= 1, got {self.num_beams}",
        )
        require(
            isinstance(self.draft_len, int) and self.draft_len >= 1,
            f"redrafter_draft_len_per_beam (--redrafter_draft_len_per_beam) must be >= 1, "
            f"got {self.draft_len}",
        )
        check_num_beams(self.num_beams, self.base.vocab_size, "redrafter_num_beams")
        require(
            self.num_beams <= self.drafter.head_vocab_size,
            f"redrafter_num_beams {self.num_beams} exceeds the draft head's vocabulary "
            f"(draft_vocab_size {self.drafter.head_vocab_size})",
        )
        require(self.draft_len + 1 <= 64, f"beam length D+1 = {self.draft_len + 1} exceeds 64")
        require(self.dtype in DTYPES, f"dtype {self.dtype!r} not in {sorted(DTYPES)}")
        require(
            self.quant_algo in (None, fp8.QUANT_ALGO),
            f"quantization.quant_algo {self.quant_algo!r} not supported (None or {fp8.QUANT_ALGO!r})",
        )
        check_tp_size(self.base, self.drafter, self.tp_size)
        validate_against_base(
            self.drafter,
            self.base.hidden_size,
            self.base.vocab_size,
            (self.base.vocab_size, self.base.hidden_size),
            "checkpoint",
        )


def convert_checkpoint(
    base_cfg: BaseConfig,
    base_sd: dict[str, torch.Tensor],
    drafter: Drafter,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    num_beams: int = 4,
    draft_len: int = 4,
    greedy_search: bool = True,
    tp_size: int = 1,
    tokenizer_dir: str | os.PathLike | None = None,
    random_drafter: bool = False,
    overwrite: bool = False,
    quantize: str | None = None,
    calibration: list[list[int]] | None = None,
    blocks: dict[str, BlockTensor] | None = None,
    blocks_source: str = "blocks",
) -> Path:
    """Write the ReDrafter checkpoint directory atomically; returns its path.

    ``blocks`` (a float32, tp_size 1, unquantized checkpoint only) are the base's GGUF block
    weights (models/blocks.py), written as ``blocks.safetensors`` next to ``rank0.safetensors``,
    which keeps the float32 expansion for every other reader (TensorRT-LLM, tensor parallel);
    each must decode to its float32 tensor bit for bit. A draft head whose projection is the
    base's vocabulary projection (all of it, or the rows of its draft vocabulary: a head trained
    with ``--freeze_lm_head``) gets those blocks too, under its own name.

    ``base_sd`` in TensorRT-LLM's FP8 convention (FP8 Hugging Face checkpoints read by
    :func:`~redrafter_trt.formats.hf.load_hf_base`) writes an FP8 checkpoint; ``quantize="fp8"``
    quantizes a float base's linears to FP8 per-tensor (weight scale = amax / 448). Either way every FP8 linear needs a
    static activation scale: the base's own, or measured on ``calibration`` (token-id rows)."""
    require(quantize in (None, "fp8"), f"--quantize {quantize!r}: expected fp8")
    quantized = fp8.is_quantized_state_dict(base_sd)
    require(
        not (quantize and quantized),
        "--quantize fp8: the base model is already FP8; convert it without --quantize",
    )
    quant_algo = fp8.QUANT_ALGO if (quantize or quantized) else None
    cfg = RedrafterCheckpointConfig(
        base=base_cfg,
        drafter=drafter.config,
        num_beams=num_beams,
        draft_len=draft_len,
        greedy_search=greedy_search,
        dtype=dtype,
        tp_size=tp_size,
        random_drafter=random_drafter,
        quant_algo=quant_algo,
    )
    cfg.validate()
    # Base tensors must be exactly what the modeling expects, and finite.
    expected = {k: tuple(v.shape) for k, v in _meta_base(base_cfg).state_dict().items()}
    for name, shape in expected.items():
        require(name in base_sd, f"base model: missing tensor {name}")
        require(
            tuple(base_sd[name].shape) == shape,
            f"base model: tensor {name} has shape {tuple(base_sd[name].shape)}, expected {shape}",
        )
    for name, t in base_sd.items():
        require(fp8.all_finite(t), f"base model: tensor {name} has non-finite values")
    require(
        calibration is None or quant_algo,
        "--calib_input_ids_file: calibration is for --quantize fp8 or an FP8 base only",
    )
    if quant_algo:
        linears = fp8.fp8_linear_names(base_cfg.num_hidden_layers)
        has_act = all(f"{n}.{fp8.ACT_SCALE}" in base_sd for n in linears)
        require(
            calibration is None or quantize or not has_act,
            "--calib_input_ids_file: the FP8 base already has static input scales "
            "(input_scale), which are used; drop --calib_input_ids_file",
        )
        if quantize or not has_act:
            if calibration is None:
                raise RedrafterError(
                    (
                        "--quantize fp8"
                        if quantize
                        else "base model: FP8 without static input scales (input_scale)"
                    )
                    + ": no activation scales. "
                    + fp8.NEEDS_ACT_SCALES
                )
            scales = fp8.calibrate_activation_scales(base_cfg, base_sd, calibration)
            if quantize:
                base_sd = fp8.quantize_state_dict(base_cfg.num_hidden_layers, base_sd, scales)
            else:
                base_sd = {**base_sd, **{f"{n}.{fp8.ACT_SCALE}": s for n, s in scales.items()}}
        fp8.check_trtllm_fp8(base_cfg.num_hidden_layers, base_sd, "base model")
        expected.update(
            {
                k: tuple(v.shape)
                for k, v in base_sd.items()
                if k.endswith((fp8.WEIGHT_SCALE, fp8.ACT_SCALE))
            }
        )
    torch_dtype = DTYPES[dtype]
    tensors = {
        k: base_sd[k].contiguous().clone()
        if fp8.is_fp8(base_sd[k]) or k.endswith((fp8.WEIGHT_SCALE, fp8.ACT_SCALE))
        else base_sd[k].to(torch_dtype).contiguous().clone()
        for k in expected
    }
    if drafter.vocab_map is not None:
        check_draft_vocab(drafter.vocab_map, drafter.config, "drafter")
    for k, v in drafter_to_checkpoint_names(drafter.config, drafter.state_dict()).items():
        require(bool(torch.isfinite(v).all()), f"drafter: tensor {k} has non-finite values")
        # The id map stays int32; weights take the checkpoint dtype.
        tensors[k] = (
            (v.detach().to(torch_dtype) if v.is_floating_point() else v.detach())
            .contiguous()
            .clone()
        )
    if blocks:
        blocks = checked_blocks(
            blocks,
            tensors,
            base_cfg,
            drafter,
            blocks_source,
            dtype,
            tp_size,
            bool(quantize or quantized),
        )
    digest = config_digest(cfg.to_dict())
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        if blocks:
            save_blocks(blocks, tmp / BLOCKS_FILE)
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        for rank in range(tp_size):
            meta = {
                "format": "pt",
                RANK_META_CONFIG: digest,
                RANK_META_RANK: str(rank),
                RANK_META_TP_SIZE: str(tp_size),
            }
            save_safetensors(tp_shard(tensors, cfg, rank), tmp / rank_file(rank), metadata=meta)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(output_dir)


def checked_blocks(
    blocks: dict[str, BlockTensor],
    tensors: dict[str, torch.Tensor],
    base_cfg: BaseConfig,
    drafter: Drafter,
    source: str,
    dtype: str,
    tp_size: int,
    fp8_checkpoint: bool,
) -> dict[str, BlockTensor]:
    """The block weights a checkpoint of ``tensors`` keeps: each must have its float32 tensor's
    shape and decode to it bit for bit (float32, tp_size 1, unquantized checkpoints only), plus
    the draft head's projection when it is the base's (:func:`draft_projection_blocks`)."""
    require(
        dtype == "float32" and tp_size == 1 and not fp8_checkpoint,
        f"{source}: block weights are kept only in a float32, tp_size 1, unquantized "
        f"checkpoint (got --dtype {dtype}, --tp_size {tp_size}"
        f"{', FP8' if fp8_checkpoint else ''})",
    )
    for name, bt in blocks.items():
        check_block_tensor(name, bt, source)
        require(
            name in tensors and tuple(tensors[name].shape) == (bt.n, bt.k),
            f"{source}: tensor {name}: {bt.fmt} [{bt.n}, {bt.k}] matches no base "
            f"weight of that shape"
            + (f" (the base's is {list(tensors[name].shape)})" if name in tensors else ""),
        )
        require(
            same_bits(decode(bt), tensors[name]),
            f"{source}: tensor {name}: its {bt.fmt} blocks do not decode to the base's "
            "float32 weight bit for bit (the blocks and the float32 file are of different "
            "models or conversions)",
        )
    blocks = dict(blocks)
    proj = draft_projection_blocks(base_cfg, blocks, drafter, tensors)
    if proj is not None:
        blocks[CKPT_DRAFT_PROJECTION] = proj
    return blocks


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two float32 tensors hold the same bits (so -0.0 != 0.0, NaN == same NaN)."""
    return (
        a.dtype == b.dtype == torch.float32
        and a.shape == b.shape
        and torch.equal(a.view(torch.int32), b.view(torch.int32))
    )


def vocabulary_blocks(cfg: BaseConfig, blocks: dict[str, BlockTensor]) -> BlockTensor | None:
    """The blocks of the base's vocabulary projection: its own, or the embedding's when tied."""
    if LM_HEAD in blocks:
        return blocks[LM_HEAD]
    return blocks.get(EMBEDDING) if cfg.tie_word_embeddings else None


def draft_projection_blocks(
    cfg: BaseConfig,
    blocks: dict[str, BlockTensor],
    drafter: Drafter,
    tensors: dict[str, torch.Tensor],
) -> BlockTensor | None:
    """Blocks for the draft head's final projection when it is the base's vocabulary projection
    bit for bit (all of it, or the rows of its draft vocabulary), else None."""
    vocab = vocabulary_blocks(cfg, blocks)
    proj = tensors.get(CKPT_DRAFT_PROJECTION)
    if vocab is None or proj is None or proj.dtype != torch.float32:
        return None
    ids = drafter.vocab_map
    cand = vocab if ids is None else rows(vocab, ids)
    if (cand.n, cand.k) != tuple(proj.shape) or not same_bits(decode(cand), proj):
        return None
    if cand is vocab:  # its own copy in the file (safetensors stores no shared tensors)
        cand = BlockTensor(
            vocab.fmt, vocab.n, vocab.k, **{f: t.clone() for f, t in vocab.parts().items()}
        )
    return cand


def stream_checkpoint_blocks(
    base: BaseModel,
    drafter: Drafter,
    blocks: dict[str, BlockTensor],
    where: str,
) -> int:
    """Let each block tensor stand in for the float32 weight of its name (models/base.py
    :func:`~redrafter_trt.models.base.stream_blocks`): the layer holding that weight, with every
    layer tied to it (the tied vocabulary projection takes the embedding's), keeps no float32
    copy. A draft projection with the same blocks as the base's vocabulary projection shares
    them (and the kernel's panels). Returns how many layers stream blocks."""
    cfg = drafter.config
    base_layers = dict(base.named_modules())
    head_layers = dict(drafter.named_modules())
    everything = [m for m in (*base.modules(), *drafter.modules()) if isinstance(m, StoredWeight)]
    vocab = vocabulary_blocks(base.config, blocks)
    count = 0
    for name, bt in blocks.items():
        if name.startswith("drafter."):
            (head_name,) = drafter_from_checkpoint_names(cfg, {name: bt})  # type: ignore[dict-item]
            layer = head_layers.get(head_name.removesuffix(".weight"))
            if vocab is not None and parts_equal(bt, vocab):
                bt = vocab  # one set of blocks and panels for both projections
        else:
            layer = base_layers.get(name.removesuffix(".weight"))
        held = layer._parameters.get("weight") if isinstance(layer, StoredWeight) else None
        require(
            name.endswith(".weight") and held is not None,
            f"{where}: tensor {name}: no linear or embedding layer of the model has this weight",
        )
        require(
            tuple(held.shape) == (bt.n, bt.k),
            f"{where}: tensor {name}: {bt.fmt} [{bt.n}, {bt.k}] does not fit the layer's weight "
            f"{list(held.shape)}",
        )
        tied = [m for m in everything if m._parameters.get("weight") is held]
        stream_blocks(tied, bt)
        count += len(tied)
    if vocab is not None:  # the comparison above read its pages
        release_pages(vocab, whole_file=True)
    return count


def share_base_projection(base: BaseModel, drafter: Drafter) -> bool:
    """Tie the draft head's final projection to the base's vocabulary projection where the two
    hold the same weight bit for bit (a head trained with the base's projection frozen, stored
    under its own name): one parameter, so the CPU kernels pack and hold it once (the GGUF-block
    counterpart is :func:`stream_checkpoint_blocks`). True when tied."""
    proj, vocab = drafter.projection, base.lm_head
    w, v = proj._parameters.get("weight"), vocab._parameters.get("weight")
    if w is None or v is None or w is v or w.shape != v.shape or w.dtype != v.dtype:
        return False
    if w.device != v.device or not w.is_contiguous() or not v.is_contiguous():
        return False
    if not torch.equal(w.detach().view(torch.uint8), v.detach().view(torch.uint8)):
        return False  # the same bits (equal values could differ in a zero's sign)
    proj.weight = v
    return True


def check_blocks_match(ckpt_dir: str | os.PathLike) -> None:
    """Every tensor of ``blocks.safetensors`` decodes bit for bit to the float32 tensor of its
    name in ``rank0.safetensors`` (and a tied ``lm_head.weight`` to the embedding's): the torch
    backend reads the blocks, TensorRT-LLM the float32 file, and both must be the same model.
    One tensor at a time; a mismatch names the tensor and both files."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    cfg = read_checkpoint_config(ckpt_dir)
    blocks_file, weights = ckpt_dir / BLOCKS_FILE, ckpt_dir / rank_file(0)
    blocks = load_blocks(blocks_file, mapped=True)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for name, bt in blocks.items():
            also = cfg.base.tie_word_embeddings and name == EMBEDDING and LM_HEAD in keys
            for target in (name, LM_HEAD) if also else (name,):
                require(
                    target in keys,
                    f"{blocks_file}: tensor {name}: {weights} has no {target}",
                )
                require(
                    same_bits(decode(bt), f.get_tensor(target)),
                    f"{blocks_file}: tensor {name}: its {bt.fmt} blocks do not decode to "
                    f"{target} of {weights} bit for bit: the two files are of different "
                    "conversions; convert the checkpoint again",
                )
            release_pages(bt, whole_file=True)


def block_backed_names(
    cfg: RedrafterCheckpointConfig,
    blocks: dict[str, BlockTensor],
    blocks_file: Path,
    weights: Path,
) -> set[str]:
    """The tensors of ``weights`` that ``blocks`` stand in for (a tied ``lm_head.weight`` with the
    embedding's), each checked against the file's header: present, of the blocks' shape."""
    if not blocks:
        return set()
    shapes = safetensors_shapes(weights)
    for name, bt in blocks.items():
        require(
            shapes.get(name) == (bt.n, bt.k),
            f"{blocks_file}: tensor {name}: {bt.fmt} [{bt.n}, {bt.k}] matches no weight of "
            f"{weights}" + (f" (shape {list(shapes[name])})" if name in shapes else ""),
        )
    names = set(blocks)
    if cfg.base.tie_word_embeddings and EMBEDDING in blocks and LM_HEAD in shapes:
        names.add(LM_HEAD)  # the tied projection is the embedding
    return names


def load_rank_shards(
    ckpt_dir: str | os.PathLike,
) -> tuple[RedrafterCheckpointConfig, list[dict[str, torch.Tensor]]]:
    """The config and every rank's tensors of a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    cfg = read_checkpoint_config(ckpt_dir)
    shards = []
    for rank in range(cfg.tp_size):
        f = ckpt_dir / rank_file(rank)
        require(f.is_file(), f"{ckpt_dir}: missing {rank_file(rank)} (tp_size {cfg.tp_size})")
        shards.append(load_state_dict_file(f))
    return cfg, shards


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def _meta_base(cfg: BaseConfig) -> BaseModel:
    with torch.device("meta"):
        return BaseModel(cfg)


def read_checkpoint_config(ckpt_dir: str | os.PathLike) -> RedrafterCheckpointConfig:
    path = Path(ckpt_dir) / CHECKPOINT_CONFIG
    return RedrafterCheckpointConfig.from_dict(read_json(path, "checkpoint config"), str(path))


def load_checkpoint_models(
    ckpt_dir: str | os.PathLike,
    weights_file: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    config: RedrafterCheckpointConfig | None = None,
) -> tuple[RedrafterCheckpointConfig, BaseModel, Drafter]:
    """Build the base model and drafter from a checkpoint directory (or, with ``config``
    given, from any directory holding ``rank0.safetensors``, such as a torch engine)."""
    ckpt_dir = Path(ckpt_dir)
    cfg = config or read_checkpoint_config(ckpt_dir)
    require(
        cfg.tp_size == 1,
        f"{ckpt_dir}: a tp_size {cfg.tp_size} checkpoint holds one shard per rank and loads "
        f"only on {cfg.tp_size} ranks (redrafter-build, then redrafter-run --tp_size "
        f"{cfg.tp_size}); this reads tp_size 1 checkpoints (convert again with --tp_size 1)",
    )
    weights = Path(weights_file) if weights_file else ckpt_dir / rank_file(0)
    torch_dtype = dtype or DTYPES[cfg.dtype]
    blocks_file = weights.parent / BLOCKS_FILE
    blocks: dict[str, BlockTensor] = {}
    if blocks_file.is_file() and torch_dtype == torch.float32 and cfg.quant_algo is None:
        # GGUF block weights stand in for their float32 tensors, which are not read at all
        blocks = load_blocks(blocks_file, mapped=True)
    skip = block_backed_names(cfg, blocks, blocks_file, weights)
    sd = load_state_dict_file(weights, skip=skip)
    if cfg.quant_algo == fp8.QUANT_ALGO:  # the torch modeling runs FP8 weights dequantized
        fp8.check_trtllm_fp8(
            cfg.base.num_hidden_layers,
            {k: v for k, v in sd.items() if not k.startswith("drafter.")},
            str(weights),
        )
        sd = fp8.dequantize_state_dict(sd, str(weights))
    else:
        bad = sorted(k for k, v in sd.items() if fp8.is_fp8(v))
        require(
            not bad,
            f"{weights}: tensor {bad[0] if bad else ''} is FP8 but the config's "
            "quantization.quant_algo is not 'FP8'",
        )
    base_sd = {k: v for k, v in sd.items() if not k.startswith("drafter.")}
    drafter_sd = drafter_from_checkpoint_names(
        cfg.drafter, {k: v for k, v in sd.items() if k.startswith("drafter.")}
    )
    head_skip = drafter_from_checkpoint_names(
        cfg.drafter, {k: None for k in skip if k.startswith("drafter.")}
    )
    with weights_uninitialized():  # every weight is loaded or streamed next
        base = BaseModel(cfg.base).to(torch_dtype)
        drafter = Drafter(cfg.drafter).to(torch_dtype)
    if cfg.base.tie_word_embeddings and LM_HEAD in base_sd:
        require(
            torch.equal(base_sd[LM_HEAD], base_sd[EMBEDDING]),
            f"{weights}: tie_word_embeddings is set but lm_head.weight differs from the embedding",
        )
    load_checked(base, base_sd, str(weights), {k for k in skip if not k.startswith("drafter.")})
    load_drafter_state(drafter, drafter_sd, str(weights), set(head_skip))
    stream_checkpoint_blocks(base, drafter, blocks, str(blocks_file))
    share_base_projection(base, drafter)
    base.eval()
    drafter.eval()
    return cfg, base, drafter


__all__ = [
    "convert_checkpoint",
    "read_checkpoint_config",
    "load_checkpoint_models",
    "load_rank_shards",
    "RedrafterCheckpointConfig",
    "copy_tokenizer_files",
    "rank_file",
    "config_digest",
    "DTYPES",
    "CHECKPOINT_CONFIG",
    "ENGINE_CONFIG",
    "REDRAFTER_DRAFT_VOCAB_SIZE",
    "model_dir_kind",
    "require_model_dir",
]


# --------------------------------------------------------------------------- what a directory is
DIR_KINDS = {
    "engine": "a redrafter-build engine directory (give it to redrafter-run, redrafter-serve or "
    "redrafter-bench --engine_dir)",
    "checkpoint": "a redrafter-convert checkpoint (give it to redrafter-build --checkpoint_dir)",
    "drafter": "a draft head directory (give it to redrafter-convert --drafter_model_dir)",
    "base": "a Hugging Face base model directory (give it to --model_dir)",
}


def model_dir_kind(path: str | os.PathLike) -> str | None:
    """Which of the project's directory kinds ``path`` holds, from its ``config.json``:
    ``"engine"``, ``"checkpoint"``, ``"drafter"``, ``"base"``, or None (no readable config)."""
    f = Path(path) / CHECKPOINT_CONFIG
    try:
        raw = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    if "backend" in raw and "build_config" in raw:
        return "engine"
    if "redrafter_num_beams" in raw or str(raw.get("architecture", "")).startswith("ReDrafter"):
        return "checkpoint"
    if raw.get("model_type") == "recurrent_drafting_drafter" or {
        "exit_dim",
        "num_draft_layers",
    } <= set(raw):
        return "drafter"
    if "architectures" in raw or "model_type" in raw:
        return "base"
    return None


def require_model_dir(path: str | os.PathLike | None, flag: str, kind: str) -> Path:
    """``path`` as a directory of ``kind`` (see :data:`DIR_KINDS`), else a
    :class:`RedrafterError` naming ``flag``, the path and what it holds instead."""
    require(path is not None and str(path) != "", f"{flag}: no directory given")
    p = Path(path)
    expected = DIR_KINDS[kind].split(" (")[0]
    require(p.exists(), f"{flag} {p}: not found; expected {expected}")
    require(p.is_dir(), f"{flag} {p}: not a directory; expected {expected}")
    require(
        (p / CHECKPOINT_CONFIG).is_file(),
        f"{flag} {p}: no {CHECKPOINT_CONFIG}; expected {expected}",
    )
    found = model_dir_kind(p)
    require(
        found is None or found == kind,
        f"{flag} {p}: this is {DIR_KINDS.get(found, found)}, not {expected}",
    )
    return p
