"""FP8 base weights: FP8 Hugging Face checkpoints (per-tensor static scales) and
``--quantize fp8`` -> TensorRT-LLM's FP8 checkpoint convention; tensor-parallel splits; the torch
backend running the checkpoint dequantized; rejections of what is not per-tensor FP8."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_tiny_hf
from redrafter_trt.cli import convert as convert_cli
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import (
    convert_checkpoint,
    load_checkpoint_models,
    load_rank_shards,
    rank_file,
    read_checkpoint_config,
)
from redrafter_trt.formats.fp8 import EXCLUDE_MODULES, FP8_LINEARS
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.formats.sharding import padded_vocab_size, tp_merge
from redrafter_trt.models.base import BaseModel
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime.engine import build_engine
from redrafter_trt.runtime.loader import load

F8 = torch.float8_e4m3fn
H, NH, NKV, HD, V, LAYERS = 32, 4, 2, 8, 97, 2
HF_PROJ = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TRT_OF = {
    "self_attn.o_proj": "attention.dense",
    "mlp.gate_proj": "mlp.fc",
    "mlp.up_proj": "mlp.gate",
    "mlp.down_proj": "mlp.proj",
}
LINEAR_RE = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
)
CALIB = [[1, 5, 9, 33, 2, 70, 96, 4], [3, 3, 8, 50, 11], [90, 12, 0, 44, 45, 46, 7, 61, 20]]


def u8(t):
    return t.contiguous().view(torch.uint8)


def write_fp8_hf(
    src: Path,
    dst: Path,
    input_scales: bool = True,
    scalar_shape=(1,),
    method: str = "compressed-tensors",
) -> Path:
    """An FP8 Hugging Face checkpoint made from a float one: every linear quantized per tensor
    (scale = amax / 448, shape ``scalar_shape``), distinct static input scales, quantization_config."""
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    for i, k in enumerate(sorted(k for k in sd if LINEAR_RE.fullmatch(k))):
        w = sd[k].float()
        s = w.abs().max() / 448.0
        sd[k] = (w / s).to(F8)
        p = k[: -len(".weight")]
        sd[p + ".weight_scale"] = s.reshape(scalar_shape).float()
        if input_scales:
            sd[p + ".input_scale"] = torch.tensor(0.01 * (1 + i % 5)).reshape(scalar_shape)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if method == "compressed-tensors":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "tensor",
                        "dynamic": False,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "tensor",
                        "dynamic": not input_scales,
                    },
                }
            },
            "ignore": ["lm_head"],
        }
    else:
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "static" if input_scales else "dynamic",
        }
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_hf")
    out = {}
    for i, arch in enumerate(("llama", "qwen2")):
        f = write_tiny_hf(root / arch, arch, seed=21 + i)
        out[arch] = (f, write_fp8_hf(f, root / f"{arch}_fp8", scalar_shape=(1,) if i else ()))
    return out


def drafter_for(cfg, exit_dim=24):
    return init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, exit_dim, 2, True), seed=5)


def convert(base, out, tp=1, dtype="float16", **kw):
    cfg, sd = base
    return convert_checkpoint(
        cfg, sd, drafter_for(cfg), out, dtype=dtype, num_beams=3, draft_len=2, tp_size=tp, **kw
    )


def hf_tensors(d: Path):
    return load_file(str(d / "model.safetensors"))


def scalar(t):
    return float(t.reshape(()))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp8_checkpoint_names_dtypes_scales(dirs, tmp_path, arch, dtype):
    _, fp8_dir = dirs[arch]
    out = convert(load_hf_base(fp8_dir), tmp_path / "ckpt", dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {
        "quant_algo": "FP8",
        "kv_cache_quant_algo": None,
        "exclude_modules": EXCLUDE_MODULES,
    }
    assert cfg["dtype"] == dtype
    for must in ("*lm_head", "*vocab_embedding", "*ln_f", "drafter.*"):
        assert must in cfg["quantization"]["exclude_modules"]
    ckpt = load_file(str(out / rank_file(0)))
    hf = hf_tensors(fp8_dir)
    linears = {f"transformer.layers.{i}.{n}" for i in range(LAYERS) for n in FP8_LINEARS}
    for name, t in ckpt.items():
        module, kind = name.rsplit(".", 1)
        if module in linears and kind == "weight":
            assert t.dtype == F8, name
        elif kind.endswith("scaling_factor"):
            assert module in linears and t.dtype == torch.float32 and tuple(t.shape) == (1,), name
        else:
            assert t.dtype == getattr(torch, dtype), (
                name
            )  # embedding, norms, biases, lm_head, drafter
    assert sum(k.startswith("drafter.") for k in ckpt) > 0
    assert len([k for k in ckpt if k.endswith("scaling_factor")]) == 2 * len(linears)
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        for hf_name, trt in TRT_OF.items():  # single linears: fp8 bytes and scales as given
            assert torch.equal(u8(ckpt[dst + trt + ".weight"]), u8(hf[src + hf_name + ".weight"]))
            assert scalar(ckpt[dst + trt + ".weights_scaling_factor"]) == scalar(
                hf[src + hf_name + ".weight_scale"]
            )
            assert scalar(ckpt[dst + trt + ".activation_scaling_factor"]) == scalar(
                hf[src + hf_name + ".input_scale"]
            )
        ws = [scalar(hf[src + f"self_attn.{p}_proj.weight_scale"]) for p in "qkv"]
        xs = [scalar(hf[src + f"self_attn.{p}_proj.input_scale"]) for p in "qkv"]
        assert len(set(ws)) == 3  # the test exercises real requantization
        assert scalar(ckpt[dst + "attention.qkv.weights_scaling_factor"]) == pytest.approx(
            max(ws), rel=0, abs=0
        )
        assert scalar(ckpt[dst + "attention.qkv.activation_scaling_factor"]) == max(xs)
        if arch == "qwen2":
            assert ckpt[dst + "attention.qkv.bias"].dtype == getattr(torch, dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_qkv_requantization_error_bound(dirs, tmp_path, arch):
    """Dequantized fused qkv is within half an fp8 step (at the shared scale) of the separately
    dequantized q/k/v; the part whose scale is the shared one is kept bit for bit."""
    _, fp8_dir = dirs[arch]
    ckpt = load_file(str(convert(load_hf_base(fp8_dir), tmp_path / "ckpt") / rank_file(0)))
    hf = hf_tensors(fp8_dir)
    for i in range(LAYERS):
        src = f"model.layers.{i}.self_attn."
        parts = [(hf[src + f"{p}_proj.weight"], hf[src + f"{p}_proj.weight_scale"]) for p in "qkv"]
        ref = torch.cat([w.float() * s.float().reshape(()) for w, s in parts])
        fused = ckpt[f"transformer.layers.{i}.attention.qkv.weight"]
        smax = scalar(ckpt[f"transformer.layers.{i}.attention.qkv.weights_scaling_factor"])
        got = fused.float() * smax
        # e4m3: 3 mantissa bits -> half a step is <= |x| * 2^-4 for normals; subnormal step 2^-9
        bound = ref.abs() * 2.0**-4 + smax * 2.0**-10
        assert bool(((got - ref).abs() <= bound * (1 + 1e-6)).all())
        assert (got - ref).abs().max() > 0  # q/k/v scales differ, so something was rounded
        sizes = [NH * HD, NKV * HD, NKV * HD]
        for (w, s), got_part in zip(parts, fused.split(sizes)):
            if scalar(s) == smax:
                assert torch.equal(u8(got_part), u8(w))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", [2, 4])
def test_fp8_tp_split_concatenates_back(dirs, tmp_path, arch, tp):
    base = load_hf_base(dirs[arch][1])
    ref = load_file(str(convert(base, tmp_path / "tp1") / rank_file(0)))
    out = convert(base, tmp_path / f"tp{tp}", tp=tp)
    cfg, shards = load_rank_shards(out)
    assert cfg.tp_size == tp and cfg.quant_algo == "FP8"
    for shard in shards:
        assert set(shard) == set(ref)
        for name, t in shard.items():
            assert t.dtype == ref[name].dtype, name
            if name.endswith("scaling_factor"):  # replicated per rank
                assert torch.equal(t, ref[name]), name
        for i in range(LAYERS):  # fp8 weights split like the float ones
            p = f"transformer.layers.{i}."
            assert shard[p + "attention.dense.weight"].shape == (H, NH * HD // tp)
            assert shard[p + "mlp.proj.weight"].shape == (H, 64 // tp)
            assert shard[p + "mlp.fc.weight"].shape == (64 // tp, H)
            assert shard[p + "attention.qkv.weight"].shape == (
                (NH // tp + 2 * max(NKV // tp, 1)) * HD,
                H,
            )
        assert shard["lm_head.weight"].shape[0] == padded_vocab_size(V, tp) // tp
    merged = tp_merge(shards, cfg)
    assert set(merged) == set(ref)
    for name, t in ref.items():
        assert torch.equal(u8(merged[name]), u8(t)), name


def reference_base(cfg, ckpt_file: Path, dtype=torch.float64) -> BaseModel:
    """A float model from the checkpoint's tensors dequantized here (fp8 * scale), independently
    of the loader."""
    sd = load_file(str(ckpt_file))
    plain = {}
    for k, v in sd.items():
        if k.startswith("drafter.") or k.endswith("scaling_factor"):
            continue
        if v.dtype == F8:
            v = v.to(torch.float64) * sd[
                k[: -len("weight")] + "weights_scaling_factor"
            ].double().reshape(())
        plain[k] = v
    base = BaseModel(cfg.base).to(dtype)
    base.load_state_dict({k: v.to(dtype) for k, v in plain.items()}, strict=True)
    return base.eval()


def rel_l2(got, ref) -> float:
    return float((got - ref).norm() / ref.norm())


def base_logits(base: BaseModel, ids: list[int]) -> torch.Tensor:
    t = len(ids)
    with torch.no_grad():
        h = base(
            torch.tensor([ids]),
            torch.arange(t)[None],
            base.new_cache(1, t),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.ones(t, t, dtype=torch.bool).tril()[None],
        )
        return base.logits(h)[0].double()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_torch_backend_runs_fp8_checkpoint_dequantized(dirs, tmp_path, arch):
    float_dir, fp8_dir = dirs[arch]
    out = convert(load_hf_base(fp8_dir), tmp_path / "ckpt", dtype="float32")
    cfg, base, drafter = load_checkpoint_models(out)
    assert cfg.quant_algo == "FP8" and base.lm_head.weight.dtype == torch.float32
    ids = CALIB[0]
    got = base_logits(base, ids)
    want = base_logits(reference_base(cfg, out / rank_file(0)), ids)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    # and near the float model the FP8 checkpoint was made from: fp8 rounding only (3 mantissa
    # bits; on this tiny random model that alone moves the logits by ~10% relative L2)
    cfg_f, sd_f = load_hf_base(float_dir)
    float_base = BaseModel(cfg_f).double()
    float_base.load_state_dict({k: v.double() for k, v in sd_f.items()})
    ref = base_logits(float_base.eval(), ids)
    assert rel_l2(got, ref) < 0.2
    # the torch engine loads it the same way and generates
    eng = build_engine(
        out,
        tmp_path / "engine",
        backend="torch",
        max_batch_size=2,
        max_input_len=16,
        max_seq_len=48,
    )
    assert (
        json.loads((eng / "config.json").read_text())["pretrained_config"]["quantization"][
            "quant_algo"
        ]
        == "FP8"
    )
    gen = load(eng, device="cpu")
    spec = gen.generate([ids], max_new_tokens=6)[0].token_ids
    plain = gen.generate([ids], max_new_tokens=6, speculative=False)[0].token_ids
    assert spec == plain and len(spec) == 6


def run_convert(capsys, *args):
    code = convert_cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_quantize_fp8_round_trip(dirs, tmp_path, capsys):
    """--quantize fp8: weight scale = amax / 448, activation scale = calibrated input amax / 448
    (checked against transformers' own model), weights within fp8 rounding, runs on torch."""
    from transformers import LlamaForCausalLM

    float_dir, _ = dirs["llama"]
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(CALIB))
    out = tmp_path / "ckpt"
    code, err = run_convert(
        capsys,
        "--model_dir",
        float_dir,
        "--random_drafter",
        "--output_dir",
        out,
        "--dtype",
        "bfloat16",
        "--quantize",
        "fp8",
        "--calib_input_ids_file",
        calib,
        "--tp_size",
        2,
    )
    assert code == 0, err
    assert "FP8" in err
    cfg, shards = load_rank_shards(out)
    assert cfg.quant_algo == "FP8" and cfg.dtype == "bfloat16"
    ckpt = tp_merge(shards, cfg)
    hf = hf_tensors(float_dir)
    # independent activation amax from transformers
    model = LlamaForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    amax, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:

            def hook(_m, a, name=name):
                amax[name] = max(amax.get(name, 0.0), float(a[0].abs().max()))

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in CALIB:
            model(torch.tensor([row]))
    for h in hooks:
        h.remove()
    for i in range(LAYERS):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        qkv = torch.cat([hf[src + f"self_attn.{p}_proj.weight"] for p in "qkv"]).float()
        singles = {trt: hf[src + n + ".weight"].float() for n, trt in TRT_OF.items()}
        for trt, w in {"attention.qkv": qkv, **singles}.items():
            s = scalar(ckpt[dst + trt + ".weights_scaling_factor"])
            assert s == pytest.approx(float(w.abs().max()) / 448.0, rel=1e-6)
            deq = ckpt[dst + trt + ".weight"].float() * s
            assert bool(((deq - w).abs() <= w.abs() * 2.0**-4 + s * 2.0**-10 + 1e-7).all()), trt
        hf_in = {"attention.qkv": "self_attn.q_proj", **{t: n for n, t in TRT_OF.items()}}
        for trt, n in hf_in.items():
            want = amax[f"model.layers.{i}.{n}"] / 448.0
            assert scalar(ckpt[dst + trt + ".activation_scaling_factor"]) == pytest.approx(
                want, rel=1e-4
            ), trt
    assert ckpt["transformer.vocab_embedding.weight"].dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for k, v in ckpt.items() if k.startswith("drafter."))

    # tp 1 of the same runs on the torch backend, close to the float model
    out1 = tmp_path / "ckpt1"
    code, err = run_convert(
        capsys,
        "--model_dir",
        float_dir,
        "--random_drafter",
        "--output_dir",
        out1,
        "--dtype",
        "float32",
        "--quantize",
        "fp8",
        "--calib_input_ids_file",
        calib,
    )
    assert code == 0, err
    cfg1, base, _ = load_checkpoint_models(out1)
    got = base_logits(base, CALIB[1])
    assert torch.allclose(
        got, base_logits(reference_base(cfg1, out1 / rank_file(0)), CALIB[1]), rtol=1e-4, atol=1e-4
    )
    with torch.no_grad():
        ref = model(torch.tensor([CALIB[1]])).logits[0].double()
    assert rel_l2(got, ref) < 0.2


