"""What a new user hits first: interrupted writes, file modes, bad inputs, silent limits, streaming
output, prompt files, --version, and the demo's engine key (issue 15)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from newuser_fixtures import WORDS, write_text_model
from redrafter_trt.cli import bench as bench_cli
from redrafter_trt.cli import build as build_cli
from redrafter_trt.cli import convert as convert_cli
from redrafter_trt.cli import run as run_cli
from redrafter_trt.cli import train as train_cli
from redrafter_trt.models.drafter import DrafterConfig, init_drafter, save_drafter

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def call(main, args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def expect_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture(scope="module")
def text_base(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("nu") / "base")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return save_drafter(
        init_drafter(DrafterConfig(97, 32, 64, 1, True), seed=5, std=0.5),
        tmp_path_factory.mktemp("nu") / "head",
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory, text_base, head):
    root = tmp_path_factory.mktemp("nu_engine")
    assert (
        call(
            convert_cli.main,
            [
                "--model_dir",
                text_base,
                "--drafter_model_dir",
                head,
                "--output_dir",
                root / "ckpt",
                "--redrafter_num_beams",
                2,
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
                32,
                "--max_seq_len",
                64,
            ],
        )
        == 0
    )
    return root / "engine"


def run_json(capsys, engine, *args):
    assert call(run_cli.main, ["--engine_dir", engine, "--json", "--no_progress", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- defect 3: leaks
WRITER = r"""
import sys, time
from redrafter_trt.cmdline import run_main
from redrafter_trt.models.io import atomic_output_dir
import argparse

def fn(args):
    with atomic_output_dir(args.out) as tmp:
        (tmp / "rank0.safetensors").write_bytes(b"x" * 1000)
        print("READY", flush=True)
        time.sleep(60)

