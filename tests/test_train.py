"""The distillation trainer on tiny models: loss and gradient by hand, indexing against the beam
search, frozen base, exact resume, gen-data resume, bad input, and a trained head that the
runtime accepts clearly more often than a random one."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer
from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.cli.train import main as train_main
from redrafter_trt.errors import RedrafterError
from redrafter_trt.models.drafter import DrafterConfig, init_drafter, load_drafter, save_drafter
from redrafter_trt.models.io import load_state_dict_file
from redrafter_trt.runtime import Generator
from redrafter_trt.train.config import TrainConfig
from redrafter_trt.train.data import (
    expand_sources,
    load_base_tokenizer,
    load_examples,
    render_conversation,
    source_kind,
)
from redrafter_trt.train.frozen_base import load_frozen_base
from redrafter_trt.train.gen_data import generate_data
from redrafter_trt.train.loop import train_drafter
from redrafter_trt.train.losses import (
    UnrolledHead,
    distill_loss,
    gather_batch,
    logit_match_loss,
    reference_loss,
    unrolled_logits,
)
from redrafter_trt.train.step import forward_loss


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def selfdistill_file(tiny_base, tmp_path_factory) -> Path:
    """The tiny base's own greedy continuations of random token prompts (gen-data format)."""
    base = load_frozen_base(tiny_base)
    v = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, v, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
        for _ in range(48)
    ]
    gen = _generator(base, _stub_head(base), 1, 1)
    res = gen.generate(prompts, max_new_tokens=48, speculative=False)
    f = tmp_path_factory.mktemp("sd") / "sd.jsonl"
    f.write_text(
        "".join(
            json.dumps({"index": i, "prompt_ids": p, "response_ids": r.token_ids}) + "\n"
            for i, (p, r) in enumerate(zip(prompts, res))
        )
    )
    return f


def _stub_head(base):
    return init_drafter(DrafterConfig(base.config.vocab_size, base.config.hidden_size, 1, 0, False))


def _generator(base, head, w, d):
    return Generator(
        TorchBackend(base, head, w, d, max_batch_size=64, max_input_len=64, max_seq_len=256)
    )


def _runtime_tokens_per_step(base, heads: dict) -> dict:
    """Greedy tokens per step (W=4, D=4) of each head through the runtime, on 24 fresh random
    prompts (not the training ones)."""
    g = torch.Generator().manual_seed(9)
    prompts = [
        torch.randint(3, base.config.vocab_size, (6,), generator=g).tolist() for _ in range(24)
    ]
    tps = {}
    for name, head in heads.items():
        gen = _generator(base, head, 4, 4)
        gen.generate(prompts, max_new_tokens=40)
        tps[name] = gen.last_stats.tokens_per_step
    print(f"runtime tokens/step: {tps}")
    return tps


def _features(base, cfg: TrainConfig, tiny_base):
    """The tiny base's features over ``cfg.data`` (top-32 teacher), cached in ``cfg.cache_dir``."""
    from redrafter_trt.train.data import model_fingerprint
    from redrafter_trt.train.features import cached_features

    feats, _, _ = cached_features(
        base,
        load_examples(cfg.data),
        model_fingerprint(tiny_base),
        32,
        cfg.cache_dir,
        progress=False,
    )
    return feats


def _cfg(tiny_base, data, out, tmp_path, **kw) -> TrainConfig:
    base = dict(
        model_dir=str(tiny_base),
        data=[str(x) for x in data],
        output_dir=str(out),
        exit_dim=48,
        num_draft_layers=1,
        batch_size=64,
        lr=1e-2,
        warmup_steps=5,
        max_steps=10,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        eval_fraction=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- loss
def test_loss_and_gradient_by_hand():
    v = 4
    z = torch.zeros((1, v), requires_grad=True)
    label = torch.tensor([1])
    ids = torch.tensor([[2, 0]])
    probs = torch.tensor([[1.0, 0.0]])  # the teacher is sure of token 2
    # KL(teacher || uniform) = log 4; gradient softmax - p = 1/4 - onehot(2)
    loss = distill_loss(z, label, ids, probs, 1.0, 1.0)
    assert loss.item() == pytest.approx(math.log(4))
    loss.sum().backward()
    assert torch.allclose(z.grad, torch.tensor([[0.25, 0.25, -0.75, 0.25]]))
    # cross-entropy on the label: log 4, gradient 1/4 - onehot(1)
    z.grad = None
    distill_loss(z, label, None, None, 1.0, 0.0).sum().backward()
    assert torch.allclose(z.grad, torch.tensor([[0.25, -0.75, 0.25, 0.25]]))
    # an even mix: gradient 1/4 - (onehot(1) + onehot(2)) / 2
    z.grad = None
    loss = distill_loss(z, label, ids, probs, 1.0, 0.5)
    assert loss.item() == pytest.approx(math.log(4))
    loss.sum().backward()
    assert torch.allclose(z.grad, torch.tensor([[0.25, -0.25, -0.25, 0.25]]))
    # temperature 2 on logits [2, 0, 0, 0], teacher split evenly over tokens 0 and 1:
    # log q = [1, 0, 0, 0] - log(e + 3); loss = T^2 * sum p (log p - log q)
    z2 = torch.tensor([[2.0, 0.0, 0.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.5, 0.5]])
    lse = math.log(math.e + 3)
    want = 4 * (0.5 * (math.log(0.5) - (1 - lse)) + 0.5 * (math.log(0.5) - (0 - lse)))
    loss = distill_loss(z2, label, torch.tensor([[0, 1]]), p, 2.0, 1.0)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.sum().backward()
    q = torch.tensor([math.e, 1, 1, 1]) / (math.e + 3)
    assert torch.allclose(z2.grad, 2 * (q - torch.tensor([0.5, 0.5, 0, 0]))[None], atol=1e-6)


@pytest.mark.parametrize(
    "alpha,temp,dense",
    [
        (1.0, 1.0, False),
        (0.0, 1.0, False),
        (0.3, 1.0, False),
        (0.7, 2.0, False),
        (1.0, 0.5, True),
        (0.5, 1.5, True),
    ],
)
def test_loss_matches_autograd_reference(alpha, temp, dense):
    g = torch.Generator().manual_seed(1)
    m, v, k = 7, 11, 3
    z = torch.randn((m, v), generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (m,), generator=g)
    if dense:
        ids, probs = None, torch.softmax(torch.randn((m, v), generator=g, dtype=torch.float64), -1)
    else:
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(m)])
        probs = torch.softmax(torch.randn((m, k), generator=g, dtype=torch.float64), -1)
    w = torch.rand(m, generator=g, dtype=torch.float64)
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    la = distill_loss(a, labels, ids, probs, temp, alpha)
    lb = reference_loss(b, labels, ids, probs, temp, alpha)
    assert torch.allclose(la, lb, atol=1e-6)
    (la * w).sum().backward()
    (lb * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


# --------------------------------------------------------------------------- indexing
def test_batch_indexing_by_hand():
    # two sequences in one stream: [10 11 12 13 14] [20 21 22]; every token a target
    tokens = torch.tensor([10, 11, 12, 13, 14, 20, 21, 22])
    targets = torch.ones(8, dtype=torch.bool)
    targets[5] = False  # the second sequence's first token is a prompt token
    seq_end = torch.tensor([5, 5, 5, 5, 5, 8, 8, 8])
    hidden = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)
    b = gather_batch(tokens, targets, seq_end, hidden, torch.tensor([0, 2, 5]), 3)
    # position t: context c_t, step i feeds x_{t+i} and predicts x_{t+i+1} with teacher at t+i
    assert b.context[:, 0].tolist() == [0, 2, 5]
    assert b.in_tokens[0].tolist() == [11, 12, 13]
    assert b.labels[0].tolist() == [12, 13, 14]
    assert b.teacher_pos[0].tolist() == [1, 2, 3]
    assert b.valid[0].tolist() == [True, True, True]
    assert b.labels[1].tolist()[:1] == [14] and b.valid[1].tolist() == [True, False, False]
    assert b.in_tokens[2].tolist() == [21, 22, 22] and b.labels[2].tolist()[:1] == [22]
    assert b.valid[2].tolist() == [True, False, False]


def test_unrolled_steps_match_beam_search(tiny_base):
    """A one-beam search (no warp) drafts exactly the argmax chain of the unrolled training
    logits fed with its own tokens: training and inference index the same way."""
    base = load_frozen_base(tiny_base).double()
    cfg = DrafterConfig(base.config.vocab_size, base.config.hidden_size, 40, 2, True)
    head = init_drafter(cfg, seed=4, std=0.3).double()
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn((5, cfg.hidden_size), generator=g, dtype=torch.float64)
    root = torch.randint(0, cfg.vocab_size, (5,), generator=g)
    beams = head.beam_search(base.embedding, ctx, root, 1, 4, warp_k=0)[:, 0].long()  # [5, 5]
    logits = unrolled_logits(head, base.embedding, ctx, beams[:, :4])
    assert torch.equal(logits.argmax(-1), beams[:, 1:])
    # and each step's logits are Drafter.logits of the recurrent state
    s = torch.zeros_like(ctx)
    for i in range(4):
        s = head.update_state(s, base.embedding(beams[:, i]))
        assert torch.allclose(logits[:, i], head.logits(ctx, s))


def test_only_head_parameters_get_gradients(tiny_base, selfdistill_file, tmp_path):

    cfg = _cfg(tiny_base, [selfdistill_file], tmp_path / "o", tmp_path)
    base = load_frozen_base(tiny_base)
    for p in base.parameters():
        p.requires_grad_(True)  # even when the base would accept gradients, none reach it
    head = init_drafter(DrafterConfig(base.config.vocab_size, base.config.hidden_size, 48, 1, True))
    feats = _features(base, cfg, tiny_base)
    loss, _ = forward_loss(
        UnrolledHead(head),
        base,
        feats,
        torch.arange(0, 200),
        cfg,
        "cpu",
        lambda: torch.autocast("cpu", enabled=False),
    )
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


# --------------------------------------------------------------------------- training loop
def test_resume_after_interruption_is_exact(tiny_base, selfdistill_file, tmp_path):
    full = train_drafter(
        _cfg(tiny_base, [selfdistill_file], tmp_path / "full", tmp_path, max_steps=12, grad_accum=2)
    )

    class Interrupt(Exception):
        pass

    def stop(step):
        if step == 7:
            raise Interrupt

    cfg = _cfg(
        tiny_base,
        [selfdistill_file],
        tmp_path / "cut",
        tmp_path,
        max_steps=12,
        grad_accum=2,
        save_every=5,
    )
    with pytest.raises(Interrupt):
        train_drafter(cfg, on_step=stop)
    assert not (tmp_path / "cut").exists()  # nothing half-written
    assert (tmp_path / "cut.checkpoints" / "step-0000005.pt").is_file()
    cfg.resume = "auto"
    resumed = train_drafter(cfg)
    a, b = load_drafter(full).state_dict(), load_drafter(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((resumed / "training_report.json").read_text())
    assert report["steps"] == 12 and report["resumed_from"].endswith("step-0000005.pt")
    assert len(report["eval"]["top1_accuracy_per_depth"]) == 4


def test_a_data_directory_is_its_jsonl_files_each_a_source(tiny_base, selfdistill_file, tmp_path):
    """``--data DIR`` trains exactly as naming DIR's *.jsonl files (sorted) one by one, and shares
    their per-file feature caches; records beside them (``.meta.json``) are not data."""
    lines = selfdistill_file.read_text().splitlines(keepends=True)
    d = tmp_path / "answers"
    d.mkdir()
    (d / "b.jsonl").write_text("".join(lines[24:]))
    (d / "a.jsonl").write_text("".join(lines[:24]))
    (d / "a.jsonl.meta.json").write_text("{}")
    listed = train_drafter(
        _cfg(tiny_base, [d / "a.jsonl", d / "b.jsonl"], tmp_path / "listed", tmp_path, max_steps=4)
    )
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(caches) == 2
    from_dir = train_drafter(_cfg(tiny_base, [d], tmp_path / "dir", tmp_path, max_steps=4))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == caches  # no recomputation
    a, b = load_drafter(listed).state_dict(), load_drafter(from_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((from_dir / "training_report.json").read_text())
    assert report["data"] == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RedrafterError, match="empty.*no \\*.jsonl or \\*.jsonl.gz files"):
        train_drafter(_cfg(tiny_base, [empty], tmp_path / "e", tmp_path, max_steps=4))


def test_bfloat16_base_features_are_the_base_rounded_and_cached_apart(
    tiny_base, selfdistill_file, tmp_path, monkeypatch
):
    """``--base_dtype bfloat16`` computes the features with a bfloat16 copy of the base: close
    to the float32 base's (not equal), in a cache entry of its own, recorded in the report; the
    float32 features are then still read from their own entry, and with every feature cached no
    bfloat16 copy of the base is built."""
    from redrafter_trt.train import loop as loop_module
    from redrafter_trt.train.features import FEATURES_FILE

    def run(name, dtype):
        out = train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / name,
                tmp_path,
                max_steps=2,
                base_dtype=dtype,
            )
        )
        report = json.loads((out / "training_report.json").read_text())
        assert report["settings"]["base_dtype"] == dtype
        (cache,) = report["features"]["cache"]
        return Path(cache), report["features"]["seconds"]

    f32, _ = run("f32", "float32")
    b16, _ = run("b16", "bfloat16")
    assert f32 != b16 and f32.parent == b16.parent
    a = load_state_dict_file(f32 / FEATURES_FILE)
    b = load_state_dict_file(b16 / FEATURES_FILE)
    assert torch.equal(a["tokens"], b["tokens"])
    ha, hb = a["hidden"].float(), b["hidden"].float()
    rel = ((ha - hb).norm(dim=1) / ha.norm(dim=1)).mean().item()
    assert 0 < rel < 0.05, rel  # bfloat16 rounding through the layers, not another model
    again, secs = run("f32b", "float32")
    assert again == f32 and secs == 0  # a cache hit
    copies = []  # every feature cached: no bfloat16 copy of the base is built
    real = loop_module.feature_base
    monkeypatch.setattr(loop_module, "feature_base", lambda *a: copies.append(a) or real(*a))
    assert run("b16b", "bfloat16") == (b16, 0) and not copies
    with pytest.raises(RedrafterError, match="--base_dtype 'float16': expected one of"):
        _cfg(
            tiny_base, [selfdistill_file], tmp_path / "x", tmp_path, base_dtype="float16"
        ).validate()


