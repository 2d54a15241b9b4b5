"""The caller a piece of work is done for: when it stops waiting (its deadline) and whether it still waits
(not cancelled). A door sets it for the thread serving a call (`serving`); the registry reads it so that
its store calls end when the caller's deadline does, and so that nothing is committed for a caller that
has already been told the call failed (a client that retries would get a second version)."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hotlora.adapters.errors import Cancelled, DeadlineExceeded


@dataclass(frozen=True)
class Caller:
    deadline: float | None
    """time.monotonic() when the caller stops waiting; None: it waits as long as it takes."""
    waiting: Callable[[], bool] = lambda: True
    """False once the caller cancelled (or its deadline passed and the door ended the call)."""

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def gone(self) -> DeadlineExceeded | Cancelled | None:
        """Why the caller no longer waits (None while it does)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return DeadlineExceeded("the caller's deadline passed")
        if not self.waiting():
            return Cancelled("the caller cancelled the call")
        return None

    def check(self, doing: str) -> None:
        """Raises DeadlineExceeded or Cancelled, naming what was not done, once the caller is gone."""
        why = self.gone()
        if why is not None:
            raise type(why)(f"{why.message}: {doing} was not done")


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("hotlora_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the call this thread serves; None for background work (loads, training, probes)."""
    return _current.get()


@contextlib.contextmanager
def serving(caller: Caller | None) -> Iterator[None]:
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


def bounded(timeout_s: float) -> float:
    """The seconds a store call may take: `timeout_s`, or less if the caller's deadline comes first;
    DeadlineExceeded at once if it has already passed."""
    caller = current_caller()
    left = None if caller is None else caller.remaining()
    if left is None:
        return timeout_s
    if left <= 0:
        raise DeadlineExceeded("the caller's deadline passed before the registry was asked")
    return min(timeout_s, left)
