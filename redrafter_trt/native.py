"""ctypes binding of the C++ CPU references of the ReDrafter operators (``cpp/``, docs/design.md section 9).

The functions mirror the PyTorch references in :mod:`redrafter_trt.ops` and run the same
per-element logic as the CUDA kernels (``__host__ __device__`` functions shared by both), so a
CPU-only machine tests the kernels' logic through them. Inputs are CPU tensors (numpy arrays
are accepted too); integer outputs are int32 as in the engine's tensors.

This module is the package's one binding of the C ABI (``cpp/include/redrafter/c_api.h``): each
operator takes one params struct by pointer, mirrored once here (:data:`ABI_STRUCTS`, checked
against the library's own layout by tests/test_native_abi.py), and :func:`call` runs any of the
C functions, raising :class:`RedrafterError` with the library's message. The CUDA operators of
the torch backend (:mod:`redrafter_trt.backends.cuda_ops`) fill the same structs.

The library is ``cpp/build/libredrafter_cpu.so`` under the repository, built by
``bash build_scripts/build_cpp.sh``; the environment variable ``REDRAFTER_NATIVE_LIB`` points
to another build.

KV relocation also runs on CUDA tensors through the CUDA launchers of
``cpp/build/libredrafter_cuda.so`` (built by the same script when nvcc exists;
``REDRAFTER_CUDA_LIB`` points to another build). That library is loaded lazily, on the first
call with a CUDA tensor (or :func:`cuda_available`): importing this module needs neither CUDA
nor the library.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .errors import RedrafterError
from .ops.accept import Acceptance
from .ops.beam_search import DEFAULT_WARP_K
from .ops.kv_cache import KvLayout, paged_pool_layout
from .ops.tree import PackedTree, mask_words, packed_mask_to_bool

LIB_ENV = "REDRAFTER_NATIVE_LIB"
BUILD_COMMAND = "bash build_scripts/build_cpp.sh"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIB = REPO_ROOT / "cpp" / "build" / "libredrafter_cpu.so"
CUDA_LIB_ENV = "REDRAFTER_CUDA_LIB"
DEFAULT_CUDA_LIB = REPO_ROOT / "cpp" / "build" / "libredrafter_cuda.so"
#: C ABI version this binding speaks (cpp/include/redrafter/c_api.h, REDRAFTER_ABI_VERSION).
ABI_VERSION = 3

#: The operators' logits dtypes and their C ABI codes (any other dtype is taken as float32).
LOGITS_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MSG_LEN = 512
_lib: ctypes.CDLL | None = None
_cuda_lib: ctypes.CDLL | None = None
_cuda_error: str | None = None  # why the CUDA library did not load (cached: tried once)

_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_sz, _f32 = ctypes.c_size_t, ctypes.c_float


# ---------------------------------------------------------------------- the C ABI's params structs
def _fields(ctype: Any, *names: str) -> list[tuple[str, Any]]:
    return [(n, ctype) for n in names]


class _Params(ctypes.Structure):
    """A params struct of the C ABI: its first field, ``struct_size``, is its own size (set here
    unless given), which the library checks; the fields are keywords (pointers as ints such as
    ``data_ptr()``, None for NULL). Unset fields are 0 / NULL."""

    def __init__(self, **fields: Any) -> None:
        fields.setdefault("struct_size", ctypes.sizeof(self))
        super().__init__(**fields)


class BeamSearchParams(_Params):
    """``RedrafterBeamSearchParams``: :func:`beam_search_step`'s and the CUDA launcher's
    (``workspace`` and ``stream`` are the launcher's)."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "logits", "beam_scores", "vocab_map", "new_scores", "parent", "token"),
        *_fields(_p, "workspace", "stream"),
        *_fields(_i64, "batch", "num_beams", "vocab", "warp_k"),
        ("workspace_bytes", _sz),
        ("dtype", _i32),
    ]


class TreePackParams(_Params):
    """``RedrafterTreePackParams``: :func:`pack_tree`'s."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "beams", "packed_tokens", "packed_len", "unpacker", "position_offsets"),
        *_fields(_p, "packed_mask", "stream"),
        *_fields(_i64, "batch", "num_beams", "beam_len"),
    ]


class AcceptParams(_Params):
    """``RedrafterAcceptParams``: :func:`accept`'s and the CUDA launcher's."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "logits", "beams", "unpacker", "packed_len"),
        *_fields(_p, "temperature", "top_k", "top_p", "uniforms"),
        *_fields(_p, *Acceptance._fields),  # num_accepted .. emitted, the outputs
        *_fields(_p, "workspace", "stream"),
        *_fields(_i64, "batch", "num_nodes", "vocab", "num_beams", "beam_len"),
        ("workspace_bytes", _sz),
        ("dtype", _i32),
    ]


class KvRelocateParams(_Params):
    """``RedrafterKvRelocateParams``: KV relocation's, contiguous (the fields from
    ``cache_elems`` on unread) and strided (:class:`KvLayout`'s fields)."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "cache", "slots", "cache_lengths", "accepted_indices", "num_accepted"),
        *_fields(_p, "new_lengths", "stream"),
        *_fields(_i64, "elem_bytes", "num_layers", "num_slots", "num_kv_heads", "max_seq_len"),
        *_fields(_i64, "head_dim", "batch", "beam_len", "cache_elems", *KvLayout._fields),
    ]


class DrawTokensParams(_Params):
    """``RedrafterDrawTokensParams``: :func:`draw_tokens`'s."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "logits", "temperature", "top_k", "top_p", "uniforms", "tokens"),
        *_fields(_i64, "rows", "vocab"),
        ("dtype", _i32),
    ]


class LinearParams(_Params):
    """``RedrafterLinearParams``: the CPU linear kernel's (:func:`linear_packed`)."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "x", "w", "bias", "y"),
        *_fields(_i64, "m", "n", "k"),
        *_fields(_i32, "x_dtype", "w_dtype", "y_dtype", "threads", "force_scalar"),
    ]


class AttentionParams(_Params):
    """``RedrafterAttentionParams``: the CPU attention kernel's (:func:`attention`)."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "q", "cache", "slots", "mask", "out"),
        *_fields(_i64, "b", "t", "nh", "nkv", "hd", "s", "cap", "num_slots"),
        ("scale", _f32),
        *_fields(_i32, "cache_dtype", "threads", "force_scalar"),
    ]


class EmbedBlocksParams(_Params):
    """``RedrafterEmbedBlocksParams``: :func:`embed_blocks`'s."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "qs", "d", "m", "ids", "out"),
        *_fields(_i64, "rows", "k", "count"),
        ("fmt", _i32),
    ]


class DecoderLayerParams(ctypes.Structure):
    """``RedrafterDecoderLayer`` (cpp/include/redrafter/decoder_cpu.h): one layer's packed weights,
    their format codes and float32 biases and norm weights (pointers)."""

    _fields_ = [
        *_fields(_p, "qkv", "qkv_bias", "dense", "dense_bias", "gate_up", "gate_up_bias"),
        *_fields(_p, "gate", "gate_bias", "up", "up_bias", "down", "down_bias"),
        *_fields(_p, "input_norm", "post_norm"),
        *_fields(_i32, "qkv_fmt", "dense_fmt", "gate_up_fmt", "gate_fmt", "up_fmt", "down_fmt"),
    ]


class DecoderParams(_Params):
    """``RedrafterDecoderParams`` (cpp/include/redrafter/decoder_cpu.h), the one argument of
    :func:`decoder_forward`'s C function."""

    _fields_ = [
        ("struct_size", _i64),
        *_fields(_p, "x", "cos", "sin", "cache", "slots", "write_pos", "mask", "layers"),
        *_fields(_i64, "num_layers", "b", "t", "s", "cap", "num_slots", "hidden", "heads"),
        *_fields(_i64, "kv_heads", "head_size", "intermediate"),
        *_fields(_f32, "eps", "scale"),
        *_fields(_i32, "cache_dtype", "threads"),
    ]


