"""GGUF block weights kept as stored (Q4_1, Q8_0) in a safetensors file, and their exact decoding.

A base that came from a GGUF (the built-in ``smollm2``) keeps, next to the float32
``model.safetensors``, a ``blocks.safetensors`` with its block-quantized matrices as they are in
the GGUF (layout in docs/design.md, "Block weights"). For a weight ``W`` of shape [N, K]
(Hugging Face orientation, K a multiple of 32):

* Q4_1: ``W.q4_1.qs`` uint8 [N, K/2] (per 32-block 16 bytes: the low nibble of byte j is element
  j, the high nibble element j + 16), ``W.q4_1.d`` and ``W.q4_1.m`` float16 [N, K/32];
  ``w[n, 32 b + j] = f32(d) * f32(q) + f32(m)`` in float32, two roundings (the product is exact:
  11 x 4 significant bits).
* Q8_0: ``W.q8_0.qs`` int8 [N, K], ``W.q8_0.d`` float16 [N, K/32]; ``w = f32(d) * f32(q)``
  (exact: 11 x 8 bits).

These are the operations of the ``gguf`` package's dequantisation, which the converter's float32
expansion uses, so :func:`decode` gives the float32 checkpoint's bits exactly (tested over every
tensor of the built-in model). The file's metadata ``redrafter_blocks`` is a JSON object
``{name: [format, N, K]}``; a missing piece, a wrong shape or dtype, an unknown format or a
truncated file is an error naming the tensor and the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RedrafterError, require

BLOCKS_FILE = "blocks.safetensors"
BLOCK = 32
FORMATS = {"q4_1": ("qs", "d", "m"), "q8_0": ("qs", "d")}
_META_KEY = "redrafter_blocks"
# GGUF llama tensor names -> Hugging Face names: the matrices and the norms (read_gguf_blocks keeps
# the Q4_1 / Q8_0 ones; the bench's llama.cpp baseline compares all of them with the engine's)
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}


@dataclass(eq=False)  # compared by identity: a loaded table is shared, never compared by value
class BlockTensor:
    """One block-quantized matrix of logical shape [n, k]: its parts as stored."""

    fmt: str
    n: int
    k: int
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    #: the :class:`FileMapping` the parts are views of (``load_blocks(mapped=True)``), or None
    #: (parts in memory); see :func:`release_pages`
    mapping: Any = field(default=None, repr=False)

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"qs": self.qs, "d": self.d}
        if self.m is not None:
            out["m"] = self.m
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def _expected_shapes(fmt: str, n: int, k: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if fmt == "q4_1":
        return {
            "qs": ((n, k // 2), torch.uint8),
            "d": ((n, k // BLOCK), torch.float16),
            "m": ((n, k // BLOCK), torch.float16),
        }
    return {"qs": ((n, k), torch.int8), "d": ((n, k // BLOCK), torch.float16)}


def check_block_tensor(name: str, bt: BlockTensor, where: str) -> None:
    """Raise a RedrafterError naming ``name`` and ``where`` unless ``bt`` is well-formed."""
    require(
        bt.fmt in FORMATS,
        f"{where}: tensor {name}: unknown block format {bt.fmt!r} (known: {sorted(FORMATS)})",
    )
    require(
        bt.n > 0 and bt.k > 0 and bt.k % BLOCK == 0,
        f"{where}: tensor {name}: shape [{bt.n}, {bt.k}] is not a matrix with K a multiple of {BLOCK}",
    )
    parts = bt.parts()
    for part, (shape, dtype) in _expected_shapes(bt.fmt, bt.n, bt.k).items():
        require(part in parts, f"{where}: tensor {name}: {bt.fmt} part {part!r} is missing")
        t = parts[part]
        require(
            tuple(t.shape) == shape and t.dtype == dtype,
            f"{where}: tensor {name}.{bt.fmt}.{part}: expected {dtype} {list(shape)}, "
            f"found {t.dtype} {list(t.shape)}",
        )
    extra = set(parts) - set(FORMATS[bt.fmt])
    require(not extra, f"{where}: tensor {name}: parts {sorted(extra)} do not belong to {bt.fmt}")
    for part in ("d", "m"):  # the float32 path refuses non-finite weights; so do the blocks
        t = parts.get(part)
        require(
            t is None or bool(torch.isfinite(t).all()),
            f"{where}: tensor {name}.{bt.fmt}.{part}: non-finite scales (NaN/inf)",
        )


def decode(bt: BlockTensor) -> torch.Tensor:
    """The float32 [n, k] weight, bit-identical to the gguf package's dequantisation."""
    nb = bt.k // BLOCK
    d = bt.d.to(torch.float32).reshape(bt.n, nb, 1)
    if bt.fmt == "q8_0":
        q = bt.qs.reshape(bt.n, nb, BLOCK).to(torch.float32)
        return (q * d).reshape(bt.n, bt.k)
    qs = bt.qs.reshape(bt.n, nb, BLOCK // 2)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).to(torch.float32)  # elements j and j + 16
    m = bt.m.to(torch.float32).reshape(bt.n, nb, 1)
    prod = d * q  # exact; a separate op so nothing fuses it with the add
    return (prod + m).reshape(bt.n, bt.k)


def rows(bt: BlockTensor, ids: torch.Tensor) -> BlockTensor:
    """The blocks of rows ``ids`` [r] of ``bt`` (a draft head's projection over a reduced
    vocabulary, an embedding lookup): decoding them gives those rows of :func:`decode` exactly."""
    ids = ids.reshape(-1).to(torch.int64)
    picked = {f: p.index_select(0, ids) for f, p in bt.parts().items()}
    return BlockTensor(bt.fmt, int(ids.numel()), bt.k, **picked)


def parts_equal(a: BlockTensor, b: BlockTensor) -> bool:
    """True when ``a`` and ``b`` hold the same blocks (format, shape and every stored byte)."""
    if (a.fmt, a.n, a.k) != (b.fmt, b.n, b.k):
        return False
    pa, pb = a.parts(), b.parts()
    return pa.keys() == pb.keys() and all(
        torch.equal(pa[f].view(torch.uint8), pb[f].view(torch.uint8)) for f in pa
    )


def concat_rows(name: str, parts: list[BlockTensor], where: str) -> BlockTensor:
    """Blocks of matrices stacked along N (q, k, v fused into qkv): the decoded result equals
    the concatenation of the decoded parts, row for row."""
    fmts = {p.fmt for p in parts}
    ks = {p.k for p in parts}
    require(
        len(fmts) == 1 and len(ks) == 1,
        f"{where}: tensor {name}: fuses parts of formats {sorted(fmts)} and K {sorted(ks)}; "
        "block weights are kept only where all parts share one format and K",
    )
    fmt, k = parts[0].fmt, parts[0].k
    cat = {f: torch.cat([p.parts()[f] for p in parts], 0) for f in FORMATS[fmt]}
    return BlockTensor(fmt, sum(p.n for p in parts), k, **cat)


def save_blocks(blocks: dict[str, BlockTensor], path: str | os.PathLike) -> None:
    """Write ``blocks`` to ``path`` (callers write into an atomic output directory)."""
    from .io import save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, list] = {}
    for name, bt in blocks.items():
        check_block_tensor(name, bt, str(path))
        meta[name] = [bt.fmt, bt.n, bt.k]
        for part, t in bt.parts().items():
            tensors[f"{name}.{bt.fmt}.{part}"] = t
    save_safetensors(tensors, path, metadata={"format": "pt", _META_KEY: json.dumps(meta)})


