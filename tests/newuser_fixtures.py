"""A tiny base model with a real (word-level) tokenizer and chat template, for the command-line
tests that need text: prompt files, chat conversations, streamed text blocks, gen-prompts."""

from __future__ import annotations

from pathlib import Path

from conftest import VOCAB, write_tiny_hf

SPECIALS = ["<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [
    f"{a}{b}"
    for a in ("ta", "ke", "mo", "ri", "su", "no", "ha", "yu", "ko", "pe", "wa")
    for b in ("n", "l", "r", "s", "m", "t", "d", "k", "p")
][: VOCAB - len(SPECIALS)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def write_text_model(path: Path, seed: int = 11, arch: str = "llama") -> Path:
    """A tiny Llama (or ``arch="qwen2"``: Qwen2) with a 97-token word-level tokenizer (words joined
    by spaces, ``<|end|>`` the end of a turn) and a chat template, saved as a Hugging Face
    directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == VOCAB
    end = vocab["<|end|>"]
    write_tiny_hf(path, arch, seed=seed, eos_token_id=end)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIALS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return path
