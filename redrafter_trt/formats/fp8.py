"""FP8 (e4m3, per-tensor static scales) base weights: reading FP8 Hugging Face checkpoints,
quantizing a float base, calibrating activation scales, and dequantizing on load.

The checkpoint convention is TensorRT-LLM's ``FP8`` quant_algo (its ``FP8Linear`` /
``FP8RowLinear`` in ``tensorrt_llm/quantization/layers.py``): for each quantized linear ``X``
(per base layer ``attention.qkv``, ``attention.dense``, ``mlp.fc``, ``mlp.gate``, ``mlp.proj``)

- ``X.weight``: float8_e4m3fn, the same shape (and tensor-parallel split) as the float weight;
- ``X.weights_scaling_factor``: float32 ``[1]``, real weight = ``weight.float() * factor``;
- ``X.activation_scaling_factor``: float32 ``[1]``, the static input scale. TensorRT-LLM's FP8
  layers declare it as a required parameter (the engine quantizes each GEMM input with it), so a
  checkpoint without it cannot be built: it comes from the Hugging Face ``input_scale`` tensors or
  is measured by calibration (:func:`calibrate_activation_scales`), never made up.

Everything else (embedding, lm_head, norms, biases, the whole draft head) stays in the
checkpoint's float dtype; ``quantization.exclude_modules`` lists it.

Hugging Face input accepted (:func:`hf_fp8_to_trtllm`): every base linear ``P``
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` of every layer) holds
``P.weight`` in float8_e4m3fn plus ``P.weight_scale`` (a per-tensor scale: shape ``[]`` or
``[1]``; ``P.weight_scale_inv`` of one element is read the same way) and, optionally,
``P.input_scale`` (shape ``[]`` or ``[1]``; all linears or none). ``config.json`` may carry
``quantization_config`` with ``quant_method`` ``compressed-tensors`` (weights ``type: float``,
``num_bits: 8``, ``strategy: tensor``), ``fp8`` (without ``weight_block_size``) or ``modelopt``
(``quant_algo: FP8``). Rejected with the tensor's name and the expected shape: per-channel or
block-wise scales, an fp8 weight without a scale, a scale without an fp8 weight, float8_e5m2,
fp8 tensors outside those linears, and checkpoints quantizing only some linears. KV-cache
scales (``k_scale``/``v_scale``) are not read: the KV cache stays in the checkpoint's float dtype
(``kv_cache_quant_algo`` null).

TensorRT-LLM fuses q/k/v into one ``attention.qkv`` GEMM with one scale: q, k and v are
dequantized with their own scales and requantized with the largest of the three (the one with
the largest scale is kept bit for bit), and the fused input scale is the largest input scale --
what TensorRT-LLM's own ``FP8Linear.postprocess`` does for ``is_qkv`` layers. gate_proj and
up_proj stay separate tensors (``mlp.fc`` / ``mlp.gate``), each with its own scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..errors import RedrafterError, require
from .names import HF_LAYER, LINEAR_ROWS, TRTLLM_LAYER

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANT_ALGO = "FP8"
#: TensorRT-LLM names (under ``transformer.layers.{i}.``) of the base linears held in FP8: the
#: linear rows of :data:`~redrafter_trt.formats.names.BASE_NAME_TABLE` (qkv, dense, fc, gate, proj).
FP8_LINEARS = tuple(r.trtllm.removeprefix(TRTLLM_LAYER) for r in LINEAR_ROWS)
#: Hugging Face names (under ``model.layers.{i}.``) of the linears behind each.
HF_LINEARS = {
    r.trtllm.removeprefix(TRTLLM_LAYER): tuple(h.removeprefix(HF_LAYER) for h in r.hf)
    for r in LINEAR_ROWS
}
#: ``quantization.exclude_modules`` (fnmatch patterns over TensorRT-LLM module names, as
#: ``tensorrt_llm.quantization.quantize.quantize_layers`` matches them): what stays float.
EXCLUDE_MODULES = [
    "*lm_head",
    "*vocab_embedding",
    "*input_layernorm",
    "*post_layernorm",
    "*ln_f",
    "drafter",
    "drafter.*",
]
ACCEPTED_QUANT_METHODS = ("compressed-tensors", "fp8", "modelopt")
WEIGHT_SCALE, ACT_SCALE = "weights_scaling_factor", "activation_scaling_factor"
NEEDS_ACT_SCALES = (
    "TensorRT-LLM's FP8 layers (FP8Linear/FP8RowLinear) quantize every GEMM input with a static "
    "per-tensor activation_scaling_factor, a required checkpoint tensor; give calibration prompts "
    "with --calib_input_ids_file FILE.json (a JSON list of token-id lists) to measure them, or "
    "start from an FP8 checkpoint with static input_scale tensors (e.g. NVIDIA ModelOpt or "
    "llm-compressor FP8 with static activations)"
)


def quantization_config(quant_algo: str | None) -> dict[str, Any]:
    """The checkpoint config's ``quantization`` block."""
    if quant_algo is None:
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    require(
        quant_algo == QUANT_ALGO,
        f"quant_algo {quant_algo!r} not supported (None or {QUANT_ALGO!r})",
    )
    return {
        "quant_algo": QUANT_ALGO,
        "kv_cache_quant_algo": None,
        "exclude_modules": list(EXCLUDE_MODULES),
    }


