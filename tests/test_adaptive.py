"""Adaptive speculation: the policy's choices, the stored cost model, and exactness of every
shape the policy can pick with the choice changing between steps of one generation."""

import json

import pytest
import torch

from conftest import tiny_generator
from redrafter_trt import contract as C
from redrafter_trt.errors import RedrafterError
from redrafter_trt.runtime.adaptive import (COST_MODEL_FILE, AdaptivePolicy, CostModel,
                                            engine_signature, load_cost_model, machine_fingerprint,
                                            save_cost_model)
from test_speculative import OracleProposer

PROMPTS = [[5, 6, 7, 8, 9], [11, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def cost_model(per_token: float, fixed: float = 1.0, draft: float = 0.05) -> CostModel:
    """t(n) = fixed + per_token * n (a CPU-like curve when per_token is large, GPU-like when small)."""
    return CostModel({n: fixed + per_token * n for n in (1, 2, 4, 8, 16, 32, 64, 128)},
                     {n: draft * (1 + 0.1 * n) for n in (1, 2, 4, 8, 16, 32, 64)},
                     {"num_beams": 4, "draft_len": 3}, {"cpu": "x"})


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


@pytest.mark.parametrize("arch,oracle", [pytest.param("llama", True, marks=pytest.mark.full), ("qwen2", False)])
def test_every_shape_the_policy_can_pick_is_exact_with_changing_choice(tiny_dirs, arch, oracle):
    w, d = 4, 3
    plain_gen = tiny_generator(tiny_dirs[arch], w, d)
    plain = [r.token_ids for r in plain_gen.generate(PROMPTS, max_new_tokens=19, speculative=False)]
    proposer = OracleProposer({i: PROMPTS[i] + plain[i] for i in range(4)}, w, d, 97, seed=2) if oracle else None
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
    cm.engine, cm.machine = engine_signature(be), machine_fingerprint()
    path = save_cost_model(cm, tmp_path)
    assert path.name == COST_MODEL_FILE and not list(tmp_path.glob("*.tmp"))
    back = load_cost_model(tmp_path, be)
    assert back.verify == cm.verify and back.draft == cm.draft
    other = tiny_generator(tiny_dirs["llama"], 3, 2, dtype=torch.float32).backend
    with pytest.raises(RedrafterError, match=rf"{COST_MODEL_FILE}.*num_beams.*--calibrate"):
        load_cost_model(tmp_path, other)
    doc = json.loads(path.read_text())
    doc["machine"]["cpu"] = "another CPU"
    path.write_text(json.dumps(doc))
    with pytest.raises(RedrafterError, match="machine cpu"):
        load_cost_model(tmp_path, be)
    path.write_text("{nope")
    with pytest.raises(RedrafterError, match=f"{COST_MODEL_FILE}: not valid JSON"):
        load_cost_model(tmp_path, be)
    path.write_text(json.dumps({"schema": "redrafter-cost-model/1", "verify": {"1": -1}}))
    with pytest.raises(RedrafterError, match="malformed|positive"):
        load_cost_model(tmp_path, be)
