"""Streaming text never splits a multi-byte character, and stream deltas add up to the final text."""

from __future__ import annotations

import pytest

from redrafter_trt.runtime.detokenize import IncrementalDetokenizer

TEXTS = [
    "Tea is 茶 in Chinese: 绿茶很好喝。",
    "emoji 🍵🫖 and more ☕️!",
    "plain ascii",
    "é à ü ß",
    "中文字符",
]


def _byte_level_tokenizer():
    """A byte-level BPE tokenizer with 256 byte tokens and a few ASCII merges: every non-ASCII
    character is several tokens, as with Llama 3 / Qwen2 / SmolLM2 for most CJK text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the tea is hot and plain ascii text " * 4], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tok():
    return _byte_level_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_deltas_whole_characters_and_sum_to_text(tok, text, chunk):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if any(ord(c) > 127 for c in text):  # the case under test: a character spans tokens
        assert len(ids) > len(text.encode("ascii", "ignore")) + 1
    d = IncrementalDetokenizer(tok)
    deltas = [d.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(d.finish())
    assert all("\ufffd" not in s for s in deltas), deltas
    assert "".join(deltas) == text
    # a naive per-step decode (the bug) does print replacement characters for split characters
    naive = [tok.decode(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    if chunk == 1 and any(len(c.encode()) > 1 for c in text):
        assert any("\ufffd" in s for s in naive)


def test_finish_flushes_a_truly_incomplete_character(tok):
    ids = tok("ok 茶", add_special_tokens=False)["input_ids"][:-1]  # drop the last byte of 茶
    d = IncrementalDetokenizer(tok)
    assert d.push(ids) == "ok "
    assert d.finish() == tok.decode(ids)[len("ok ") :]  # the replacement char, once the row ends
    assert d.finish() == ""


def test_finish_cuts_at_final_text(tok):
    ids = tok("stop. after", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok)
    assert d.finish(ids, final_text="stop.") == "stop."