_SAFETENSORS_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F64": torch.float64,
}


class FileMapping:
    """A private memory map of a block weights file (the parts of ``load_blocks(mapped=True)``
    are views of it): pages are read from the file when touched and can be dropped again."""

    def __init__(self, mapped, base: int):
        self.mapped, self.base = mapped, base  # the mmap and the address of its first byte

    def release(self, parts: list[torch.Tensor] | None = None) -> None:
        """Drop the resident pages under ``parts`` (views of this map; the pages around them
        too), or every page of the map (None): the OS reads them from the file again when next
        touched."""
        import mmap

        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        if parts is None:
            self.mapped.madvise(mmap.MADV_DONTNEED)
            return
        if not parts:
            return
        lo = min(t.data_ptr() for t in parts) - self.base
        hi = max(t.data_ptr() + t.numel() * t.element_size() for t in parts) - self.base
        if lo < 0 or hi > len(self.mapped):  # not views of this map (copied parts)
            return
        lo -= lo % mmap.PAGESIZE
        self.mapped.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self.mapped)) - lo)


def release_pages(bt: BlockTensor, whole_file: bool = False) -> None:
    """Let the OS drop the resident pages of the file ``bt`` is mapped from: under its parts
    (after a lookup of embedding rows), or all of them (``whole_file``: after a pass over the
    parts, such as packing them for the CPU kernel, which also maps pages around them). They
    stop counting as this process's memory and are read from the file again when next touched
    (the page cache usually still has them). The parts are read-only by contract (a write to a
    mapped part would be dropped with them); nothing happens to parts in memory."""
    if bt.mapping is not None:
        bt.mapping.release(None if whole_file else list(bt.parts().values()))


