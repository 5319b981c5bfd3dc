"""Token ids → text pieces as they are generated, with stop strings cut exactly.

Two rules make streamed text equal the non-streamed text: a piece is released only when it
ends on a whole character (byte-level BPE splits UTF-8 across tokens), and text that might
be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decode one token at a time (the prefix/read offsets method of TGI and vLLM).

    Args:
        tokenizer: a transformers tokenizer.
        context: the last few prompt ids; decoding against them keeps tokenizers that drop a
            leading space at the start of a string (SentencePiece) from losing it.
        skip_special_tokens: leave special tokens (chat markers, placeholders) out of the text.
    """

    def __init__(self, tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(context)[-4:]
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly complete text (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class TextAssembler:
    """Accumulates generated text, stops at the first stop string, never releases part of one.

    Args:
        decoder: the incremental decoder of this choice.
        stop: stop strings; the text ends right before the first one found (it is not included).
    """

    def __init__(self, decoder: IncrementalDecoder, stop: Sequence[str] = ()) -> None:
        self.decoder = decoder
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token → (text now safe to release, whether a stop string was hit)."""
        return self._advance(self.decoder.push(token_id))

    def finish(self) -> str:
        """End of generation (EOS or length): release everything still held."""
        piece, stopped = self._advance(self.decoder.flush())
        if not stopped:
            piece += self.text[self.sent :]
            self.sent = len(self.text)
        return piece

    def _advance(self, piece: str) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.longest + 1)  # a new match must end inside the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, True
        safe = len(self.text) - self._held()
        out = self.text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return out, False

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
