"""Compact Llama-family / Qwen2 decoder with a preallocated KV cache and tree masks.

Parameter names are TensorRT-LLM's checkpoint names (``transformer.layers.{i}.attention.qkv``,
...), so the TensorRT-LLM style checkpoint written by ``redrafter-convert`` loads as it is; the
Hugging Face name mapping lives in :mod:`redrafter_trt.formats.names`.

One forward appends ``T`` tokens per row to the row's cache slot and attends over the row's
whole cache plus an intra-block mask (causal for prompts, ancestor-or-self for packed trees).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RedrafterError, require
from ..ops.kv_cache import contiguous_cache_shape
from .blocks import BlockTensor, decode, release_pages, rows

#: Architectures this modeling implements, by the name TensorRT-LLM's checkpoints use.
ARCH_LLAMA = "LlamaForCausalLM"
ARCH_QWEN2 = "QWenForCausalLM"
#: The architecture map: each architecture's Hugging Face class (``architectures[0]``, also the
#: name TensorRT-LLM's base ``PretrainedConfig`` takes) and ``model_type``, as written out.
HF_ARCHITECTURE = {ARCH_LLAMA: "LlamaForCausalLM", ARCH_QWEN2: "Qwen2ForCausalLM"}
HF_MODEL_TYPE = {ARCH_LLAMA: "llama", ARCH_QWEN2: "qwen2"}
#: Hugging Face ``architectures`` / ``model_type`` values accepted for each (Mistral reads as Llama).
HF_ARCHITECTURES = {
    **{hf: arch for arch, hf in HF_ARCHITECTURE.items()},
    "MistralForCausalLM": ARCH_LLAMA,
}
HF_MODEL_TYPES = {**{mt: arch for arch, mt in HF_MODEL_TYPE.items()}, "mistral": ARCH_LLAMA}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
#: set to 0 to run the CPU kernels layer by layer from Python instead of in one fused call
FUSED_ENV = "REDRAFTER_CPU_FUSED"


@dataclass
class BaseConfig:
    """Shape and numerics of a base model (the fields the modeling needs, nothing else)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    rotary_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    dense_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseConfig:
        names = set(cls.__dataclass_fields__)
        missing = [
            n
            for n in (
                "architecture",
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_size",
            )
            if n not in d
        ]
        require(not missing, f"base model config is missing keys {missing}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        require(
            self.architecture in (ARCH_LLAMA, ARCH_QWEN2),
            f"unsupported architecture {self.architecture!r}; expected one of "
            f"{sorted(HF_ARCHITECTURES)} (Hugging Face) / {ARCH_LLAMA}, {ARCH_QWEN2}",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_size",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0,
                f"base config {name} must be a positive integer, got {value!r}",
            )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        require(self.head_size % 2 == 0, f"head_size must be even for RoPE, got {self.head_size}")
        rope_type = (self.rotary_scaling or {}).get("rope_type", "default")
        require(
            rope_type in SUPPORTED_ROPE_TYPES,
            f"unsupported RoPE scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}",
        )


def rope_inv_freq(cfg: BaseConfig) -> torch.Tensor:
    """Inverse frequencies [head_size/2] float64 for the config's RoPE type."""
    hd = cfg.head_size
    inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = cfg.rotary_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(nn.Module):
    #: on the CPU kernel (``cpp/src/layer_ops_cpu.cpp``), set with the linear layers
    native = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
            from .. import native

            return native.rmsnorm(x, self.weight, self.eps)
        x32 = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


_NO_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("no_weight_init", default=False)


@contextlib.contextmanager
def weights_uninitialized() -> Iterator[None]:
    """Inside: :class:`Linear` and :class:`Embedding` skip their random initialisation (the
    weights are allocated but never touched: no time spent, no memory resident), for a model
    whose every weight is loaded, or replaced by block weights, right after."""
    token = _NO_INIT.set(True)
    try:
        yield
    finally:
        _NO_INIT.reset(token)