def test_gzip_compressed_data_reads_as_the_plain_file(tiny_base, selfdistill_file, tmp_path):
    """A gen-data file stored gzip-compressed (``.jsonl.gz``) gives the same examples as the
    plain file, alone or from a directory; a directory holding a file both ways, a truncated
    .gz, and gen-data told to write .gz are errors naming the file."""
    plain = load_examples([str(selfdistill_file)])
    d = tmp_path / "packed"
    d.mkdir()
    gz = d / "sd.jsonl.gz"
    gz.write_bytes(gzip.compress(selfdistill_file.read_bytes(), mtime=0))
    assert source_kind(str(gz)) == "selfdistill"
    for got in (load_examples([str(gz)]), load_examples(expand_sources([str(d)]))):
        assert [(e.ids, e.targets) for e in got] == [(e.ids, e.targets) for e in plain]
    (d / "sd.jsonl").write_bytes(selfdistill_file.read_bytes())
    with pytest.raises(RedrafterError, match="packed: holds sd.jsonl both plain and gzip"):
        expand_sources([str(d)])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(RedrafterError, match="cut.jsonl.gz: cannot read the gen-data file"):
        load_examples([str(cut)])
    with pytest.raises(RedrafterError, match="out.jsonl.gz: gen-data appends to a plain"):
        generate_data(tiny_base, ["hi"], tmp_path / "out.jsonl.gz", max_new_tokens=2)
    assert not (tmp_path / "out.jsonl.gz").exists()


@pytest.mark.full
def test_trained_head_is_accepted_more_than_random(tiny_base, selfdistill_file, tmp_path):
    out = train_drafter(
        _cfg(
            tiny_base,
            [selfdistill_file],
            tmp_path / "head",
            tmp_path,
            max_steps=300,
            warmup_steps=20,
            exit_dim=64,
            lr=1e-2,
            eval_fraction=0.1,
        )
    )
    trained = load_drafter(out)
    random_head = init_drafter(trained.config, seed=1)
    tps = _runtime_tokens_per_step(
        load_frozen_base(tiny_base), {"trained": trained, "random": random_head}
    )
    assert tps["random"] < 1.2
    assert tps["trained"] > tps["random"] + 0.8, tps
    report = json.loads((out / "training_report.json").read_text())
    # the trainer's own held-out estimate agrees with what the runtime measures
    assert abs(report["eval"]["greedy_chain_tokens_per_step"] - tps["trained"]) < 0.6
    assert (
        report["throughput"]["positions_per_s"] > 0 and report["peak_memory"]["host_max_rss_mb"] > 0
    )


# --------------------------------------------------------------------------- data
def test_conversation_targets_are_the_assistant_turns(tiny_base):
    tok = load_base_tokenizer(tiny_base)
    conv = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ok"},
    ]
    ex = render_conversation(tok, conv)
    text = "".join(tok.decode([i]) for i, t in zip(ex.ids, ex.targets) if t)
    assert text == "hello!<|im_end|>\nok<|im_end|>\n"


def test_gen_data_resumes_and_drops_a_torn_line(tiny_base, tmp_path):
    prompts = ["abc", "hello world", "x", "what is 2+2?", "tell me"]
    out = tmp_path / "sd.jsonl"
    kw = dict(max_new_tokens=6, batch_size=2, progress=False, log=lambda m: None)
    generate_data(tiny_base, prompts, out, **kw)
    lines = out.read_text().splitlines()
    assert sorted(json.loads(x)["index"] for x in lines) == list(range(5))
    # an interrupted run: the last batch is missing and a half-written line is left behind
    ref = {json.loads(x)["index"]: json.loads(x) for x in lines}
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    generate_data(tiny_base, prompts, out, **kw)
    again = {json.loads(x)["index"]: json.loads(x) for x in out.read_text().splitlines()}
    assert again == ref
    # other settings on the same file: an error, unless --overwrite
    with pytest.raises(RedrafterError, match="other settings"):
        generate_data(tiny_base, prompts, out, **{**kw, "max_new_tokens": 7})
    ex = load_examples([str(out)])
    assert len(ex) >= 1 and all(len(e.ids) == len(e.targets) for e in ex)


# --------------------------------------------------------------------------- bad input
def test_dataset_without_usable_turns(tiny_base, tmp_path):
    f = tmp_path / "conv.json"
    f.write_text(json.dumps([{"conversations": [{"from": "human", "value": "only a question"}]}]))
    with pytest.raises(RedrafterError, match="no usable turns"):
        train_drafter(_cfg(tiny_base, [f], tmp_path / "o", tmp_path))
    assert not (tmp_path / "o").exists()


