"""convert -> build -> run through the command-line entry points, and every bad input's error."""

import json
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_hf
from redrafter_trt.backends.torch_backend import auto_dtype
from redrafter_trt.cli import build as build_cli
from redrafter_trt.cli import convert as convert_cli
from redrafter_trt.cli import run as run_cli
from redrafter_trt.formats.checkpoint import read_checkpoint_config
from redrafter_trt.models.drafter import DrafterConfig, init_drafter, save_drafter
from redrafter_trt.models.io import save_safetensors


def call(main, args):
    """Run a CLI main; returns its exit status (argparse errors included)."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_hf(tmp_path_factory.mktemp("cli") / "base", "qwen2", seed=7)


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    d = init_drafter(DrafterConfig(97, 32, 24, 1, True), seed=3)  # exit_dim < 2H: input_proj
    return save_drafter(d, tmp_path_factory.mktemp("cli") / "drafter")


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory, base_dir, drafter_dir):
    root = tmp_path_factory.mktemp("cli_engine")
    assert (
        call(
            convert_cli.main,
            [
                "--model_dir",
                base_dir,
                "--drafter_model_dir",
                drafter_dir,
                "--output_dir",
                root / "ckpt",
                "--redrafter_num_beams",
                3,
                "--redrafter_draft_len_per_beam",
                2,
            ],
        )
        == 0
    )
    assert (
        call(
            build_cli.main,
            [
                "--checkpoint_dir",
                root / "ckpt",
                "--output_dir",
                root / "engine",
                "--backend",
                "torch",
                "--max_batch_size",
                2,
                "--max_input_len",
                16,
                "--max_seq_len",
                64,
            ],
        )
        == 0
    )
    return root / "engine"


def test_checkpoint_layout(engine_dir):
    ckpt = engine_dir.parent / "ckpt"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architecture"] == "ReDrafterForQWenLM"
    assert cfg["base_model_architecture"] == "Qwen2ForCausalLM"
    for key, value in {
        "redrafter_num_beams": 3,
        "redrafter_draft_len_per_beam": 2,
        "redrafter_greedy_search": True,
        "redrafter_num_layers": 1,
        "redrafter_hidden_size": 32,
        "redrafter_exit_dim": 24,
        "redrafter_is_rnn": True,
        "dtype": auto_dtype()[0],  # --dtype auto: bfloat16 where the CPU has bf16 units
    }.items():
        assert cfg[key] == value
    assert cfg["mapping"]["tp_size"] == 1
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "rank0.safetensors"))
    assert sd["transformer.layers.0.attention.qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)
    assert sd["transformer.layers.1.attention.qkv.bias"].shape == ((4 + 2 * 2) * 8,)
    assert {
        "drafter.layers.0.linear.weight",
        "drafter.layers.0.linear.bias",
        "drafter.lm_head.weight",
        "drafter.rnn_u.weight",
        "drafter.rnn_u.bias",
        "drafter.rnn_w.weight",
        "drafter.input_proj.weight",
        "drafter.input_proj.bias",
    } <= set(sd)
    assert sd["drafter.lm_head.weight"].shape == (97, 24)
    assert read_checkpoint_config(ckpt).num_beams == 3


def test_run_json_with_ids_file_and_plain_equality(engine_dir, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3, 4], [9, 8]]))
    reports = {}
    for mode in ("spec", "plain"):
        extra = ["--no_speculation"] if mode == "plain" else []
        assert (
            call(
                run_cli.main,
                [
                    "--engine_dir",
                    engine_dir,
                    "--input_ids_file",
                    ids,
                    "--json",
                    "--max_output_len",
                    9,
                    *extra,
                ],
            )
            == 0
        )
        reports[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = reports["spec"]
    assert set(spec) >= {"outputs", "tokens_per_step", "num_steps", "wall_s"}
    for s, p in zip(spec["outputs"], reports["plain"]["outputs"]):
        assert s["output_token_ids"] == p["output_token_ids"] and len(s["output_token_ids"]) == 9
        assert sum(s["accepted_per_step"]) == 9 and s["output_text"] is None
    assert reports["plain"]["tokens_per_step"] == 1.0


def test_run_streaming_prints_tokens(engine_dir, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 6, 7]]))
    assert (
        call(
            run_cli.main,
            [
                "--engine_dir",
                engine_dir,
                "--input_ids_file",
                ids,
                "--streaming",
                "--json",
                "--max_output_len",
                5,
            ],
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    events, final = lines[:-1], lines[-1]
    streamed = [t for e in events for t in e["token_ids"]]
    assert streamed == final["outputs"][0]["output_token_ids"] and events[-1]["finished"]


def expect_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    for f in fragments:
        assert f in err, err


def test_bad_run_inputs(engine_dir, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[]]))
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine_dir, "--input_ids_file", ids]),
        "empty prompt",
    )
    ids.write_text(json.dumps([list(range(20))]))
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine_dir, "--input_ids_file", ids]),
        "max_input_len 16",
    )
    ids.write_text(json.dumps([[1, 500]]))
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine_dir, "--input_ids_file", ids]),
        "outside [0, 97)",
    )
    ids.write_text("{not json")
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine_dir, "--input_ids_file", ids]),
        "not valid JSON",
    )
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine_dir, "--input_text", "hi"]),
        "no tokenizer",
    )
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", tmp_path / "nope", "--input_text", "x"]),
        "--engine_dir",
        "not found",
    )


def convert_args(base_dir, drafter_dir, out, *extra):
    return [
        "--model_dir",
        base_dir,
        "--drafter_model_dir",
        drafter_dir,
        "--output_dir",
        out,
        *extra,
    ]


def test_bad_convert_inputs_leave_nothing_behind(base_dir, drafter_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"

    def fails(args, *fragments):
        expect_error(capsys, call(convert_cli.main, args), *fragments)
        assert not out.exists(), "a failed conversion must not leave an output directory"
        assert not list(tmp_path.glob(".ckpt.tmp-*"))

    # Drafter trained for another base: hidden size / vocab size mismatch.
    wrong_h = save_drafter(init_drafter(DrafterConfig(97, 48, 24, 1, True)), tmp_path / "d_h")
    fails(convert_args(base_dir, wrong_h, out), "hidden_size 48", "base hidden_size 32")
    wrong_v = save_drafter(init_drafter(DrafterConfig(120, 32, 24, 1, True)), tmp_path / "d_v")
    fails(convert_args(base_dir, wrong_v, out), "vocab_size 120")
    # Missing and truncated weights.
    missing = tmp_path / "d_missing"
    missing.mkdir()
    (missing / "config.json").write_text((Path(drafter_dir) / "config.json").read_text())
    fails(convert_args(base_dir, missing, out), "no model.safetensors")
    trunc = tmp_path / "d_trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((Path(drafter_dir) / "config.json").read_text())
    data = (Path(drafter_dir) / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails(convert_args(base_dir, trunc, out), "truncated or corrupt")
    # Non-finite drafter weights.
    nan = init_drafter(DrafterConfig(97, 32, 24, 1, True))
    with torch.no_grad():
        nan.rnn_w.weight[0, 0] = float("nan")
    fails(convert_args(base_dir, save_drafter(nan, tmp_path / "d_nan"), out), "non-finite")
    # Beam shape.
    fails(convert_args(base_dir, drafter_dir, out, "--redrafter_num_beams", 0), "must be >= 1")
    fails(
        convert_args(base_dir, drafter_dir, out, "--redrafter_draft_len_per_beam", 0),
        "must be >= 1",
    )
    fails(
        convert_args(base_dir, drafter_dir, out, "--redrafter_num_beams", 98),
        "exceeds the vocabulary size 97",
    )


def test_bad_base_models(base_dir, drafter_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    # Unsupported architecture.
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    (gpt2 / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    expect_error(
        capsys,
        call(convert_cli.main, convert_args(gpt2, drafter_dir, out)),
        "unsupported architecture",
    )
    # Missing weights; truncated base weights; non-finite base weights.
    nowt = tmp_path / "nowt"
    nowt.mkdir()
    (nowt / "config.json").write_text((Path(base_dir) / "config.json").read_text())
    expect_error(
        capsys, call(convert_cli.main, convert_args(nowt, drafter_dir, out)), "no model.safetensors"
    )
    data = (Path(base_dir) / "model.safetensors").read_bytes()
    (nowt / "model.safetensors").write_bytes(data[:100])
    expect_error(
        capsys, call(convert_cli.main, convert_args(nowt, drafter_dir, out)), "truncated or corrupt"
    )
    from safetensors.torch import load_file

    sd = load_file(str(Path(base_dir) / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 3] = float("inf")
    save_safetensors(sd, nowt / "model.safetensors")
    expect_error(capsys, call(convert_cli.main, convert_args(nowt, drafter_dir, out)), "non-finite")
    assert not out.exists()


def test_build_errors_and_overwrite(engine_dir, tmp_path, capsys):
    ckpt = engine_dir.parent / "ckpt"
    expect_error(
        capsys,
        call(
            build_cli.main,
            ["--checkpoint_dir", ckpt, "--output_dir", engine_dir, "--backend", "torch"],
        ),
        "not empty",
        "--overwrite",
    )
    expect_error(
        capsys,
        call(
            build_cli.main,
            [
                "--checkpoint_dir",
                ckpt,
                "--output_dir",
                tmp_path / "e",
                "--backend",
                "torch",
                "--max_input_len",
                64,
                "--max_seq_len",
                64,
            ],
        ),
        "must be smaller",
    )
    # A corrupted engine weights file fails on load with a clear message.
    e2 = tmp_path / "e2"
    assert (
        call(build_cli.main, ["--checkpoint_dir", ckpt, "--output_dir", e2, "--backend", "torch"])
        == 0
    )
    w = e2 / "rank0.safetensors"
    data = w.read_bytes()
    w.unlink()  # may be a hard link to the checkpoint's file: never write through it
    w.write_bytes(data[: len(data) // 3])
    ids = tmp_path / "ids.json"
    ids.write_text("[[1, 2]]")
    expect_error(
        capsys, call(run_cli.main, ["--engine_dir", e2, "--input_ids_file", ids]), "truncated"
    )


def test_trtllm_backend_needs_the_container(engine_dir, tmp_path, capsys):
    ckpt = engine_dir.parent / "ckpt"
    expect_error(
        capsys,
        call(
            build_cli.main,
            ["--checkpoint_dir", ckpt, "--output_dir", tmp_path / "t", "--backend", "trtllm"],
        ),
        "nvcr.io/nvidia/tensorrt-llm/release",
    )


def test_help_explains_every_flag(capsys):
    for mod in (convert_cli, build_cli, run_cli):
        parser = mod.build_parser()
        for action in parser._actions:
            if action.option_strings:
                assert action.help and len(action.help) > 10, (
                    f"{parser.prog} {action.option_strings}"
                )
        assert call(mod.main, ["--help"]) == 0
        out = capsys.readouterr().out
        assert all(a.option_strings[-1] in out for a in parser._actions if a.option_strings)
