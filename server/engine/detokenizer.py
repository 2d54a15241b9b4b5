"""Incremental detokenization with stop strings.

Decoding the whole completion each step and emitting the new suffix is what keeps
multi-byte characters intact; a trailing U+FFFD means an incomplete character, so it
is held back until the next token completes it."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.emitted = ""  # text already sent to the client
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def add(self, token_id: int, final: bool = False) -> str:
        """Append a token; return the text to emit now (may be empty)."""
        self.token_ids.append(token_id)
        return self._advance(final)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self._text()
        if self.stop:
            # earliest stop string in the full text wins; search from a little before
            # the emitted part so a stop string spanning two tokens is found
            hits = [(i, s) for s in self.stop if (i := text.find(s, max(0, len(self.emitted) - len(s)))) >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                self.stopped = True
                delta = text[len(self.emitted) : cut] if cut > len(self.emitted) else ""
                self.emitted += delta
                return delta
        if not final:
            if text.endswith("\ufffd"):
                return ""
            # hold back a tail that could still become a stop string
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[: len(text) - hold] if hold else text
        if len(text) <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta
