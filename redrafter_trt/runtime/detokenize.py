"""Incremental detokenization: text deltas of a growing token sequence that never split a character.

Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2) spread one multi-byte UTF-8 character over
several tokens; decoding each step's tokens on their own prints U+FFFD replacement characters.
:class:`IncrementalDetokenizer` decodes the whole sequence so far and holds back a tail that ends
in an incomplete character (U+FFFD at the end of the decoded text) until the next token completes
it. Concatenating every delta plus :meth:`IncrementalDetokenizer.finish` gives exactly
``tokenizer.decode(all_ids, skip_special_tokens=True)`` (or the text cut at a stop string).

Example (SmolLM2's tokenizer writes the tea emoji as three tokens)::

    d = IncrementalDetokenizer(tok)
    d.push([ids[0]])   # -> ""      (first bytes of the emoji: held back)
    d.push(ids[1:3])   # -> "🍵"    (the character is complete)
    d.finish()         # -> ""      (nothing left)

The concatenation of all deltas and ``finish`` equals the row's final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one row.

    ``tokenizer`` is anything with ``decode(ids, skip_special_tokens=...)`` (a Hugging Face
    tokenizer). Each :meth:`push` decodes the sequence so far once; the held-back tail is at most
    the bytes of one character, so the cost per step is one decode of the row's tokens.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""  # text handed out so far: always a prefix of the decoded text

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
        """Add ``new_ids``; return the text they complete (possibly ``""``)."""
        self.ids.extend(int(t) for t in new_ids)
        text = self._decode()
        stable = text.rstrip(REPLACEMENT)  # an incomplete character decodes as trailing U+FFFD
        return self._advance(stable)

    def finish(self, new_ids: Sequence[int] = (), final_text: str | None = None) -> str:
        """Add the row's last ``new_ids`` and return the rest of its text: everything still held
        back (a real U+FFFD included), or up to ``final_text`` (the row's text cut at a stop
        string, so nothing past the stop is ever handed out)."""
        self.ids.extend(int(t) for t in new_ids)
        return self._advance(self._decode() if final_text is None else final_text)

    def _advance(self, upto: str) -> str:
        # Never retract what was printed: if a tokenizer's decoding of a prefix changed with later
        # tokens (byte-level BPE does not), what lies beyond the printed length is handed out.
        delta = upto[len(self.emitted) :]
        self.emitted += delta
        return delta