p = argparse.ArgumentParser(prog="writer")
p.add_argument("out")
sys.exit(run_main(fn, p))
"""


def _start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    assert len(list(out.parent.glob(f".{out.name}.tmp-*"))) == 1
    return proc


@pytest.mark.full
def test_sigterm_removes_the_temp_dir(tmp_path):
    out = tmp_path / "ckpt"
    proc = _start_writer(out)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM and "terminated by SIGTERM" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_sigterm_python_swallows_is_raised_again():
    """A handler that runs inside a weakref callback (as when a signal lands while an import
    releases its module lock) raises where Python ignores exceptions: the command must still
    stop, not run on to the end."""
    import time
    import weakref

    from redrafter_trt.cmdline import terminate_like_interrupt
    from redrafter_trt.errors import Terminated

    class Thing:
        pass

    hook, handler = sys.unraisablehook, signal.getsignal(signal.SIGTERM)
    ran_on = 0
    with pytest.raises(Terminated) as caught:
        with terminate_like_interrupt():
            thing = Thing()
            ref = weakref.ref(thing, lambda _: signal.raise_signal(signal.SIGTERM))
            del thing
            assert ref() is None  # the callback ran, and its Terminated was swallowed there
            for _ in range(200):  # 2 s of work that the signal must stop
                time.sleep(0.01)
                ran_on += 1
    assert caught.value.signum == signal.SIGTERM and ran_on < 100
    assert sys.unraisablehook is hook and signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.full
def test_next_run_removes_what_sigkill_left(tmp_path, text_base, head, capsys):
    out = tmp_path / "ckpt"
    proc = _start_writer(out)
    live = _start_writer(tmp_path / "other")  # another writer still running: never touched
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = list(tmp_path.glob(".ckpt.tmp-*"))
    assert len(left) == 1 and (left[0] / "rank0.safetensors").is_file()
    foreign = tmp_path / ".ckpt.tmp-notours"  # not of our naming: left alone
    foreign.mkdir()
    # a live writer of the same output (this test's own parent process id) is left alone too
    alive_same = tmp_path / f".ckpt.tmp-{os.getppid()}-abc123"
    alive_same.mkdir()
    assert (
        call(
            convert_cli.main,
            ["--model_dir", text_base, "--drafter_model_dir", head, "--output_dir", out],
        )
        == 0
    )
    assert not left[0].exists()
    assert foreign.is_dir() and alive_same.is_dir()
    assert len(list(tmp_path.glob(".other.tmp-*"))) == 1
    live.kill()
    live.wait(30)


# --------------------------------------------------------------------------- defect 4: umask
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_honour_the_umask(tmp_path, text_base, head, mask):
    old = os.umask(mask)
    try:
        ckpt, eng, drafter = tmp_path / "ckpt", tmp_path / "engine", tmp_path / "drafter"
        save_drafter(init_drafter(DrafterConfig(97, 32, 64, 1, True)), drafter)
        assert (
            call(
                convert_cli.main,
                ["--model_dir", text_base, "--drafter_model_dir", head, "--output_dir", ckpt],
            )
            == 0
        )
        assert (
            call(
                build_cli.main,
                ["--checkpoint_dir", ckpt, "--output_dir", eng, "--backend", "torch"],
            )
            == 0
        )
    finally:
        os.umask(old)
    for d in (ckpt, eng, drafter):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d
        files = [f for f in d.iterdir() if f.is_file()]
        assert any(f.suffix == ".safetensors" for f in files)
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


# --------------------------------------------------------------------------- defect 5: tracebacks
def test_bad_device_is_a_message(engine, capsys):
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine, "--input_text", "tan", "--device", "gpu"]),
        "--device 'gpu'",
        "cpu, cuda or cuda:N",
    )
    if not torch.cuda.is_available():
        expect_error(
            capsys,
            call(run_cli.main, ["--engine_dir", engine, "--input_text", "tan", "--device", "cuda"]),
            "--device cuda",
            "no usable CUDA",
        )


@pytest.mark.full
def test_prompt_that_is_not_utf8(engine, tmp_path):
    # the real command line: the shell hands Python the raw bytes
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "redrafter_trt.cli.run",
            "--engine_dir",
            str(engine),
            "--input_text",
            b"\xff\xfe bad",
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--input_text prompt 0: not valid UTF-8" in r.stderr
    f = tmp_path / "p.txt"
    f.write_bytes(b"tan kel\n\xff\xfe bad\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "redrafter_trt.cli.run",
            "--engine_dir",
            str(engine),
            "--input_file",
            str(f),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--input_file {f}: not valid UTF-8 (byte 0xff on line 2)" in r.stderr


# --------------------------------------------------------------------------- defect 6: silent limits
def test_limits_are_reported(engine, capsys):
    err_of = lambda: capsys.readouterr().err  # noqa: E731
    assert (
        call(
            run_cli.main,
            [
                "--engine_dir",
                engine,
                "--input_text",
                "tan",
                "kel",
                "mor",
                "--max_output_len",
                4,
                "--no_progress",
            ],
        )
        == 0
    )
    err = err_of()
    assert "3 prompts but the engine's max_batch_size is 2" in err
    long = " ".join(WORDS[:20])
    assert (
        call(
            run_cli.main,
            [
                "--engine_dir",
                engine,
                "--input_text",
                long,
                "--max_output_len",
                60,
                "--ignore_eos",
                "--no_progress",
                "--json",
            ],
        )
        == 0
    )
    out = capsys.readouterr()
    assert (
        "prompt 0 has 20 tokens" in out.err and "max_seq_len 64: at most 44 new tokens" in out.err
    )
    assert len(json.loads(out.out)["outputs"][0]["output_token_ids"]) == 44


def test_draft_len_other_than_trained_warns(tmp_path, text_base, head, capsys):
    trained = tmp_path / "trained"
    save_drafter(
        init_drafter(DrafterConfig(97, 32, 64, 1, True)),
        trained,
        extra_files={"training_report.json": json.dumps({"settings": {"draft_len": 4}})},
    )
    assert (
        call(
            convert_cli.main,
            [
                "--model_dir",
                text_base,
                "--drafter_model_dir",
                trained,
                "--output_dir",
                tmp_path / "c8",
                "--redrafter_draft_len_per_beam",
                8,
                "--redrafter_num_beams",
                16,
            ],
        )
        == 0
    )
    assert (
        "trained for D=4 draft steps but --redrafter_draft_len_per_beam is 8"
        in capsys.readouterr().err
    )
    assert (
        call(
            convert_cli.main,
            [
                "--model_dir",
                text_base,
                "--drafter_model_dir",
                trained,
                "--output_dir",
                tmp_path / "c4",
            ],
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().err


def test_bogus_trtllm_flags_fail_with_torch_backend(engine, tmp_path, capsys):
    ckpt = engine.parent / "ckpt"
    for flag, value in (
        ("--kv_cache_type", "bogus"),
        ("--gemm_plugin", "fp7"),
        ("--use_paged_context_fmha", "maybe"),
        ("--max_num_tokens", "-3"),
        ("--workers", "many"),
    ):
        code = call(
            build_cli.main,
            [
                "--checkpoint_dir",
                ckpt,
                "--output_dir",
                tmp_path / "e",
                "--backend",
                "torch",
                flag,
                value,
            ],
        )
        expect_error(capsys, code, flag, value)
        assert not (tmp_path / "e").exists()
    assert (
        call(
            build_cli.main,
            [
                "--checkpoint_dir",
                ckpt,
                "--output_dir",
                tmp_path / "e",
                "--backend",
                "torch",
                "--kv_cache_type",
                "paged",
            ],
        )
        == 0
    )
    assert "used by the trtllm backend only" in capsys.readouterr().err


# --------------------------------------------------------------------------- defect 7: streaming
def test_streaming_json_is_json_lines(engine, capsys):
    assert (
        call(
            run_cli.main,
            [
                "--engine_dir",
                engine,
                "--input_text",
                "tan kel",
                "mor sun",
                "--streaming",
                "--json",
                "--max_output_len",
                12,
                "--ignore_eos",
            ],
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    events, summary = lines[:-1], lines[-1]
    assert summary["summary"] is True and len(summary["outputs"]) == 2
    assert all(
        set(e) >= {"index", "token_ids", "text", "finished"} and "summary" not in e for e in events
    )
    for i, o in enumerate(summary["outputs"]):
        mine = [e for e in events if e["index"] == i]
        assert "".join(e["text"] for e in mine) == o["output_text"] != ""
        assert [t for e in mine for t in e["token_ids"]] == o["output_token_ids"]
        assert mine[-1]["finished"] and not any(e["finished"] for e in mine[:-1])


def test_streaming_several_prompts_prints_whole_blocks(engine, capsys):
    prompts = ["tan kel", "mor sun", "rin kol"]
    plain = run_json(
        capsys, engine, "--input_text", *prompts, "--max_output_len", 10, "--ignore_eos"
    )
    assert (
        call(
            run_cli.main,
            [
                "--engine_dir",
                engine,
                "--input_text",
                *prompts,
                "--streaming",
                "--max_output_len",
                10,
                "--ignore_eos",
            ],
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(lines) == sorted(
        f"[{i}] {o['output_text']}" for i, o in enumerate(plain["outputs"])
    )


# --------------------------------------------------------------------------- defect 8: smaller ones
def test_train_unknown_subcommand(capsys):
    expect_error(
        capsys,
        call(train_cli.main, ["gen_data", "--limit", "2"]),
        "unknown subcommand 'gen_data'",
        "did you mean 'gen-data'",
    )


def test_directory_flags_name_themselves(engine, text_base, tmp_path, capsys):
    ckpt = engine.parent / "ckpt"

    def conv(d):
        return call(
            convert_cli.main,
            [
                "--model_dir",
                text_base,
                "--drafter_model_dir",
                d,
                "--output_dir",
                tmp_path / "o",
            ],
        )

    expect_error(capsys, conv("/nonexistent"), "--drafter_model_dir /nonexistent: not found")
    expect_error(
        capsys, conv(engine), f"--drafter_model_dir {engine}: this is a redrafter-build engine"
    )
    expect_error(capsys, conv(ckpt), "this is a redrafter-convert checkpoint")
    expect_error(capsys, conv(text_base), "this is a Hugging Face base model directory")
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", ckpt, "--input_text", "tan"]),
        f"--engine_dir {ckpt}: this is a redrafter-convert checkpoint",
        "redrafter-build",
    )
    expect_error(
        capsys,
        call(build_cli.main, ["--checkpoint_dir", engine, "--output_dir", tmp_path / "e"]),
        "--checkpoint_dir",
        "this is a redrafter-build engine",
    )
    for sub in ("gen-data", "eval"):
        expect_error(
            capsys,
            call(
                train_cli.main,
                [sub, "--model_dir", text_base, "--drafter_model_dir", "/nonexistent"],
            ),
            "--drafter_model_dir /nonexistent",
        )
    expect_error(
        capsys,
        call(
            train_cli.main,
            [
                "train",
                "--model_dir",
                text_base,
                "--data",
                "x",
                "--output_dir",
                tmp_path / "h",
                "--init_from",
                engine,
            ],
        ),
        "--init_from",
        "redrafter-build engine",
    )
    expect_error(
        capsys,
        call(
            convert_cli.main,
            ["--model_dir", tmp_path / "none", "--random_drafter", "--output_dir", tmp_path / "o"],
        ),
        "--model_dir",
    )
    assert not list(tmp_path.iterdir())


def test_gen_prompts_keeps_exactly_num_prompts_and_extends_exactly(text_base, tmp_path):
    from redrafter_trt.train.gen_prompts import generate_prompts

    kw = dict(batch_size=16, min_words=1, max_prompt_tokens=24, progress=False, log=lambda m: None)
    read = lambda f: [json.loads(x) for x in Path(f).read_text().splitlines()]  # noqa: E731
    once = read(generate_prompts(text_base, tmp_path / "seven.jsonl", 7, **kw))
    assert len(once) == 7 and sum(r["batch"] == 0 for r in once) >= 4  # batch 0 alone passes 3
    three = read(generate_prompts(text_base, tmp_path / "p.jsonl", 3, **kw))
    assert len(three) == 3 and three == once[:3]
    again = read(generate_prompts(text_base, tmp_path / "p.jsonl", 3, **kw))
    assert again == three
    assert read(generate_prompts(text_base, tmp_path / "p.jsonl", 7, **kw)) == once


def test_trainer_log_says_the_budget_sets_the_steps(text_base, tmp_path):
    from redrafter_trt.train.config import TrainConfig
    from redrafter_trt.train.loop import train_drafter

    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "index": i,
            "prompt_ids": torch.randint(5, 97, (6,), generator=g).tolist(),
            "response_ids": torch.randint(5, 97, (40,), generator=g).tolist(),
        }
        for i in range(24)
    ]
    data = tmp_path / "sd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs: list[str] = []
    cfg = TrainConfig(
        model_dir=str(text_base),
        data=[str(data)],
        output_dir=str(tmp_path / "h"),
        exit_dim=32,
        batch_size=32,
        warmup_steps=5,
        epochs=1000.0,
        time_budget_s=1.5,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    out = train_drafter(cfg, log=logs.append)
    report = json.loads((out / "training_report.json").read_text())
    header = next(m for m in logs if "held-out positions" in m)
    assert "up to" in header and "--time_budget_min" in header, header
    wrote = next(m for m in logs if m.startswith("[train] wrote"))
    assert f"({report['steps']} steps" in wrote
    assert ("stopped by the time budget" in wrote) == report["stopped_by_time_budget"]


def test_progress_and_speed_lines(engine, text_base, head, tmp_path, capsys):
    assert (
        call(
            convert_cli.main,
            ["--model_dir", text_base, "--drafter_model_dir", head, "--output_dir", tmp_path / "c"],
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "[convert] read base" in err and " MB in " in err
    assert (
        call(
            run_cli.main,
            [
                "--engine_dir",
                engine,
                "--input_text",
                "tan kel",
                "--max_output_len",
                8,
                "--ignore_eos",
            ],
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "generate: " in err  # the progress bar of a non-streaming run
    assert "tokens/s: " in err and "time to first token: " in err


# --------------------------------------------------------------------------- defect 9: basics
def test_prompt_file_text_lines(engine, tmp_path, capsys):
    prompts = ["tan kel mor", "sun rin", "kol nol"]
    f = tmp_path / "prompts.txt"
    f.write_text(prompts[0] + "\n\n" + prompts[1] + "\r\n" + prompts[2] + "\n")
    from_file = run_json(capsys, engine, "--input_file", f, "--max_output_len", 6)
    from_args = run_json(capsys, engine, "--input_text", *prompts, "--max_output_len", 6)
    pick = lambda rep: [(o["output_token_ids"], o["output_text"]) for o in rep["outputs"]]  # noqa: E731
    assert pick(from_file) == pick(from_args) and len(from_file["outputs"]) == 3


def test_prompt_file_chat_json_lines(engine, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(engine))
    convs = [
        [
            {"role": "user", "content": "tan kel"},
            {"role": "assistant", "content": "mor"},
            {"role": "user", "content": "sun rin"},
        ],
        [{"role": "system", "content": "kol"}, {"role": "user", "content": "nol"}],
    ]
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    ids = [
        tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"]
        for m in convs
    ]
    assert ids[0][:1] == [tok.convert_tokens_to_ids("<|user|>")] and len(ids[0]) == 12
    idf = tmp_path / "ids.json"
    idf.write_text(json.dumps(ids))
    chat = run_json(capsys, engine, "--input_file", f, "--max_output_len", 6)
    direct = run_json(capsys, engine, "--input_ids_file", idf, "--max_output_len", 6)
    assert [o["output_token_ids"] for o in chat["outputs"]] == [
        o["output_token_ids"] for o in direct["outputs"]
    ]
    f.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine, "--input_file", f]),
        f"--input_file {f} line 1: message 0",
    )


def test_speed_in_json(engine, capsys):
    rep = run_json(capsys, engine, "--input_text", "tan kel", "--max_output_len", 8, "--ignore_eos")
    assert rep["generated_tokens"] == 8
    assert rep["tokens_per_s"] == pytest.approx(8 / rep["wall_s"])
    assert 0 < rep["time_to_first_token_s"] <= rep["wall_s"] + 0.05
    assert rep["outputs"][0]["time_to_first_token_s"] == rep["time_to_first_token_s"]


def test_version_on_every_command(capsys):
    from redrafter_trt import __version__

    for mod, prog in (
        (convert_cli, "redrafter-convert"),
        (build_cli, "redrafter-build"),
        (run_cli, "redrafter-run"),
        (train_cli, "redrafter-train"),
        (bench_cli, "redrafter-bench"),
    ):
        assert call(mod.main, ["--version"]) == 0
        assert capsys.readouterr().out.strip() == f"{prog} {__version__}"


# --------------------------------------------------------------------------- defect 2: demo key
def test_demo_engine_key_follows_the_head_content(tmp_path):
    def key(d):
        r = subprocess.run(
            ["bash", str(REPO / "build_scripts" / "demo.sh"), "--engine-key", str(d)],
            capture_output=True,
            text=True,
            check=True,
        )
        return r.stdout.strip()

    a = save_drafter(init_drafter(DrafterConfig(97, 32, 64, 1, True), seed=1), tmp_path / "a")
    b = save_drafter(init_drafter(DrafterConfig(97, 32, 64, 1, True), seed=2), tmp_path / "b")
    same = save_drafter(init_drafter(DrafterConfig(97, 32, 64, 1, True), seed=1), tmp_path / "a2")
    assert len(key(a)) == 16 and key(a) != key(b) and key(a) == key(same)


# --------------------------------------------------------------------------- issue 26
def test_mistyped_flag_is_named_with_the_closest_one(capsys):
    # before: "the following arguments are required: --engine_dir", the typo unmentioned
    assert call(run_cli.main, ["--input_txt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--input_txt" in err and "--input_text" in err, err
    assert "required" not in err
    assert call(train_cli.main, ["gen-data", "--model_dri", "x"]) == 2  # subcommand flags too
    err = capsys.readouterr().err
    assert "--model_dri" in err and "--model_dir" in err, err
    # an abbreviation argparse accepts is not reported as unknown
    assert call(run_cli.main, ["--engine", "/nonexistent", "--input_text", "x"]) == 2
    assert "unrecognized" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["nonexistent", "smollm", "SmolLM2"])
def test_convert_names_a_base_dir_that_does_not_exist(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # before: "give the draft head with --drafter_model_dir (no head ships for it ...)"
    err = expect_error(
        capsys,
        call(convert_cli.main, ["--model_dir", name, "--output_dir", tmp_path / "o"]),
        f"--model_dir {name}: no such directory",
    )
    assert "--drafter_model_dir" not in err
    assert ("did you mean 'smollm2'" in err) == (name != "nonexistent"), err
    assert not (tmp_path / "o").exists()


def test_engine_dir_errors_do_not_send_serve_or_bench_users_to_run(tmp_path, capsys):
    from redrafter_trt.cli import serve as serve_cli

    for main, prog in ((serve_cli.main, "redrafter-serve"), (bench_cli.main, "redrafter-bench")):
        err = expect_error(
            capsys, call(main, ["--engine_dir", tmp_path / "nope"]), "--engine_dir", "not found"
        )
        assert "give it to redrafter-run" not in err, err
        assert f"{prog}: error: --engine_dir" in err, err


def test_ids_file_errors_name_the_prompt_and_precede_any_warning(engine, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3], [4, 500]]))
    err = expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine, "--input_ids_file", ids]),
        f"--input_ids_file {ids} prompt 1",
        "[0, 97)",
    )
    ids.write_text(json.dumps([[1, 2], list(range(40))]))  # max_input_len 32
    err = expect_error(
        capsys,
        call(run_cli.main, ["--engine_dir", engine, "--input_ids_file", ids]),
        f"--input_ids_file {ids} prompt 1 has 40 tokens",
        "max_input_len 32",
    )
    assert "warning" not in err, err  # the error alone, no warning about capped output first


def test_bench_checks_batch_sizes_before_measuring(engine, tmp_path, capsys, monkeypatch):
    import redrafter_trt.bench.calibrate as cal

    def measured(*a, **k):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(cal, "measure_cost_model", measured)
    (engine / "cost_model.json").unlink(missing_ok=True)  # an earlier load may have measured one
    for extra in (["--calibrate"], ["--no_hf_baseline"]):
        expect_error(
            capsys,
            call(
                bench_cli.main,
                ["--engine_dir", engine, "--batch_sizes", "4", "--output_dir", tmp_path / "b"]
                + extra,
            ),
            "--batch_sizes 4",
            "max_batch_size is 2",
        )
    assert not (engine / "cost_model.json").exists()


def test_serve_threads_help_says_the_default_that_applies():
    from redrafter_trt.cli import serve as serve_cli

    def threads_help(parser):
        return next(a.help for a in parser._actions if "--threads" in a.option_strings)

    # before: "torch CPU threads (default: torch's)", while every command applies the same default
    assert threads_help(serve_cli.build_parser()) == threads_help(run_cli.build_parser())


def test_serve_port_in_use_exits_2_naming_the_port_before_announcing(engine, capsys):
    import socket

    from redrafter_trt.cli import serve as serve_cli

    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = expect_error(
            capsys,
            call(serve_cli.main, ["--engine_dir", engine, "--port", port, "--threads", 1]),
            f"--port {port}",
            "already in use",
        )
    assert "http://" not in err and "Errno" not in err, err


def test_run_summary_says_which_policy_ran_and_its_shapes(engine, tmp_path, capsys):
    from redrafter_trt.runtime.adaptive import CostModel, save_cost_model
    from redrafter_trt.runtime.loader import load

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3]]))
    args = ["--engine_dir", engine, "--input_ids_file", ids, "--max_output_len", 8, "--threads", 1]
    assert call(run_cli.main, args + ["--no_progress", "--adaptive", "off"]) == 0
    err = capsys.readouterr().err
    assert "fixed 2x2" in err, err  # before: "(speculative)" whatever ran
    out = run_json(capsys, engine, *args[2:], "--adaptive", "off")
    assert out["policy"] == "fixed 2x2" and out["chosen_shapes"] is None
    assert out["threads"] == 1
    # a cost model under which drafting never pays: the adaptive policy runs plain steps
    gen = load(engine, adaptive="off")
    sig = gen.backend.engine_signature()
    from redrafter_trt.runtime.adaptive import machine_fingerprint

    cost = CostModel(
        verify={1: 1.0, 64: 1000.0},
        draft={1: 100.0, 8: 100.0},
        engine=sig,
        machine=machine_fingerprint(1),
    )
    save_cost_model(cost, engine)
    try:
        assert call(run_cli.main, args + ["--no_progress", "--adaptive", "on"]) == 0
        err = capsys.readouterr().err
        assert "adaptive policy" in err and "1x0 (plain)" in err, err
        out = run_json(capsys, engine, *args[2:], "--adaptive", "on")
        assert out["policy"] == "adaptive"
        assert [c["shape"] for c in out["chosen_shapes"]] == ["1x0"]
        why = out["policy_why"]  # why it stayed plain: no shape is predicted to pay
        assert why["predicted_speedup"] < why["speculates_above"] and why["batch"] == 1
        assert str(engine / "cost_model.json") in out["policy_note"]
        assert sum(c["steps"] for c in out["chosen_shapes"]) >= 1
    finally:
        (engine / "cost_model.json").unlink()


def test_readme_says_how_to_reach_the_commands_and_what_the_tests_need():
    readme = (REPO / "README.md").read_text()
    workflow = readme.split("## Workflow")[1].split("```")[0]
    assert "source .venv/bin/activate" in workflow and "pip install -e ." in workflow
    setup = readme.split("## The two set-up commands")[1].split("## ")[0]
    # the prerequisites build_cpp.sh states in its header, said where the test command is
    import re

    header = (REPO / "build_scripts" / "build_cpp.sh").read_text()
    cmake = re.search(r"cmake \(>= ([\d.]+)\)", header).group(1)
    assert f"cmake\n(>= {cmake})" in setup or f"cmake (>= {cmake})" in setup, setup
    assert "g++" in header and "g++" in setup and "nvcc is optional" in setup


def test_readme_says_the_builtin_model_is_the_q4_gguf_streamed_as_stored():
    from redrafter_trt.models.hub import SMOLLM2_GGUF

    quant = SMOLLM2_GGUF.rsplit(".", 2)[1]  # SmolLM2-135M-Instruct.Q4_1.gguf -> Q4_1
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"that GGUF is the {quant} quantization: the checkpoint keeps its 4-bit blocks" in readme
    assert "not of the original bfloat16 weights" in readme


def test_progress_bar_ends_at_100_percent_on_a_line_of_its_own(engine, tmp_path, capsys):
    """Rows that end at end-of-sequence count their unused budget as done (before: the bar
    stopped where they ended, e.g. at 50%), and the bar's last state ends with a newline, so a
    header printed next does not land on the bar's line."""
    import shutil

    eng = tmp_path / "engine"
    shutil.copytree(engine, eng)
    cfg = json.loads((eng / "config.json").read_text())
    cfg["pretrained_config"]["eos_token_id"] = list(range(97))  # every token ends a row
    (eng / "config.json").write_text(json.dumps(cfg))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, 3], [4, 5]]))
    args = ["--engine_dir", eng, "--input_ids_file", ids, "--max_output_len", 10, "--json"]
    assert call(run_cli.main, args) == 0
    out, err = capsys.readouterr()
    assert [len(o["output_token_ids"]) for o in json.loads(out)["outputs"]] == [1, 1]
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and "20/20" in last, err
    assert err.endswith("\n"), repr(err[-80:])


