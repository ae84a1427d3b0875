"""Training data that names its prompts by reference to an installed package's record.

The repository keeps the base's answers as token ids plus ``prompt_ref`` (set, package, version,
record id, hash); the loader rebuilds the prompt from the installed package. These tests pin the
rebuild to the prompt the data was made from, and every way it can go wrong to a clear error.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats import datasets
from redrafter_trt.train.data import (
    load_base_tokenizer,
    load_examples,
    read_selfdistill,
    render_prompt,
    selfdistill_needs_tokenizer,
)
from redrafter_trt.train.gen_data import generate_data, read_prompt_entries
from redrafter_trt.train.step import own_path_reach

KW = dict(max_new_tokens=5, batch_size=2, progress=False, log=lambda m: None)


@pytest.fixture
def refs_file(tiny_base, tmp_path):
    entries = read_prompt_entries(["writingbench"], training=True)
    entries = sorted(entries, key=lambda e: len(e[0]))[:3]  # the tiny base's short context
    prompts, refs = [p for p, _ in entries], [r for _, r in entries]
    out = tmp_path / "refs.jsonl"
    generate_data(tiny_base, prompts, out, refs=refs, refs_only=True, **KW)
    full = tmp_path / "full.jsonl"
    generate_data(tiny_base, prompts, full, refs=refs, **KW)
    return out, full, prompts


def test_a_reference_rebuilds_the_prompt_the_answer_was_made_from(tiny_base, refs_file):
    out, full, prompts = refs_file
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3
    for r in recs:  # no prompt text and no prompt ids are stored, only the reference
        assert set(r) == {"index", "prompt_ref", "response_ids", "finish_reason"}
        assert (
            r["prompt_ref"]["package"] == "inspect-evals"
            and r["prompt_ref"]["set"] == "writingbench"
        )
    assert selfdistill_needs_tokenizer(out) and not selfdistill_needs_tokenizer(full)
    tok = load_base_tokenizer(tiny_base)
    rebuilt, stored = read_selfdistill(out, tok), read_selfdistill(full)
    assert [e.ids for e in rebuilt] == [e.ids for e in stored]
    assert [e.targets for e in rebuilt] == [e.targets for e in stored]
    by_index = {r["index"]: r for r in recs}
    for i, p in enumerate(prompts):
        assert datasets.resolve_prompt_ref(by_index[i]["prompt_ref"], "x") == p
        n = len(render_prompt(tok, p))
        e = rebuilt[[r["index"] for r in recs].index(i)]
        assert not any(e.targets[:n]) and all(e.targets[n:])
    with pytest.raises(RedrafterError, match="needs the base model's tokenizer"):
        read_selfdistill(out)
    assert len(load_examples([str(out)], tok)) == 3


def _rewrite(path, line, edit):
    lines = path.read_text().splitlines()
    rec = json.loads(lines[line])
    edit(rec)
    lines[line] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")


def test_a_missing_package_is_named_with_its_install_command(tiny_base, refs_file, monkeypatch):
    out, _, _ = refs_file
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "inspect_evals" else real(name, *a),
    )
    datasets.package_records.cache_clear()
    try:
        with pytest.raises(RedrafterError) as e:
            read_selfdistill(out, load_base_tokenizer(tiny_base))
    finally:
        datasets.package_records.cache_clear()
    msg = str(e.value)
    assert str(out) in msg and "line 1" in msg
    assert "inspect-evals" in msg and "pip install --no-deps inspect-evals==0.26.0" in msg


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda r: r["prompt_ref"].update(record="no-such-record"),
            "has no record 'no-such-record'",
        ),
        (lambda r: r["prompt_ref"].update(sha256="0" * 16), "is not the prompt the data was made"),
        (lambda r: r["prompt_ref"].update(set="nope"), "does not know"),
        (lambda r: r.update(prompt_ref="writingbench"), "must be an object"),
        (lambda r: r.update(response_ids=[1, -2]), "not non-negative integers"),
    ],
)
def test_a_bad_reference_names_the_file_and_line(tiny_base, refs_file, edit, match):
    out, _, _ = refs_file
    _rewrite(out, 1, edit)
    with pytest.raises(RedrafterError, match=match) as e:
        read_selfdistill(out, load_base_tokenizer(tiny_base))
    assert f"{out}: line 2" in str(e.value)


def test_a_corrupt_line_is_an_error_but_a_torn_last_line_is_dropped(tiny_base, refs_file):
    out, _, _ = refs_file
    tok = load_base_tokenizer(tiny_base)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    assert len(read_selfdistill(out, tok)) == 2
    out.write_text(lines[0][:15] + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(RedrafterError, match=r"line 1 is not valid JSON.*corrupt") as e:
        read_selfdistill(out, tok)
    assert str(out) in str(e.value)


def test_refs_only_needs_package_prompts_and_mt_bench_is_never_training_data(tiny_base, tmp_path):
    with pytest.raises(RedrafterError, match="needs every prompt from a built-in package set"):
        generate_data(
            tiny_base, ["a", "b"], tmp_path / "o.jsonl", refs=[None, None], refs_only=True, **KW
        )
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(RedrafterError, match="evaluation set"):
        read_prompt_entries(["mt-bench"], training=True)
    assert len(read_prompt_entries(["mt-bench"])) == 80  # measuring on it is what it is for
    with pytest.raises(RedrafterError, match="evaluation set; it is never trained on"):
        load_examples(["mt-bench"], load_base_tokenizer(tiny_base))


def test_a_directory_of_prompt_files_is_its_jsonl_files_in_name_order(tmp_path):
    d = tmp_path / "chunks"
    d.mkdir()
    (d / "b.jsonl").write_text(json.dumps({"prompt": "second file"}) + "\n")
    (d / "a.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ("one", "two")))
    (d / "a.meta.json").write_text("{}")  # gen-data's settings record: not prompts
    got = [p for p, _ in read_prompt_entries([str(d), "ifeval"], limit_per_source=2)]
    assert got[:3] == ["one", "two", "second file"] and len(got) == 5  # the limit is per file
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RedrafterError, match=f"--prompts {empty}: a directory with no"):
        read_prompt_entries([str(empty)])


def test_every_package_set_reads_and_its_references_round_trip():
    for name, s in datasets.PACKAGE_SETS.items():
        records = datasets.package_records(name)
        ids = [rid for rid, _ in records]
        assert records and len(set(ids)) == len(ids), name  # record ids name one record each
        for rid, turns in records[:: max(1, len(records) // 7)]:
            assert turns and all(isinstance(t, str) and t.strip() for t in turns)
            ref = datasets.prompt_ref(name, rid)
            assert ref["package"] == s.dist and ref["version"] == s.version
            assert datasets.resolve_prompt_ref(ref, name) == turns[0]


def test_a_set_read_from_several_files_or_a_csv_names_what_is_wrong(tmp_path, monkeypatch):
    """PersistBench is read from three sibling files (records ``file:line``), FreshQA from a CSV
    behind a notice line; a missing sibling or a CSV without its header is an error naming the
    file and the install command, never a shorter set."""
    d = tmp_path / "samples"
    d.mkdir()
    for name in datasets.PERSISTBENCH_FILES:
        (d / f"{name}.jsonl").write_text(
            "\n".join(json.dumps({"query": f"{name} q{i}", "memories": []}) for i in range(2))
        )
    first = d / f"{datasets.PERSISTBENCH_FILES[0]}.jsonl"
    got = datasets._persistbench_records(first)
    assert [rid for rid, _ in got][:3] == ["cross_domain:0", "cross_domain:1", "sycophancy:0"]
    assert got[-1] == ("beneficial_samples:1", ["beneficial_samples q1"])
    csv_file = tmp_path / "fresh.csv"
    csv_file.write_text(
        '"Warning: a notice",,\n,,\nid,split,question\n0,TEST,Why?\n7,DEV,"A, b?"\n'
    )
    assert datasets._freshqa_records(csv_file) == [("0", ["Why?"]), ("7", ["A, b?"])]

    (d / "sycophancy.jsonl").unlink()
    csv_file.write_text("no header here\n")
    for name, path, what in (
        ("persistbench", first, f"{d / 'sycophancy.jsonl'} is missing"),
        ("freshqa", csv_file, str(csv_file)),
    ):
        monkeypatch.setattr(datasets, "package_file", lambda n, p=path: p)
        datasets.package_records.cache_clear()
        with pytest.raises(RedrafterError, match="pip install --no-deps inspect-evals==") as e:
            datasets.package_records(name)
        assert str(e.value).startswith(str(path)) and what in str(e.value)
    datasets.package_records.cache_clear()


def test_own_path_reach_follows_the_heads_greedy_path():
    correct = torch.tensor(
        [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool
    )
    expect = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool
    )
    assert torch.equal(own_path_reach(correct), expect)