#: Every struct of the C ABI by its C name (tests/test_native_abi.py compares each with the
#: library's layout, :func:`c_params_layout`).
ABI_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "RedrafterBeamSearchParams": BeamSearchParams,
    "RedrafterTreePackParams": TreePackParams,
    "RedrafterAcceptParams": AcceptParams,
    "RedrafterKvRelocateParams": KvRelocateParams,
    "RedrafterDrawTokensParams": DrawTokensParams,
    "RedrafterLinearParams": LinearParams,
    "RedrafterAttentionParams": AttentionParams,
    "RedrafterEmbedBlocksParams": EmbedBlocksParams,
    "RedrafterDecoderParams": DecoderParams,
    "RedrafterDecoderLayer": DecoderLayerParams,
}

#: A field's layout: (name, offset, size, kind: p pointer, i signed / u unsigned int, f float).
FieldLayout = tuple[str, int, int, str]


def c_params_layout() -> dict[str, tuple[int, list[FieldLayout]]]:
    """Every params struct's ``sizeof`` and fields as the loaded library lays them out
    (``redrafter_params_layout``): what the mirrors above must match."""
    out = {}
    for line in load_library().redrafter_params_layout().decode().splitlines():
        name, size, *fields = line.split()
        parsed = [f.split(":") for f in fields]
        out[name] = (int(size), [(n, int(o), int(s), k) for n, o, s, k in parsed])
    return out


def _kind(ctype: Any) -> str:
    if ctype is _p:
        return "p"
    if ctype in (_f32, ctypes.c_double):
        return "f"
    return "i" if ctype(-1).value < 0 else "u"


def python_params_layout() -> dict[str, tuple[int, list[FieldLayout]]]:
    """The same description computed from the ctypes mirrors (:data:`ABI_STRUCTS`)."""
    out = {}
    for name, cls in ABI_STRUCTS.items():
        fields = [(fd[0], getattr(cls, fd[0]), _kind(fd[1])) for fd in cls._fields_]
        out[name] = (ctypes.sizeof(cls), [(f, d.offset, d.size, k) for f, d, k in fields])
    return out


# ---------------------------------------------------------------------- the libraries' functions
#: restype of an operator: a status code, with (msg, msg_len) appended to its arguments
_STATUS = "status"


def _op(params: type[ctypes.Structure]) -> tuple[list[Any], Any]:
    """An operator's signature: its params struct by pointer, a status."""
    return [ctypes.POINTER(params)], _STATUS


#: The functions of libredrafter_cpu.so this binding calls: name -> (argtypes, restype).
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "redrafter_params_layout": ([], ctypes.c_char_p),
    "redrafter_beam_search_step_cpu": _op(BeamSearchParams),
    "redrafter_tree_pack_cpu": _op(TreePackParams),
    "redrafter_accept_cpu": _op(AcceptParams),
    "redrafter_kv_relocate_cpu": _op(KvRelocateParams),
    "redrafter_kv_relocate_strided_cpu": _op(KvRelocateParams),
    "redrafter_draw_tokens_cpu": _op(DrawTokensParams),
    "redrafter_linear_packed_cpu": _op(LinearParams),
    "redrafter_linear_cpu": _op(LinearParams),
    "redrafter_attention_cpu": _op(AttentionParams),
    "redrafter_embed_blocks_cpu": _op(EmbedBlocksParams),
    "redrafter_decoder_forward_cpu": _op(DecoderParams),
    # the small kernels (cpp/src/{linear,layer_ops}_cpu.cpp) take their few arguments directly
    "redrafter_linear_pack_cpu": ([_p, _i32, _p, _i64, _i64], _STATUS),
    "redrafter_linear_pack_blocks_cpu": ([_p, _p, _p, _i32, _p, _i64, _i64], _STATUS),
    "redrafter_rmsnorm_cpu": ([_p, _p, _p, _i32, _i64, _i64, _f32], _STATUS),
    "redrafter_rope_cpu": ([_p, _i32, _i64, _i64, _i64, _i64, _p, _p], _STATUS),
    "redrafter_silu_mul_cpu": ([_p, _p, _i32, _i64, _i64], _STATUS),
    # queries, and the machine probes (cpp/src/machine_cpu.cpp)
    "redrafter_linear_simd_cpu": ([], _i32),
    "redrafter_linear_packed_elems": ([_i64, _i64], _i64),
    "redrafter_linear_blocks_packed_bytes": ([_i32, _i64, _i64], _i64),
    "redrafter_read_sum_cpu": ([_p, _i64, _i32], _f32),
    "redrafter_fma_burn_cpu": ([_i64, _i64, _i32], _f32),
}
#: The functions of libredrafter_cuda.so (the same operators' CUDA launchers).
_CUDA_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "redrafter_beam_search_workspace_bytes": ([ctypes.POINTER(BeamSearchParams)], _sz),
    "redrafter_accept_workspace_bytes": ([ctypes.POINTER(AcceptParams)], _sz),
    "redrafter_beam_search_step_cuda": _op(BeamSearchParams),
    "redrafter_tree_pack_cuda": _op(TreePackParams),
    "redrafter_accept_cuda": _op(AcceptParams),
    "redrafter_kv_relocate_cuda": _op(KvRelocateParams),
    "redrafter_kv_relocate_strided_cuda": _op(KvRelocateParams),
}


def _env_path(env_name: str, default: Path) -> Path:
    env = os.environ.get(env_name)
    return Path(env) if env else default


def library_path() -> Path:
    """Where the CPU library is looked for (``$REDRAFTER_NATIVE_LIB`` or ``cpp/build/``)."""
    return _env_path(LIB_ENV, DEFAULT_LIB)