def test_missing_chat_template(tiny_base, tmp_path):
    d = tmp_path / "notemplate"
    shutil.copytree(tiny_base, d)
    for f in d.glob("chat_template*"):
        f.unlink()
    char_tokenizer(None).save_pretrained(str(d))
    f = tmp_path / "conv.jsonl"
    f.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello there"},
                ]
            }
        )
        + "\n"
    )
    with pytest.raises(RedrafterError, match="no chat template"):
        train_drafter(_cfg(d, [f], tmp_path / "o", tmp_path))
    assert not (tmp_path / "o").exists()
    # raw text works when asked for
    out = train_drafter(
        _cfg(
            d,
            [f],
            tmp_path / "o",
            tmp_path,
            chat_template=False,
            max_steps=2,
            batch_size=4,
            eval_fraction=0.0,
        )
    )
    assert (out / "model.safetensors").is_file()


def test_head_base_shape_mismatch(tiny_base, selfdistill_file, tmp_path):
    other = init_drafter(DrafterConfig(97, 16, 32, 1, True))  # hidden 16, base has 32
    save_drafter(other, tmp_path / "other")
    with pytest.raises(RedrafterError, match="hidden_size 16 != base hidden_size 32"):
        train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                init_from=str(tmp_path / "other"),
            )
        )
    assert not (tmp_path / "o").exists()


def test_output_dir_not_empty(tiny_base, selfdistill_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = [
        "--model_dir",
        str(tiny_base),
        "--data",
        str(selfdistill_file),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--no_progress",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert train_main(argv) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o.checkpoints").exists()
    assert train_main(argv + ["--overwrite", "--batch_size", "32"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_unreadable_resume_checkpoint(tiny_base, selfdistill_file, tmp_path, capsys):
    bad = tmp_path / "step-0000003.pt"
    bad.write_bytes(b"not a checkpoint")
    argv = [
        "train",
        "--model_dir",
        str(tiny_base),
        "--data",
        str(selfdistill_file),
        "--output_dir",
        str(tmp_path / "o"),
        "--max_steps",
        "4",
        "--resume",
        str(bad),
        "--no_progress",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert train_main(argv) == 2
    assert "cannot read the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_subcommand_measures_through_the_runtime(tiny_base, tmp_path, capsys):
    head = init_drafter(DrafterConfig(97, 32, 48, 1, True), seed=2)
    save_drafter(head, tmp_path / "head")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["hello", "what is up?", "abc"]))
    argv = [
        "eval",
        "--model_dir",
        str(tiny_base),
        "--drafter_model_dir",
        str(tmp_path / "head"),
        "--prompts",
        str(prompts),
        "--max_new_tokens",
        "12",
        "--plain_check",
        "--batch_size",
        "2",
        "--no_progress",
    ]
    assert train_main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompts"] == 3 and res["identical_to_plain"] is True
    assert 1.0 <= res["tokens_per_step"] <= 5.0
    assert sum(res["tokens_per_step_histogram"].values()) == res["steps"]
    # one entry per prompt across both engine batches, adding up to the totals
    per = res["per_prompt"]
    assert len(per) == 3
    assert sum(p["tokens"] for p in per) == res["generated_tokens"]
    assert sum(p["steps"] for p in per) == res["steps"]
    assert all(p["steps"] <= p["tokens"] <= 5 * p["steps"] for p in per)


def test_features_of_two_sources_concatenate_into_one_stream():
    from redrafter_trt.train.features import Features, concat_features

    def part(tokens, ends, starts):
        n = len(tokens)
        return Features(
            torch.tensor(tokens),
            torch.ones(n, dtype=torch.bool),
            torch.tensor(ends),
            torch.zeros((n, 2)),
            torch.zeros((n, 3)),
            torch.zeros((n, 3), dtype=torch.int64),
            torch.tensor(starts),
        )

    f = concat_features([part([1, 2, 3], [2, 2, 3], [0, 2]), part([4, 5], [2, 2], [0])])
    assert f.tokens.tolist() == [1, 2, 3, 4, 5]
    assert f.seq_end.tolist() == [2, 2, 3, 5, 5] and f.seq_starts.tolist() == [0, 2, 3]


def test_every_flag_has_help():
    from redrafter_trt.cli.train import build_parser

    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"{sub.prog} {action.option_strings} has no help"


# --------------------------------------------------------------------------- base-initialised head
def test_base_initialised_frozen_projection(tiny_base, selfdistill_file, tmp_path):
    """--lm_head_init base copies the base's [V, H] projection and passes the context through
    input_proj; with --freeze_lm_head training leaves that projection bit-identical while the
    layers in front of it learn."""
    from redrafter_trt.train.head import make_drafter

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    cfg = _cfg(
        tiny_base,
        [selfdistill_file],
        tmp_path / "frozen",
        tmp_path,
        exit_dim=h,
        lm_head_init="base",
        freeze_lm_head=True,
        max_steps=15,
    )
    start = make_drafter(cfg, h, v, base.lm_head.weight)
    assert torch.equal(start.lm_head[-1].weight, base.lm_head.weight.float())
    assert not start.lm_head[-1].weight.requires_grad
    c = torch.randn(5, h)
    passed = start.input_proj(torch.cat([c, torch.zeros_like(c)], -1))
    assert (
        float((passed - c).detach().norm() / c.norm()) < 0.3
    )  # the init noise (std 0.02) stays small

    out = train_drafter(cfg)
    trained = load_drafter(out)
    assert torch.equal(trained.lm_head[-1].weight, base.lm_head.weight.float())
    before, after = start.state_dict(), trained.state_dict()
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    assert (
        "input_proj.weight" in moved and "rnn_w.weight" in moved and "lm_head.1.weight" not in moved
    )
    report = json.loads((out / "training_report.json").read_text())
    assert report["trainable_parameters"] == sum(
        t.numel() for k, t in after.items() if k != "lm_head.1.weight"
    )


def test_base_initialised_projection_needs_matching_width(tiny_base, selfdistill_file, tmp_path):
    with pytest.raises(RedrafterError, match="--exit_dim must be the base hidden size 32"):
        train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                exit_dim=48,
                lm_head_init="base",
            )
        )
    with pytest.raises(
        RedrafterError, match="--freeze_lm_head keeps a random vocabulary projection"
    ):
        train_drafter(
            _cfg(tiny_base, [selfdistill_file], tmp_path / "o", tmp_path, freeze_lm_head=True)
        )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- logit_match
