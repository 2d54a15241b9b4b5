"""Incremental detokenization with stop strings, at a cost per token that does not grow with the output.

vLLM's offsets scheme (`detokenize_incrementally`): each token is turned into its token string once, and
only a short window of the latest ones is decoded at each step -- from `_prefix` (tokens whose text was
already emitted, kept as context: a decoder may treat a first token differently, e.g. SentencePiece's
leading space) to the end. The new text is what the window decodes to beyond what its first part
(`_prefix` to `_read`) decodes to. While the window's text ends in U+FFFD a character is incomplete (a
byte-level token holds part of it) and nothing new is read; the next token completes it.

Stop strings: text not yet sent is held in `_pending`; a stop string found there cuts the output before it,
and a tail of it that could still grow into a stop string is held back until it cannot. A stop string
cannot start in text already sent (that text's tail would have been held), so only `_pending` is searched.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._tokens: list[str] = []  # the completion's token strings (special tokens skipped)
        self._prefix = 0  # the window's first token: its text was emitted already (context)
        self._read = 0  # tokens whose text has been decoded into the output
        self._pending = ""  # decoded text not yet sent: a possible start of a stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text to emit now (may be empty)."""
        if self.stopped:
            return ""
        self._tokens += self.tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=True)
        self._pending += self._decode_new()
        return self._release(final=False)

    def flush(self) -> str:
        """The text held back (the end of the output: nothing can complete it any more)."""
        if self.stopped:
            return ""
        if self._read < len(self._tokens):  # an incomplete character at the very end: as decode gives it
            self._pending += self._window_text(len(self._tokens))[len(self._window_text(self._read)) :]
            self._prefix = self._read = len(self._tokens)
        return self._release(final=True)

    def _decode_new(self) -> str:
        """The text the tokens since `_read` add, once it ends in a whole character ('' until then)."""
        end = len(self._tokens)
        if end == self._read:
            return ""  # a special token: no text
        new = self._window_text(end)
        if new.endswith("\ufffd"):
            return ""
        read = self._window_text(self._read)
        if len(new) <= len(read):
            return ""
        self._prefix, self._read = self._read, end
        return new[len(read) :]

    def _window_text(self, end: int) -> str:
        return self.tokenizer.convert_tokens_to_string(self._tokens[self._prefix : end])

    def _release(self, final: bool) -> str:
        pending = self._pending
        if self.stop:
            hits = [i for s in self.stop if (i := pending.find(s)) >= 0]
            if hits:  # the earliest stop string wins; it and what follows are never sent
                self.stopped = True
                self._pending = ""
                return pending[: min(hits)]
        hold = 0 if final else self._held_back(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that could still grow into a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold
