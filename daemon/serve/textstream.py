"""Token ids in, text out as it grows: whole characters only, and never a piece of a stop string.

    ts = TextStream(tokenizer, stops=("\\n\\n",))
    delta = ts.push(token_id)        # the new text safe to send now ("" while a character or a stop may be half-made)
    ts.stopped                       # True once a stop string appeared: the text ends before it
    rest = ts.finish()               # what was held back, at the end

Decoding the whole answer each time (not token by token) keeps what a tokenizer merges across tokens (byte-level
BPE, SentencePiece's leading spaces) exactly as `tokenizer.decode` gives it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what decode gives for a UTF-8 sequence the next token completes


class TextStream:
    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # the answer so far (up to a stop, once stopped)
        self.sent = 0  # characters of self.text already given out
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Text already sent never holds a stop's start: the last len(longest stop) - 1 characters are held back.
        found = [at for stop in self.stops if (at := text.find(stop, self.sent)) >= 0]
        if found:
            text = text[:min(found)]
            self.stopped = True
        self.text = text
        if self.stopped:
            return self._take(len(self.text))
        safe = len(text) - self._hold
        while safe > self.sent and text[safe - 1] == REPLACEMENT:  # half a character: wait for the rest
            safe -= 1
        return self._take(safe)

    def finish(self) -> str:
        """The held-back tail (a replacement character left at the very end stays: the model ended there)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