@pytest.mark.parametrize("spec_s, plain_s", [(27.0, 12.0), (6.0, 12.0)])
def test_demo_report_says_what_each_figure_is_and_what_the_speed_means(tmp_path, spec_s, plain_s):
    """The demo's closing report (the Python block of demo.sh) labels the trainer's greedy-chain
    estimate and the measured tokens per step, and ends with a sentence on the measured speed."""
    script = (REPO / "build_scripts" / "demo.sh").read_text()
    code = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]

    def run_doc(wall, tps):
        out = {"token_ids": [1, 2], "output_token_ids": [1, 2], "output_text": "hi"}
        out["accepted_per_step"] = [1, 1]
        return {"outputs": [out], "tokens_per_step": tps, "num_steps": 9, "wall_s": wall}

    files = []
    for name, doc in (
        ("spec", run_doc(spec_s, 1.65)),
        ("plain", run_doc(plain_s, 1.0)),
        (
            "report",
            {
                "steps": 10,
                "train_seconds_total": 5,
                "eval": {"top1_accuracy_per_depth": [0.5], "greedy_chain_tokens_per_step": 1.94},
            },
        ),
    ):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(doc))
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, check=True
    )
    lines = r.stdout.splitlines()
    chain = next(x for x in lines if "1.94" in x)
    assert "estimate" in chain and "greedy chain" in chain, chain
    measured = next(x for x in lines if "1.65" in x and "1.94" not in x)
    assert measured.startswith("measured on these prompts"), measured
    closing = lines[-1]
    assert closing.startswith("On this machine"), r.stdout
    if spec_s > plain_s:
        assert f"{spec_s / plain_s:.2f}x as long as plain" in closing, closing
    else:
        assert f"{plain_s / spec_s:.2f}x as fast as plain" in closing, closing
