"""Structured output: a request's output must match a JSON schema, any JSON object, a regex or one of a
list of strings. The grammar engine is llguidance: per decode step it fills a bitmask of the tokens the
grammar allows next (≈80 µs a row for the default model's 49k vocabulary on this CPU, against ≈170 µs
for xgrammar, whose CPU mask application also costs ≈250 µs against ≈55 µs; benchmarks/http_door.py
measures the whole overhead). Each request carries its own matcher, so constrained and free requests
share a batch: only the constrained rows are masked."""

from __future__ import annotations

import collections
import enum
import json
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

from hotlora.adapters.errors import InvalidArgument
from hotlora.server.engine.device_io import to_device
from hotlora.server.engine.schema_instances import no_finite_instance

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or choice list larger than this is refused
MAX_CHOICES = 256


class GuidedKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"  # any JSON object
    REGEX = "regex"
    CHOICE = "choice"


@dataclass(frozen=True)
class GuidedSpec:
    """What the output must match. `value`: the schema as JSON text, the regex, or the choices."""

    kind: GuidedKind
    value: str | tuple[str, ...] = ""

    def grammar(self) -> str:
        """The llguidance grammar text (not yet checked against a tokenizer)."""
        import llguidance

        M = llguidance.LLMatcher
        # compact separators and no free whitespace: a model cannot pad the output with endless blanks
        opts = {"whitespace_flexible": False}
        if self.kind is GuidedKind.JSON_OBJECT:
            return M.grammar_from_json_schema({"type": "object"}, defaults=opts)
        if self.kind is GuidedKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.value)
            except (ValueError, RecursionError) as exc:
                raise InvalidArgument(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise InvalidArgument("a JSON schema must be an object (or true/false)")
            # llguidance compiles a schema whose every value contains itself; no answer could ever finish
            why = no_finite_instance(schema)
            if why is not None:
                raise InvalidArgument(why)
            try:
                return M.grammar_from_json_schema(schema, defaults=opts)
            except Exception as exc:  # llguidance raises ValueError on schemas it cannot compile
                raise InvalidArgument(f"the JSON schema cannot be enforced: {exc}") from None
        if self.kind is GuidedKind.REGEX:
            return M.grammar_from_regex(self.value)
        return M.grammar_from_regex("|".join(re.escape(c) for c in self.value))


def check_spec(spec: GuidedSpec) -> None:
    """Bounds a user could otherwise abuse; the grammar itself is checked by GrammarEngine.compile."""
    if spec.kind is GuidedKind.CHOICE:
        if not spec.value or len(spec.value) > MAX_CHOICES or any(not c for c in spec.value):
            raise InvalidArgument(f"guided choice needs 1 to {MAX_CHOICES} non-empty strings")
        size = sum(len(c) for c in spec.value)
    elif spec.kind is GuidedKind.JSON_OBJECT:
        size = 0
    else:
        if not spec.value:
            raise InvalidArgument(f"guided {spec.kind.value} is empty")
        size = len(spec.value)
    if size > MAX_SPEC_CHARS:
        raise InvalidArgument(f"the guided {spec.kind.value} is {size} characters; at most {MAX_SPEC_CHARS}")


class GrammarEngine:
    """llguidance bound to the served tokenizer (built on first use: ≈0.3 s for a 49k vocabulary).

    Compiling a grammar can take long (a JSON schema with `minLength: 400` takes ≈0.8 s here), so the
    last GRAMMAR_CACHE compiled grammars are kept as fresh matchers and each request gets a copy: traffic
    that reuses a schema compiles it once."""

    GRAMMAR_CACHE = 64

    def __init__(self, tokenizer, vocab_size: int):
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._tok = None
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[str, object] = collections.OrderedDict()

    def _tokenizer(self):
        with self._lock:
            if self._tok is None:
                import llguidance
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tok

    def matcher(self, spec: GuidedSpec) -> Matcher:
        """A fresh matcher for one request; InvalidArgument when the grammar is not valid."""
        import llguidance

        check_spec(spec)
        tok = self._tokenizer()
        grammar = spec.grammar()
        with self._lock:
            fresh = self._compiled.get(grammar)
            if fresh is not None:
                self._compiled.move_to_end(grammar)
        if fresh is None:  # compiled outside the lock: a slow schema does not hold up the others
            try:
                fresh = llguidance.LLMatcher(tok, grammar, log_level=0)
                error = fresh.get_error() if fresh.is_error() else ""
            except Exception as exc:  # llguidance raises ValueError on a grammar it cannot compile
                error = str(exc)
            if error:
                raise InvalidArgument(f"the guided {spec.kind.value} is not valid: {error[:500]}")
            with self._lock:
                self._compiled[grammar] = fresh
                while len(self._compiled) > self.GRAMMAR_CACHE:
                    self._compiled.popitem(last=False)
        return Matcher(fresh.deep_copy(), self, spec.kind)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, ll, engine: GrammarEngine, kind: GuidedKind):
        self.ll = ll
        self.engine = engine
        self.kind = kind

    def failure(self) -> InvalidArgument | None:
        """Why the output can no longer follow the grammar, once the grammar engine has given up on it
        (e.g. ParserTooComplex on a forced prefix that never ends): the request then ends with this error,
        never as a finished answer that does not parse."""
        if not self.ll.is_error():
            return None
        return InvalidArgument(
            f"the output could not follow the guided {self.kind.value} (the grammar engine gave up: "
            f"{self.ll.get_error()[:300]}); the text so far does not match it"
        )

    def accept(self, token_id: int) -> bool:
        return self.ll.consume_token(token_id)

    @property
    def finished(self) -> bool:
        return self.ll.is_stopped()


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
    """logits: [B, V] float32 (on any device), masked in place: row rows[i] keeps only what matchers[i]
    allows. The bitmask is filled on the host and sent to the logits' device."""
    if not rows:
        return
    import llguidance.torch as llt

    words = (matchers[0].engine.vocab_size + 31) // 32
    bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
    # one row after another: llguidance's parallel fill hands rows to its own thread pool, which on a
    # 2-core host competes with the engine's threads and measured slower (benchmarks/http_door.py)
    for i, m in enumerate(matchers):
        llt.fill_next_token_bitmask(m.ll, bitmask, i)
    # little-endian bit i of word w allows token 32*w + i
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits[:, : logits.shape[1]].astype(bool))
    if logits.shape[1] > allowed.shape[1]:  # padded vocabulary rows beyond the tokenizer's
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[1] - allowed.shape[1]))
    allowed = to_device(allowed, logits.device)
    for i, row in enumerate(rows):  # in place on each row's view: no gather and scatter of [B, V]
        logits[row].masked_fill_(~allowed[i], float("-inf"))