def fp8_linear_names(num_layers: int) -> list[str]:
    """TensorRT-LLM module names of every FP8 linear of the base."""
    return [TRTLLM_LAYER.format(i) + n for i in range(num_layers) for n in FP8_LINEARS]


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def is_quantized_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True when ``sd`` (TensorRT-LLM names) holds FP8 weights or their scaling factors."""
    return any(is_fp8(v) or k.endswith((WEIGHT_SCALE, ACT_SCALE)) for k, v in sd.items())


def all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float() if is_fp8(t) else t).all())


# --------------------------------------------------------------------------- numerics
def per_tensor_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """``amax / 448`` as float32 ``[1]`` (1.0 for an all-zero tensor)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float -> float8_e4m3fn with ``scale`` (round to nearest, saturating at +-448)."""
    return (w.to(torch.float32) / scale.to(torch.float32)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 [1] scale) with scale = amax / 448."""
    scale = per_tensor_scale(w.detach().to(torch.float32).abs().max())
    return quantize(w, scale), scale


def dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 weight * scale in float32."""
    return w.to(torch.float32) * scale.to(torch.float32).reshape(())


def requantize_fused(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate fp8 tensors with different scales under one scale, the largest of them: each
    part is dequantized with its own scale and quantized again with the shared one."""
    shared = torch.stack([s.to(torch.float32).reshape(()) for _, s in parts]).max().reshape(1)
    return torch.cat([quantize(dequantize(w, s), shared) for w, s in parts], 0), shared


# --------------------------------------------------------------------------- TensorRT-LLM side
def check_trtllm_fp8(num_layers: int, sd: dict[str, torch.Tensor], where: str) -> None:
    """Raise unless ``sd`` holds exactly TensorRT-LLM's FP8 tensors for every base linear."""
    linears = set(fp8_linear_names(num_layers))
    for name in sorted(linears):
        w = sd.get(name + ".weight")
        require(w is not None, f"{where}: missing tensor {name}.weight")
        require(
            w.dtype == FP8_DTYPE,
            f"{where}: tensor {name}.weight has dtype {w.dtype}; an FP8 "
            f"checkpoint holds every base linear in {FP8_DTYPE}",
        )
        for kind in (WEIGHT_SCALE, ACT_SCALE):
            s = sd.get(f"{name}.{kind}")
            if s is None and kind == ACT_SCALE:
                raise RedrafterError(f"{where}: missing tensor {name}.{kind}: {NEEDS_ACT_SCALES}")
            require(s is not None, f"{where}: fp8 weight {name}.weight has no {name}.{kind}")
            require(
                s.numel() == 1 and s.dim() <= 1,
                f"{where}: tensor {name}.{kind} has shape {list(s.shape)}; expected [1] "
                "(one per-tensor scale)",
            )
            require(
                s.is_floating_point()
                and not is_fp8(s)
                and bool(torch.isfinite(s).all())
                and float(s.reshape(())) > 0,
                f"{where}: tensor {name}.{kind} must be a positive finite float32, got {s}",
            )
    for k, v in sd.items():
        module = k.rsplit(".", 1)[0]
        if is_fp8(v):
            require(
                k.endswith(".weight") and module in linears,
                f"{where}: tensor {k} is {v.dtype}; only the base linears "
                f"({', '.join(FP8_LINEARS)}) are FP8, everything else stays float",
            )
        elif k.endswith((WEIGHT_SCALE, ACT_SCALE)):
            require(module in linears, f"{where}: unexpected scaling factor {k}")


