"""Tensor parallelism end to end on CPU: a tp_size 2 engine runs on 2 real ranks (gloo), gives the
tp_size 1 tokens, speculates exactly, refuses disagreeing rank files before any rank starts, and
ends cleanly when a rank is SIGKILLed.

Tolerance: tp_size 2 sums the row-parallel products in another order than tp_size 1 (an
all-reduce of two partial sums), so float32 logits differ by rounding only; on these models the
difference is below ``LOGITS_ATOL`` = 1e-4 (logits of magnitude ~3), and greedy tokens, drafts
and accepted counts are equal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_hf
from redrafter_trt import load
from redrafter_trt.backends.tp import (
    check_rank_files,
    prompt_logits,
    rank_bytes_per_step,
    read_config_dict,
)
from redrafter_trt.errors import RedrafterError
from redrafter_trt.formats.checkpoint import (
    convert_checkpoint,
    load_checkpoint_models,
    rank_file,
    read_checkpoint_config,
)
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime.engine import build_engine

REPO = Path(__file__).resolve().parents[1]
LOGITS_ATOL = 1e-4
W, D, EXIT = 3, 3, 48  # exit_dim 48 != 2H: input_proj is present (and sharded)
PROMPTS = [[5, 17, 33, 2, 61], [40, 41, 42], [9, 8, 7, 6, 5, 4, 3]]


def fit_drafter(cfg, sd, prompts, steps=300):
    """A draft head fitted to the tiny base's own greedy continuations (teacher forcing), so
    that speculation accepts drafts and the sharded draft head is exercised for real."""
    from redrafter_trt.models.base import BaseModel

    base = BaseModel(cfg)
    base.load_state_dict(sd)
    base.eval()
    seqs = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(40):
                t = len(ids)
                cache = base.new_cache(1, t)
                x = torch.tensor([ids])
                causal = torch.ones(t, t, dtype=torch.bool).tril()[None]
                h = base(x, torch.arange(t)[None], cache, torch.zeros(1), torch.zeros(1), causal)
                ids.append(int(base.logits(h[0, -1]).argmax()))
            cache = base.new_cache(1, len(ids))
            t = len(ids)
            causal = torch.ones(t, t, dtype=torch.bool).tril()[None]
            hid = base(
                torch.tensor([ids]),
                torch.arange(t)[None],
                cache,
                torch.zeros(1),
                torch.zeros(1),
                causal,
            )[0]
            seqs.append((torch.tensor(ids), hid))
    dcfg = DrafterConfig(cfg.vocab_size, cfg.hidden_size, EXIT, 1, True)
    drafter = init_drafter(dcfg, seed=1, std=0.2)
    emb = base.embedding.weight.detach()
    opt = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = 0.0
        for ids, hid in seqs:
            n = len(ids) - D - 1
            ctx = hid[:n]  # context at position t; g0 = ids[t+1]
            state = torch.zeros_like(ctx)
            for d in range(1, D + 1):
                state = drafter.update_state(state, emb[ids[d : n + d]])
                logits = drafter.logits(ctx, state)
                loss = loss + torch.nn.functional.cross_entropy(logits, ids[d + 1 : n + d + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """{arch: {tp: engine_dir}} for tp 1 and 2, plus the checkpoints."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for i, arch in enumerate(("llama", "qwen2")):
        cfg, sd = load_hf_base(write_tiny_hf(root / f"hf_{arch}", arch, seed=21 + i))
        drafter = fit_drafter(cfg, sd, PROMPTS)
        out[arch] = {}
        for tp in (1, 2):
            ckpt = convert_checkpoint(
                cfg, sd, drafter, root / f"ckpt_{arch}{tp}", num_beams=W, draft_len=D, tp_size=tp
            )
            out[arch][tp] = build_engine(
                ckpt,
                root / f"engine_{arch}{tp}",
                backend="torch",
                max_batch_size=4,
                max_input_len=64,
                max_seq_len=1024,
            )
            out[arch][f"ckpt{tp}"] = ckpt
    return out


