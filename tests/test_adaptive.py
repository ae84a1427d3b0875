"""Adaptive speculation: the policy's choices, the stored cost model, and exactness of every
shape the policy can pick with the choice changing between steps of one generation."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_generator
from redrafter_trt import contract as C
from redrafter_trt.errors import RedrafterError
from redrafter_trt.runtime.adaptive import (
    COST_MODEL_FILE,
    AdaptivePolicy,
    CostModel,
    load_cost_model,
    machine_fingerprint,
    save_cost_model,
)
from test_speculative import OracleProposer

PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def cost_model(per_token: float, fixed: float = 1.0, draft: float = 0.05) -> CostModel:
    """t(n) = fixed + per_token * n (a CPU-like curve when per_token is large, GPU-like when small)."""
    return CostModel(
        {n: fixed + per_token * n for n in (1, 2, 4, 8, 16, 32, 64, 128)},
        {n: draft * (1 + 0.1 * n) for n in (1, 2, 4, 8, 16, 32, 64)},
        {"num_beams": 4, "draft_len": 3},
        {"cpu": "x"},
    )


class Cycling:
    """Walks through every shape the real policy can pick, one per step (a test input)."""

    def __init__(self, shapes):
        self.shapes, self.i, self.used, self.seen = list(shapes), 0, [], []

    def choose(self, batch_size):
        s = self.shapes[self.i % len(self.shapes)]
        self.i += 1
        self.used.append(s)
        return s

    def observe(self, w, d, accepted):
        assert all(0 <= a <= d for a in accepted), (w, d, accepted)
        self.seen.append((w, d, list(accepted)))


@pytest.mark.parametrize(
    "arch,oracle", [pytest.param("llama", True, marks=pytest.mark.full), ("qwen2", False)]
)
def test_every_shape_the_policy_can_pick_is_exact_with_changing_choice(tiny_dirs, arch, oracle):
    w, d = 4, 3
    plain_gen = tiny_generator(tiny_dirs[arch], w, d)
    plain = [r.token_ids for r in plain_gen.generate(PROMPTS, max_new_tokens=19, speculative=False)]
    proposer = (
        OracleProposer({i: PROMPTS[i] + plain[i] for i in range(4)}, w, d, 97, seed=2)
        if oracle
        else None
    )
    gen = tiny_generator(tiny_dirs[arch], w, d, proposer=proposer)
    shapes = AdaptivePolicy(cost_model(0.1), w, d).candidates()
    assert (1, 0) in shapes and (w, d) in shapes and (1, 1) in shapes
    cyc = Cycling(shapes + shapes[-2:0:-1])  # no shape twice in a row, also when it wraps
    gen.policy = cyc
    spec = gen.generate(PROMPTS, max_new_tokens=19, speculative=True)
    assert [r.token_ids for r in spec] == plain
    assert set(cyc.used) == set(shapes)  # every shape ran, a different one on consecutive steps
    assert all(a != b for a, b in zip(cyc.used, cyc.used[1:]))
    if oracle:  # draft tokens were accepted under shortened shapes too
        assert any(max(acc) >= 2 for (_, dd, acc) in cyc.seen if 2 <= dd < d)


def test_policy_speculates_at_small_batch_and_not_at_large():
    pol = AdaptivePolicy(cost_model(per_token=0.02), 4, 3, prior=[0.8, 0.6, 0.4])
    assert pol.choose(1) != (1, 0)
    assert pol.predicted_speedup(1, *pol.choose(1)) > 1.05
    # t(n) steep in n (a CPU at large batch): any tree costs more than its tokens bring
    assert pol.choose(64) == (1, 0)
    assert all(pol.predicted_speedup(64, *s) < 1 for s in pol.candidates() if s[1])


def test_policy_follows_observed_acceptance():
    pol = AdaptivePolicy(cost_model(per_token=0.01), 4, 3, prior=[0.9, 0.8, 0.7], probe_every=0)
    first = pol.choose(1)
    assert first[1] == 3
    for _ in range(200):  # the head stops accepting anything: plain decoding wins
        pol.observe(*first, [0, 0])
    assert pol.survival[first[0]][0] < 0.01
    for w in pol.beam_choices():  # other beam counts learn too once tried
        for _ in range(200):
            pol.observe(w, 3, [0])
    assert pol.choose(1) == (1, 0)


def test_probe_refreshes_estimate_after_plain_run():
    pol = AdaptivePolicy(cost_model(per_token=1.0), 4, 3, probe_every=5)
    picks = [pol.choose(8) for _ in range(10)]
    assert picks.count((1, 0)) == 8 and sum(1 for p in picks if p[1] > 0) == 2


def test_real_policy_in_the_generator_stays_exact_as_batch_shrinks(tiny_dirs):
    w, d = 4, 3
    gen = tiny_generator(tiny_dirs["llama"], w, d)
    free = gen.generate(PROMPTS, max_new_tokens=15, speculative=False)
    # rows 0-2 stop early at their 3rd token, row 3 (if it never emits those) runs on alone
    eos = sorted({free[i].token_ids[2] for i in range(3)} - set(free[3].token_ids))
    plain = gen.generate(PROMPTS, max_new_tokens=15, speculative=False, eos_token_ids=eos)
    assert sum(len(r.token_ids) < 15 for r in plain) >= 2, "the tiny model's outputs changed"

    class Recording(AdaptivePolicy):
        def choose(self, batch_size):
            self.log.append((batch_size, super().choose(batch_size)))
            return self.log[-1][1]

    pol = Recording(cost_model(per_token=0.2), w, d, prior=[0.9, 0.8, 0.7], probe_every=0)
    pol.log = []
    assert pol.choose(4) == (1, 0) and pol.choose(1) != (1, 0)  # the batch size decides
    pol.log = []
    gen.policy = pol
    spec = gen.generate(PROMPTS, max_new_tokens=15, speculative=True, eos_token_ids=eos)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert pol.log[0] == (4, (1, 0)) and any(c[1] > 0 for b, c in pol.log if b <= 2)


def test_backend_rejects_shapes_beyond_the_engine(tiny_dirs):
    gen = tiny_generator(tiny_dirs["llama"], 2, 2)

    class Bad(Cycling):
        pass

    for bad, msg in (((1, 3), C.NUM_DRAFT_STEPS), ((3, 1), "num_draft_beams")):
        gen.policy = Bad([bad])
        with pytest.raises(ValueError, match=msg):
            gen.generate([[1, 2]], max_new_tokens=3)


def test_cost_model_stored_checked_and_reported(tiny_dirs, tmp_path):
    gen = tiny_generator(tiny_dirs["llama"], 2, 2, dtype=torch.float32)
    be = gen.backend
    assert load_cost_model(tmp_path, be) is None
    cm = cost_model(0.01)
    cm.engine, cm.machine = be.engine_signature(), machine_fingerprint()
    path = save_cost_model(cm, tmp_path)
    assert path.name == COST_MODEL_FILE and not list(tmp_path.glob("*.tmp"))
    back = load_cost_model(tmp_path, be)
    assert back.verify == cm.verify and back.draft == cm.draft
    other = tiny_generator(tiny_dirs["llama"], 3, 2, dtype=torch.float32).backend
    with pytest.raises(RedrafterError, match=rf"{COST_MODEL_FILE}.*num_beams.*--calibrate"):
        load_cost_model(tmp_path, other)
    # a model for another thread count is kept beside this one; each is found for its own
    other_threads = cost_model(0.02)
    other_threads.engine = be.engine_signature()
    other_threads.machine = {**machine_fingerprint(), "threads": 99}
    save_cost_model(other_threads, tmp_path)
    doc = json.loads(path.read_text())
    assert [m["machine"]["threads"] for m in doc["models"]] == [cm.machine["threads"], 99]
    assert load_cost_model(tmp_path, be).verify == cm.verify
    save_cost_model(cm, tmp_path)  # the same machine and engine: replaced, not added
    assert len(json.loads(path.read_text())["models"]) == 2
    doc = json.loads(path.read_text())
    for m in doc["models"]:
        m["machine"]["cpu"] = "another CPU"
    path.write_text(json.dumps(doc))
    with pytest.raises(RedrafterError, match="machine cpu"):
        load_cost_model(tmp_path, be)
    path.write_text("{nope")
    with pytest.raises(RedrafterError, match=f"{COST_MODEL_FILE}: not valid JSON"):
        load_cost_model(tmp_path, be)
    path.write_text(json.dumps({"schema": "redrafter-cost-model/1", "verify": {"1": -1}}))
    with pytest.raises(RedrafterError, match="malformed|positive"):
        load_cost_model(tmp_path, be)


# --------------------------------------------------------------------------- K < V, sampling
def _kv_maps(tiny_dir, plain):
    """Draft vocabularies of K < V ids: the base's most emitted tokens, and none of them."""
    emitted = [t for r in plain for t in r.token_ids]
    counts = torch.bincount(torch.tensor(emitted), minlength=97)
    covering = torch.argsort(counts, descending=True, stable=True)[:6].to(torch.int32)
    missing = torch.tensor([t for t in range(97) if t not in set(emitted)][:12], dtype=torch.int32)
    return {"covering": covering, "missing": missing}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_changing_shapes_with_reduced_draft_vocabulary_greedy_exact(tiny_dirs, arch):
    from test_draft_vocab import generator

    w, d = 3, 3
    plain = generator(tiny_dirs[arch], w, d, None).generate(
        PROMPTS, max_new_tokens=17, speculative=False
    )
    shapes = AdaptivePolicy(cost_model(0.1), w, d).candidates()
    accepted = {}
    for name, ids in _kv_maps(tiny_dirs[arch], plain).items():
        gen = generator(tiny_dirs[arch], w, d, ids)
        cyc = Cycling(shapes + shapes[-2:0:-1])
        gen.policy = cyc
        spec = gen.generate(PROMPTS, max_new_tokens=17, speculative=True)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain], name
        assert set(cyc.used) == set(shapes)
        accepted[name] = sum(sum(a) for (_, _, a) in cyc.seen)
    assert accepted["missing"] == 0  # the head cannot draft what the base emits: acceptance stops
    assert accepted["covering"] > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [None, 20])
