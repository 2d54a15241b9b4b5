"""Several samples of one prompt (the OpenAI API's `n`), sharing the prompt's prefill.

Sample 0 is submitted first; the others follow once it has its first token, by then every full KV block
of the prompt is in the engine's prefix cache (keyed by tenant and adapter), so they compute only the
prompt's last partial block. Sample i draws with seed + i, so a seeded request stays reproducible and its
samples still differ."""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator

from hotlora.server.frontend import GenerateInput, InferenceFrontend
from hotlora.server.requests import GenerationRequest, TokenEvent

MAX_SAMPLES = 16


class _Tagged:
    """The engine's `events.put` for one sample: tags the event with the sample's index."""

    def __init__(self, shared: queue.SimpleQueue, index: int):
        self.shared = shared
        self.index = index

    def put(self, event: TokenEvent) -> None:
        self.shared.put((self.index, event))


class SampleGroup:
    def __init__(self, fe: InferenceFrontend, tenant: str, g: GenerateInput, n: int, deadline=None):
        self.fe = fe
        self.tenant = tenant
        self.g = g
        self.n = n
        self.deadline = deadline
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        ids, params = fe.prepare_generation(g)
        self._prepared = [
            (ids, params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
            for i in range(n)
        ]
        first, self.adapter = fe.start_generation(
            tenant, g, deadline, self._prepared[0], _Tagged(self.events, 0)
        )
        self.requests: list[GenerationRequest] = [first]

    def _start_rest(self) -> None:
        try:
            for i in range(1, self.n):
                req, _ = self.fe.start_generation(
                    self.tenant, self.g, self.deadline, self._prepared[i], _Tagged(self.events, i)
                )
                self.requests.append(req)
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()

    def stream(self, poll: float = 0.25) -> Iterator[tuple[int, TokenEvent]]:
        """(sample index, event) until every sample has finished."""
        open_samples = self.n
        try:
            while open_samples:
                try:
                    index, event = self.events.get(timeout=poll)
                except queue.Empty:
                    continue
                if index == 0 and len(self.requests) < self.n:
                    self._start_rest()
                if event.finish_reason is not None:
                    open_samples -= 1
                yield index, event
        finally:
            if open_samples:  # the consumer went away: free the batch rows
                self.cancel()
