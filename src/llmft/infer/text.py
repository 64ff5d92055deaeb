"""Answers as text that never ends in half a character.

An answer cut by max_new_tokens can stop inside a multi-byte UTF-8 character: byte-level BPE (SmolLM2, Qwen,
Llama 3) spends several tokens on one Chinese character, and decoding its first bytes gives U+FFFD ("�"). Such a
tail is not text the model wrote; it is a cut. Evaluate, chat and serve drop it here.

    complete_decode(tokenizer, ids)      # decode, minus the tokens of a trailing partial character
    cleaner = StreamCleaner(); cleaner.feed(piece) ... cleaner.finish()   # the same for streamed pieces
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
MAX_PARTIAL_TOKENS = 3  # a UTF-8 character has at most 4 bytes, so at most 3 of them can dangle


def complete_decode(tokenizer, ids: list[int], **decode_kwargs) -> str:
    """tokenizer.decode(ids) without a trailing partial character (the last tokens that decode to U+FFFD)."""
    text = tokenizer.decode(ids, **decode_kwargs)
    for cut in range(1, min(MAX_PARTIAL_TOKENS, len(ids)) + 1):
        if not text.endswith(REPLACEMENT):
            break
        text = tokenizer.decode(ids[:-cut], **decode_kwargs)
    return text


def strip_partial(text: str) -> str:
    """A decoded answer that hit its token limit, without the U+FFFD its cut left at the end."""
    return text.rstrip(REPLACEMENT)


class StreamCleaner:
    """Streamed pieces of an answer, holding back a trailing U+FFFD until more text shows it was a real character.

    transformers' TextStreamer emits text only up to a space or a CJK character while generating, and the rest when
    generation ends; a character cut by max_new_tokens can only show up in that last piece, which finish() drops.
    """

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, piece: str) -> str:
        text = self.pending + piece
        kept = strip_partial(text)
        self.pending = text[len(kept) :]
        return kept

    def finish(self) -> str:
        self.pending = ""
        return ""
