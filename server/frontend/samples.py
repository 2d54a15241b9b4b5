"""Several samples of each of several prompts (the OpenAI API's `n`, and a list of prompts), sharing each
prompt's prefill.

Sample 0 of a prompt is submitted first; the others follow once it has its first token: by then every full
KV block of the prompt is in the engine's prefix cache (keyed by tenant and adapter), so they compute only
the prompt's last partial block. Sample i draws with seed + i, so a seeded request stays reproducible and
its samples still differ. Every sample's events arrive on one queue, tagged with its choice index."""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator

from hotlora.adapters.errors import InvalidArgument
from hotlora.server.engine.requests import GenerationRequest, TokenEvent
from hotlora.server.frontend.events import POLL_SECONDS, pump
from hotlora.server.frontend.inference import GenerateInput, InferenceFrontend

MAX_SAMPLES = 16


class _Tagged:
    """The engine's `events.put` for one sample: tags the event with the sample's choice index."""

    def __init__(self, shared: queue.SimpleQueue, choice: int):
        self.shared = shared
        self.choice = choice

    def put(self, event: TokenEvent) -> None:
        self.shared.put((self.choice, event))


class SampleSet:
    """`n` samples of each prompt; choice index = prompt index * n + sample index."""

    def __init__(
        self, fe: InferenceFrontend, tenant: str, inputs: list[GenerateInput], n: int, deadline=None
    ):
        if not 1 <= n <= MAX_SAMPLES:
            raise InvalidArgument(f"n must be in [1, {MAX_SAMPLES}] (got {n})")
        self.fe = fe
        self.tenant = tenant
        self.n = n
        self.deadline = deadline
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.inputs = inputs
        fe.check_counts([g.prompt or "".join(c for _, c in g.messages) for g in inputs], "prompts")
        self.prepared = [fe.prepare_generation(g) for g in inputs]  # every prompt valid before any is queued
        if len(inputs) > 1:  # a list of prompts is one request: --max-request-tokens bounds them together
            fe.check_request_tokens(sum(len(ids) for ids, _ in self.prepared), "prompts")
        self.requests: list[GenerationRequest | None] = [None] * (len(inputs) * n)
        self.adapter = ""
        try:
            for p in range(len(inputs)):
                self._start(p * n)
        except BaseException:
            self.cancel()
            raise

    def _start(self, choice: int) -> None:
        p, i = divmod(choice, self.n)
        ids, params = self.prepared[p]
        if params.seed is not None:
            params = dataclasses.replace(params, seed=params.seed + i)
        req, self.adapter = self.fe.start_generation(
            self.tenant, self.inputs[p], self.deadline, (ids, params), _Tagged(self.events, choice)
        )
        self.requests[choice] = req

    def prompt_requests(self) -> list[GenerationRequest]:
        """Each prompt's first sample (for prompt token counts)."""
        return [r for r in self.requests[:: self.n] if r is not None]

    def cancel(self) -> None:
        for req in self.requests:
            if req is not None:
                req.cancel()

    def stream(self, poll: float = POLL_SECONDS, alive=None) -> Iterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every sample has finished; `alive()` False = the caller left."""
        open_samples = len(self.requests)
        if not open_samples:
            return
        try:
            for choice, event in pump(self.events, self.cancel, alive, poll):
                if choice % self.n == 0 and self.requests[choice + 1 : choice + self.n][:1] == [None]:
                    for other in range(choice + 1, choice + self.n):  # the prompt's prefill is cached now
                        self._start(other)
                if event.finish_reason is not None:
                    open_samples -= 1
                yield choice, event
                if not open_samples:
                    return
        finally:
            if open_samples:  # the consumer went away or failed: free the batch rows
                self.cancel()