#: the CPU kernel's panels of a block tensor, made once and shared by every Linear streaming it
#: (a draft head whose projection is the base's vocabulary projection); held weakly on both
#: sides: the panels live while a layer holds them
_PANELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: the kernel's panels of a float32/bf16 parameter by the parameter's id: (the parameter, its key
#: when packed, the panels), all held weakly, so that layers of two models sharing one weight (a
#: draft head's projection tied to the base's) pack it once; an entry goes with its parameter
_PACKED_FROM: dict[int, tuple] = {}


def _pack_weight(w: torch.Tensor, key: tuple):
    """``w`` packed for the CPU kernel: the panels packed from this very parameter in its current
    state when some layer still holds them, else packed now (and remembered)."""
    from .. import native

    entry = _PACKED_FROM.get(id(w))
    if entry is not None and entry[0]() is w and entry[1] == key:
        packed = entry[2]()
        if packed is not None:
            return packed
    packed = native.pack_linear(w)
    if entry is None or entry[0]() is not w:
        weakref.finalize(w, _PACKED_FROM.pop, id(w), None)
    _PACKED_FROM[id(w)] = (weakref.ref(w), key, weakref.ref(packed))
    return packed


def _is_panels(stored: Any) -> bool:
    """True for the CPU kernel's float32/bf16 panels (``native.PackedWeight`` of no block format),
    False for GGUF blocks (:class:`~.blocks.BlockTensor`) and None."""
    return stored is not None and not isinstance(stored, BlockTensor) and stored.fmt is None


def _stored_dtype(stored: Any) -> torch.dtype:
    """The dtype of the weight a stored form stands for: blocks expand to float32, panels hold
    their weight's dtype."""
    return stored.dtype if _is_panels(stored) else torch.float32


class StoredWeight:
    """What :class:`Linear` and :class:`Embedding` share: a weight that a stored form holding its
    exact values can stand in for, GGUF block weights (models/blocks.py) or the CPU kernel's
    panels (:func:`redrafter_trt.native.pack_linear`, a permutation of the values plus padding).

    After :func:`stream_stored` (:func:`stream_blocks` for blocks; :func:`stream_panels` when
    the kernels are turned on) the layer holds no weight parameter at all: the CPU kernels read
    the stored form (the linear kernel its panels or block panels, the embedding its rows),
    which give the weight's bits. Everything that wants the weight still gets it exactly:
    reading ``.weight`` decodes (unpacks) the stored form into a parameter again, shared with
    the layers tied to it, and kept (the layer follows that parameter from then on: a changed
    weight drops the stored form); ``state_dict()`` holds the decoded weight; moving the layer
    to another device or dtype decodes it first. ``weight_dtype`` and ``weight_device`` answer
    without decoding."""

    _stored: Any = None  # the BlockTensor or PackedWeight panels whose exact values are the weight
    _stored_key: tuple | None = None  # the held weight's key it stands for (None: no weight held)
    _tied: tuple = ()  # the layers sharing this weight (a tied embedding and vocabulary projection)
    _weight_requires_grad = True

    def streams_stored(self) -> bool:
        """True while no weight parameter is held: its stored form stands in for it."""
        return self._stored is not None and self._parameters.get("weight") is None

    def streams_blocks(self) -> bool:
        """True while no float32 weight is held: GGUF blocks stand in for it."""
        return self.streams_stored() and isinstance(self._stored, BlockTensor)

    def streams_panels(self) -> bool:
        """True while no weight is held: the CPU kernel's float32/bf16 panels stand in for it."""
        return self.streams_stored() and _is_panels(self._stored)

    @property
    def blocks(self) -> BlockTensor | None:
        """The GGUF blocks whose expansion the weight is (held or not), or None."""
        return self._stored if isinstance(self._stored, BlockTensor) else None

    @property
    def weight_dtype(self) -> torch.dtype:
        """The weight's dtype (float32 for blocks), without decoding a stored form."""
        if self.streams_stored():
            return _stored_dtype(self._stored)
        return self._parameters["weight"].dtype

    @property
    def weight_device(self) -> torch.device:
        """The weight's device (the CPU for a stored form), without decoding it."""
        return torch.device("cpu") if self.streams_stored() else self._parameters["weight"].device

    def _weight_key(self) -> tuple | None:
        w = self._parameters.get("weight")
        return None if w is None else (w.data_ptr(), w._version, w.dtype, tuple(w.shape))

    def _stored_changed(self) -> None:
        """Hook: the stored form was attached or dropped (a Linear drops its packed copy)."""

    def attach_blocks(self, blocks) -> None:
        """GGUF blocks whose exact float32 expansion this layer's weight is now, the weight
        staying held: the CPU kernel streams the blocks instead (the same bits) until the weight
        changes. :func:`stream_blocks` also drops the weight."""
        self._stored, self._stored_key, self._tied = blocks, self._weight_key(), (self,)
        self._stored_changed()

    def _decoded(self) -> torch.Tensor:
        """The stored form's values as a new tensor (the layer keeps none)."""
        stored = self._stored
        if _is_panels(stored):
            from .. import native

            return native.unpack_linear(stored)
        w = decode(stored)
        release_pages(stored, whole_file=True)
        return w

    def weight_values(self) -> torch.Tensor:
        """The weight's values without making the layer hold them: the held weight (detached),
        else its stored form decoded (a copy)."""
        return self._decoded() if self.streams_stored() else self._parameters["weight"].detach()

    def _materialize(self) -> nn.Parameter:
        """Decode the stored form into the weight of every layer tied to this one."""
        with torch.inference_mode(False), torch.no_grad():
            w = self._decoded()
        p = nn.Parameter(w, requires_grad=self._weight_requires_grad)
        key = (p.data_ptr(), p._version, p.dtype, tuple(p.shape))
        for m in self._tied:
            m._parameters["weight"] = p
            m._stored_key = key
        return p

    def __getattr__(self, name: str):
        if name == "weight" and self.streams_stored():
            return self._materialize()
        return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's, after the mixin

    def _apply(self, fn, recurse=True):
        if self.streams_stored():  # a stored form is CPU values of one dtype: another decodes
            dtype = _stored_dtype(self._stored)
            probe = fn(torch.empty(0, 0, dtype=dtype))
            if probe.device.type != "cpu" or probe.dtype != dtype:
                self._materialize()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.streams_stored():  # the weight's values, decoded (a copy; the layer keeps none)
            destination[prefix + "weight"] = self._decoded()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.streams_stored() and prefix + "weight" in state_dict:
            self._materialize()  # a weight loaded into it replaces the stored form (its key changes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


#: the name this mixin had while only GGUF blocks could stand in for a weight
BlockBacked = StoredWeight


def stream_stored(layers: Sequence[StoredWeight], stored) -> None:
    """Let ``stored`` (GGUF blocks, a :class:`~.blocks.BlockTensor`, or the CPU kernel's panels,
    a ``native.PackedWeight``) stand in for the weight that ``layers`` share (one layer, or
    every layer tied to one weight: the caller passes all of them) and drop that weight: the
    layers keep no copy of it. The caller vouches that the stored form holds exactly the
    weight the layers are meant to have (a checkpoint writes both from one source and checks
    them; the kernel's panels are packed from the weight)."""
    w = layers[0]._parameters.get("weight")
    require(
        all(m._parameters.get("weight") is w for m in layers),
        "stream_stored: the layers do not share one weight",
    )
    what = stored.fmt or f"{str(stored.dtype)[6:]} panels"
    require(
        w is None or (tuple(w.shape) == (stored.n, stored.k) and w.dtype == _stored_dtype(stored)),
        f"stream_stored: {what} [{stored.n}, {stored.k}] cannot stand in for a "
        f"{None if w is None else w.dtype} weight of shape {None if w is None else list(w.shape)}",
    )
    for m in layers:
        m._stored, m._stored_key, m._tied = stored, None, tuple(layers)
        m._weight_requires_grad = True if w is None else w.requires_grad
        m._parameters["weight"] = None
        m._stored_changed()


def stream_blocks(layers: Sequence[StoredWeight], blocks) -> None:
    """:func:`stream_stored` with GGUF blocks (a :class:`~.blocks.BlockTensor`)."""
    stream_stored(layers, blocks)


def _weight_groups(module: nn.Module) -> dict[int, list[StoredWeight]]:
    """The layers under ``module`` holding each weight parameter, by the parameter's id."""
    groups: dict[int, list[StoredWeight]] = {}
    for m in module.modules():
        if isinstance(m, StoredWeight) and m._parameters.get("weight") is not None:
            groups.setdefault(id(m._parameters["weight"]), []).append(m)
    return groups


def _stream_held(tied: Sequence[StoredWeight]) -> bool:
    """Drop the weight ``tied`` hold where a kernel layer among them has a stored form standing
    for it (:func:`stream_panels`); True if it was dropped."""
    if not tied or tied[0]._parameters.get("weight") is None:
        return False
    key = tied[0]._weight_key()
    for m in tied:
        if isinstance(m, Linear) and m.native and _is_panels(m._stored) and m._stored_key == key:
            stream_stored(tied, m._stored)
            return True
    return False


def stream_panels(module: nn.Module) -> int:
    """Drop every weight under ``module`` that the CPU kernel's panels already stand for (a
    :class:`Linear` on the kernels holds its packed panels; an MLP's gate_proj and up_proj the
    halves of their fused panels): the panels stand in for it from now on
    (:func:`stream_stored`), in every layer under ``module`` tied to it (a tied embedding then
    looks its rows up in the vocabulary projection's panels). Returns how many weights were
    dropped. A parameter someone else still holds is theirs: the layers no longer follow it
    (reading ``.weight`` gives the layer's own again). A weight decoded from GGUF blocks stays
    held (its reader asked for it). :func:`set_native_linear` does this as it packs."""
    return sum(_stream_held(tied) for tied in _weight_groups(module).values())


def hold_weights(module: nn.Module) -> None:
    """The reverse of :func:`stream_panels`: every weight under ``module`` that kernel panels
    stand in for is a parameter again (unpacked: the same bits), and the layers keep no panels
    as its stored form (GGUF blocks stay: they are the weights as stored)."""
    for m in module.modules():
        if isinstance(m, StoredWeight) and m.streams_panels():
            m._materialize()
    for m in module.modules():
        if isinstance(m, StoredWeight) and _is_panels(m._stored):
            m._stored = m._stored_key = None
            m._tied = ()


class Linear(StoredWeight, nn.Linear):
    """``nn.Linear`` (same parameter names) that can run on the batch-invariant CPU kernel.

    With ``native = True`` and CPU float32/bfloat16 weights, the product runs through
    :func:`redrafter_trt.native.linear_packed` on a copy of the weight packed once for streaming
    (repacked only when the weight tensor changes): a row's output has the same bits alone or
    among any number of rows and with any thread count (one float32 FMA chain per element),
    which torch's GEMMs do not promise. The panels are the weight as the layer stores it: after
    :func:`stream_panels` (``use_native_linear(True)``) they stand in for it and the layer holds
    no float32/bf16 parameter (:class:`StoredWeight`: reading ``.weight`` unpacks them, exactly).
    A layer whose weight is GGUF blocks packs the blocks instead: the same bits, no float32
    weight held.
    """

    native = False
    _packed: Any = None
    _packed_key: tuple | None = None

    def reset_parameters(self) -> None:
        if not _NO_INIT.get():
            super().reset_parameters()

    def _stored_changed(self) -> None:
        self.drop_packed()

    @property
    def streamed_format(self) -> str:
        """What this layer's weight is stored as for the CPU kernel: its GGUF block format
        (``q4_1``, ``q8_0``) or its dtype (``float32``, ``bfloat16``)."""
        packed = self._packed
        if packed is not None:
            return packed.fmt or str(packed.dtype)[6:]
        return self._stored.fmt if self.streams_blocks() else str(self.weight_dtype)[6:]

    def packed_weight(self):
        """The weight packed for the CPU kernel (cached; repacked when the weight changes): the
        stored form while it stands for the weight (its panels, or the blocks' panels), else
        the weight packed now, and those panels then stand for it."""
        from .. import native

        key = self._weight_key()
        if self._packed is None or self._packed_key != key:
            stored = self._stored
            if stored is not None and self._stored_key == key:
                packed = stored if _is_panels(stored) else None
                if packed is None:
                    ref = _PANELS.get(stored)
                    packed = ref() if ref is not None else None
                if packed is None:
                    packed = native.pack_blocks(stored)
                    _PANELS[stored] = weakref.ref(packed)
                    release_pages(stored, whole_file=True)  # the panels are enough
                self._packed = packed
            else:  # the weight changed: it no longer is the stored form's values
                for m in self._tied:  # nor for the layers tied to it that hold it
                    if m is not self and m._stored is stored and not m.streams_stored():
                        m._stored = m._stored_key = None
                        m._tied = ()
                self._packed = _pack_weight(self.weight, key)
                self._stored, self._stored_key, self._tied = self._packed, key, (self,)
            self._packed_key = key
        return self._packed

    def drop_packed(self) -> None:
        self._packed = self._packed_key = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.device.type == "cpu" and not torch.is_grad_enabled():
            from .. import native

            return native.linear_packed(x, self.packed_weight(), self.bias)
        return super().forward(x)


class Embedding(StoredWeight, nn.Embedding):
    """``nn.Embedding`` (same parameter name) that looks its rows up in a stored form standing in
    for the table (:class:`StoredWeight`), so no float32 [V, H] table is held: GGUF block
    weights (a CPU lookup decodes only the rows asked for, :func:`redrafter_trt.native.embed_blocks`;
    the rows of :func:`~.blocks.decode` bit for bit), or the panels of the vocabulary
    projection it is tied to (:func:`redrafter_trt.native.packed_rows`, the rows as packed;
    not while a gradient is wanted: that reads the weight)."""

    def reset_parameters(self) -> None:
        if not _NO_INIT.get():
            super().reset_parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.streams_stored() and ids.device.type == "cpu":
            from .. import native

            stored = self._stored
            if not _is_panels(stored):
                if native.linear_available():
                    out = native.embed_blocks(stored, ids)
                else:
                    out = decode(rows(stored, ids)).reshape(*ids.shape, stored.k)
                release_pages(stored)  # a mapped table keeps no pages resident between lookups
                return out
            if not (torch.is_grad_enabled() and self._weight_requires_grad):
                return native.packed_rows(stored, ids)
        return super().forward(ids)


def set_native_linear(module: nn.Module, on: bool) -> None:
    """Every :class:`Linear` under ``module`` on the CPU kernel (packed now) or on torch.

    On: each weight's panels then stand in for it (:func:`stream_panels`, one layer at a time,
    so the load never holds every weight twice). Off: every weight is a parameter again
    (:func:`hold_weights`, unpacked exactly) and the packed copies are dropped."""
    if not on:
        hold_weights(module)
    for m in module.modules():
        if isinstance(m, (Linear, RMSNorm)):
            m.native = on
    # an MLP's gate_proj and up_proj stream as one fused weight: no packed copy of their own
    fused = {
        id(lin)
        for m in module.modules()
        if isinstance(m, MLP) and m.fuses()
        for lin in (m.fc, m.gate)
    }
    groups = _weight_groups(module) if on else {}
    for m in module.modules():
        if isinstance(m, Linear):
            if on and m.weight_device.type == "cpu" and id(m) not in fused:
                w = m._parameters.get("weight")
                m.packed_weight()
                if w is not None:
                    _stream_held(groups.get(id(w), []))
            elif not on:
                m.drop_packed()
        elif isinstance(m, MLP):
            if on and m.fuses() and m.fc.weight_device.type == "cpu":
                ws = [lin._parameters.get("weight") for lin in (m.fc, m.gate)]
                m.fused_weight()
                for w in ws:
                    if w is not None:
                        _stream_held(groups.get(id(w), []))
            elif not on:
                m._fused = m._fused_key = m._fused_parts = None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.qkv = Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.dense = Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.dense_bias)

    def forward(self, x, cos, sin, layer_cache, slots, read_slots, write_pos, read_len, attn_mask):
        b, t, _ = x.shape
        if cos.dim() == 2:  # the CPU kernels' step (BaseModel.forward chose it)
            return self._forward_kernels(x, cos, sin, layer_cache, slots, write_pos, attn_mask)
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q = _rotate(q.view(b, t, self.nh, self.hd), cos, sin)
        k = _rotate(k.view(b, t, self.nkv, self.hd), cos, sin)
        v = v.view(b, t, self.nkv, self.hd)
        rows = slots[:, None]
        layer_cache[0, rows, :, write_pos] = k.to(layer_cache.dtype)
        layer_cache[1, rows, :, write_pos] = v.to(layer_cache.dtype)
        keys = layer_cache[0, read_slots, :, :read_len].to(q.dtype)  # [B, nkv, S, hd]
        values = layer_cache[1, read_slots, :, :read_len].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=attn_mask[:, None], enable_gqa=True
        )
        return self.dense(out.transpose(1, 2).reshape(b, t, self.nh * self.hd))

    def _forward_kernels(self, x, cos, sin, layer_cache, slots, write_pos, attn_mask):
        """The step on the CPU kernels: fused qkv, RoPE in place, KV write, batch-invariant
        attention (a tree node gets its plain-decoding bits), output projection."""
        from .. import native

        b, t, _ = x.shape
        nq, nk = self.nh * self.hd, self.nkv * self.hd
        qkv = self.qkv(x)  # [B, T, (nh + 2 nkv) hd], contiguous
        native.rope_(qkv, 0, self.nh, self.hd, cos, sin)
        native.rope_(qkv, nq, self.nkv, self.hd, cos, sin)
        k = qkv[..., nq : nq + nk].view(b, t, self.nkv, self.hd)
        v = qkv[..., nq + nk :].view(b, t, self.nkv, self.hd)
        rows = slots[:, None]
        layer_cache[0, rows, :, write_pos] = k.to(layer_cache.dtype)
        layer_cache[1, rows, :, write_pos] = v.to(layer_cache.dtype)
        q = qkv[..., :nq].reshape(b, t, self.nh, self.hd).to(torch.float32)
        out = native.attention(q, layer_cache, slots, attn_mask)
        return self.dense(out.to(x.dtype).reshape(b, t, nq))