def test_quantize_fp8_without_calibration_is_refused(dirs, tmp_path, capsys):
    float_dir, fp8_dir = dirs["llama"]
    out = tmp_path / "ckpt"
    code, err = run_convert(
        capsys,
        "--model_dir",
        float_dir,
        "--random_drafter",
        "--output_dir",
        out,
        "--quantize",
        "fp8",
    )
    assert code == 2 and "activation_scaling_factor" in err and "--calib_input_ids_file" in err, err
    assert not out.exists() and not list(tmp_path.glob(".ckpt*"))
    # an FP8 base is converted as FP8 without --quantize; with it, it is an error
    code, err = run_convert(
        capsys, "--model_dir", fp8_dir, "--random_drafter", "--output_dir", out, "--quantize", "fp8"
    )
    assert code == 2 and "already FP8" in err
    assert not out.exists()
    # calibration prompts that would be ignored are an error, not silently dropped
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(CALIB))
    for model_dir, fragment in (
        (float_dir, "for --quantize fp8 or an FP8 base only"),
        (fp8_dir, "already has static input scales"),
    ):
        code, err = run_convert(
            capsys,
            "--model_dir",
            model_dir,
            "--random_drafter",
            "--output_dir",
            out,
            "--calib_input_ids_file",
            calib,
        )
        assert code == 2 and fragment in err, err
        assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1, 2, 500]]))
    code, err = run_convert(
        capsys,
        "--model_dir",
        float_dir,
        "--random_drafter",
        "--output_dir",
        out,
        "--quantize",
        "fp8",
        "--calib_input_ids_file",
        bad,
    )
    assert code == 2 and "token ids must be in [0, 97)" in err, err
    assert not out.exists()


