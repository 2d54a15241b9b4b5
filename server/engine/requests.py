"""Requests as the engine sees them: token ids in, events or pooled vectors out.
No wire types here: the servicers convert at the edge."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hotlora.server.engine.sampling import SamplingParams

_ids = itertools.count(1)


class FinishReason(StrEnum):
    """Why a generation ended. The values are the wire's (proto strings, metric labels); an error's
    message lives on the request (`GenerationRequest.error`), never in the reason."""

    EOS = "eos"
    STOP = "stop"  # a stop string or stop token
    LENGTH = "length"  # max_new_tokens, or the model's context
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"

    @property
    def completed(self) -> bool:
        """The model finished the text (as opposed to the request being cut short or failing)."""
        return self in (FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH)


@dataclass
class TokenEvent:
    """New tokens and text for one request; `finish_reason` set on the last event."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: list | None = None  # one TokenLogprob per token, when the request asked for them


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str = "default"
    adapter: Any = None  # an adapter handle from the adapter runtime, None = base model
    deadline: float | None = None  # time.monotonic() seconds
    request_id: str = ""
    matcher: Any = None  # a hotlora.server.engine.guided.Matcher when the output must match a grammar
    seq: int = field(default_factory=lambda: next(_ids))
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # TokenLogprob per output token, if asked
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob per prompt token from the 2nd on
    text: str = ""
    finish_reason: FinishReason | None = None
    error: Exception | None = None  # set with FinishReason.ERROR
    created_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class PoolingRequest:
    """Embed (mean over tokens) or classify (last token, then the adapter's head)."""

    inputs: list[list[int]]
    mode: str  # "mean" | "last"
    tenant: str = "default"
    adapter: Any = None
    deadline: float | None = None
    seq: int = field(default_factory=lambda: next(_ids))
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()