class MLP(nn.Module):
    """SwiGLU with TensorRT-LLM's names: ``fc`` = gate_proj, ``gate`` = up_proj, ``proj`` = down_proj."""

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.fc = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.gate = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    _fused: Any = None
    _fused_key: tuple | None = None
    #: gate_proj's and up_proj's rows of the fused panels (views), which stand for their
    #: weights; None where the split falls inside a panel (then both weights stay held)
    _fused_parts: tuple | None = None

    def fuses(self) -> bool:
        """gate_proj and up_proj run as one packed call (not when either streams GGUF blocks)."""
        return self.fc.blocks is None and self.gate.blocks is None

    def _fused_current(self) -> bool:
        if self._fused is None:
            return False
        if self._fused_parts is None:
            return self._fused_key == (self.fc._weight_key(), self.gate._weight_key())
        return all(
            lin._stored is part and lin._stored_key == lin._weight_key()
            for lin, part in zip((self.fc, self.gate), self._fused_parts)
        )

    def fused_weight(self):
        """gate_proj and up_proj as one packed [2I, H] weight and bias (cached; repacked when
        either weight changes). Each output is its own FMA chain: the same bits as two calls.
        Its two halves are the two layers' stored forms (panel views; I a multiple of 16), so
        :func:`stream_panels` can drop both weights."""
        from .. import native

        if not self._fused_current():
            fc, gate = self.fc, self.gate
            key = (fc._weight_key(), gate._weight_key())
            packed = native.pack_linear(torch.cat([fc.weight.detach(), gate.weight.detach()]))
            bias = None
            if fc.bias is not None:
                bias = torch.cat([fc.bias.detach(), gate.bias.detach()])
            n = fc.out_features
            parts = (
                native.packed_row_range(packed, 0, n),
                native.packed_row_range(packed, n, 2 * n),
            )
            self._fused_parts = None if None in parts else parts
            if self._fused_parts is not None:
                for lin, part in zip((fc, gate), parts):
                    lin._stored, lin._stored_key, lin._tied = part, lin._weight_key(), (lin,)
                    lin.drop_packed()
            self._fused, self._fused_key = (packed, bias), key
        return self._fused

    def forward(self, x):
        if self.fc.native and x.device.type == "cpu" and not torch.is_grad_enabled():
            from .. import native

            if self.fuses():
                ab = native.linear_packed(x, *self.fused_weight())
            else:  # GGUF block weights stream as stored: two calls, the same bits
                ab = torch.cat([self.fc(x), self.gate(x)], -1)
            return self.proj(native.silu_mul(ab))
        return self.proj(F.silu(self.fc(x)) * self.gate(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.attention = Attention(cfg)
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer_cache, slots, read_slots, write_pos, read_len, attn_mask):
        x = x + self.attention(
            self.input_layernorm(x),
            cos,
            sin,
            layer_cache,
            slots,
            read_slots,
            write_pos,
            read_len,
            attn_mask,
        )
        return x + self.mlp(self.post_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: BaseConfig):
        super().__init__()
        self.vocab_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)


