"""How a request ends, in one place: its finish reason decided from the token just sampled, and its ending
recorded (metrics first, so they are counted before the client sees the end) and then delivered, as the
last event of a generation or the exception of a pooling request's future."""

from __future__ import annotations

import time

from hotlora.adapters.errors import Cancelled, DeadlineExceeded
from hotlora.adapters.observer import Observer
from hotlora.server.engine.detokenizer import IncrementalDetokenizer
from hotlora.server.engine.requests import FinishReason, GenerationRequest, PoolingRequest, TokenEvent


def expiry(req: GenerationRequest | PoolingRequest, now: float) -> FinishReason | None:
    """CANCELLED or DEADLINE when the request should end now without its result; None otherwise."""
    if req.cancelled.is_set():
        return FinishReason.CANCELLED
    if req.deadline is not None and now > req.deadline:
        return FinishReason.DEADLINE
    return None


def eos_ids(runner, tokenizer) -> set[int]:
    """The token ids that end a generation: the generation config's, the model's and the tokenizer's."""
    ids: set[int] = set()
    for src in (getattr(runner, "generation_config", None), runner.config):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def after_token(
    req: GenerationRequest,
    tok: int,
    detok: IncrementalDetokenizer,
    eos_ids: set[int],
    num_tokens: int,
    max_positions: int,
) -> tuple[str, FinishReason | None]:
    """The text `tok` adds to the output and the finish reason it brings, if any (`num_tokens`: the
    sequence's tokens, `tok` included). ERROR: the request's grammar gave up (`req.matcher.failure()`)."""
    reason = None
    if req.matcher is not None and req.matcher.failure() is not None:
        reason = FinishReason.ERROR  # the token was forced: nothing the grammar allowed was left
        text = detok.flush()
    elif tok in eos_ids and not req.params.ignore_eos:
        reason = FinishReason.EOS
        text = detok.flush()
    elif tok in req.params.stop_token_ids:
        reason = FinishReason.STOP  # like EOS: the stop token's own text is not emitted
        text = detok.flush()
    else:
        text = detok.add(tok)
        if detok.stopped:
            reason = FinishReason.STOP
        elif len(req.output_ids) >= req.params.max_new_tokens or num_tokens >= max_positions:
            reason = FinishReason.LENGTH
            text += detok.flush()
    if reason is None and req.cancelled.is_set():
        reason = FinishReason.CANCELLED
    return text, reason


class Endings:
    def __init__(self, observer: Observer):
        self.observer = observer

    def finish(self, req: GenerationRequest, reason: FinishReason, error: Exception | None = None) -> None:
        """Record a generation's ending; the caller sends its last event."""
        req.error = error
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        self.observer.request_finished(req)

    def end(
        self, req: GenerationRequest | PoolingRequest, reason: FinishReason, error: Exception | None = None
    ) -> None:
        """End a request that produces nothing more: a generation gets an empty last event, a pooling request
        its future's exception (`error`, else Cancelled or DeadlineExceeded)."""
        if isinstance(req, GenerationRequest):
            self.finish(req, reason, error)
            req.events.put(TokenEvent([], "", reason))
            return
        if error is None:
            if reason == FinishReason.DEADLINE:
                error = DeadlineExceeded("deadline exceeded while queued")
            else:
                error = Cancelled("cancelled")
        if not req.future.done():
            req.future.set_exception(error)