@pytest.mark.parametrize("temp,mse_weight", [(1.0, 1.0), (2.0, 0.3), (0.7, 0.0)])
def test_logit_match_equals_full_vocabulary_formulation(temp, mse_weight):
    """The Gram-matrix MSE and the top-k KL equal their definitions on full [M, V] logits, in value
    and gradient (float64)."""
    g = torch.Generator().manual_seed(5)
    m, k, h, v = 7, 5, 6, 40
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    feat = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(m, h, generator=g, dtype=torch.float64)
    t_logits = target @ w.T
    ids = t_logits.topk(k, -1).indices
    p = torch.softmax(t_logits.gather(1, ids) / temp, -1)
    loss, zk = logit_match_loss(feat, target, w.T @ w, w[ids], p, v, temp, mse_weight)

    z = feat @ w.T  # the head's full logits
    mse = ((z - t_logits) ** 2).mean(-1)
    q = torch.log_softmax(z.gather(1, ids) / temp, -1)  # renormalised over the teacher's top-k
    kl = (p * (p.log() - q)).sum(-1)
    ref = temp**2 * kl + mse_weight * mse
    assert torch.allclose(zk, z.gather(1, ids))
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    (ga,) = torch.autograd.grad(loss.sum(), feat, retain_graph=True)
    (gb,) = torch.autograd.grad(ref.sum(), feat)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)


def test_logit_match_is_zero_exactly_at_the_teacher():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(30, 4, generator=g, dtype=torch.float64)
    target = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ids = (target @ w.T).topk(4, -1).indices
    p = torch.softmax((target @ w.T).gather(1, ids), -1)
    at, _ = logit_match_loss(target, target, w.T @ w, w[ids], p, 30)
    off, _ = logit_match_loss(target + 0.1, target, w.T @ w, w[ids], p, 30)
    assert float(at.abs().max()) < 1e-12 and bool((off > 1e-6).all())


@pytest.mark.full
def test_logit_match_training(tiny_base, selfdistill_file, tmp_path):
    """--loss logit_match trains only the layers in front of the frozen base projection, and the
    trained head drafts better than the untrained one through the runtime."""
    from redrafter_trt.train.head import make_drafter

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    cfg = _cfg(
        tiny_base,
        [selfdistill_file],
        tmp_path / "lm",
        tmp_path,
        exit_dim=h,
        lm_head_init="base",
        freeze_lm_head=True,
        loss="logit_match",
        max_steps=300,
        warmup_steps=20,
        lr=1e-2,
    )
    start = make_drafter(cfg, h, v, base.lm_head.weight)
    out = train_drafter(cfg)
    trained = load_drafter(out)
    assert torch.equal(trained.lm_head[-1].weight, base.lm_head.weight.float())
    tps = _runtime_tokens_per_step(base, {"trained": trained, "start": start})
    assert tps["trained"] > tps["start"] + 0.5, tps
    report = json.loads((out / "training_report.json").read_text())
    assert report["settings"]["loss"] == "logit_match"


def test_logit_match_needs_the_frozen_base_projection(tiny_base, selfdistill_file, tmp_path):
    with pytest.raises(RedrafterError, match="logit_match needs --freeze_lm_head"):
        train_drafter(
            _cfg(tiny_base, [selfdistill_file], tmp_path / "o", tmp_path, loss="logit_match")
        )
    with pytest.raises(RedrafterError, match="logit_match needs --freeze_lm_head"):
        train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                loss="logit_match",
                exit_dim=32,
                lm_head_init="base",
                freeze_lm_head=True,
                teacher_topk=0,
            )
        )
    with pytest.raises(RedrafterError, match="--alpha does not apply"):
        train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                loss="logit_match",
                alpha=0.5,
            )
        )
    # a head loaded with --init_from keeps its own (trained) projection: not the base's
    other = tmp_path / "other"
    save_drafter(
        init_drafter(DrafterConfig(load_frozen_base(tiny_base).config.vocab_size, 32, 32, 1, True)),
        other,
    )
    with pytest.raises(RedrafterError, match="final projection to be the base model's lm_head"):
        train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                loss="logit_match",
                exit_dim=32,
                init_from=str(other),
                freeze_lm_head=True,
            )
        )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- gen-prompts
@pytest.mark.full
def test_gen_prompts_writes_distinct_finished_requests_and_resumes_exactly(tiny_base, tmp_path):
    from redrafter_trt.train.gen_data import read_prompt_sources
    from redrafter_trt.train.gen_prompts import acceptable, generate_prompts, user_turn_prefix

    tok = load_base_tokenizer(tiny_base)
    assert (
        user_turn_prefix(tok, tiny_base)
        == tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    )
    kw = dict(
        temperature=1.0, max_prompt_tokens=24, min_words=1, batch_size=8, seed=3, progress=False
    )
    full = generate_prompts(tiny_base, tmp_path / "full.jsonl", 6, **kw)
    recs = [json.loads(x) for x in full.read_text().splitlines()]
    assert len(recs) >= 6
    texts = [r["prompt"] for r in recs]
    assert len({t.lower() for t in texts}) == len(texts) and all(acceptable(t, 1) for t in texts)
    assert read_prompt_sources([str(full)]) == texts  # what gen-data --prompts reads

    # a short run extended later equals one long run
    part = tmp_path / "part.jsonl"
    generate_prompts(tiny_base, part, 2, **kw)
    assert len(part.read_text().splitlines()) < len(recs)
    generate_prompts(tiny_base, part, 6, **kw)
    assert part.read_text() == full.read_text()

    # a crash after some lines of a batch were written, before the batch was recorded
    meta = Path(str(part) + ".meta.json")
    m = json.loads(meta.read_text())
    m["batches_done"] -= 1
    meta.write_text(json.dumps(m))
    with part.open("a") as f:
        f.write('{"index": 99, "batch": 0, "pro')
    generate_prompts(tiny_base, part, 6, **kw)
    assert part.read_text() == full.read_text()

    with pytest.raises(RedrafterError, match="other settings"):
        generate_prompts(tiny_base, part, 6, **{**kw, "seed": 4})
    with pytest.raises(RedrafterError, match="temperature must be > 0"):
        generate_prompts(tiny_base, tmp_path / "t.jsonl", 6, **{**kw, "temperature": 0.0})


def test_gen_prompts_needs_a_chat_template(tiny_base, tmp_path):
    from redrafter_trt.train.gen_prompts import generate_prompts

    d = tmp_path / "nochat"
    shutil.copytree(tiny_base, d)
    char_tokenizer(None).save_pretrained(str(d))
    cfg_file = d / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(RedrafterError, match="no chat template"):
        generate_prompts(d, tmp_path / "p.jsonl", 4, progress=False)
    assert not (tmp_path / "p.jsonl").exists()