def _open(
    path: Path, what: str, where: str, env_name: str, file_name: str, version: str, signatures: dict
) -> ctypes.CDLL:
    """Open one of our shared libraries, check its C ABI version (the function ``version``) and
    bind ``signatures``; every failure says how to build it."""
    if not path.is_file():
        raise RedrafterError(
            f"{what} not found at {path}: build it with `{BUILD_COMMAND}` {where}, "
            f"or set {env_name} to a built {file_name}"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RedrafterError(
            f"cannot load {what} {path}: {e}; rebuild it with `{BUILD_COMMAND}`"
        ) from e
    _bind(lib, path, {version: ([], _i32)})
    found = getattr(lib, version)()
    if found != ABI_VERSION:
        raise RedrafterError(
            f"{what} {path} speaks C ABI version {found}, this binding needs "
            f"{ABI_VERSION}: rebuild it with `{BUILD_COMMAND}`"
        )
    _bind(lib, path, signatures)
    return lib


def load_library() -> ctypes.CDLL:
    """The loaded ``libredrafter_cpu.so``; raises :class:`RedrafterError` saying how to build it."""
    global _lib
    if _lib is not None:
        return _lib
    _lib = _open(
        library_path(),
        "native library",
        f"from {REPO_ROOT} (needs cmake and g++)",
        LIB_ENV,
        "libredrafter_cpu.so",
        "redrafter_abi_version",
        _SIGNATURES,
    )
    return _lib


def _bind(lib: ctypes.CDLL, path: Path, signatures: dict) -> None:
    for name, (argtypes, restype) in signatures.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise RedrafterError(
                f"native library {path} has no {name} (built from older sources): rebuild it "
                f"with `{BUILD_COMMAND}`"
            ) from None
        if restype == _STATUS:  # an operator: its message buffer and length last
            fn.argtypes, fn.restype = [*argtypes, ctypes.c_char_p, _i64], _i32
        else:
            fn.argtypes, fn.restype = argtypes, restype


def cuda_library_path() -> Path:
    """Where the CUDA library is looked for (``$REDRAFTER_CUDA_LIB`` or ``cpp/build/``)."""
    return _env_path(CUDA_LIB_ENV, DEFAULT_CUDA_LIB)


def load_cuda_library() -> ctypes.CDLL:
    """The loaded ``libredrafter_cuda.so`` (CUDA launchers); raises :class:`RedrafterError`.

    Loaded on first use only; a failure is remembered (the next call raises the same error).
    """
    global _cuda_lib, _cuda_error
    if _cuda_lib is not None:
        return _cuda_lib
    if _cuda_error is not None:
        raise RedrafterError(_cuda_error)
    try:
        lib = _open(
            cuda_library_path(),
            "CUDA library",
            "where nvcc exists",
            CUDA_LIB_ENV,
            "libredrafter_cuda.so",
            "redrafter_cuda_abi_version",
            _CUDA_SIGNATURES,
        )
    except RedrafterError as e:
        _cuda_error = str(e)
        raise
    _cuda_lib = lib
    return lib


def cuda_available() -> bool:
    """True when ``libredrafter_cuda.so`` is built and loads (it does not check for a GPU)."""
    try:
        load_cuda_library()
        return True
    except RedrafterError:
        return False


def kernels_fingerprint() -> str | None:
    """A short digest of the loaded CPU library's file (None when it does not load): timings
    measured on one build of the kernels (a cost model) do not describe another. Taken once, when
    first asked after the library loaded (a rebuild of the file does not change the library this
    process runs)."""
    global _kernels_digest
    if _kernels_digest is None:
        try:
            load_library()
        except RedrafterError:
            return None
        h = hashlib.sha256()
        with open(library_path(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _kernels_digest = h.hexdigest()[:16]
    return _kernels_digest


_kernels_digest: str | None = None


def available() -> bool:
    """True when the CPU library is built and loads."""
    try:
        load_library()
        return True
    except RedrafterError:
        return False


_local = threading.local()  # each thread's message buffer


def call(name: str, *args: Any, lib: ctypes.CDLL | None = None) -> None:
    """Run the operator ``name`` of the CPU library (or of ``lib``, e.g. :func:`load_cuda_library`)
    on ``args`` (its params struct, or the few arguments of a small kernel), with a message
    buffer; a non-zero status raises :class:`RedrafterError` with the library's message."""
    fn = getattr(lib if lib is not None else load_library(), name)
    msg = getattr(_local, "msg", None)
    if msg is None:
        msg = _local.msg = ctypes.create_string_buffer(_MSG_LEN)
    status = fn(*args, msg, _MSG_LEN)
    if status != 0:
        raise RedrafterError(f"{msg.value.decode(errors='replace')} [native status {status}]")


def _cpu(x, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.device.type != "cpu":
        raise RedrafterError(
            f"{name}: the native CPU reference needs a CPU tensor, got device {t.device}"
        )
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous()


def as_logits(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous in a dtype of :data:`LOGITS_DTYPES` (float32 unless it has one)."""
    return (t if t.dtype in LOGITS_DTYPES else t.float()).contiguous()


def _logits(x, name: str) -> torch.Tensor:
    return as_logits(_cpu(x, name))


def _shape(t: torch.Tensor, shape: tuple, name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise RedrafterError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _ndim(t: torch.Tensor, ndim: int, name: str, dims: str) -> None:
    if t.dim() != ndim:
        raise RedrafterError(f"{name}: expected {ndim} dims {dims}, got shape {list(t.shape)}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def beam_search_params(
    logits: torch.Tensor,
    beam_scores: torch.Tensor,
    warp_k: int,
    vocab_map: torch.Tensor | None,
    new_scores: torch.Tensor,
    parent: torch.Tensor,
    token: torch.Tensor,
) -> BeamSearchParams:
    """The beam-search step's params over these contiguous tensors (CPU or CUDA; logits
    [B, W, V] in a dtype of :data:`LOGITS_DTYPES`, the rest as :func:`beam_search_step`'s);
    the library checks them."""
    b, w, v = logits.shape
    return BeamSearchParams(
        logits=logits.data_ptr(),
        dtype=LOGITS_DTYPES[logits.dtype],
        beam_scores=beam_scores.data_ptr(),
        vocab_map=_ptr(vocab_map),
        new_scores=new_scores.data_ptr(),
        parent=parent.data_ptr(),
        token=token.data_ptr(),
        batch=b,
        num_beams=w,
        vocab=v,
        warp_k=int(warp_k),
    )


def beam_search_step(logits, beam_scores, warp_k: int = DEFAULT_WARP_K, vocab_map=None):
    """Native twin of :func:`redrafter_trt.ops.beam_search.beam_search_step`.

    Args:
        logits: [B, W, V] float32/float16/bfloat16; beam_scores: [B, W] float32; warp_k: int;
        vocab_map: None or [V] int32, the full-vocabulary id of each logit column (a head's
            draft vocabulary; V is then its K).
    Returns:
        new_scores [B, W] float32 (descending), parent [B, W] int32, token [B, W] int32
        (``vocab_map[column]`` with a map).
    """
    x = _logits(logits, "beam_search_step logits")
    _ndim(x, 3, "beam_search_step logits", "[B, W, V]")
    b, w, v = x.shape
    s = _cpu(beam_scores, "beam_search_step beam_scores", torch.float32)
    _shape(s, (b, w), "beam_search_step beam_scores")
    m = None if vocab_map is None else _cpu(vocab_map, "beam_search_step vocab_map", torch.int32)
    if m is not None:
        _shape(m, (v,), "beam_search_step vocab_map")
    scores = torch.empty((b, w), dtype=torch.float32)
    parent = torch.empty((b, w), dtype=torch.int32)
    token = torch.empty((b, w), dtype=torch.int32)
    if b == 0 and 1 <= w <= min(v, 64):  # nothing to do (empty tensors have no data pointer)
        return scores, parent, token
    call(
        "redrafter_beam_search_step_cpu", beam_search_params(x, s, warp_k, m, scores, parent, token)
    )
    return scores, parent, token


def pack_tree(beams) -> PackedTree:
    """Native twin of :func:`redrafter_trt.ops.tree.pack_tree` (beams [B, W, L] int)."""
    bm = _cpu(beams, "pack_tree beams", torch.int32)
    _ndim(bm, 3, "pack_tree beams", "[B, W, L]")
    b, w, l = bm.shape
    n = w * l
    tokens = torch.empty((b, n), dtype=torch.int32)
    lengths = torch.empty((b,), dtype=torch.int32)
    unpacker = torch.empty((b, w, l), dtype=torch.int32)
    offsets = torch.empty((b, n), dtype=torch.int32)
    packed_mask = torch.empty((b, n, mask_words(n)), dtype=torch.int32)
    if b == 0 and 1 <= w <= 64 and 1 <= l <= 64:
        return PackedTree(
            tokens,
            lengths,
            unpacker,
            offsets,
            packed_mask,
            torch.zeros((0, n, n), dtype=torch.bool),
        )
    p = TreePackParams(
        beams=bm.data_ptr(),
        packed_tokens=tokens.data_ptr(),
        packed_len=lengths.data_ptr(),
        unpacker=unpacker.data_ptr(),
        position_offsets=offsets.data_ptr(),
        packed_mask=packed_mask.data_ptr(),
        batch=b,
        num_beams=w,
        beam_len=l,
    )
    call("redrafter_tree_pack_cpu", p)
    return PackedTree(
        tokens, lengths, unpacker, offsets, packed_mask, packed_mask_to_bool(packed_mask, n)
    )


def accept_params(
    logits: torch.Tensor,
    beams: torch.Tensor,
    unpacker: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    out: Acceptance,
    packed_len: torch.Tensor | None = None,
) -> AcceptParams:
    """Acceptance's params over these contiguous tensors (CPU or CUDA; logits [B, N, V] in a
    dtype of :data:`LOGITS_DTYPES`, the rest as :func:`accept`'s, int32 and float32; ``out``
    the output tensors); the library checks them."""
    b, n, v = logits.shape
    _, w, l = beams.shape
    return AcceptParams(
        logits=logits.data_ptr(),
        dtype=LOGITS_DTYPES[logits.dtype],
        beams=beams.data_ptr(),
        unpacker=unpacker.data_ptr(),
        packed_len=_ptr(packed_len),
        temperature=temperature.data_ptr(),
        top_k=top_k.data_ptr(),
        top_p=top_p.data_ptr(),
        uniforms=uniforms.data_ptr(),
        **{name: t.data_ptr() for name, t in out._asdict().items()},
        batch=b,
        num_nodes=n,
        vocab=v,
        num_beams=w,
        beam_len=l,
    )


def accept(
    logits, beams, unpacker, temperature, top_k, top_p, uniforms, packed_len=None
) -> Acceptance:
    """Native twin of :func:`redrafter_trt.ops.accept.accept`.

    Args:
        logits: [B, N, V] float32/float16/bfloat16; beams, unpacker: [B, W, L] int;
        temperature: [B] float (<= 0 greedy); top_k: [B] int (0 off); top_p: [B] float;
        uniforms: [B, L] float32; packed_len: optional [B] int (checked against the unpacker).
    Returns:
        :class:`~redrafter_trt.ops.accept.Acceptance` of int32 tensors.
    """
    x = _logits(logits, "accept logits")
    _ndim(x, 3, "accept logits", "[B, N, V]")
    b, n, v = x.shape
    bm = _cpu(beams, "accept beams", torch.int32)
    _ndim(bm, 3, "accept beams", "[B, W, L]")
    _, w, l = bm.shape
    _shape(bm, (b, w, l), "accept beams")
    up = _cpu(unpacker, "accept unpacker", torch.int32)
    _shape(up, (b, w, l), "accept unpacker")
    temp = _cpu(temperature, "accept temperature", torch.float32).reshape(-1)
    tk = _cpu(top_k, "accept top_k", torch.int32).reshape(-1)
    tp = _cpu(top_p, "accept top_p", torch.float32).reshape(-1)
    for t, name in ((temp, "temperature"), (tk, "top_k"), (tp, "top_p")):
        _shape(t, (b,), f"accept {name}")
    u = _cpu(uniforms, "accept uniforms", torch.float32)
    _shape(u, (b, l), "accept uniforms")
    plen = None
    if packed_len is not None:
        plen = _cpu(packed_len, "accept packed_len", torch.int32)
        _shape(plen, (b,), "accept packed_len")
    out = Acceptance(
        *(torch.empty(s, dtype=torch.int32) for s in ((b,), (b,), (b,), (b, l), (b, l)))
    )
    if b == 0 and 1 <= w <= 64 and 1 <= l <= 64:
        return out
    call("redrafter_accept_cpu", accept_params(x, bm, up, temp, tk, tp, u, out, plen))
    return out


def draw_tokens(logits, temperature, top_k, top_p, uniforms) -> torch.Tensor:
    """Native twin of :func:`redrafter_trt.ops.sampling.draw_tokens` (logits [N, V]); int32 [N]."""
    x = _logits(logits, "draw_tokens logits")
    _ndim(x, 2, "draw_tokens logits", "[N, V]")
    rows, v = x.shape
    temp = _cpu(temperature, "draw_tokens temperature", torch.float32).reshape(-1)
    tk = _cpu(top_k, "draw_tokens top_k", torch.int32).reshape(-1)
    tp = _cpu(top_p, "draw_tokens top_p", torch.float32).reshape(-1)
    u = _cpu(uniforms, "draw_tokens uniforms", torch.float32).reshape(-1)
    for t, name in ((temp, "temperature"), (tk, "top_k"), (tp, "top_p"), (u, "uniforms")):
        _shape(t, (rows,), f"draw_tokens {name}")
    out = torch.empty((rows,), dtype=torch.int32)
    if rows == 0:
        return out
    p = DrawTokensParams(
        logits=x.data_ptr(),
        dtype=LOGITS_DTYPES[x.dtype],
        temperature=temp.data_ptr(),
        top_k=tk.data_ptr(),
        top_p=tp.data_ptr(),
        uniforms=u.data_ptr(),
        tokens=out.data_ptr(),
        rows=rows,
        vocab=v,
    )
    call("redrafter_draw_tokens_cpu", p)
    return out


def kv_relocate_params(
    cache: torch.Tensor | None,
    slots: torch.Tensor | None,
    cache_lengths: torch.Tensor | None,
    accepted_indices: torch.Tensor,
    num_accepted: torch.Tensor | None,
    new_lengths: torch.Tensor | None,
    *,
    num_layers: int,
    num_slots: int,
    kv_heads: int,
    max_seq: int,
    head_dim: int,
    elem_bytes: int | None = None,
    layout: KvLayout | None = None,
    cache_elems: int = 0,
) -> KvRelocateParams:
    """KV relocation's params over these contiguous tensors (CPU or CUDA; as
    :func:`relocate_kv_strided`'s, int32; None is NULL): the dims, the element size (default the
    cache's), and for the strided entry points the ``layout`` and ``cache_elems``. The library
    checks them."""
    b, l = accepted_indices.shape
    if elem_bytes is None:
        elem_bytes = 0 if cache is None else cache.element_size()
    return KvRelocateParams(
        cache=_ptr(cache),
        slots=_ptr(slots),
        cache_lengths=_ptr(cache_lengths),
        accepted_indices=accepted_indices.data_ptr(),
        num_accepted=_ptr(num_accepted),
        new_lengths=_ptr(new_lengths),
        elem_bytes=elem_bytes,
        num_layers=int(num_layers),
        num_slots=int(num_slots),
        num_kv_heads=int(kv_heads),
        max_seq_len=int(max_seq),
        head_dim=int(head_dim),
        batch=b,
        beam_len=l,
        cache_elems=int(cache_elems),
        **({} if layout is None else {f: int(v) for f, v in layout._asdict().items()}),
    )


def relocate_kv(
    cache: torch.Tensor, slots, cache_lengths, accepted_indices, num_accepted
) -> torch.Tensor:
    """Native twin of :func:`redrafter_trt.ops.kv_cache.relocate_kv`; moves ``cache`` in place.

    Args:
        cache: [layers, 2, slots, kv_heads, max_seq, head_dim] contiguous CPU tensor (any dtype).
        slots, cache_lengths, num_accepted: [B] int; accepted_indices: [B, L] int.
    Returns:
        new cache lengths [B] int32.
    """
    if (
        not isinstance(cache, torch.Tensor)
        or cache.device.type != "cpu"
        or not cache.is_contiguous()
    ):
        raise RedrafterError(
            "relocate_kv: cache must be a contiguous CPU torch.Tensor "
            "[layers, 2, slots, kv_heads, max_seq, head_dim] (it is updated in place)"
        )
    _ndim(cache, 6, "relocate_kv cache", "[layers, 2, slots, kv_heads, max_seq, head_dim]")
    layers, two, num_slots, heads, max_seq, head_dim = cache.shape
    if two != 2:
        raise RedrafterError(
            f"relocate_kv cache: dim 1 must be 2 (K and V), got shape {list(cache.shape)}"
        )
    q = _cpu(accepted_indices, "relocate_kv accepted_indices", torch.int32)
    _ndim(q, 2, "relocate_kv accepted_indices", "[B, L]")
    b, l = q.shape
    sl = _cpu(slots, "relocate_kv slots", torch.int32).reshape(-1)
    lens = _cpu(cache_lengths, "relocate_kv cache_lengths", torch.int32).reshape(-1)
    na = _cpu(num_accepted, "relocate_kv num_accepted", torch.int32).reshape(-1)
    for t, name in ((sl, "slots"), (lens, "cache_lengths"), (na, "num_accepted")):
        _shape(t, (b,), f"relocate_kv {name}")
    out = torch.empty((b,), dtype=torch.int32)
    if b == 0 and 1 <= l <= 64:
        return out
    p = kv_relocate_params(
        cache,
        sl,
        lens,
        q,
        na,
        out,
        num_layers=layers,
        num_slots=num_slots,
        kv_heads=heads,
        max_seq=max_seq,
        head_dim=head_dim,
    )
    call("redrafter_kv_relocate_cpu", p)
    return out


def _extent(t: torch.Tensor) -> int:
    """Elements a strided view reaches from its data pointer (0 when empty)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


def relocate_kv_strided(
    cache: torch.Tensor,
    slots,
    cache_lengths,
    accepted_indices,
    num_accepted,
    *,
    layout: KvLayout,
    num_layers: int,
    num_slots: int,
    kv_heads: int,
    max_seq: int,
    head_dim: int,
    cache_elems: int | None = None,
) -> torch.Tensor:
    """docs/design.md section 7 in place on a cache of any blocked, strided layout (:class:`KvLayout`).

    A CPU ``cache`` runs the C++ CPU reference; a CUDA ``cache`` runs the CUDA kernel of
    ``libredrafter_cuda.so`` on ``torch.cuda.current_stream()`` (asynchronously; bad rows get
    new length -1 there instead of an error).

    Args:
        cache: the tensor whose ``data_ptr()`` is element 0 of the layout (any dtype).
        slots, cache_lengths, num_accepted: [B] int; accepted_indices: [B, L] int.
        layout: the strides; num_layers .. head_dim: the dims (max_seq: positions per slot).
        cache_elems: elements addressable from ``data_ptr()`` (default: the view's extent); the
            native code rejects layouts reaching beyond it.
    Returns:
        new cache lengths [B] int32, on the cache's device.
    """
    if not isinstance(cache, torch.Tensor):
        raise RedrafterError(
            "relocate_kv_strided: cache must be a torch.Tensor (it is updated in place)"
        )
    dev = cache.device
    if dev.type not in ("cpu", "cuda"):
        raise RedrafterError(
            f"relocate_kv_strided: cache must be on the CPU or a CUDA device, got {dev}"
        )

    def ints(x):
        return torch.as_tensor(x).to(device=dev, dtype=torch.int32).contiguous()

    q = ints(accepted_indices)
    _ndim(q, 2, "relocate_kv_strided accepted_indices", "[B, L]")
    b, l = q.shape
    sl, lens, na = (ints(x).reshape(-1) for x in (slots, cache_lengths, num_accepted))
    for t, name in ((sl, "slots"), (lens, "cache_lengths"), (na, "num_accepted")):
        _shape(t, (b,), f"relocate_kv_strided {name}")
    out = torch.empty((b,), dtype=torch.int32, device=dev)
    if b == 0 and 1 <= l <= 64:
        return out
    p = kv_relocate_params(
        cache,
        sl,
        lens,
        q,
        na,
        out,
        num_layers=num_layers,
        num_slots=num_slots,
        kv_heads=kv_heads,
        max_seq=max_seq,
        head_dim=head_dim,
        layout=layout,
        cache_elems=_extent(cache) if cache_elems is None else int(cache_elems),
    )
    if dev.type == "cpu":
        call("redrafter_kv_relocate_strided_cpu", p)
    else:
        lib = load_cuda_library()
        with torch.cuda.device(dev):
            p.stream = torch.cuda.current_stream(dev).cuda_stream
            call("redrafter_kv_relocate_strided_cuda", p, lib=lib)
    return out


def relocate_paged_native(
    pool: torch.Tensor,
    slots,
    cache_lengths,
    accepted_indices,
    num_accepted,
    *,
    max_blocks: int,
    kv_heads: int,
    tokens_per_block: int,
    head_dim: int,
) -> torch.Tensor:
    """Native twin of :func:`redrafter_trt.ops.kv_cache.relocate_paged` (CPU reference or CUDA kernel).

    Args:
        pool: [slots * max_blocks, layers, 2, kv_heads * tokens_per_block * head_dim] (last dim
            contiguous; the outer strides are taken from the tensor), CPU or CUDA.
    Returns:
        new cache lengths [B] int32 (positions per slot: max_blocks * tokens_per_block).
    """
    layout = paged_pool_layout(
        pool,
        max_blocks=max_blocks,
        kv_heads=kv_heads,
        tokens_per_block=tokens_per_block,
        head_dim=head_dim,
    )
    blocks, layers = pool.shape[:2]
    return relocate_kv_strided(
        pool,
        slots,
        cache_lengths,
        accepted_indices,
        num_accepted,
        layout=layout,
        num_layers=layers,
        num_slots=blocks // max_blocks,
        kv_heads=kv_heads,
        max_seq=max_blocks * tokens_per_block,
        head_dim=head_dim,
    )


# ---------------------------------------------------------------------- batch-invariant linear
_LINEAR_DTYPES = {torch.float32: 0, torch.bfloat16: 2}
#: GGUF block formats the kernel decodes in registers (cpp/src/linear_cpu.cpp kQ4_1, kQ8_0)
_BLOCK_CODES = {"q4_1": 10, "q8_0": 11}
#: weights per GGUF block along K (cpp/src/linear_cpu.cpp kBlock)
GGUF_BLOCK = 32
#: output columns per packed panel (cpp/src/linear_cpu.cpp kPanel)
LINEAR_PANEL = 16


def linear_available() -> bool:
    """True when the CPU library, and with it the batch-invariant linear kernel, loads."""
    return available()


def require_linear() -> None:
    """Raise a :class:`RedrafterError` saying how to build the library when the kernel is missing."""
    load_library()


def simd_level() -> int:
    """The kernels' SIMD path on this CPU: 2 AVX-512, 1 AVX2+FMA, 0 the portable path (same bits
    on every path; ``$REDRAFTER_NO_AVX512`` keeps AVX2)."""
    return int(load_library().redrafter_linear_simd_cpu())


def _check_linear_tensor(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu" or t.dtype not in _LINEAR_DTYPES:
        raise RedrafterError(
            f"linear: {name} must be a float32 or bfloat16 CPU tensor, got {t.dtype} on {t.device}"
        )


class PackedWeight:
    """A weight [N, K] packed once for :func:`linear_packed` (panels of 16 output columns,
    ``[ceil(N/16), K, 16]``, zero-padded; float32 or bfloat16 as given), or a GGUF block weight
    packed by :func:`pack_blocks` (``fmt`` ``q4_1`` / ``q8_0``; ``data`` bytes)."""

    __slots__ = ("data", "n", "k", "fmt", "__weakref__")

    def __init__(self, data: torch.Tensor, n: int, k: int, fmt: str | None = None):
        self.data, self.n, self.k, self.fmt = data, n, k, fmt

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def code(self) -> int:
        """The kernel's weight type: 0 float32, 2 bfloat16, 10 q4_1, 11 q8_0."""
        return _BLOCK_CODES[self.fmt] if self.fmt else _LINEAR_DTYPES[self.data.dtype]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def pack_linear(weight: torch.Tensor) -> PackedWeight:
    """Pack ``weight`` [N, K] (float32/bfloat16, CPU) for :func:`linear_packed`."""
    lib = load_library()
    _check_linear_tensor("weight", weight)
    if weight.dim() != 2:
        raise RedrafterError(f"linear: weight must be [N, K], got {list(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().contiguous()
    elems = int(lib.redrafter_linear_packed_elems(n, k))
    packed = torch.empty(elems, dtype=w.dtype)
    call(
        "redrafter_linear_pack_cpu", w.data_ptr(), _LINEAR_DTYPES[w.dtype], packed.data_ptr(), n, k
    )
    return PackedWeight(packed, int(n), int(k))


def _panels(packed: PackedWeight, where: str) -> torch.Tensor:
    """The float32/bf16 panels of a :func:`pack_linear` packing as ``[ceil(N/16), K, 16]``."""
    if packed.fmt:
        raise RedrafterError(
            f"{where}: {packed.fmt} block panels hold no float weight to read; decode the blocks"
        )
    np_ = -(-packed.n // LINEAR_PANEL)
    return packed.data[: np_ * packed.k * LINEAR_PANEL].view(np_, packed.k, LINEAR_PANEL)


def unpack_linear(packed: PackedWeight) -> torch.Tensor:
    """The weight [N, K] that :func:`pack_linear` packed (a new tensor of its dtype): the
    panels' permutation undone and the padding left out, so the packed values, bit for bit."""
    panels = _panels(packed, "unpack")
    np_, k = panels.shape[0], packed.k
    out = torch.empty((np_ * LINEAR_PANEL, k), dtype=packed.dtype)
    out.view(np_, LINEAR_PANEL, k).copy_(panels.transpose(1, 2))
    return out if np_ * LINEAR_PANEL == packed.n else out[: packed.n].clone()


def packed_rows(packed: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the weight a :func:`pack_linear` packing holds, ``[*ids.shape, K]`` (the
    rows of :func:`unpack_linear` bit for bit, without unpacking the rest): an embedding lookup
    in a tied vocabulary projection's panels. An id outside [0, N) is an error naming it."""
    if ids.device.type != "cpu" or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RedrafterError(
            f"packed rows: ids must be an integer CPU tensor, got {ids.dtype} on {ids.device}"
        )
    panels = _panels(packed, "packed rows")
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= packed.n):
        bad = int(flat.min()) if int(flat.min()) < 0 else int(flat.max())
        raise RedrafterError(f"packed rows: id {bad} is outside [0, {packed.n})")
    rows = panels[flat // LINEAR_PANEL, :, flat % LINEAR_PANEL]  # [M, K]
    return rows.reshape(*ids.shape, packed.k)


def packed_row_range(packed: PackedWeight, lo: int, hi: int) -> PackedWeight | None:
    """Rows [lo, hi) of a :func:`pack_linear` packing as a packing of their own that shares its
    memory (a view), or None where they do not start and end on panel boundaries (the end of
    the weight counts as one)."""
    if packed.fmt or lo % LINEAR_PANEL or not 0 <= lo < hi <= packed.n:
        return None
    if hi % LINEAR_PANEL and hi != packed.n:
        return None
    start, stop = lo * packed.k, -(-hi // LINEAR_PANEL) * LINEAR_PANEL * packed.k
    return PackedWeight(packed.data[start:stop], hi - lo, packed.k)


def pack_blocks(bt) -> PackedWeight:
    """Pack a GGUF block weight (:class:`~redrafter_trt.models.blocks.BlockTensor`) into block
    panels the kernel decodes in registers: 16 columns x 32 k each, scales widened to float32;
    :func:`linear_packed` then gives the bits of the float32 path on its exact expansion."""
    lib = load_library()
    if bt.fmt not in _BLOCK_CODES:
        raise RedrafterError(f"linear: unknown block format {bt.fmt!r}")
    nbytes = int(lib.redrafter_linear_blocks_packed_bytes(_BLOCK_CODES[bt.fmt], bt.n, bt.k))
    if nbytes <= 0:
        raise RedrafterError(f"linear: a {bt.fmt} weight [{bt.n}, {bt.k}] cannot be packed")
    code, qs, d, m = _block_parts(bt, "linear")
    packed = torch.empty(nbytes, dtype=torch.uint8)
    call(
        "redrafter_linear_pack_blocks_cpu",
        qs.data_ptr(),
        d.data_ptr(),
        _ptr(m),
        code,
        packed.data_ptr(),
        bt.n,
        bt.k,
    )
    return PackedWeight(packed, int(bt.n), int(bt.k), bt.fmt)


def _block_parts(bt, where: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The kernel's format code and the contiguous parts of a block weight, checked against the
    shapes its [n, k] promises (the kernels read what the shapes promise)."""
    if bt.fmt not in _BLOCK_CODES:
        raise RedrafterError(f"{where}: unknown block format {bt.fmt!r}")
    n, k, nb = bt.n, bt.k, bt.k // GGUF_BLOCK
    want = {"qs": ((n, k // 2), torch.uint8), "d": ((n, nb), torch.float16)}
    if bt.fmt == "q8_0":
        want["qs"] = ((n, k), torch.int8)
    else:
        want["m"] = ((n, nb), torch.float16)
    for part, (shape, dtype) in want.items():
        t = getattr(bt, part, None)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            found = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise RedrafterError(
                f"{where}: tensor weight.{bt.fmt}.{part}: expected {dtype} {list(shape)}, found {found}"
            )
    m = bt.m.contiguous() if bt.m is not None else None
    return _BLOCK_CODES[bt.fmt], bt.qs.contiguous(), bt.d.contiguous(), m


def embed_blocks(bt, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a GGUF block table (:class:`~redrafter_trt.models.blocks.BlockTensor`
    [V, H], ``q8_0`` or ``q4_1``) as float32 ``[*ids.shape, H]``, decoded in C++
    (``cpp/src/embed_cpu.cpp``) with the converter's operations: bit-identical to the rows of
    :func:`~redrafter_trt.models.blocks.decode`, without a float32 [V, H] table. An id outside
    [0, V) is an error naming it."""
    if ids.device.type != "cpu" or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise RedrafterError(
            f"embed: ids must be an integer CPU tensor, got {ids.dtype} on {ids.device}"
        )
    code, qs, d, m = _block_parts(bt, "embed")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((*ids.shape, bt.k), dtype=torch.float32)
    if flat.numel() == 0:
        return out
    p = EmbedBlocksParams(
        qs=qs.data_ptr(),
        d=d.data_ptr(),
        m=_ptr(m),
        fmt=code,
        rows=bt.n,
        k=bt.k,
        ids=flat.data_ptr(),
        count=flat.numel(),
        out=out.data_ptr(),
    )
    call("redrafter_embed_blocks_cpu", p)
    return out


_linear_threads_override: int | None = None


def linear_threads() -> int:
    """Threads the linear kernel uses: torch's intra-op thread count (the run's ``--threads``),
    or, inside :func:`torch_ops_on_one_thread`, the count it saved."""
    n = _linear_threads_override or torch.get_num_threads()
    return max(1, min(256, n))


@contextlib.contextmanager
def torch_ops_on_one_thread():
    """Inside: torch's own ops (norms, RoPE, activation, indexing) on ONE thread, the kernels
    (:func:`linear_packed`, :func:`attention`) on the run's threads. Torch's OpenMP regions over
    a few kilobytes cost more in hand-off than they compute, and two pools spinning on the same
    cores slow each other down."""
    global _linear_threads_override
    n = torch.get_num_threads()
    if n == 1 or _linear_threads_override is not None:
        yield
        return
    _linear_threads_override = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _linear_threads_override = None


def linear_packed(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    threads: int | None = None,
    force_scalar: bool = False,
) -> torch.Tensor:
    """Batch-invariant ``x @ W.T + bias`` on the CPU with ``W`` packed by :func:`pack_linear`.

    Every output element is one fused multiply-add chain over k in order (float32), so a row's
    result has the same bits alone or among any rows, with any thread count, on either path.

    Args:
        x: [..., K] float32 or bfloat16 CPU tensor; bias: [N] or None (added in float32);
        out_dtype: float32 or bfloat16 (default x's); threads: default :func:`linear_threads`.
    Returns:
        [..., N] in ``out_dtype``.
    """
    out_dtype = out_dtype or x.dtype
    _check_linear_tensor("x", x)
    if out_dtype not in _LINEAR_DTYPES:
        raise RedrafterError(f"linear: out_dtype must be float32 or bfloat16, got {out_dtype}")
    n, k = weight.n, weight.k
    if x.shape[-1] != k:
        raise RedrafterError(
            f"linear: x [..., K] and weight [N, K] disagree: {list(x.shape)} vs [{n}, {k}]"
        )
    xc = x if x.is_contiguous() else x.contiguous()
    b = None
    if bias is not None:
        b = bias.detach()
        if b.dtype != torch.float32 or not b.is_contiguous():
            b = b.to(torch.float32).contiguous()
        if b.shape != (n,):
            raise RedrafterError(f"linear: bias must be [{n}], got {list(bias.shape)}")
    m = xc.numel() // k
    y = torch.empty((*x.shape[:-1], n), dtype=out_dtype)
    p = LinearParams(
        x=xc.data_ptr(),
        x_dtype=_LINEAR_DTYPES[xc.dtype],
        w=weight.data.data_ptr(),
        w_dtype=weight.code,
        bias=_ptr(b),
        y=y.data_ptr(),
        y_dtype=_LINEAR_DTYPES[out_dtype],
        m=m,
        n=n,
        k=k,
        threads=linear_threads() if threads is None else int(threads),
        force_scalar=int(force_scalar),
    )
    call("redrafter_linear_packed_cpu", p)
    return y


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    force_scalar: bool = False,
) -> torch.Tensor:
    """:func:`linear_packed` with an unpacked ``weight`` [N, K] (packed per call: for tests and
    one-off products; layers pack once with :func:`pack_linear`). The same bits."""
    load_library()
    _check_linear_tensor("weight", weight)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise RedrafterError(
            f"linear: x [..., K] and weight [N, K] disagree: {list(x.shape)} vs "
            f"{list(weight.shape)}"
        )
    return linear_packed(
        x, pack_linear(weight), bias, out_dtype, threads=1, force_scalar=force_scalar
    )


# ---------------------------------------------------------------------- batch-invariant attention
def attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    threads: int | None = None,
    force_scalar: bool = False,
) -> torch.Tensor:
    """Batch-invariant attention over one layer's slot KV cache (``cpp/src/attention_cpu.cpp``).

    Each query row is reduced alone over its allowed keys in position order, so its bits do not
    depend on the other rows, the call's size or the thread count: a token verified in a tree
    gets the bits it gets when decoded plainly.

    Args:
        q: [B, T, nh, hd] float32 (RoPE applied); layer_cache: [2, slots, nkv, cap, hd] float32
            or bfloat16, contiguous; slots: [B] int; mask: [B, T, S] bool, keys j < S allowed
            (S <= cap); scale: default 1/sqrt(hd).
    Returns:
        [B, T, nh, hd] float32.
    """
    if q.dim() != 4 or q.dtype != torch.float32 or q.device.type != "cpu":
        raise RedrafterError(
            f"attention: q must be a [B, T, nh, hd] float32 CPU tensor, got {q.dtype} {list(q.shape)}"
        )
    b, t, nh, hd = q.shape
    if (
        layer_cache.dim() != 5
        or layer_cache.shape[0] != 2
        or layer_cache.shape[4] != hd
        or layer_cache.dtype not in _LINEAR_DTYPES
        or not layer_cache.is_contiguous()
    ):
        raise RedrafterError(
            f"attention: layer_cache must be a contiguous [2, slots, nkv, cap, {hd}] float32/bfloat16 "
            f"tensor, got {layer_cache.dtype} {list(layer_cache.shape)}"
        )
    _, num_slots, nkv, cap, _ = layer_cache.shape
    if mask.dim() != 3 or tuple(mask.shape[:2]) != (b, t):
        raise RedrafterError(f"attention: mask must be [{b}, {t}, S], got {list(mask.shape)}")
    s = mask.shape[2]
    qc = q.contiguous()
    sl = slots.to(torch.int64).contiguous()
    mk = mask.to(torch.uint8).contiguous()
    out = torch.empty_like(qc)
    p = AttentionParams(
        q=qc.data_ptr(),
        cache=layer_cache.data_ptr(),
        cache_dtype=_LINEAR_DTYPES[layer_cache.dtype],
        slots=sl.data_ptr(),
        mask=mk.data_ptr(),
        out=out.data_ptr(),
        b=b,
        t=t,
        nh=nh,
        nkv=nkv,
        hd=hd,
        s=s,
        cap=cap,
        num_slots=num_slots,
        scale=float(hd**-0.5 if scale is None else scale),
        threads=linear_threads() if threads is None else int(threads),
        force_scalar=int(force_scalar),
    )
    call("redrafter_attention_cpu", p)
    return out


# ---------------------------------------------------------------------- the machine's limits
def machine_limits(threads: int | None = None, mib: int = 512, repeats: int = 5) -> dict[str, Any]:
    """The memory read bandwidth (bytes/s; with ``threads`` and with one thread) and the float32
    FMA peak (flop/s with ``threads``), measured on the kernels' own thread pool
    (``cpp/src/machine_cpu.cpp``): the limits the linear kernel is judged against. Best of
    ``repeats``; a buffer of ``mib`` MiB (larger than the caches)."""
    lib = load_library()
    read_sum, fma_burn = lib.redrafter_read_sum_cpu, lib.redrafter_fma_burn_cpu
    nt = linear_threads() if threads is None else int(threads)
    buf = torch.ones(mib * 2**20 // 4)

    def best(fn) -> float:
        fn()
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    read = {
        n: buf.numel() * 4 / best(lambda n=n: read_sum(buf.data_ptr(), buf.numel(), n))
        for n in sorted({1, nt})
    }
    iters, chunks = 200_000, 16 * nt
    t = best(lambda: fma_burn(iters, chunks, nt))
    lanes = {2: 16, 1: 8}.get(simd_level(), 0)
    peak = chunks * iters * 12 * lanes * 2 / t
    return {
        "threads": nt,
        "simd": {2: "AVX-512", 1: "AVX2+FMA"}.get(simd_level(), "portable (no AVX2+FMA)"),
        "read_bytes_per_s": read[nt],
        "read_bytes_per_s_1_thread": read[1],
        "fma_flops_per_s": peak,
    }


# ---------------------------------------------------------------------- small per-layer ops
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (``cpp/src/layer_ops_cpu.cpp``): float32 arithmetic, each row
    reduced alone in a fixed order; x and weight float32 or bfloat16 of one dtype."""
    _check_linear_tensor("x", x)
    if weight.dtype != x.dtype or weight.shape != (x.shape[-1],):
        raise RedrafterError(
            f"rmsnorm: weight must be [{x.shape[-1]}] {x.dtype}, got {weight.dtype} {list(weight.shape)}"
        )
    xc, wc = x.contiguous(), weight.detach().contiguous()
    y = torch.empty_like(xc)
    h = x.shape[-1]
    call(
        "redrafter_rmsnorm_cpu",
        xc.data_ptr(),
        wc.data_ptr(),
        y.data_ptr(),
        _LINEAR_DTYPES[x.dtype],
        xc.numel() // h,
        h,
        float(eps),
    )
    return y


def rope_(
    x: torch.Tensor, offset: int, heads: int, head_size: int, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate, in place, ``heads`` heads starting at column ``offset`` of every row of the
    contiguous ``x`` [..., C] (a fused qkv output) by cos/sin [rows, head_size/2] float32."""
    _check_linear_tensor("x", x)
    if not x.is_contiguous():
        raise RedrafterError("rope: x must be contiguous")
    c = x.shape[-1]
    rows = x.numel() // c
    if (
        offset + heads * head_size > c
        or cos.shape != (rows, head_size // 2)
        or sin.shape != cos.shape
    ):
        raise RedrafterError(
            f"rope: {heads} heads of {head_size} at column {offset} of [{rows}, {c}] with cos "
            f"{list(cos.shape)}: shapes disagree"
        )
    cc, sc = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
    ptr = x.data_ptr() + offset * x.element_size()
    call(
        "redrafter_rope_cpu",
        ptr,
        _LINEAR_DTYPES[x.dtype],
        rows,
        heads,
        head_size,
        c,
        cc.data_ptr(),
        sc.data_ptr(),
    )


def silu_mul(ab: torch.Tensor) -> torch.Tensor:
    """``silu(ab[..., :n]) * ab[..., n:]`` for ab [..., 2n] (float32 arithmetic)."""
    _check_linear_tensor("ab", ab)
    abc = ab.contiguous()
    n = ab.shape[-1] // 2
    if ab.shape[-1] != 2 * n or n < 1:
        raise RedrafterError(f"silu_mul: last dim must be even, got {list(ab.shape)}")
    y = torch.empty((*ab.shape[:-1], n), dtype=ab.dtype)
    call(
        "redrafter_silu_mul_cpu",
        abc.data_ptr(),
        y.data_ptr(),
        _LINEAR_DTYPES[ab.dtype],
        abc.numel() // (2 * n),
        n,
    )
    return y


# ---------------------------------------------------------------------- the fused decoder forward
class DecoderWeights:
    """Every layer's weights for :func:`decoder_forward`, as a C array of
    :class:`DecoderLayerParams`; holds the tensors the pointers point into.

    ``layers``: one dict per layer with ``qkv``, ``dense``, ``down`` and either ``gate_up`` or
    ``gate`` and ``up`` (each ``(PackedWeight, bias or None)``), and ``input_norm``,
    ``post_norm`` (float32 [H] tensors)."""

    def __init__(self, layers: list[dict]):
        self._keep: list[torch.Tensor] = []
        self.array = (DecoderLayerParams * len(layers))()
        for entry, layer in zip(self.array, layers):
            for name in ("qkv", "dense", "gate_up", "gate", "up", "down"):
                if layer.get(name) is None:
                    continue
                packed, bias = layer[name]
                setattr(entry, name, self._ptr(packed.data))
                setattr(entry, f"{name}_fmt", packed.code)
                if bias is not None:
                    if bias.shape != (packed.n,):
                        raise RedrafterError(
                            f"decoder: {name} bias must be [{packed.n}], got {list(bias.shape)}"
                        )
                    setattr(entry, f"{name}_bias", self._ptr(bias, torch.float32))
            for name in ("input_norm", "post_norm"):
                setattr(entry, name, self._ptr(layer[name], torch.float32))
        self.num_layers = len(layers)

    def _ptr(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        t = t.detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()


def decoder_forward(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    write_pos: torch.Tensor,
    mask: torch.Tensor,
    weights: DecoderWeights,
    heads: int,
    intermediate: int,
    eps: float,
    threads: int | None = None,
) -> None:
    """Every decoder layer in one call (``cpp/src/decoder_cpu.cpp``), in place on ``x``: the
    kernels of the per-layer path in its order, so the same bits.

    Args:
        x: [B, T, H] float32 contiguous: the embeddings in, the last layer's output out.
        cos, sin: [B*T, hd/2] float32. cache: [layers, 2, slots, nkv, cap, hd] float32 or
            bfloat16, contiguous; token (i, j) is written at ``write_pos[i, j]`` of slot
            ``slots[i]``. mask: [B, T, S] bool, query (i, j) sees key positions p < S allowed.
        weights: the layers' :class:`DecoderWeights`; heads: query heads; intermediate: the MLP
            width; eps: the RMSNorm epsilon. Scores are scaled by 1/sqrt(hd).
    """
    if x.dim() != 3 or x.dtype != torch.float32 or not x.is_contiguous():
        raise RedrafterError(
            f"decoder: x must be a contiguous [B, T, H] float32 tensor, got {x.dtype} {list(x.shape)}"
        )
    b, t, h = x.shape
    if (
        cache.dim() != 6
        or cache.shape[1] != 2
        or cache.shape[0] != weights.num_layers
        or cache.dtype not in _LINEAR_DTYPES
        or not cache.is_contiguous()
    ):
        raise RedrafterError(
            f"decoder: cache must be a contiguous [{weights.num_layers}, 2, slots, nkv, cap, hd] "
            f"float32/bfloat16 tensor, got {cache.dtype} {list(cache.shape)}"
        )
    _, _, num_slots, nkv, cap, hd = cache.shape
    if mask.dim() != 3 or tuple(mask.shape[:2]) != (b, t) or mask.dtype != torch.bool:
        raise RedrafterError(
            f"decoder: mask must be [{b}, {t}, S] bool, got {mask.dtype} {list(mask.shape)}"
        )
    rows = b * t
    for name, tab in (("cos", cos), ("sin", sin)):
        if (
            tab.dtype != torch.float32
            or tuple(tab.shape) != (rows, hd // 2)
            or not tab.is_contiguous()
        ):
            raise RedrafterError(
                f"decoder: {name} must be a contiguous [{rows}, {hd // 2}] float32 tensor, got "
                f"{tab.dtype} {list(tab.shape)}"
            )
    sl = slots.to(torch.int64).contiguous()
    wp = write_pos.to(torch.int64).contiguous()
    if tuple(sl.shape) != (b,) or tuple(wp.shape) != (b, t):
        raise RedrafterError(
            f"decoder: slots must be [{b}] and write_pos [{b}, {t}], got {list(sl.shape)} and {list(wp.shape)}"
        )
    mk = mask.contiguous().view(torch.uint8)
    p = DecoderParams(
        x=x.data_ptr(),
        cos=cos.data_ptr(),
        sin=sin.data_ptr(),
        cache=cache.data_ptr(),
        slots=sl.data_ptr(),
        write_pos=wp.data_ptr(),
        mask=mk.data_ptr(),
        layers=ctypes.addressof(weights.array),
        num_layers=weights.num_layers,
        b=b,
        t=t,
        s=mask.shape[2],
        cap=cap,
        num_slots=num_slots,
        hidden=h,
        heads=heads,
        kv_heads=nkv,
        head_size=hd,
        intermediate=intermediate,
        eps=float(eps),
        scale=float(hd**-0.5),
        cache_dtype=_LINEAR_DTYPES[cache.dtype],
        threads=linear_threads() if threads is None else int(threads),
    )
    call("redrafter_decoder_forward_cpu", p)