def test_fp8_base_without_input_scales_needs_calibration(dirs, tmp_path, capsys):
    float_dir, _ = dirs["qwen2"]
    dyn = write_fp8_hf(float_dir, tmp_path / "dyn", input_scales=False, method="fp8")
    out = tmp_path / "ckpt"
    code, err = run_convert(capsys, "--model_dir", dyn, "--random_drafter", "--output_dir", out)
    assert code == 2 and "input_scale" in err and "--calib_input_ids_file" in err, err
    assert not out.exists()
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(CALIB))
    code, err = run_convert(
        capsys,
        "--model_dir",
        dyn,
        "--random_drafter",
        "--output_dir",
        out,
        "--calib_input_ids_file",
        calib,
        "--dtype",
        "float16",
    )
    assert code == 0, err
    ckpt = load_file(str(out / rank_file(0)))
    hf = hf_tensors(dyn)
    for i in range(LAYERS):  # weights as given; activation scales measured
        p = f"transformer.layers.{i}."
        assert torch.equal(
            u8(ckpt[p + "mlp.proj.weight"]), u8(hf[f"model.layers.{i}.mlp.down_proj.weight"])
        )
        for n in FP8_LINEARS:
            assert scalar(ckpt[p + n + ".activation_scaling_factor"]) > 0