# --------------------------------------------------------------------------- fused / batch-vocabulary loss
@pytest.mark.parametrize(
    "alpha,temp,dense,chunk",
    [(1.0, 1.0, False, 3), (0.0, 1.0, False, 64), (0.4, 2.0, False, 5), (1.0, 0.5, True, 4)],
)
def test_projected_loss_equals_the_loss_on_full_logits(alpha, temp, dense, chunk):
    """The fused, chunked loss over ``feat @ W.T`` equals :func:`reference_loss` on the materialised
    logits, in value and in the gradient reaching ``feat`` under arbitrary per-row weights."""
    from redrafter_trt.train.losses import projected_distill_loss

    g = torch.Generator().manual_seed(11)
    m, h, v, k = 13, 8, 50, 6
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    feat = torch.randn(m, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (m,), generator=g)
    t_logits = torch.randn(m, v, generator=g, dtype=torch.float64) * 3
    if dense:
        ids, p = None, torch.softmax(t_logits / temp, -1)
    else:
        ids = t_logits.topk(k, -1).indices
        p = torch.softmax(t_logits.gather(1, ids) / temp, -1)
    weights = torch.rand(m, generator=g, dtype=torch.float64)
    rows, pred = projected_distill_loss(
        feat, w, labels, ids, p, temp, alpha, chunk=chunk, matmul_dtype=torch.float64
    )
    ref = reference_loss(feat @ w.T, labels, ids, p, temp, alpha)
    assert torch.allclose(rows, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(pred, (feat @ w.T).argmax(-1))
    (ga,) = torch.autograd.grad((rows * weights).sum(), feat)
    (gb,) = torch.autograd.grad((ref * weights).sum(), feat)
    assert torch.allclose(ga, gb, rtol=1e-9, atol=1e-12)


def test_batch_vocabulary_reindexes_into_the_union():
    from redrafter_trt.train.step import batch_vocabulary

    ids = torch.tensor([[7, 3, 9], [3, 12, 7]])
    labels = torch.tensor([40, 9])
    u, ids_u, labels_u = batch_vocabulary(ids, labels)
    assert u.tolist() == [3, 7, 9, 12, 40]
    assert torch.equal(u[ids_u], ids) and torch.equal(u[labels_u], labels)
    u2, _, none = batch_vocabulary(ids, None)
    assert u2.tolist() == [3, 7, 9, 12] and none is None
    u3, no_ids, labels3 = batch_vocabulary(None, labels)
    assert u3.tolist() == [9, 40] and no_ids is None and torch.equal(u3[labels3], labels)


def test_frozen_projection_path_gives_the_same_loss_and_gradients(
    tiny_base, selfdistill_file, tmp_path
):
    """With a frozen projection the trainer routes the loss through the fused path; in float32 it
    matches the plain path (materialised logits) in loss and in every parameter's gradient."""
    from redrafter_trt.train.head import make_drafter
    from redrafter_trt.train.step import FrozenProjection

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    cfg = _cfg(
        tiny_base,
        [selfdistill_file],
        tmp_path / "o",
        tmp_path,
        exit_dim=h,
        lm_head_init="base",
        freeze_lm_head=True,
        loss="mix",
        alpha=0.6,
        temperature=1.5,
    )
    feats = _features(base, cfg, tiny_base)
    head = make_drafter(cfg, h, v, base.lm_head.weight)
    pos = torch.arange(0, 300)
    no_ac = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    grads, losses = [], []
    for proj in (None, FrozenProjection.of(head, base, cfg, torch.float32)):
        head.zero_grad(set_to_none=True)
        loss, m = forward_loss(UnrolledHead(head), base, feats, pos, cfg, "cpu", no_ac, proj)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad})
        assert int(m["valid"].sum()) > 0
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7), n


@pytest.mark.full
@pytest.mark.parametrize("freeze", [True, False])
def test_batch_vocabulary_training(tiny_base, selfdistill_file, tmp_path, freeze):
    """--kl_vocab batch trains a head (frozen or trainable projection) that drafts better than its
    starting point through the runtime; the trainable projection moves only through the rows the
    batches saw."""
    from redrafter_trt.train.head import make_drafter

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    cfg = _cfg(
        tiny_base,
        [selfdistill_file],
        tmp_path / "bv",
        tmp_path,
        exit_dim=h,
        lm_head_init="base",
        freeze_lm_head=freeze,
        kl_vocab="batch",
        teacher_topk=8,
        max_steps=300,
        warmup_steps=20,
        lr=1e-2,
        loss="mix",
        alpha=0.8,
    )
    start = make_drafter(cfg, h, v, base.lm_head.weight)
    trained = load_drafter(train_drafter(cfg))
    assert torch.equal(trained.lm_head[-1].weight, base.lm_head.weight.float()) == freeze
    tps = _runtime_tokens_per_step(base, {"trained": trained, "start": start})
    assert tps["trained"] > tps["start"] + 0.5, tps


def test_batch_vocabulary_needs_a_teacher_top_k(tiny_base, selfdistill_file, tmp_path):
    with pytest.raises(
        RedrafterError, match="--kl_vocab batch takes its vocabulary from the teacher"
    ):
        train_drafter(
            _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                kl_vocab="batch",
                teacher_topk=0,
            )
        )
    with pytest.raises(RedrafterError, match="--kl_vocab 'sampled'"):
        train_drafter(
            _cfg(tiny_base, [selfdistill_file], tmp_path / "o", tmp_path, kl_vocab="sampled")
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.full
def test_time_budget_is_used_and_respected(tiny_base, selfdistill_file, tmp_path):
    """--time_budget_min fixes the step count from the measured step time (so the cosine schedule
    ends on time): training spends most of the budget and does not overrun it."""
    budget = 4.0
    out = train_drafter(
        _cfg(
            tiny_base,
            [selfdistill_file],
            tmp_path / "tb",
            tmp_path,
            max_steps=10**6,
            time_budget_s=budget,
            warmup_steps=5,
        )
    )
    report = json.loads((out / "training_report.json").read_text())
    spent = report["train_seconds_this_run"]
    assert 0.5 * budget <= spent <= 1.25 * budget + 0.5, spent
    assert 20 <= report["steps"] < 10**6


@pytest.mark.full
def test_train_step_benchmark_runs_every_path(tmp_path, capsys):
    from redrafter_trt.bench.train_step import PATHS, main

    out = tmp_path / "b.json"
    assert (
        main(
            [
                "--vocab",
                "500",
                "--hidden",
                "16",
                "--batch_size",
                "16",
                "--steps",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == [p[0] for p in PATHS]
    assert all(r["positions_per_s"] > 0 and r["speedup_vs_plain"] > 0 for r in rows)
    assert "speed-up over the plain fp32 path" in capsys.readouterr().out


# --------------------------------------------------------------------------- draft vocabulary
def test_restricted_teacher_by_hand():
    """The teacher restricted to the draft vocabulary and renormalised; labels re-indexed."""
    from redrafter_trt.train.step import restrict_to_draft_vocab

    vmap = torch.tensor([7, 2, 5])  # column k is full id vmap[k]
    labels = torch.tensor([5, 3, 2])  # 3 is outside
    t_ids = torch.tensor([[5, 3], [3, 9], [2, 7]])
    t_probs = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.25, 0.75]])
    lab, keep, ids, probs = restrict_to_draft_vocab(vmap, 10, labels, t_ids, t_probs, alpha=1.0)
    assert lab.tolist() == [2, 0, 1]
    assert keep.tolist() == [1.0, 0.0, 1.0]  # row 1: no teacher mass inside K
    assert ids.tolist() == [[2, 0], [0, 0], [1, 0]]
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.25, 0.75]]))
    _, keep_ce, _, _ = restrict_to_draft_vocab(vmap, 10, labels, None, None, alpha=0.0)
    assert keep_ce.tolist() == [1.0, 0.0, 1.0]  # cross-entropy: label 3 cannot be drafted
    dense = torch.softmax(torch.randn(3, 10), -1)
    _, _, none_ids, dense_k = restrict_to_draft_vocab(vmap, 10, labels, None, dense, alpha=0.5)
    assert none_ids is None
    torch.testing.assert_close(dense_k, dense[:, vmap] / dense[:, vmap].sum(-1, keepdim=True))