def child_pids(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(d.name))
    return kids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_equals_tp1_and_speculates_exactly(engines, arch):
    g1 = load(engines[arch][1], device="cpu", adaptive="off")  # tp > 1 runs the fixed shape
    want = g1.generate(PROMPTS, max_new_tokens=24)
    want_plain = g1.generate(PROMPTS, max_new_tokens=24, speculative=False)
    assert [r.token_ids for r in want] == [r.token_ids for r in want_plain]
    with load(engines[arch][2], device="cpu") as g2:
        assert (
            g2.backend.tp_size == 2 and g2.backend.local.base.lm_head.weight.shape[0] == 49
        )  # 97 -> 98/2
        spec = g2.generate(PROMPTS, max_new_tokens=24)
        plain = g2.generate(PROMPTS, max_new_tokens=24, speculative=False)
        # greedy: the tp_size 1 tokens; speculative == plain exactly; the same drafts accepted
        assert [r.token_ids for r in spec] == [r.token_ids for r in want]
        assert [r.token_ids for r in plain] == [r.token_ids for r in want]
        assert [r.accepted_per_step for r in spec] == [r.accepted_per_step for r in want]
        assert g2.last_stats.tokens_per_step == 1.0  # (plain)
        assert max(max(r.accepted_per_step) for r in spec) > 1  # the sharded head's drafts accepted
        # logits within the stated tolerance
        ids = torch.tensor([PROMPTS[2]])
        got = g2.backend.prompt_logits(ids)
        ref = prompt_logits(g1.backend.base, ids)
        assert got.shape == ref.shape == (1, 7, 97)
        assert (got - ref).abs().max().item() < LOGITS_ATOL
        # seeded sampling: the same tokens with and without speculation, and as tp_size 1
        kw = dict(max_new_tokens=20, temperature=0.9, top_k=20, seed=7)
        s_spec = g2.generate(PROMPTS, **kw)
        s_plain = g2.generate(PROMPTS, speculative=False, **kw)
        s_ref = g1.generate(PROMPTS, **kw)
        assert [r.token_ids for r in s_spec] == [r.token_ids for r in s_plain]
        assert [r.token_ids for r in s_spec] == [r.token_ids for r in s_ref]
        ranks = child_pids(os.getpid())
        assert len(ranks) == 1  # rank 1
    # close() stopped rank 1 and reaped it
    assert not any(alive(p) for p in ranks)