def _mapped_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Every tensor of a safetensors file as a view of one private
    memory map of it: pages are read from the file when first touched, so an unused table holds
    no memory. A range outside the file or of the wrong length is an error naming the tensor."""
    import mmap

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        require(len(head) == 8, f"{path}: shorter than a safetensors header: truncated")
        n = int.from_bytes(head, "little")
        require(8 + n <= size, f"{path}: header of {n} bytes runs past the file: truncated")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RedrafterError(f"{path}: safetensors header is not JSON ({e})") from e
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        require(dtype is not None, f"{path}: tensor {key}: unknown dtype {info.get('dtype')}")
        shape, (begin, end) = [int(x) for x in info["shape"]], info["data_offsets"]
        numel = 1
        for x in shape:
            numel *= x
        item = torch.empty((), dtype=dtype).element_size()
        require(
            end - begin == numel * item and 8 + n + end <= size and mapped is not None,
            f"{path}: tensor {key}: bytes {begin}..{end} do not hold {dtype} {shape} inside the "
            f"file ({size} bytes): truncated or corrupt",
        )
        offset = 8 + n + begin
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        elif offset % item:  # not aligned for its dtype: a copy (the parts are small)
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=numel * item, offset=offset)
            out[key] = raw.clone().view(dtype).reshape(shape)
        else:
            out[key] = torch.frombuffer(mapped, dtype=dtype, count=numel, offset=offset).reshape(
                shape
            )
    mapping = None
    if mapped is not None:
        probe = torch.frombuffer(mapped, dtype=torch.uint8, count=1, offset=0)
        mapping = FileMapping(mapped, probe.data_ptr())
    return out, mapping


def load_blocks(path: str | os.PathLike, mapped: bool = False) -> dict[str, BlockTensor]:
    """Read a ``blocks.safetensors``; every tensor is checked (see the module doc).

    ``mapped``: the parts are views of a private memory map of the file instead of copies (what
    a loaded model streams: the pages a kernel never reads again cost no memory, and the file's
    bytes stay the ones mapped even if it is replaced)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    require(path.is_file(), f"{path}: block weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header and the file's size
            views, mapping = _mapped_tensors(path) if mapped else (None, None)
            meta_json = (f.metadata() or {}).get(_META_KEY)
            require(
                meta_json is not None,
                f"{path}: no '{_META_KEY}' metadata: not a block weights file",
            )
            try:
                meta = json.loads(meta_json)
            except json.JSONDecodeError as e:
                raise RedrafterError(f"{path}: '{_META_KEY}' metadata is not JSON ({e})") from e
            require(isinstance(meta, dict), f"{path}: '{_META_KEY}' metadata is not an object")
            keys = set(f.keys())
            out: dict[str, BlockTensor] = {}
            for name, entry in meta.items():
                require(
                    isinstance(entry, list) and len(entry) == 3,
                    f"{path}: tensor {name}: metadata entry {entry!r} is not [format, N, K]",
                )
                fmt, n, k = entry
                require(
                    fmt in FORMATS,
                    f"{path}: tensor {name}: unknown block format {fmt!r} "
                    f"(known: {sorted(FORMATS)})",
                )
                parts = {}
                for part in FORMATS[fmt]:
                    key = f"{name}.{fmt}.{part}"
                    require(key in keys, f"{path}: tensor {name}: {fmt} part {key} is missing")
                    parts[part] = views[key] if views is not None else f.get_tensor(key)
                bt = BlockTensor(fmt, int(n), int(k), **parts, mapping=mapping)
                check_block_tensor(name, bt, str(path))
                out[name] = bt
            used = {f"{n}.{e[0]}.{p}" for n, e in meta.items() for p in FORMATS[e[0]]}
            stray = sorted(keys - used)
            require(not stray, f"{path}: tensors {stray[:5]} are not described by the metadata")
            if out:  # the checks read every scale: drop those pages again
                release_pages(next(iter(out.values())), whole_file=True)
            return out
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RedrafterError(
            f"{path}: cannot read block weights ({e}); it may be truncated or corrupt: "
            "re-convert it"
        ) from e


def _reverse_permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """The row order transformers gives q/k projections read from a llama GGUF."""
    dim = a.shape[0] // n_head // 2
    return a.reshape(n_head, dim, 2, *a.shape[1:]).swapaxes(2, 1).reshape(a.shape)


def gguf_name_to_hf(name: str) -> str | None:
    parts = name.split(".")
    if parts[-1] != "weight":
        return None
    if len(parts) == 2 and parts[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[parts[0]]}.weight"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER[parts[2]]}.weight"
    return None


def read_gguf_blocks(
    gguf_path: str | os.PathLike, num_heads: int, num_kv_heads: int, reader=None
) -> dict[str, BlockTensor]:
    """The Q4_1 / Q8_0 matrices of a llama GGUF as :class:`BlockTensor` under Hugging Face
    names, rows in the order the float32 conversion gives them (q/k reverse-permuted).
    ``reader``: a ``gguf.GGUFReader`` of ``gguf_path`` already open (opening one parses the whole
    vocabulary: seconds)."""
    from gguf import GGMLQuantizationType, GGUFReader

    where = str(gguf_path)
    fmts = {GGMLQuantizationType.Q4_1: "q4_1", GGMLQuantizationType.Q8_0: "q8_0"}
    reader = reader if reader is not None else GGUFReader(where)
    out: dict[str, BlockTensor] = {}
    for t in reader.tensors:
        fmt = fmts.get(t.tensor_type)
        hf = gguf_name_to_hf(t.name)
        if fmt is None or hf is None:
            continue
        require(len(t.shape) == 2, f"{where}: tensor {t.name}: expected a matrix, got {t.shape}")
        k, n = int(t.shape[0]), int(t.shape[1])  # GGUF lists ne0 (the contiguous dim) first
        bpb = 2 + 2 + BLOCK // 2 if fmt == "q4_1" else 2 + BLOCK
        raw = np.asarray(t.data, dtype=np.uint8)
        require(
            raw.size == n * (k // BLOCK) * bpb and k % BLOCK == 0,
            f"{where}: tensor {t.name}: {raw.size} bytes for a {fmt} [{n}, {k}] matrix",
        )
        raw = raw.reshape(n, k // BLOCK, bpb)
        if ".attn_q." in t.name:
            raw = _reverse_permute_rows(raw, num_heads)
        elif ".attn_k." in t.name:
            raw = _reverse_permute_rows(raw, num_kv_heads)
        raw = np.ascontiguousarray(raw)
        d = torch.from_numpy(raw[:, :, 0:2].copy().view(np.float16).reshape(n, k // BLOCK))
        if fmt == "q4_1":
            m = torch.from_numpy(raw[:, :, 2:4].copy().view(np.float16).reshape(n, k // BLOCK))
            qs = torch.from_numpy(raw[:, :, 4:].copy().reshape(n, k // 2))
            out[hf] = BlockTensor(fmt, n, k, qs, d, m)
        else:
            qs = torch.from_numpy(raw[:, :, 2:].copy().view(np.int8).reshape(n, k))
            out[hf] = BlockTensor(fmt, n, k, qs, d)
    return out


__all__ = [
    "BLOCKS_FILE",
    "BlockTensor",
    "FORMATS",
    "check_block_tensor",
    "concat_rows",
    "decode",
    "gguf_name_to_hf",
    "load_blocks",
    "parts_equal",
    "read_gguf_blocks",
    "release_pages",
    "rows",
    "save_blocks",
]