def test_draft_vocab_training(tiny_base, selfdistill_file, tmp_path):
    """--draft_vocab_size K: the map holds the EOS ids and the most frequent answer tokens, the
    projection is the base's rows of those ids, and the trained head decodes exactly."""
    from redrafter_trt.train.frozen_base import eos_ids
    from redrafter_trt.train.head import choose_draft_vocab

    base = load_frozen_base(tiny_base)
    h, v, k = base.config.hidden_size, base.config.vocab_size, 24
    cfg = _cfg(
        tiny_base,
        [selfdistill_file],
        tmp_path / "dv",
        tmp_path,
        exit_dim=h,
        lm_head_init="base",
        draft_vocab_size=k,
        max_steps=8,
    )
    out = train_drafter(cfg)
    head = load_drafter(out)
    ids = head.vocab_map.tolist()
    assert head.config.draft_vocab_size == k and len(set(ids)) == k and ids == sorted(ids)
    answers = [
        t
        for line in selfdistill_file.read_text().splitlines()
        for t in json.loads(line)["response_ids"]
    ]
    counts = torch.bincount(torch.tensor(answers), minlength=v)
    eos = eos_ids(base, load_base_tokenizer(tiny_base))
    assert set(eos) <= set(ids)
    # every id outside the map is no more frequent than the rarest non-EOS id in it
    inside = [counts[i].item() for i in ids if i not in eos]
    assert max(counts[i].item() for i in range(v) if i not in ids) <= min(inside)
    assert head.lm_head[-1].weight.shape == (k, h)
    # a frequency-chosen map of the base's own text covers most of it
    assert torch.isin(torch.tensor(answers), head.vocab_map.long()).float().mean() > 0.5
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, v, (6,), generator=g).tolist() for _ in range(6)]
    gen = _generator(base, head, 4, 3)
    plain = gen.generate(prompts, max_new_tokens=20, speculative=False)
    spec = gen.generate(prompts, max_new_tokens=20)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert gen.last_stats.tokens_per_step > 1.0
    with pytest.raises(RedrafterError, match=r"--draft_vocab_size 98 must be in \[1, V=97\]"):
        train_drafter(
            _cfg(tiny_base, [selfdistill_file], tmp_path / "big", tmp_path, draft_vocab_size=98)
        )
    assert not (tmp_path / "big").exists()
    feats_like = type(
        "F", (), {"tokens": torch.tensor([4, 4, 9, 1]), "targets": torch.tensor([True] * 4)}
    )
    # EOS 11 first, then 4 (twice), then the tie 1 vs 9 (once each) goes to the lower id
    assert choose_draft_vocab(feats_like, 12, 3, [11]).tolist() == [1, 4, 11]


def test_init_from_with_a_wider_draft_vocab_keeps_the_trained_rows(
    tiny_base, selfdistill_file, tmp_path
):
    """--init_from a head of K ids with --draft_vocab_size K2 > K: the head's ids stay, their
    trained rows and every other weight come along, the new ids start from the base's rows carried
    into the trained rows' space, and the widened head drafts what the old one drafted plus the
    new ids."""
    from redrafter_trt.train.head import with_draft_vocab

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    old_ids = torch.tensor([0, 2, 5, 7, 40, 41, 90], dtype=torch.int32)  # not the frequent ones
    cfg = DrafterConfig(v, h, h, 1, True, draft_vocab_size=len(old_ids))
    old = init_drafter(cfg, seed=4, draft_vocab=old_ids)
    save_drafter(old, tmp_path / "old")
    out = train_drafter(
        _cfg(
            tiny_base,
            [selfdistill_file],
            tmp_path / "wide",
            tmp_path,
            init_from=str(tmp_path / "old"),
            draft_vocab_size=20,
            max_steps=2,
        )
    )
    ids = load_drafter(out).vocab_map.tolist()
    assert len(ids) == 20 and set(old_ids.tolist()) <= set(ids)

    wide_ids = torch.tensor(sorted(set(old_ids.tolist()) | {1, 3, 60}), dtype=torch.int32)
    wide = with_draft_vocab(old, wide_ids, base.lm_head.weight)
    assert wide.vocab_map.tolist() == wide_ids.tolist()
    ctx, state = torch.randn(3, h), torch.randn(3, h)
    with torch.no_grad():
        lo, lw = old.logits(ctx, state), wide.logits(ctx, state)
    col = {t: i for i, t in enumerate(wide_ids.tolist())}
    for j, t in enumerate(old_ids.tolist()):  # an old id: the same logit as before
        torch.testing.assert_close(lw[:, col[t]], lo[:, j])
    for name, p in old.state_dict().items():
        if not name.startswith("lm_head.1.") and name != "draft_vocab":
            torch.testing.assert_close(wide.state_dict()[name], p)
    # a new id's row: the base's row carried by the map from the base's rows to the trained ones.
    # Rows still the base's (an untrained head): the base's row as it is
    base_w = base.lm_head.weight.detach().float()
    with torch.no_grad():
        old.projection.weight.copy_(base_w[old_ids.long()])
    wide = with_draft_vocab(old, wide_ids, base.lm_head.weight)
    for t in (1, 3, 60):
        torch.testing.assert_close(wide.projection.weight[col[t]], base_w[t])
    # rows that training turned into a linear image of the base's: the new rows are that image
    many = torch.arange(0, v, 2, dtype=torch.int32)  # more ids than H, so the map is determined
    assert len(many) > h
    turn = torch.randn(h, h, generator=torch.Generator().manual_seed(5))
    moved = init_drafter(
        DrafterConfig(v, h, h, 1, True, draft_vocab_size=len(many)), 4, draft_vocab=many
    )
    with torch.no_grad():
        moved.projection.weight.copy_(base_w[many.long()] @ turn)
    all_ids = torch.arange(v, dtype=torch.int32)
    got = with_draft_vocab(moved, all_ids, base.lm_head.weight).projection.weight.detach()
    want = base_w[1::2] @ turn
    assert float(torch.nn.functional.cosine_similarity(got[1::2], want, dim=1).min()) > 0.999
    torch.testing.assert_close(got[1::2].norm(dim=1), want.norm(dim=1), rtol=1e-2, atol=1e-3)
    assert not torch.allclose(got[1::2], base_w[1::2], atol=1e-2)
    # --new_rows base: the base's rows as they are
    as_is = with_draft_vocab(moved, all_ids, base.lm_head.weight, mapped=False).projection.weight
    torch.testing.assert_close(as_is.detach()[1::2], base_w[1::2])
    # exit_dim other than H: a new id's row starts at zero
    narrow_exit = init_drafter(
        DrafterConfig(v, h, 2 * h, 1, True, draft_vocab_size=7), 1, draft_vocab=old_ids
    )
    w2 = with_draft_vocab(narrow_exit, wide_ids, base.lm_head.weight)
    w2_rows = w2.projection.weight.detach()
    assert float(w2_rows[col[60]].abs().sum()) == 0.0
    assert float(w2_rows[col[90]].abs().sum()) > 0.0