def _versions(params: list) -> list:
    """Each parameter's in-place version and storage (``module.to`` swaps ``.data`` without
    bumping the version)."""
    return [(p._version, p.data_ptr()) for p in params]


class BaseModel(nn.Module):
    """The base LLM. ``forward`` returns the final-norm hidden states; ``lm_head`` gives logits."""

    inv_freq: torch.Tensor  # RoPE inverse frequencies [hd/2], a buffer

    def __init__(self, cfg: BaseConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.vocab_embedding.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def embedding(self) -> Embedding:
        return self.transformer.vocab_embedding

    def new_cache(
        self,
        slots: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Allocate ``[layers, 2, slots, kv_heads, capacity, head_size]`` (zeros)."""
        c = self.config
        shape = contiguous_cache_shape(
            c.num_hidden_layers, slots, c.num_key_value_heads, capacity, c.head_size
        )
        return torch.zeros(
            shape,
            dtype=dtype or self.lm_head.weight_dtype,
            device=device or self.lm_head.weight_device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: torch.Tensor,
        slots: torch.Tensor,
        cache_lengths: torch.Tensor,
        block_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Append ``T`` tokens per row to the cache and return their hidden states.

        Args:
            input_ids: [B, T] int token ids (padding positions are computed, never read).
            positions: [B, T] int absolute RoPE positions.
            cache: [layers, 2, slots, kv_heads, capacity, head_size], written at
                ``cache_lengths[b] + i`` for i < T in slot ``slots[b]``.
            slots: [B] int; cache_lengths: [B] int tokens already in each row's slot.
            block_mask: [B, T, T] bool, query i may see new token j (self is always allowed).
        Returns:
            hidden: [B, T, H] after the final norm.
        """
        b, t = input_ids.shape
        capacity = cache.shape[4]
        cache_lengths = cache_lengths.to(torch.int64)
        read_len = int(cache_lengths.max()) + t
        if read_len > capacity:
            raise RedrafterError(
                f"KV cache overflow: a row needs {read_len} positions, the cache holds {capacity}"
            )
        slots = slots.to(torch.int64)
        ar = torch.arange(t, device=input_ids.device)
        write_pos = cache_lengths[:, None] + ar  # [B, T]
        # Mask over the S = read_len key positions: the cache prefix, then the new block.
        s = torch.arange(read_len, device=input_ids.device)
        rel = s[None, :] - cache_lengths[:, None]  # [B, S]
        in_block = (rel >= 0) & (rel < t)
        block = block_mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        gathered = block.gather(2, rel.clamp(0, t - 1)[:, None, :].expand(b, t, read_len))
        mask = (rel < 0)[:, None, :] | (in_block[:, None, :] & gathered)
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq  # [B, T, hd/2]
        dtype = self.lm_head.weight_dtype
        kernels = (
            self.lm_head.native
            and input_ids.device.type == "cpu"
            and not torch.is_grad_enabled()
            and cache.is_contiguous()
        )
        if kernels:  # the CPU kernels' tables: float32 [B*T, hd/2]
            cos = torch.cos(freqs).to(torch.float32).reshape(b * t, -1)
            sin = torch.sin(freqs).to(torch.float32).reshape(b * t, -1)
        else:
            cos = torch.cos(freqs).to(dtype)[:, :, None, :]
            sin = torch.sin(freqs).to(dtype)[:, :, None, :]
        x = self.transformer.vocab_embedding(input_ids.to(torch.int64))
        fused = self._fused_weights() if kernels and dtype == torch.float32 else None
        if fused is not None:  # every layer in one C++ call: the same kernels, the same bits
            from .. import native

            x = x.contiguous()
            native.decoder_forward(
                x,
                cos,
                sin,
                cache,
                slots,
                write_pos,
                mask,
                fused,
                self.config.num_attention_heads,
                self.config.intermediate_size,
                self.config.norm_epsilon,
            )
            return self.transformer.ln_f(x)
        # Contiguous slots (the usual case) are read as a view instead of a gathered copy.
        s0 = int(slots[0])
        contiguous = bool(torch.equal(slots, torch.arange(s0, s0 + b, device=slots.device)))
        read_slots = slice(s0, s0 + b) if contiguous else slots
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, cos, sin, cache[i], slots, read_slots, write_pos, read_len, mask)
        return self.transformer.ln_f(x)

    _fused: Any = None
    _fused_key: list | None = None

    def fused_layers_apply(self) -> bool:
        """True when every layer is this module's own Llama/Qwen2 layer with plain
        :class:`Linear` projections (not a tensor-parallel shard's, whose products are reduced
        across ranks) on the CPU kernels: what the fused forward computes
        (``$REDRAFTER_CPU_FUSED=0`` turns it off, for comparison)."""
        if os.environ.get(FUSED_ENV, "1") == "0":
            return False
        for layer in self.transformer.layers:
            if type(layer) is not DecoderLayer or type(layer.attention) is not Attention:
                return False
            if type(layer.mlp) is not MLP:
                return False
            lins = (layer.attention.qkv, layer.attention.dense, layer.mlp.fc, layer.mlp.gate)
            if any(type(m) is not Linear or not m.native for m in (*lins, layer.mlp.proj)):
                return False
            norms = (layer.input_layernorm, layer.post_layernorm)
            if any(type(n) is not RMSNorm or n.weight.dtype != torch.float32 for n in norms):
                return False
        return True

    def _fused_refs(self) -> tuple[list, list]:
        """Where everything the fused weights were built from lives, as (dict, key) pairs read
        without nn.Module's attribute lookup (every module, parameter, packed copy, block weight
        and ``native`` flag the table depends on), and every parameter (whose in-place changes
        show in its ``_version``)."""
        refs: list = [(self._modules, "transformer"), (self.transformer._modules, "layers")]
        params: list = []
        layers = self.transformer.layers._modules
        for name, layer in layers.items():
            refs.append((layers, name))
            lm = layer._modules
            refs.extend((lm, k) for k in ("input_layernorm", "post_layernorm", "attention", "mlp"))
            att, mlp = lm["attention"]._modules, lm["mlp"]
            refs.extend((att, k) for k in ("qkv", "dense"))
            refs.extend((mlp._modules, k) for k in ("fc", "gate", "proj"))
            refs.append((mlp.__dict__, "_fused"))
            lins = (att["qkv"], att["dense"], *mlp._modules.values())
            for mod in (lm["input_layernorm"], lm["post_layernorm"], *lins):
                refs.extend((mod._parameters, k) for k in mod._parameters)
                params.extend(p for p in mod._parameters.values() if p is not None)
            for lin in lins:
                refs.extend((lin.__dict__, k) for k in ("_packed", "native", "_stored"))
        return refs, params

    def _fused_current(self) -> bool:
        refs, params, ids, versions = self._fused_key
        return [id(d.get(k)) for d, k in refs] == ids and _versions(params) == versions

    def _fused_weights(self):
        """The layers' packed weights for :func:`redrafter_trt.native.decoder_forward` (rebuilt
        when any module, weight, bias or norm changes), or None where the fused forward does not
        apply."""
        if os.environ.get(FUSED_ENV, "1") == "0":
            return None
        if self._fused is not None and self._fused_current():
            return self._fused
        if not self.fused_layers_apply():
            self._fused = self._fused_key = None
            return None
        from .. import native

        layers = []
        for layer in self.transformer.layers:
            att, mlp = layer.attention, layer.mlp
            entry = {
                "qkv": (att.qkv.packed_weight(), att.qkv.bias),
                "dense": (att.dense.packed_weight(), att.dense.bias),
                "down": (mlp.proj.packed_weight(), mlp.proj.bias),
                "input_norm": layer.input_layernorm.weight,
                "post_norm": layer.post_layernorm.weight,
            }
            if mlp.fuses():
                entry["gate_up"] = mlp.fused_weight()
            else:
                entry["gate"] = (mlp.fc.packed_weight(), mlp.fc.bias)
                entry["up"] = (mlp.gate.packed_weight(), mlp.gate.bias)
            layers.append(entry)
        self._fused = native.DecoderWeights(layers)
        refs, params = self._fused_refs()
        # every object an id is taken of stays referenced while the table is cached, so a
        # replacement cannot reuse its id
        self._keep_alive = [d.get(k) for d, k in refs]
        self._fused_key = (refs, params, [id(o) for o in self._keep_alive], _versions(params))
        return self._fused

    def use_native_linear(self, on: bool = True) -> None:
        """Route every linear layer (attention, MLP, lm_head) through the batch-invariant CPU
        kernel (``on``; weights packed now, once, and the panels stand in for them) or torch
        (``off``; the weights held again, packed copies dropped)."""
        self._fused = self._fused_key = self._keep_alive = None  # what it kept holds old weights
        set_native_linear(self, on)

    @property
    def native_linear(self) -> bool:
        """True when the linear layers run on the CPU kernel (see :meth:`use_native_linear`)."""
        return any(m.native for m in self.modules() if isinstance(m, Linear))

    def logits(self, hidden: torch.Tensor, float32: bool = False) -> torch.Tensor:
        """Vocabulary logits [..., V]; ``float32`` = float32 products and output whatever the
        weight dtype (bfloat16 weights on CPU: the native kernel, no float32 weight copy)."""
        if not float32 or hidden.dtype == torch.float32:
            return self.lm_head(hidden).to(torch.float32) if float32 else self.lm_head(hidden)
        lm = self.lm_head
        if lm.weight_device.type == "cpu" and lm.weight_dtype in (torch.float32, torch.bfloat16):
            from .. import native

            if lm.native:
                return native.linear_packed(
                    hidden, lm.packed_weight(), lm.bias, out_dtype=torch.float32
                )
            if native.linear_available():
                return native.linear(hidden, lm.weight, lm.bias, out_dtype=torch.float32)
        return F.linear(hidden.to(torch.float32), lm.weight.to(torch.float32))