def dequantize_state_dict(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """TensorRT-LLM FP8 names -> plain float tensors (``weight.float() * weights_scaling_factor``;
    scaling factors dropped), for the torch modeling."""
    out = {}
    for k, v in sd.items():
        if k.endswith((WEIGHT_SCALE, ACT_SCALE)):
            continue
        if is_fp8(v):
            require(v.dtype == FP8_DTYPE, f"{where}: tensor {k} is {v.dtype}; expected {FP8_DTYPE}")
            scale_name = k[: -len("weight")] + WEIGHT_SCALE
            require(
                k.endswith(".weight") and scale_name in sd,
                f"{where}: fp8 tensor {k} has no {scale_name}",
            )
            s = sd[scale_name]
            require(
                s.numel() == 1,
                f"{where}: tensor {scale_name} has shape {list(s.shape)}; "
                "expected [1] (one per-tensor scale)",
            )
            v = dequantize(v, s)
        out[k] = v
    return out


def quantize_state_dict(
    num_layers: int, sd: dict[str, torch.Tensor], act_scales: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A float base state dict (TensorRT-LLM names) -> FP8 base linears with per-tensor weight
    scales (amax / 448) and the given activation scales (module name -> [1])."""
    out = dict(sd)
    for name in fp8_linear_names(num_layers):
        require(not is_fp8(sd[name + ".weight"]), f"{name}.weight is already FP8")
        w, s = quantize_per_tensor(sd[name + ".weight"])
        require(name in act_scales, f"no activation scale for {name}: {NEEDS_ACT_SCALES}")
        out[name + ".weight"] = w
        out[f"{name}.{WEIGHT_SCALE}"] = s
        out[f"{name}.{ACT_SCALE}"] = act_scales[name].to(torch.float32).reshape(1)
    return out


@torch.no_grad()
def calibrate_activation_scales(
    base_cfg, sd: dict[str, torch.Tensor], rows: Iterable[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Static per-tensor input scales (``amax / 448``, max calibration) of every FP8 linear,
    measured by running the base (FP8 weights dequantized) in float32 over ``rows`` of token ids,
    one row at a time, on the GPU when there is one (else the CPU: keep calibration sets small)."""
    from ..models.base import BaseModel
    from ..models.drafter import load_checked

    base = BaseModel(base_cfg)
    float_sd = dequantize_state_dict(sd, "calibration") if is_quantized_state_dict(sd) else sd
    load_checked(base, {k: v for k, v in float_sd.items() if k in base.state_dict()}, "calibration")
    del float_sd
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = base.to(device).eval()
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    linears = set(fp8_linear_names(base_cfg.num_hidden_layers))
    for name, module in base.named_modules():
        if name in linears:

            def hook(_m, args, name=name):
                a = args[0].detach().abs().max().to(torch.float32)
                amax[name] = torch.maximum(amax[name], a) if name in amax else a

            hooks.append(module.register_forward_pre_hook(hook))
    n = 0
    try:
        for row in rows:
            row = [int(t) for t in row]
            require(
                row and all(0 <= t < base_cfg.vocab_size for t in row),
                f"calibration prompt {n}: token ids must be in [0, {base_cfg.vocab_size})",
            )
            ids = torch.tensor([row], device=device)
            t = len(row)
            zero = torch.zeros(1, dtype=torch.long, device=device)
            base(
                ids,
                torch.arange(t, device=device)[None],
                base.new_cache(1, t),
                zero,
                zero,
                torch.ones(t, t, dtype=torch.bool, device=device).tril()[None],
            )
            n += 1
    finally:
        for h in hooks:
            h.remove()
    require(n > 0, "calibration needs at least one prompt")
    return {name: per_tensor_scale(a.cpu()) for name, a in amax.items()}


# --------------------------------------------------------------------------- Hugging Face side
def _check_hf_quant_config(qc: Any, where: str) -> None:
    require(isinstance(qc, dict), f"{where}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    require(
        method in ACCEPTED_QUANT_METHODS,
        f"{where}: quantization_config.quant_method {method!r} is not supported; accepted: "
        f"{list(ACCEPTED_QUANT_METHODS)} with FP8 e4m3 per-tensor scales",
    )
    if method == "fp8":
        require(
            not qc.get("weight_block_size"),
            f"{where}: quantization_config.weight_block_size {qc.get('weight_block_size')} "
            "(block-wise FP8) is not supported; expected per-tensor scales (weight_scale of shape [1])",
        )
    elif method == "modelopt":
        algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
        require(
            algo == QUANT_ALGO,
            f"{where}: quantization_config.quant_algo {algo!r}; only "
            f"{QUANT_ALGO!r} (per-tensor) is supported",
        )
    else:  # compressed-tensors
        for gname, group in (qc.get("config_groups") or {}).items():
            w = (group or {}).get("weights") or {}
            require(
                w.get("type", "float") == "float" and w.get("num_bits", 8) == 8,
                f"{where}: quantization_config.config_groups.{gname}.weights is "
                f"{w.get('type')}{w.get('num_bits')}; only 8-bit float (FP8) is supported",
            )
            require(
                w.get("strategy", "tensor") == "tensor",
                f"{where}: quantization_config.config_groups.{gname}.weights.strategy "
                f"{w.get('strategy')!r}; only 'tensor' (per-tensor scales) is supported",
            )
            a = (group or {}).get("input_activations") or {}
            require(
                not a or a.get("dynamic") or a.get("strategy", "tensor") == "tensor",
                f"{where}: quantization_config.config_groups.{gname}.input_activations.strategy "
                f"{a.get('strategy')!r}; only 'tensor' is supported",
            )


def _scalar(hf: dict[str, torch.Tensor], name: str, where: str, what: str) -> torch.Tensor:
    s = hf[name]
    require(
        s.numel() == 1 and s.dim() <= 1,
        f"{where}: tensor {name} has shape {list(s.shape)}; expected a per-tensor {what} of "
        "shape [] or [1] (per-channel and block-wise scales are not supported)",
    )
    require(
        s.is_floating_point() and not is_fp8(s),
        f"{where}: tensor {name} has dtype {s.dtype}; expected float32",
    )
    s = s.to(torch.float32).reshape(1)
    require(
        bool(torch.isfinite(s).all()) and float(s) > 0,
        f"{where}: tensor {name} = {float(s)}; a scale must be positive and finite",
    )
    return s


def hf_fp8_to_trtllm(
    cfg, hf: dict[str, torch.Tensor], raw_config: dict[str, Any], where: str, rename
) -> dict[str, torch.Tensor] | None:
    """FP8 Hugging Face tensors -> TensorRT-LLM FP8 checkpoint tensors, or None when the
    checkpoint is not quantized. ``rename`` is the float name mapping
    (:func:`redrafter_trt.formats.names.hf_to_trtllm`)."""
    qc = raw_config.get("quantization_config")
    scale_suffixes = (".weight_scale", ".weight_scale_inv", ".input_scale")
    fp8_names = sorted(k for k, v in hf.items() if is_fp8(v))
    scale_names = sorted(k for k in hf if k.endswith(scale_suffixes))
    if qc is None and not fp8_names and not scale_names:
        return None
    if qc is not None:
        _check_hf_quant_config(qc, f"{where}/config.json")
    require(
        fp8_names,
        f"{where}: config.json has a quantization_config but no tensor is FP8 "
        "(float8_e4m3fn); an FP8 checkpoint stores the linear weights in float8_e4m3fn",
    )
    prefixes = {
        HF_LAYER.format(i) + p: (i, trt)
        for i in range(cfg.num_hidden_layers)
        for trt, ps in HF_LINEARS.items()
        for p in ps
    }
    # every fp8 tensor and every scale must belong to a base linear
    for k in fp8_names:
        require(
            hf[k].dtype == FP8_DTYPE,
            f"{where}: tensor {k} is {hf[k].dtype}; only {FP8_DTYPE} (e4m3) weights are supported",
        )
        require(
            k.endswith(".weight") and k[: -len(".weight")] in prefixes,
            f"{where}: tensor {k} is FP8; only the attention and MLP linears "
            "(q/k/v/o_proj, gate/up/down_proj) may be FP8 (embedding, lm_head and norms stay float)",
        )
    for k in scale_names:
        p = k.rsplit(".", 1)[0]
        require(p in prefixes, f"{where}: scale tensor {k} belongs to no attention/MLP linear")
        require(
            p + ".weight" in hf and is_fp8(hf[p + ".weight"]),
            f"{where}: scale tensor {k} given, but {p}.weight is not FP8 "
            f"({hf[p + '.weight'].dtype if p + '.weight' in hf else 'missing'})",
        )
    w_scales, a_scales = {}, {}
    for p in prefixes:
        w = hf.get(p + ".weight")
        require(w is not None, f"{where}: missing tensor {p}.weight")
        require(
            is_fp8(w),
            f"{where}: tensor {p}.weight is {w.dtype} while other linears are FP8; "
            "checkpoints quantizing only some linears are not supported (every "
            "q/k/v/o_proj and gate/up/down_proj must be float8_e4m3fn with a weight_scale)",
        )
        if p + ".weight_scale" in hf:
            w_scales[p] = _scalar(hf, p + ".weight_scale", where, "weight scale")
        elif p + ".weight_scale_inv" in hf:
            w_scales[p] = _scalar(hf, p + ".weight_scale_inv", where, "weight scale")
        else:
            raise RedrafterError(
                f"{where}: fp8 weight {p}.weight has no {p}.weight_scale "
                "(a float32 per-tensor scale of shape [] or [1])"
            )
        if p + ".input_scale" in hf:
            a_scales[p] = _scalar(hf, p + ".input_scale", where, "input scale")
    if a_scales:
        missing = sorted(set(prefixes) - set(a_scales))
        if missing:
            raise RedrafterError(
                f"{where}: tensor {missing[0]}.input_scale is missing while other "
                "linears have static input scales (all or none)"
            )
    # float names first (q/k/v fused as raw bytes; replaced below), then the FP8 tensors
    out = rename(cfg, hf, where)
    for p, (i, trt) in prefixes.items():
        if trt == "attention.qkv" and not p.endswith("q_proj"):
            continue
        name = TRTLLM_LAYER.format(i) + trt
        ps = [HF_LAYER.format(i) + q for q in HF_LINEARS[trt]]
        if len(ps) == 1:
            out[name + ".weight"], out[f"{name}.{WEIGHT_SCALE}"] = hf[p + ".weight"], w_scales[p]
        else:
            out[name + ".weight"], out[f"{name}.{WEIGHT_SCALE}"] = requantize_fused(
                [(hf[q + ".weight"], w_scales[q]) for q in ps]
            )
        if a_scales:
            out[f"{name}.{ACT_SCALE}"] = torch.stack([a_scales[q] for q in ps]).max().reshape(1)
    return out


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "QUANT_ALGO",
    "FP8_LINEARS",
    "HF_LINEARS",
    "EXCLUDE_MODULES",
    "quantization_config",
    "fp8_linear_names",
    "is_fp8",
    "is_quantized_state_dict",
    "per_tensor_scale",
    "quantize",
    "quantize_per_tensor",
    "dequantize",
    "requantize_fused",
    "check_trtllm_fp8",
    "dequantize_state_dict",
    "quantize_state_dict",
    "calibrate_activation_scales",
    "hf_fp8_to_trtllm",
    "NEEDS_ACT_SCALES",
]
