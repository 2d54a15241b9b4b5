"""Waiting on the engine's events, for every door (hotlora.v1, KServe, HTTP): one loop that pumps an
events queue and cancels the work when the caller has gone away. Deadlines need no check here: the
engine ends an expired request itself, and its last event arrives like any other."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any

from hotlora.server.engine.requests import GenerationRequest, TokenEvent

POLL_SECONDS = 0.25  # how soon a caller's departure is noticed while no event comes


def pump(
    events: queue.SimpleQueue,
    cancel: Callable[[], None],
    alive: Callable[[], bool] | None = None,
    poll: float = POLL_SECONDS,
) -> Iterator[Any]:
    """Every item put on `events`, for as long as the consumer iterates; while none comes and `alive()` is
    False, `cancel()` (again each poll: the engine's ending then arrives as an item)."""
    while True:
        try:
            item = events.get(timeout=poll)
        except queue.Empty:
            if alive is not None and not alive():
                cancel()
            continue
        yield item


def request_events(req: GenerationRequest, alive: Callable[[], bool] | None = None) -> Iterator[TokenEvent]:
    """One request's events up to and including its last (the one with a finish reason)."""
    for event in pump(req.events, req.cancel, alive):
        yield event
        if event.finish_reason is not None:
            return