def test_init_from_with_more_blocks_drafts_the_same_until_trained(
    tiny_base, selfdistill_file, tmp_path, capsys
):
    """--init_from a 1-block head with --num_draft_layers 3: the old blocks and projection are
    kept, the two new blocks are the identity (same logits), they receive gradient, a run trains
    and writes the grown head, and fewer blocks than the head has is a clear error."""
    from redrafter_trt.train.head import with_more_blocks

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    ids = torch.tensor([0, 2, 5, 7, 40, 41, 90], dtype=torch.int32)
    old = init_drafter(
        DrafterConfig(v, h, h, 1, True, draft_vocab_size=len(ids)), 4, draft_vocab=ids
    )
    save_drafter(old, tmp_path / "old")
    grown = with_more_blocks(old, 3, "old")
    assert grown.config.num_draft_layers == 3 and grown.vocab_map.tolist() == ids.tolist()
    ctx, state = torch.randn(3, h), torch.randn(3, h)
    torch.testing.assert_close(grown.logits(ctx, state), old.logits(ctx, state), rtol=0, atol=0)
    torch.testing.assert_close(grown.projection.weight, old.projection.weight)
    torch.testing.assert_close(grown.lm_head[0].linear.weight, old.lm_head[0].linear.weight)
    grown.logits(ctx, state).square().sum().backward()
    for i in (1, 2):
        assert float(grown.lm_head[i].linear.weight.grad.abs().sum()) > 0

    out = train_drafter(
        _cfg(
            tiny_base,
            [selfdistill_file],
            tmp_path / "grown",
            tmp_path,
            init_from=str(tmp_path / "old"),
            num_draft_layers=2,
            max_steps=2,
        )
    )
    trained = load_drafter(out)
    assert trained.config.num_draft_layers == 2
    assert float(trained.lm_head[1].linear.weight.detach().abs().sum()) > 0  # trained from zero

    argv = ["--model_dir", str(tiny_base), "--data", str(selfdistill_file), "--output_dir"]
    argv += [str(tmp_path / "o"), "--max_steps", "2", "--no_progress", "--cache_dir"]
    argv += [str(tmp_path / "cache"), "--init_from", str(tmp_path / "grown")]
    argv[argv.index("--cache_dir") + 1] = str(tmp_path / "cache2")
    assert train_main(argv + ["--num_draft_layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--num_draft_layers 1" in err and "has 2 residual blocks" in err, err
    assert not (tmp_path / "o").exists()
    # refused before any base feature is computed
    assert not (tmp_path / "cache2").exists() or not any((tmp_path / "cache2").rglob("*.*"))


def test_draft_vocab_size_flag_errors(tiny_base, selfdistill_file, tmp_path, capsys):
    argv = [
        "--model_dir",
        str(tiny_base),
        "--data",
        str(selfdistill_file),
        "--output_dir",
        str(tmp_path / "o"),
        "--max_steps",
        "2",
        "--no_progress",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    assert train_main(argv + ["--draft_vocab_size", "0"]) == 2
    assert "--draft_vocab_size must be >= 1, got 0" in capsys.readouterr().err
    assert train_main(argv + ["--draft_vocab_size", "500"]) == 2
    assert "--draft_vocab_size 500 must be in [1, V=97]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_own_path_trains_a_depth_only_where_the_heads_own_draft_reaches_it(
    tiny_base, selfdistill_file, tmp_path
):
    """--own_path: depth 1 is trained as before; depth i > 1 only on positions where the head's
    own top-1 drafts at depths 1..i-1 equal the data."""
    from redrafter_trt.train.head import make_drafter

    base = load_frozen_base(tiny_base)
    h, v = base.config.hidden_size, base.config.vocab_size
    feats = _features(
        base, _cfg(tiny_base, [selfdistill_file], tmp_path / "o", tmp_path), tiny_base
    )
    pos = torch.arange(0, 300)
    no_ac = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    out = {}
    for own in (False, True):
        for weights in ([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]):
            cfg = _cfg(
                tiny_base,
                [selfdistill_file],
                tmp_path / "o",
                tmp_path,
                exit_dim=h,
                depth_weights=weights,
                own_path=own,
            )
            head = make_drafter(cfg, h, v, base.lm_head.weight)
            loss, m = forward_loss(UnrolledHead(head), base, feats, pos, cfg, "cpu", no_ac)
            out[own, weights[0]] = (float(loss.detach()), m)
    assert out[True, 1.0][0] == out[False, 1.0][0]  # depth 1 is always on the head's path
    # depth 2: the mean over the positions whose depth-1 draft was right (a subset)
    m = out[True, 0.0][1]
    right1 = int(m["correct"][0])
    assert 0 < right1 < int(m["valid"][0])
    assert out[True, 0.0][0] != out[False, 0.0][0]