def test_changing_shapes_seeded_sampling_same_tokens(tiny_dirs, arch, k):
    from test_draft_vocab import generator

    w, d = 3, 3
    ids = (
        None if k is None else torch.tensor(list(range(0, 97, 5)), dtype=torch.int32)
    )  # K = 20 of 97
    gen = generator(tiny_dirs[arch], w, d, ids, seed=2)
    shapes = AdaptivePolicy(cost_model(0.1), w, d).candidates()
    for seed, (temp, top_k, top_p) in enumerate([(1.0, 0, 1.0), (0.7, 20, 0.9)]):
        kw = dict(max_new_tokens=15, temperature=temp, top_k=top_k, top_p=top_p, seed=seed)
        gen.policy = None
        plain = gen.generate(PROMPTS, speculative=False, **kw)
        fixed = gen.generate(PROMPTS, speculative=True, **kw)
        gen.policy = cyc = Cycling(shapes + shapes[-2:0:-1])
        spec = gen.generate(PROMPTS, speculative=True, **kw)
        assert (
            [s.token_ids for s in spec]
            == [q.token_ids for q in plain]
            == [f.token_ids for f in fixed]
        )
        assert set(cyc.used) == set(shapes)
        if ids is not None:  # sampled tokens outside the draft vocabulary occur
            assert any(t not in ids.tolist() for q in plain for t in q.token_ids)