def test_bytes_per_rank_halve(engines):
    cfg = read_checkpoint_config(engines["llama"]["ckpt2"])
    one, two = rank_bytes_per_step(cfg, 1, 4), rank_bytes_per_step(cfg, 2, 4)
    # every linear is split in two; the lm_head over the padded vocabulary (98 rows)
    assert two["base_weight_bytes"] == 4 * (
        2 * (32 * 8 * 8 // 2 + 32 * 32 // 2 + 3 * 32 * 32) + 32 * 49
    )
    assert one["base_weight_bytes"] == 4 * (2 * (32 * 8 * 8 + 32 * 32 + 3 * 32 * 64) + 32 * 97)
    assert (
        two["all_reduce_bytes_per_token"] == 4 * 2 * 2 * 32
        and one["all_reduce_bytes_per_token"] == 0
    )


def _no_ranks_started():
    assert child_pids(os.getpid()) == []


def test_disagreeing_rank_files_fail_before_any_rank_starts(engines, tmp_path):
    e2, e1 = engines["llama"][2], engines["llama"][1]
    with pytest.raises(RedrafterError, match=r"--tp_size 4: .* tp_size 2"):
        load(e2, device="cpu", tp_size=4)
    with pytest.raises(RedrafterError, match=r"--tp_size 2: .* tp_size 1"):
        load(e1, device="cpu", tp_size=2)
    _no_ranks_started()

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(e2, dst)
        return dst

    missing = copy("missing")
    (missing / rank_file(1)).unlink()
    with pytest.raises(RedrafterError, match=rf"{missing}: missing rank1.safetensors"):
        load(missing, device="cpu")
    extra = copy("extra")
    shutil.copy(extra / rank_file(1), extra / rank_file(2))
    with pytest.raises(RedrafterError, match="rank2.safetensors beyond its tp_size 2"):
        load(extra, device="cpu")
    swapped = copy("swapped")
    (swapped / rank_file(0)).unlink()
    shutil.copy(swapped / rank_file(1), swapped / rank_file(0))
    with pytest.raises(RedrafterError, match="holds rank 1 of tp_size 2, expected rank 0"):
        load(swapped, device="cpu")
    # a rank file of a conversion with another config (here: other beam count)
    cfg, sd = load_hf_base(write_tiny_hf(tmp_path / "hf", "llama", seed=21))
    other = convert_checkpoint(
        cfg,
        sd,
        init_drafter(DrafterConfig(97, 32, EXIT, 1, True)),
        tmp_path / "other",
        num_beams=2,
        draft_len=D,
        tp_size=2,
    )
    mixed = copy("mixed")
    shutil.copy(other / rank_file(1), mixed / rank_file(1))
    with pytest.raises(RedrafterError, match=r"rank1.safetensors: written with a different config"):
        load(mixed, device="cpu")
    # a config whose tp_size does not divide the heads
    bad = copy("bad")
    raw = json.loads((bad / "config.json").read_text())
    raw["pretrained_config"]["mapping"] = {"world_size": 3, "tp_size": 3, "pp_size": 1}
    (bad / "config.json").write_text(json.dumps(raw))
    shutil.copy(bad / rank_file(1), bad / rank_file(2))
    with pytest.raises(
        RedrafterError, match="--tp_size 3 does not divide the num_attention_heads 4"
    ):
        load(bad, device="cpu")
    # a rank file with the wrong shapes (another model)
    wrong = copy("wrong")
    shutil.copy(engines["llama"][1] / rank_file(0), wrong / rank_file(1))
    with pytest.raises(RedrafterError, match="rank1.safetensors: .*rank 1 of tp_size 2"):
        check_rank_files(wrong, read_checkpoint_config(engines["llama"]["ckpt2"]), None)
    _no_ranks_started()
    # building an engine from a bad checkpoint writes nothing
    bad_ckpt = tmp_path / "bad_ckpt"
    shutil.copytree(engines["llama"]["ckpt2"], bad_ckpt)
    (bad_ckpt / rank_file(1)).unlink()
    with pytest.raises(RedrafterError, match="missing rank1.safetensors"):
        build_engine(
            bad_ckpt,
            tmp_path / "never",
            backend="torch",
            max_batch_size=1,
            max_input_len=8,
            max_seq_len=32,
        )
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # the tp_size 1 loader names the way to run a tp_size 2 checkpoint
    with pytest.raises(RedrafterError, match="redrafter-run --tp_size 2"):
        load_checkpoint_models(engines["llama"]["ckpt2"])
    assert read_config_dict(e2)["mapping"]["tp_size"] == 2


def _run_cli(engine, ids_file, *extra, env=None, **popen):
    cmd = [
        sys.executable,
        "-m",
        "redrafter_trt.cli.run",
        "--engine_dir",
        str(engine),
        "--input_ids_file",
        str(ids_file),
        "--no_progress",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def _env(tmp):
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_cli_tp2_matches_tp1(engines, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(PROMPTS))
    env = _env(tmp_path / "tmp")
    outs = {}
    for tp in (1, 2):
        p = _run_cli(
            engines["qwen2"][tp],
            ids,
            "--json",
            "--max_output_len",
            "16",
            *(["--tp_size", "2"] if tp == 2 else []),
            env=env,
        )
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs[tp] = [o["output_token_ids"] for o in json.loads(out)["outputs"]]
    assert outs[2] == outs[1]
    # under torchrun: both ranks run the command, rank 0 prints, rank 1 follows and exits 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "redrafter_trt.cli.run",
        "--engine_dir",
        str(engines["qwen2"][2]),
        "--input_ids_file",
        str(ids),
        "--no_progress",
        "--json",
        "--max_output_len",
        "16",
    ]
    # (torchrun's own torchelastic_* temp dir goes to its own TMPDIR)
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(tmp_path / "tmp_torchrun"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err
    assert [o["output_token_ids"] for o in json.loads(out)["outputs"]] == outs[1]
    assert "terminate called" not in err
    p = _run_cli(engines["qwen2"][1], ids, "--tp_size", "2", env=env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "--tp_size 2:" in err and "Traceback" not in err
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("victim", ["follower", "rank0"])
def test_sigkill_one_rank_ends_the_others(engines, tmp_path, victim):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 17, 33]]))
    tmp = tmp_path / "tmp"
    p = _run_cli(
        engines["llama"][2],
        ids,
        "--streaming",
        "--json",
        "--max_output_len",
        "1000",
        "--no_speculation",
        env=_env(tmp),
    )
    try:
        first = p.stdout.readline()  # the run is under way
        assert json.loads(first)["token_ids"], first
        kids = child_pids(p.pid)
        assert len(kids) == 1
        (rank1,) = kids
        target = rank1 if victim == "follower" else p.pid
        os.kill(target, signal.SIGKILL)
        t0 = time.monotonic()
        survivor = p.pid if victim == "follower" else rank1
        while alive(survivor) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert not alive(survivor), f"survivor still running after {took:.1f} s"
        assert took < 10, f"{victim} killed: the survivor took {took:.1f} s to end"
        _, err = p.communicate(timeout=10)
        if victim == "follower":
            assert p.returncode == 2
            assert "rank 1" in err and "SIGKILL" in err and "Traceback" not in err
        else:
            assert "rank 1" in err and f"rank 0 (pid {p.pid}) is gone" in err
        assert not alive(rank1) and not alive(p.pid)
        assert list(tmp.iterdir()) == []
    finally:
        for pid in [p.pid, *child_pids(p.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def test_hung_rank_times_out_naming_it(engines, tmp_path):
    """A rank that stops answering (SIGSTOP) ends the run after --tp_timeout with a message
    naming it, and is reaped."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 17, 33]]))
    p = _run_cli(
        engines["llama"][2],
        ids,
        "--streaming",
        "--json",
        "--max_output_len",
        "1000",
        "--no_speculation",
        "--tp_timeout",
        "3",
        env=_env(tmp_path / "tmp"),
    )
    try:
        assert json.loads(p.stdout.readline())["token_ids"]
        (rank1,) = child_pids(p.pid)
        os.kill(rank1, signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=30)
        assert time.monotonic() - t0 < 20
        assert p.returncode == 2, err
        assert "rank 1 (last finished command" in err and "Traceback" not in err
        assert not alive(rank1)
    finally:
        for pid in [p.pid, *child_pids(p.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def test_trtllm_tp_engine_says_how_to_start_it(engines, tmp_path, monkeypatch):
    """A tp_size 2 TensorRT-LLM engine runs on MPI ranks (GPU only): outside mpirun, a missing
    rank engine or another rank count is a clear error naming the fix, before anything loads."""
    for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(k, raising=False)
    eng = tmp_path / "trt"
    eng.mkdir()
    raw = json.loads((engines["llama"][2] / "config.json").read_text())
    raw["backend"] = "trtllm"
    (eng / "config.json").write_text(json.dumps(raw))
    (eng / "rank0.engine").write_bytes(b"")
    with pytest.raises(RedrafterError, match=r"missing rank1.engine \(tp_size 2\)"):
        load(eng, device="cpu")
    (eng / "rank1.engine").write_bytes(b"")
    with pytest.raises(RedrafterError, match=r"--tp_size 4: .* built for tp_size 2"):
        load(eng, device="cpu", tp_size=4)
    with pytest.raises(RedrafterError, match=r"mpirun -n 2 redrafter-run --engine_dir"):
        load(eng, device="cpu")


@pytest.mark.smollm2
def test_smollm2_tp3_equals_tp1_on_chat_prompts(tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads: tp_size 2 does not divide it, 3 does) with its shipped
    draft head: tp_size 3 on 3 ranks gives the tp_size 1 greedy tokens on chat prompts,
    speculative equals plain, and the logits agree within 1e-3 (30 layers of float32)."""
    from redrafter_trt.heads import builtin_head
    from redrafter_trt.models.drafter import load_drafter
    from redrafter_trt.models.hub import ensure_smollm2

    model_dir = ensure_smollm2()
    cfg, sd = load_hf_base(model_dir)
    drafter = load_drafter(builtin_head("smollm2"), base_lm_head=sd["lm_head.weight"])
    with pytest.raises(
        RedrafterError, match="--tp_size 2 does not divide the num_attention_heads 9"
    ):
        convert_checkpoint(cfg, sd, drafter, tmp_path / "tp2", tp_size=2)
    eng = {}
    for tp in (1, 3):
        ckpt = convert_checkpoint(
            cfg,
            sd,
            drafter,
            tmp_path / f"ckpt{tp}",
            num_beams=4,
            draft_len=4,
            tp_size=tp,
            tokenizer_dir=model_dir,
        )
        eng[tp] = build_engine(
            ckpt,
            tmp_path / f"engine{tp}",
            backend="torch",
            max_batch_size=4,
            max_input_len=256,
            max_seq_len=512,
        )
    chat = ["What is the capital of France?", "Give me three tips for writing clean code."]
    g1 = load(eng[1], device="cpu", adaptive="off")  # tp > 1 runs the fixed shape
    want = g1.generate(chat, max_new_tokens=24, use_chat_template=True)
    with load(eng[3], device="cpu") as g3:
        spec = g3.generate(chat, max_new_tokens=24, use_chat_template=True)
        plain = g3.generate(chat, max_new_tokens=24, use_chat_template=True, speculative=False)
        ids = torch.tensor([g1.encode(chat[0], True)])
        diff = (g3.backend.prompt_logits(ids) - prompt_logits(g1.backend.base, ids)).abs().max()
    assert [r.token_ids for r in spec] == [r.token_ids for r in want]
    assert [r.token_ids for r in plain] == [r.token_ids for r in want]
    assert [r.accepted_per_step for r in spec] == [r.accepted_per_step for r in want]
    assert max(max(r.accepted_per_step) for r in spec) > 1
    assert diff.item() < 1e-3, diff


@pytest.mark.full
def test_tp4_shares_kv_heads_and_equals_tp1(tmp_path):
    """tp_size 4 on the tiny Llama (2 KV heads): ranks 0,1 hold KV head 0 and ranks 2,3 KV head
    1 (TensorRT-LLM's replication), 4 real ranks give the tp_size 1 tokens."""
    cfg, sd = load_hf_base(write_tiny_hf(tmp_path / "hf", "llama", seed=21))
    drafter = fit_drafter(cfg, sd, PROMPTS, steps=100)
    eng = {}
    for tp in (1, 4):
        ckpt = convert_checkpoint(
            cfg, sd, drafter, tmp_path / f"ckpt{tp}", num_beams=W, draft_len=D, tp_size=tp
        )
        eng[tp] = build_engine(
            ckpt,
            tmp_path / f"e{tp}",
            backend="torch",
            max_batch_size=4,
            max_input_len=64,
            max_seq_len=256,
        )
    g1 = load(eng[1], device="cpu", adaptive="off")  # tp > 1 runs the fixed shape
    want = g1.generate(PROMPTS, max_new_tokens=16)
    with load(eng[4], device="cpu") as g4:
        assert g4.backend.local.base.config.num_key_value_heads == 1
        got = g4.generate(PROMPTS, max_new_tokens=16)
        ids = torch.tensor([PROMPTS[0]])
        diff = (g4.backend.prompt_logits(ids) - prompt_logits(g1.backend.base, ids)).abs().max()
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.accepted_per_step for r in got] == [r.accepted_per_step for r in want]
    assert diff.item() < LOGITS_ATOL
