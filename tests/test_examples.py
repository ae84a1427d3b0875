"""The examples/ scripts run end to end on CPU on tiny random models (with a word-level tokenizer
and a chat template), through the console scripts exactly as pip installs them, and every flag an
example's --help names is one it parses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from newuser_fixtures import WORDS, write_text_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SHELL = ["llama_end_to_end.sh", "train_head.sh"]
PYTHON = ["qwen2_end_to_end.py", "serve.py"]


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """A bin directory holding the [project.scripts] console scripts as pip writes them, run by
    this interpreter on this checkout."""
    import tomllib  # Python >= 3.11, as in the test venv (3.11) and the TensorRT-LLM container (3.12)

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, target in scripts.items():
        module, func = target.split(":")
        path = bin_dir / name
        path.write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        path.chmod(0o755)
    return bin_dir


def run_example(
    tools: Path, script: str, *args, timeout: float = 900
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PATH=f"{tools}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        REDRAFTER_THREADS="1",
    )
    cmd = ["bash"] if script.endswith(".sh") else [sys.executable]
    return subprocess.run(
        [*cmd, str(EXAMPLES / script), *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (
        f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr[-6000:]}"
    )
    return r


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """Six text prompts in the tiny tokenizer's words (a prompt file for bench, gen-data, eval)."""
    f = tmp_path_factory.mktemp("prompts") / "prompts.json"
    f.write_text(json.dumps([" ".join(WORDS[i : i + 5 + i % 3]) for i in range(0, 60, 10)]))
    return f


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_text_model(tmp_path_factory.mktemp("ex") / "llama", seed=5, arch="llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return write_text_model(tmp_path_factory.mktemp("ex") / "qwen2", seed=6, arch="qwen2")


@pytest.mark.parametrize("script", SHELL + PYTHON)
def test_help_names_every_flag_the_example_parses(tools, script):
    r = ok(run_example(tools, script, "--help"))
    text = (EXAMPLES / script).read_text()
    if script.endswith(".sh"):
        parsed = set(re.findall(r"^\s+(--\w+)\) ", text, flags=re.M))
    else:
        parsed = set(re.findall(r'add_argument\(\s*"(--\w+)"', text))
    assert parsed and {f for f in parsed if f not in r.stdout} == set()
    assert len(r.stdout.splitlines()) >= 10  # what the example does, not only a usage line


@pytest.mark.parametrize("script", SHELL + PYTHON)
def test_bad_arguments_exit_2_with_a_message(tools, tmp_path, script):
    if script.endswith(".sh"):
        r = run_example(tools, script, tmp_path / "missing", tmp_path / "w")
    else:
        flag = "--engine_dir" if script == "serve.py" else "--model_dir"
        extra = [] if script == "serve.py" else ["--work_dir", tmp_path / "w"]
        r = run_example(tools, script, flag, tmp_path / "missing", *extra)
    assert r.returncode == 2
    assert "missing" in r.stderr and "config.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.full
def test_llama_end_to_end(tools, llama_dir, prompts_file, tmp_path):
    work = tmp_path / "work"
    r = ok(
        run_example(
            tools,
            "llama_end_to_end.sh",
            llama_dir,
            work,
            "--beams",
            3,
            "--draft_len",
            2,
            "--dtype",
            "float32",
            "--max_seq_len",
            128,
            "--max_new_tokens",
            12,
            "--prompt",
            " ".join(WORDS[:6]),
            "--bench_dataset",
            prompts_file,
            "--bench_prompts",
            2,
            "--bench_repetitions",
            1,
        )
    )
    ckpt = json.loads((work / "ckpt" / "config.json").read_text())
    assert (
        ckpt["base_model_architecture"] == "LlamaForCausalLM" and ckpt["redrafter_num_beams"] == 3
    )
    spec, plain = (json.loads((work / f"run_{m}.json").read_text()) for m in ("spec", "plain"))
    assert spec["outputs"][0]["output_token_ids"] == plain["outputs"][0]["output_token_ids"]
    assert len(spec["outputs"][0]["output_token_ids"]) > 0
    assert "greedy speculative output equals plain output: True" in r.stdout
    bench = json.loads((work / "bench" / "bench.json").read_text())
    assert (work / "bench" / "bench.md").is_file() and bench["schema"] == "redrafter-bench/1"
    assert bench["configs"] and all(c["outputs_identical"] for c in bench["configs"])


@pytest.mark.full
def test_qwen2_end_to_end(tools, qwen2_dir, prompts_file, tmp_path):
    work = tmp_path / "work"
    r = ok(
        run_example(
            tools,
            "qwen2_end_to_end.py",
            "--model_dir",
            qwen2_dir,
            "--work_dir",
            work,
            "--beams",
            2,
            "--draft_len",
            3,
            "--dtype",
            "float32",
            "--max_seq_len",
            128,
            "--max_new_tokens",
            10,
            "--prompt",
            " ".join(WORDS[3:9]),
            "--prompt",
            " ".join(WORDS[20:23]),
            "--bench_dataset",
            prompts_file,
            "--bench_prompts",
            2,
            "--bench_repetitions",
            1,
        )
    )
    ckpt = json.loads((work / "ckpt" / "config.json").read_text())
    assert ckpt["base_model_architecture"] == "Qwen2ForCausalLM"
    assert "greedy: speculative == plain for all 2 prompts" in r.stdout
    assert "speculative == plain with the same seed: True" in r.stdout
    assert re.search(r"^\[1\] '", r.stdout, flags=re.M) and "streamed:" in r.stdout
    bench = json.loads((work / "bench" / "bench.json").read_text())
    assert bench["configs"] and all(c["outputs_identical"] for c in bench["configs"])


@pytest.mark.full
def test_train_head(tools, llama_dir, prompts_file, tmp_path):
    work = tmp_path / "work"
    ok(
        run_example(
            tools,
            "train_head.sh",
            llama_dir,
            work,
            "--prompts",
            prompts_file,
            "--limit",
            6,
            "--answer_tokens",
            16,
            "--eval_prompts",
            prompts_file,
            "--eval_limit",
            3,
            "--max_steps",
            4,
            "--batch_size",
            32,
            "--beams",
            2,
            "--draft_len",
            2,
        )
    )
    assert len((work / "data.jsonl").read_text().splitlines()) == 6
    report = json.loads((work / "head" / "training_report.json").read_text())
    assert report["steps"] == 4
    assert (work / "head" / "model.safetensors").is_file()
    ev = json.loads((work / "eval.json").read_text())
    assert ev["tokens_per_step"] >= 1.0 and ev["identical_to_plain"] is True and ev["prompts"] == 3
    ckpt = json.loads((work / "ckpt" / "config.json").read_text())
    assert ckpt["redrafter_draft_len_per_beam"] == 2 and ckpt["redrafter_num_beams"] == 2


@pytest.mark.full
def test_serve(tools, llama_dir, tmp_path):
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    for tool, args in (
        (
            "redrafter-convert",
            [
                "--model_dir",
                llama_dir,
                "--random_drafter",
                "--output_dir",
                ckpt,
                "--redrafter_num_beams",
                2,
                "--redrafter_draft_len_per_beam",
                2,
            ],
        ),
        (
            "redrafter-build",
            [
                "--checkpoint_dir",
                ckpt,
                "--output_dir",
                engine,
                "--backend",
                "torch",
                "--max_batch_size",
                2,
                "--max_input_len",
                32,
                "--max_seq_len",
                96,
            ],
        ),
    ):
        ok(
            subprocess.run(
                [str(tools / tool), *map(str, args)],
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                capture_output=True,
                text=True,
                timeout=600,
            )
        )
    r = ok(
        run_example(
            tools,
            "serve.py",
            "--engine_dir",
            engine,
            "--prompt",
            " ".join(WORDS[:4]),
            "--max_tokens",
            8,
        )
    )
    assert "model: engine" in r.stdout
    assert re.search(
        r"^completion: '.+' \([2-8] tokens, finish: \w+, [0-9.]+ tokens/step\)",
        r.stdout,
        flags=re.M,
    ), r.stdout
    assert re.search(r"^chat: ", r.stdout, flags=re.M) and "chat, streamed: " in r.stdout
    assert "redrafter_requests_total" in r.stdout
    assert "redrafter-serve stopped (exit status 0)" in r.stdout
    # a model that ends at its first token (every token is end-of-sequence here): the example
    # says so instead of an empty answer at "0.0000 tokens/step"
    cfg = json.loads((engine / "config.json").read_text())
    base = cfg["pretrained_config"] if "pretrained_config" in cfg else cfg
    base["eos_token_id"] = list(range(97))
    (engine / "config.json").write_text(json.dumps(cfg))
    r = ok(run_example(tools, "serve.py", "--engine_dir", engine, "--max_tokens", 8))
    line = next(x for x in r.stdout.splitlines() if x.startswith("completion: "))
    assert "0.0000" not in line and "ended at its first token" in line, line