def mutate_fp8(src: Path, dst: Path, fn, cfg_fn=None) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if cfg_fn:
        cfg = json.loads((dst / "config.json").read_text())
        cfg_fn(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_rejections_name_the_tensor_and_leave_nothing(dirs, tmp_path, capsys):
    _, fp8_dir = dirs["llama"]
    k = "model.layers.1.self_attn.k_proj"

    def block_wise(sd):
        sd[k + ".weight_scale_inv"] = torch.ones(2, 2)
        del sd[k + ".weight_scale"]

    def per_channel(sd):
        sd[k + ".weight_scale"] = torch.ones(NKV * HD, 1)

    def no_scale(sd):
        del sd[k + ".weight_scale"]

    def e5m2(sd):
        sd[k + ".weight"] = sd[k + ".weight"].float().to(torch.float8_e5m2)

    def partial_input(sd):
        del sd[k + ".input_scale"]

    def float_linear(sd):
        sd[k + ".weight"] = sd[k + ".weight"].float()
        del sd[k + ".weight_scale"], sd[k + ".input_scale"]

    def fp8_embedding(sd):
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].to(F8)

    def block_cfg(cfg):
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}

    def channel_cfg(cfg):
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "channel"

    def gptq_cfg(cfg):
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}

    cases = [
        ("block", block_wise, None, [k + ".weight_scale_inv", "[2, 2]", "[] or [1]"]),
        (
            "channel",
            per_channel,
            None,
            [k + ".weight_scale", "[16, 1]", "[] or [1]", "per-channel"],
        ),
        ("noscale", no_scale, None, [k + ".weight", "no " + k + ".weight_scale"]),
        ("e5m2", e5m2, None, [k + ".weight", "float8_e5m2"]),
        ("partial", partial_input, None, [k + ".input_scale", "all or none"]),
        ("mixed", float_linear, None, [k + ".weight", "only some linears"]),
        ("embed", fp8_embedding, None, ["model.embed_tokens.weight", "stay float"]),
        ("blockcfg", lambda sd: None, block_cfg, ["weight_block_size", "block-wise"]),
        ("channelcfg", lambda sd: None, channel_cfg, ["group_0.weights.strategy", "'channel'"]),
        ("gptq", lambda sd: None, gptq_cfg, ["quant_method 'gptq'"]),
    ]
    for tag, fn, cfg_fn, fragments in cases:
        bad = mutate_fp8(fp8_dir, tmp_path / f"bad_{tag}", fn, cfg_fn)
        with pytest.raises(RedrafterError) as e:
            load_hf_base(bad)
        for f in fragments:
            assert f in str(e.value), (tag, f, str(e.value))
        out = tmp_path / f"out_{tag}"
        code, err = run_convert(capsys, "--model_dir", bad, "--random_drafter", "--output_dir", out)
        assert code == 2 and fragments[0] in err, (tag, err)
        assert not out.exists(), tag
    assert not list(tmp_path.glob(".out_*")), "temporary output left behind"


