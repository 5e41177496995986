"""Turning a stream of token ids into a stream of text, one delta at a time.

Decoding each token alone is wrong twice over: a multi-byte character (an emoji, most CJK)
can span several byte-level tokens, and sentencepiece-style tokenizers decide spaces from
the previous token. So each step decodes a small window ending at the new token and emits
only what the window added past the text already emitted (the method of TGI and vLLM);
while the window ends in an incomplete character (U+FFFD), nothing is emitted yet.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: one token of context before the unread ones
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; returns the new text it completes ("" while a character is partial)."""
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(emitted) and not window.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return window[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of a generation), even if incomplete."""
        emitted = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return window[len(emitted) :] if len(window) > len(emitted) else ""