# --------------------------------------------------------------------------- load(adaptive=...)
@pytest.fixture(scope="module")
def engine_dir(tiny_dirs, tmp_path_factory):
    from redrafter_trt.cli import build, convert

    root = tmp_path_factory.mktemp("adaptive_engine")
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
    return root / "engine"


def test_load_measures_a_cost_model_when_none_matches_and_stores_it(engine_dir):
    """Adaptive by default: no calibration step for the user to know about."""
    import redrafter_trt

    path = engine_dir / COST_MODEL_FILE
    path.unlink(missing_ok=True)
    try:
        gen = redrafter_trt.load(engine_dir)
        assert isinstance(gen.policy, AdaptivePolicy) and (
            gen.policy.max_beams,
            gen.policy.max_draft_steps,
        ) == (2, 3)
        assert "measured now" in gen.policy_note and str(path) in gen.policy_note
        assert "\n" not in gen.policy_note
        stored = load_cost_model(engine_dir, gen.backend)
        assert stored.verify == gen.policy.cost.verify
        # the next load finds it: no second measurement
        gen = redrafter_trt.load(engine_dir, adaptive="on")
        assert gen.policy.cost.verify == stored.verify and gen.policy_note.startswith(
            f"adaptive speculation from {path}"
        )
        assert redrafter_trt.load(engine_dir, adaptive="off").policy is None
        # the policy runs in generate and keeps greedy output exact
        plain = gen.generate(PROMPTS, max_new_tokens=8, speculative=False)
        spec = gen.generate(PROMPTS, max_new_tokens=8, speculative=True)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        # a model measured for another engine or machine: a new one is measured and kept beside
        for key, value in (("engine", ("draft_vocab_size", 40)), ("machine", ("threads", 99))):
            doc = stored.to_json()
            doc[key] = {**doc[key], value[0]: value[1]}
            path.write_text(json.dumps(doc))
            gen = redrafter_trt.load(engine_dir)
            assert isinstance(gen.policy, AdaptivePolicy) and "measured now" in gen.policy_note
            assert f"{key} {value[0]}" not in gen.policy_note or str(path) in gen.policy_note
            models = json.loads(path.read_text())["models"]
            assert len(models) == 2 and models[0][key][value[0]] == value[1]
        with pytest.raises(RedrafterError, match="adaptive mode 'sometimes'"):
            redrafter_trt.load(engine_dir, adaptive="sometimes")
    finally:
        path.unlink(missing_ok=True)