def test_inconsistent_trtllm_fp8_state_dicts_are_refused(dirs, tmp_path):
    cfg, sd = load_hf_base(dirs["llama"][1])
    name = "transformer.layers.0.mlp.fc"
    for tag, edit, fragment in (
        (
            "noact",
            lambda d: d.pop(name + ".activation_scaling_factor"),
            "activation_scaling_factor",
        ),
        (
            "shape",
            lambda d: d.__setitem__(name + ".weights_scaling_factor", torch.ones(2)),
            name + ".weights_scaling_factor has shape [2]",
        ),
        (
            "lm_head",
            lambda d: d.__setitem__("lm_head.weight", d["lm_head.weight"].to(F8)),
            "lm_head.weight",
        ),
    ):
        bad = dict(sd)
        edit(bad)
        with pytest.raises(RedrafterError, match=re.escape(fragment)):
            convert((cfg, bad), tmp_path / tag)
        assert not (tmp_path / tag).exists()


def test_float_checkpoint_config_unchanged(dirs, tmp_path):
    out = convert(load_hf_base(dirs["llama"][0]), tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "quant_algo": None,
        "kv_cache_quant_algo": None,
    }
    assert read_checkpoint_config(out).quant_algo is None
    # a float checkpoint carrying fp8 tensors is refused by the loader
    sd = load_file(str(out / rank_file(0)))
    sd["transformer.layers.0.mlp.fc.weight"] = sd["transformer.layers.0.mlp.fc.weight"].to(F8)
    save_file(sd, str(out / rank_file(0)))
    with pytest.raises(RedrafterError, match="transformer.layers.0.mlp.fc.weight is FP8"):
        load_checkpoint_models(out)
