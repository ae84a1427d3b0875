"""Shipped draft heads: a projection shared with the base (not stored twice), checksums that name
a corrupt or missing file with the command that rebuilds it, and the built-in smollm2 head."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.heads import BUILTIN_HEADS, CHECKSUMS, builtin_head, check_head_files
from redrafter_trt.heads.package import package_head
from redrafter_trt.models.drafter import (
    DRAFTER_CONFIG,
    DRAFTER_WEIGHTS,
    LM_HEAD_FROM_BASE,
    DrafterConfig,
    init_drafter,
    load_drafter,
    save_drafter,
)
from redrafter_trt.models.io import load_state_dict_file


def _head_sharing(base_lm_head: torch.Tensor, tmp_path, seed=0, draft_vocab=None):
    v, h = base_lm_head.shape
    k = None if draft_vocab is None else len(draft_vocab)
    d = init_drafter(
        DrafterConfig(v, h, h, 1, True, draft_vocab_size=k),
        seed=seed,
        std=0.3,
        draft_vocab=draft_vocab,
    )
    with torch.no_grad():
        rows = base_lm_head if draft_vocab is None else base_lm_head[draft_vocab.long()]
        d.lm_head[-1].weight.copy_(rows)
    return d, save_drafter(d, tmp_path / f"trained{seed}")


@pytest.mark.parametrize("with_vocab", [False, True])
def test_shared_projection_round_trip(tiny_dirs, tmp_path, with_vocab):
    _, sd = load_hf_base(tiny_dirs["llama"])
    base_w = sd["lm_head.weight"]
    vocab = torch.tensor([5, 0, 17, 33, 2, 90], dtype=torch.int32) if with_vocab else None
    d, trained = _head_sharing(base_w, tmp_path, draft_vocab=vocab)
    out = package_head(trained, base_w, tmp_path / "shipped")
    stored = load_state_dict_file(out / DRAFTER_WEIGHTS)
    assert "lm_head.1.weight" not in stored  # not stored twice
    assert (out / DRAFTER_WEIGHTS).stat().st_size < (trained / DRAFTER_WEIGHTS).stat().st_size
    assert json.loads((out / DRAFTER_CONFIG).read_text())[LM_HEAD_FROM_BASE].startswith("sha256:")
    back = load_drafter(out, base_lm_head=base_w)
    for k, v in d.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    check_head_files(out, "REBUILD")  # checksums written by packaging


def test_shared_projection_needs_the_right_base(tiny_dirs, tmp_path):
    _, sd = load_hf_base(tiny_dirs["llama"])
    base_w = sd["lm_head.weight"]
    _, trained = _head_sharing(base_w, tmp_path)
    out = package_head(trained, base_w, tmp_path / "shipped")
    with pytest.raises(RedrafterError, match="loads only together with that base"):
        load_drafter(out)
    other = base_w.clone()
    other[0, 0] += 1.0
    with pytest.raises(RedrafterError, match="give the base model the head was trained for"):
        load_drafter(out, base_lm_head=other)


def test_packaging_refuses_a_head_with_its_own_projection(tiny_dirs, tmp_path):
    _, sd = load_hf_base(tiny_dirs["llama"])
    base_w = sd["lm_head.weight"]
    v, h = base_w.shape
    trained = save_drafter(init_drafter(DrafterConfig(v, h, h, 1, True), seed=1), tmp_path / "own")
    with pytest.raises(RedrafterError, match="is not the base model's lm_head"):
        package_head(trained, base_w, tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()  # nothing half-written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_head_with_its_own_projection_ships_whole(tiny_dirs, tmp_path, dtype):
    _, sd = load_hf_base(tiny_dirs["llama"])
    base_w = sd["lm_head.weight"]
    v, h = base_w.shape
    cfg = DrafterConfig(v, h, 2 * h, 2, True, draft_vocab_size=16)
    trained = save_drafter(init_drafter(cfg, seed=1), tmp_path / "own")
    out = package_head(trained, base_w, tmp_path / "shipped", dtype=dtype, own_projection=True)
    raw = json.loads((out / DRAFTER_CONFIG).read_text())
    assert LM_HEAD_FROM_BASE not in raw and raw["draft_vocab_size"] == 16
    stored = load_state_dict_file(out / DRAFTER_WEIGHTS)
    assert stored["lm_head.2.weight"].shape == (16, 2 * h)
    assert all(t.dtype == dtype for t in stored.values() if t.is_floating_point())
    ref = load_drafter(trained).state_dict()
    got = load_drafter(out).state_dict()  # no base projection needed
    assert ref.keys() == got.keys()
    for k in ref:
        want = ref[k].to(dtype).to(ref[k].dtype) if ref[k].is_floating_point() else ref[k]
        assert torch.equal(got[k], want), k
    check_head_files(out, "rebuild")


def test_the_shipped_training_report_names_no_path_of_the_training_machine(tiny_dirs, tmp_path):
    _, sd = load_hf_base(tiny_dirs["llama"])
    base_w = sd["lm_head.weight"]
    v, h = base_w.shape
    trained = save_drafter(
        init_drafter(DrafterConfig(v, h, h, 1, True, draft_vocab_size=16), seed=1), tmp_path / "t"
    )
    report = {
        "settings": {"output_dir": "/home/dev/runs/head9", "init_from": "/tmp/x/head8", "lr": 5e-4},
        "data": ["data/smollm2/answers.jsonl", "sharegpt"],
        "features": {"cache": ["/home/dev/.cache/redrafter_trt/train_features/48a9b7cc"]},
        "model_dir": "/home/dev/.cache/redrafter_trt/SmolLM2-135M-Instruct",
        "steps": 3889,
    }
    (trained / "training_report.json").write_text(json.dumps(report))
    out = package_head(trained, base_w, tmp_path / "shipped", own_projection=True)
    got = json.loads((out / "training_report.json").read_text())
    assert got == {
        "settings": {"output_dir": "head9", "init_from": "head8", "lr": 5e-4},
        "data": ["data/smollm2/answers.jsonl", "sharegpt"],
        "features": {"cache": ["48a9b7cc"]},
        "model_dir": "SmolLM2-135M-Instruct",
        "steps": 3889,
    }
    check_head_files(out, "rebuild")  # the checksums cover the rewritten report
    shipped = (BUILTIN_HEADS["smollm2"][0] / "training_report.json").read_text()
    assert "/tmp/" not in shipped and "/.cache/" not in shipped


def test_corrupt_or_missing_shipped_file_is_named_with_the_rebuild_command(tiny_dirs, tmp_path):
    _, sd = load_hf_base(tiny_dirs["llama"])
    base_w = sd["lm_head.weight"]
    _, trained = _head_sharing(base_w, tmp_path)
    out = package_head(trained, base_w, tmp_path / "shipped")
    weights = out / DRAFTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RedrafterError, match=rf"{DRAFTER_WEIGHTS}: corrupt .*`bash rebuild.sh`"):
        check_head_files(out, "bash rebuild.sh")
    weights.unlink()
    with pytest.raises(RedrafterError, match=rf"{DRAFTER_WEIGHTS}: missing .*`bash rebuild.sh`"):
        check_head_files(out, "bash rebuild.sh")
    (out / CHECKSUMS).unlink()
    with pytest.raises(RedrafterError, match="checksum list"):
        check_head_files(out, "bash rebuild.sh")


def test_only_builtin_models_have_a_builtin_head():
    assert builtin_head("/some/hf/dir") is None


def test_convert_without_a_head_names_the_flag(tiny_dirs, tmp_path, capsys):
    from redrafter_trt.cli.convert import main

    rc = main(["--model_dir", str(tiny_dirs["llama"]), "--output_dir", str(tmp_path / "ck")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--drafter_model_dir" in err and "smollm2" in err
    assert not (tmp_path / "ck").exists()


def test_the_shipped_smollm2_head_is_intact_and_small():
    path, rebuild = BUILTIN_HEADS["smollm2"]
    check_head_files(path, rebuild)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total <= 16 * 1024 * 1024
    cfg = json.loads((path / DRAFTER_CONFIG).read_text())
    assert cfg["vocab_size"] == 49152 and cfg["draft_vocab_size"] == 8192
    assert cfg["num_draft_layers"] == 3 and cfg["exit_dim"] == cfg["hidden_size"] == 576
    assert LM_HEAD_FROM_BASE not in cfg  # its projection is its own, stored with it


@pytest.mark.smollm2
def test_the_shipped_smollm2_head_loads_with_its_base():
    """The shipped head drafts over 8,192 ids of the base's vocabulary, EOS among them, through a
    projection of its own; loading it needs no base projection and gives float32 values."""
    from redrafter_trt.models.hub import ensure_smollm2

    cfg, sd = load_hf_base(ensure_smollm2())
    head = load_drafter(builtin_head("smollm2"))
    ids = head.vocab_map.long()
    assert ids.shape == (8192,) and len(set(ids.tolist())) == 8192
    assert int(ids.min()) >= 0 and int(ids.max()) < 49152
    assert set(cfg.eos_token_id) <= set(ids.tolist())
    w = head.lm_head[-1].weight
    assert w.shape == (8192, 576) and w.dtype == torch.float32
    assert not torch.equal(w, sd["lm_head.weight"][ids])  # trained, not the base's rows


DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2"


def _records(path) -> list[dict]:
    """The records of a JSONL data file (one per non-empty line), gzip-compressed or not."""
    from redrafter_trt.formats.datasets import read_data_text

    return [json.loads(x) for x in read_data_text(path, "data file").split("\n") if x]


@functools.cache
def _mt_bench_runs() -> frozenset:
    """Every 8-word run of MT-Bench's turns (both): the evaluation set, with which no training
    request may share one."""
    from redrafter_trt.formats.datasets import load_prompts, word_runs

    return frozenset().union(*(word_runs(q) for q in load_prompts("mt-bench", all_turns=True)))


def _prompts(*names: str) -> set[str]:
    """The prompts of request or gen-data files of DATA (a directory stands for its files)."""
    from redrafter_trt.train.data import expand_sources

    files = expand_sources([str(DATA / n) for n in names])
    return {r["prompt"] for f in files for r in _records(f)}


def _written_request_files() -> list[str]:
    return sorted(f.name for f in DATA.glob("requests_written*.jsonl"))


def test_the_committed_training_data_is_clean_disjoint_and_small():
    from redrafter_trt.formats.datasets import word_runs
    from redrafter_trt.train.data import expand_sources, read_selfdistill, source_kind

    train = [r["prompt"] for r in _records(DATA / "requests_train.jsonl")]
    heldout = [r["prompt"] for r in _records(DATA / "requests_heldout.jsonl")]
    answers = _records(DATA / "answers.jsonl")
    assert len(train) == len(set(train)) and heldout and not set(train) & set(heldout)
    assert sorted(a["prompt"] for a in answers) == sorted(train)
    # later answers: files of their own (each keeps its prompts), never a held-out request
    more_files = {Path(f): _records(f) for f in expand_sources([str(DATA / "answers2")])}
    more = [a for recs in more_files.values() for a in recs]
    assert len(more) >= 500
    seen = {p.strip().lower() for p in train + heldout}
    assert not [a for a in more if a["prompt"].strip().lower() in seen]
    for a in answers + more:
        ids = a["prompt_ids"] + a["response_ids"]
        assert a["response_ids"] and all(0 <= t < 49152 for t in ids)
    # MT-Bench is the evaluation set: no request may share an 8-word run with any of its turns
    mt = _mt_bench_runs()
    assert len(mt) > 1000
    prompts = train + heldout + [a["prompt"] for a in more]
    assert [p for p in prompts if word_runs(p) & mt] == []
    # the trainer reads the answers as they are (token ids; targets only on the answer)
    for f, recs in [(DATA / "answers.jsonl", answers), *more_files.items()]:
        assert source_kind(str(f)) == "selfdistill"
        ex = read_selfdistill(f)
        assert len(ex) == len(recs) and sum(sum(e.targets) for e in ex) == sum(
            len(a["response_ids"]) for a in recs
        )
    head_dir, _ = BUILTIN_HEADS["smollm2"]
    stored = [f for d in (DATA, head_dir) for f in d.rglob("*") if f.is_file()]
    assert not [f for f in stored if f.name.endswith(".meta.json")]  # no local paths kept
    assert sum(f.stat().st_size for f in stored) <= 30 * 1024 * 1024


@pytest.mark.smollm2
def test_the_answers_to_human_requests_reference_training_sets_only():
    """data/smollm2/human: the base's answers to requests of installed prompt sets, stored as
    token ids and references. Every reference resolves to its package's record; none names the
    evaluation set or the held-out set (AlpacaEval, the head's check on unseen human requests);
    no rebuilt prompt shares an 8-word run with MT-Bench; one file per set, one answer per
    record."""
    from redrafter_trt.formats.datasets import (
        PACKAGE_SETS,
        load_prompts,
        resolve_prompt_ref,
        word_runs,
    )
    from redrafter_trt.models.hub import resolve_base_model_dir
    from redrafter_trt.train.data import load_base_tokenizer, read_selfdistill

    files = sorted((DATA / "human").glob("*.jsonl"))
    assert len(files) >= 5
    mt = _mt_bench_runs()
    held_out = set(load_prompts("alpaca-eval"))
    total = 0
    for f in files:
        recs = _records(f)
        sets = {r["prompt_ref"]["set"] for r in recs}
        assert sets == {f.stem} and PACKAGE_SETS[f.stem].train and f.stem != "alpaca-eval"
        ids = [r["prompt_ref"]["record"] for r in recs]
        assert len(ids) == len(set(ids))
        for r in recs:
            assert set(r) == {"index", "prompt_ref", "response_ids", "finish_reason"}
            text = resolve_prompt_ref(r["prompt_ref"], str(f))
            assert not (word_runs(text) & mt) and text not in held_out
            assert r["response_ids"] and all(0 <= t < 49152 for t in r["response_ids"])
        total += sum(len(r["response_ids"]) for r in recs)
    assert total >= 300_000
    # the trainer rebuilds the prompts with the base's tokenizer; targets only on the answers
    tok = load_base_tokenizer(resolve_base_model_dir("smollm2"))
    f = files[0]
    ex = read_selfdistill(f, tok)
    recs = _records(f)
    assert [sum(e.targets) for e in ex] == [len(r["response_ids"]) for r in recs]


#: the kinds of request in requests_written*.jsonl (their ``category`` field)
WRITTEN_KINDS = {
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
}


@pytest.mark.smollm2
def test_the_written_requests_are_new_and_each_is_answered_once():
    """data/smollm2/requests_written*.jsonl: requests written for training in eight kinds (never
    MT-Bench's text: no 8-word run in common with any of its turns; none of the held-out requests,
    AlpacaEval's or the base-written held-out ones; none of the other training requests, nor a
    request of another written file); data/smollm2/written/: the base's greedy answers, every
    request of every written file answered exactly once (token ids the trainer reads)."""
    from redrafter_trt.formats.datasets import load_prompts, word_runs
    from redrafter_trt.train.data import expand_sources, read_selfdistill

    reqs = [r for f in _written_request_files() for r in _records(DATA / f)]
    texts = [r["prompt"] for r in reqs]
    assert len(texts) >= 1000 and len({t.strip().lower() for t in texts}) == len(texts)
    assert {r["category"] for r in reqs} == WRITTEN_KINDS
    assert all(set(r) == {"prompt", "category"} and r["prompt"].strip() for r in reqs)
    mt = _mt_bench_runs()
    assert [t for t in texts if word_runs(t) & mt] == []
    others = set(load_prompts("alpaca-eval"))
    others |= _prompts("requests_train.jsonl", "requests_heldout.jsonl", "answers2")
    others = {t.strip().lower() for t in others}
    assert not [t for t in texts if t.strip().lower() in others]
    files = [Path(f) for f in expand_sources([str(DATA / "written")])]
    assert files
    answered: list[str] = []
    for f in files:
        recs = _records(f)
        asked = [r["prompt"] for r in recs]
        assert set(asked) <= set(texts), f
        answered += asked
        for r in recs:
            ids = r["prompt_ids"] + r["response_ids"]
            assert r["response_ids"] and all(0 <= t < 49152 for t in ids)
        ex = read_selfdistill(f)
        assert [sum(e.targets) for e in ex] == [len(r["response_ids"]) for r in recs]
    # every request answered once (none dropped for length or an MT-Bench run)
    assert sorted(answered) == sorted(texts)


@pytest.mark.smollm2
def test_the_sampled_answers_are_training_requests_answered_again():
    """data/smollm2/sampled/seed*/: the base's answers sampled at temperature 0.7 to the same
    training requests (more contexts of the base's own text). Package requests by reference, one
    answer per record and file, never the evaluation or held-out set; the base-written requests
    are those of requests_train.jsonl and answers2/, none of the held-out ones, and the written
    ones those of requests_written*.jsonl; no request shares an 8-word run with MT-Bench."""
    from redrafter_trt.formats.datasets import (
        PACKAGE_SETS,
        load_prompts,
        resolve_prompt_ref,
        word_runs,
    )
    from redrafter_trt.train.data import expand_sources, read_selfdistill

    dirs = sorted((DATA / "sampled").glob("seed*"))
    assert dirs
    mt = _mt_bench_runs()
    held_out = set(load_prompts("alpaca-eval"))
    trained = _prompts("requests_train.jsonl", "answers2")
    heldout_written = _prompts("requests_heldout.jsonl")
    written = _prompts(*_written_request_files())
    total = 0
    for d in dirs:
        for f in map(Path, expand_sources([str(d)])):
            recs = _records(f)
            name = f.name.split(".")[0]
            if name == "base" or name.startswith("written"):
                texts = [r["prompt"] for r in recs]
                assert set(texts) <= (trained if name == "base" else written)
                assert not set(texts) & heldout_written and len(texts) == len(set(texts))
                assert len(read_selfdistill(f)) == len(recs)
            else:
                assert {r["prompt_ref"]["set"] for r in recs} == {name}
                assert PACKAGE_SETS[name].train and name != "alpaca-eval"
                ids = [r["prompt_ref"]["record"] for r in recs]
                assert len(ids) == len(set(ids))
                texts = [resolve_prompt_ref(r["prompt_ref"], str(f)) for r in recs]
                assert not set(texts) & held_out
            assert not [t for t in texts if word_runs(t) & mt]
            assert all(r["response_ids"] and max(r["response_ids"]) < 49152 for r in recs)
            total += sum(len(r["response_ids"]) for r in recs)
    assert total >= 500_000


def test_the_head_recipe_runs_the_cli_as_it_is_over_the_data_in_the_repository(tmp_path):
    """build_scripts/train_smollm2_head.sh takes hours; its dry run prints the commands, which
    must parse with the CLIs of today, chain each stage to a head an earlier command wrote, name
    data that is in the repository, train the last stage on every data file kept here and write
    the built-in head."""
    import os
    import shlex
    import subprocess

    from redrafter_trt.cli.train import build_parser as train_parser
    from redrafter_trt.heads.package import build_parser as package_parser
    from redrafter_trt.train.data import BUILTIN, expand_sources

    root = DATA.parents[1]
    work = tmp_path / "work"
    env = {**os.environ, "REDRAFTER_HEAD_DRY_RUN": "1", "REDRAFTER_HEAD_WORK": str(work)}
    env.pop("REDRAFTER_HEAD_OUT", None)
    out = subprocess.run(
        ["bash", str(root / "build_scripts" / "train_smollm2_head.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [shlex.split(line) for line in out.splitlines() if line.strip()]
    assert not work.exists()  # a dry run writes nothing
    written: list[str] = []
    trains = []
    for c in commands:
        if c[0].endswith("/redrafter-train"):
            args = train_parser().parse_args(c[1:])
            assert args.command == "train"
            assert args.init_from is None or str(args.init_from) in written, args.init_from
            for src in args.data:
                assert src in BUILTIN or (root / src).exists(), src
            written.append(str(args.output_dir))
            trains.append(args)
        else:
            assert c[1:3] == ["-m", "redrafter_trt.heads.package"], c
            args = package_parser().parse_args(c[3:])
            assert str(args.head) in written and args.own_projection
            written.append(str(args.output))
    assert len(trains) >= 2 and trains[0].init_from is None
    assert written[-1] == str(BUILTIN_HEADS["smollm2"][0])
    # the last stage trains on every answer file kept in data/smollm2
    files = [str(root / s) for s in trains[-1].data if s not in BUILTIN]
    last = {Path(f).resolve() for f in expand_sources(files)}
    kept = {f.resolve() for f in DATA.rglob("*.jsonl*") if not f.name.startswith("requests_")}
    assert kept and kept == last, sorted(kept ^ last)