def test_an_engine_dir_this_user_cannot_write_keeps_its_model_in_the_user_cache(
    engine_dir, tmp_path, monkeypatch
):
    import redrafter_trt
    from redrafter_trt.runtime import adaptive

    monkeypatch.setenv(adaptive.CACHE_ENV, str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(
        adaptive.os,
        "access",
        lambda p, mode: (
            False if Path(p) == engine_dir and mode == os.W_OK else real_access(p, mode)
        ),
    )
    gen = redrafter_trt.load(engine_dir)
    user = adaptive.user_cost_model_path(engine_dir)
    assert user.is_file() and str(user) in gen.policy_note
    assert not (engine_dir / COST_MODEL_FILE).exists()
    gen = redrafter_trt.load(engine_dir)
    assert gen.policy_note.startswith(f"adaptive speculation from {user}")


def test_run_cli_adaptive_flag(engine_dir, capsys):
    from redrafter_trt.cli import run

    args = ["--engine_dir", str(engine_dir), "--input_ids_file", None, "--max_output_len", "4"]
    ids = engine_dir.parent / "ids.json"
    ids.write_text(json.dumps([[5, 6, 7]]))
    args[3] = str(ids)
    try:
        assert run.main(args + ["--adaptive", "on"]) == 0
        err = capsys.readouterr().err
        assert "adaptive speculation from" in err and COST_MODEL_FILE in err
        assert run.main(args + ["--adaptive", "off"]) == 0
        assert "adaptive speculation from" not in capsys.readouterr().err
    finally:
        (engine_dir / COST_MODEL_FILE).unlink(missing_ok=True)


def test_serve_scheduler_gets_the_stored_policy(engine_dir):
    from redrafter_trt.cli import serve

    gen = redrafter_trt_load(engine_dir)
    cm = cost_model(0.01)
    cm.engine, cm.machine = gen.backend.engine_signature(), machine_fingerprint()
    save_cost_model(cm, engine_dir)
    try:
        argv = ["--engine_dir", str(engine_dir)]
        state, _ = serve.make_state(serve.build_parser().parse_args(argv))
        assert isinstance(state.scheduler.policy, AdaptivePolicy)
        state, _ = serve.make_state(serve.build_parser().parse_args(argv + ["--adaptive", "off"]))
        assert state.scheduler.policy is None
    finally:
        (engine_dir / COST_MODEL_FILE).unlink(missing_ok=True)


def redrafter_trt_load(path, **kw):
    import redrafter_trt

    return redrafter_trt.load(path, **kw)


# --------------------------------------------------------------------------- a measured cost model
#: `redrafter-bench --calibrate` on SmolLM2-135M-Instruct + the shipped head's engine (W=4, D=4,
#: float32, torch linears), AMD EPYC VM, 1 thread, load average 8.0-8.3, 2026-12-02 (seconds).
SMOLLM2_EPYC_VERIFY = {
    1: 0.7111,
    2: 1.0216,
    4: 1.3011,
    8: 1.4780,
    17: 1.6698,
    33: 1.9583,
    65: 2.9550,
}
SMOLLM2_EPYC_DRAFT = {
    1: 0.0715,
    2: 0.1787,
    4: 0.1980,
    8: 0.2733,
    16: 0.3991,
    32: 0.6962,
    64: 0.9891,
}
#: P(accepted >= j) of the shipped head on the 80 MT-Bench first turns (docs/results.md, 2026-12-02:
#: 5,813 steps adding 1/2/3/4/5 tokens 3619/1325/467/199/203 times, 1.63 tokens/step)
SHIPPED_HEAD_ACCEPTANCE = [2194 / 5813, 869 / 5813, 402 / 5813, 203 / 5813]


def test_measured_cost_model_picks_plain_where_drafting_does_not_pay():
    cm = CostModel(SMOLLM2_EPYC_VERIFY, SMOLLM2_EPYC_DRAFT, {}, {})
    shipped = AdaptivePolicy(cm, 4, 4, prior=SHIPPED_HEAD_ACCEPTANCE, probe_every=0)
    for b in (1, 2, 4, 8, 16):  # the shipped head never pays on this machine: plain at every batch
        assert shipped.choose(b) == (1, 0)
        assert shipped.best(b)[1] < 1.0
    perfect = AdaptivePolicy(cm, 4, 4, prior=[0.99] * 4, probe_every=0)
    for b in (1, 4, 16):  # a head that is nearly always right pays even here: it drafts
        assert perfect.choose(b)[1] > 0 and perfect.best(b)[1] > 1.05
    # and the full 4x4 tree, 8x a plain step at batch 16, is not what it drafts there
    assert cm.step_cost(16, 4, 4) / cm.t(16) > 8 and perfect.choose(16) != (4, 4)
