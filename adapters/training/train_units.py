"""Where a training unit ends, so that a request waits at most a small slice behind training.

The engine serves nothing while a unit runs (one thread does both), so a unit's length is the wait it adds
to every request that arrives meanwhile. A unit ends at the trainer loop's next `yield` (after an optimizer
step or an evaluation batch) or, inside a forward or backward pass, at the first linear layer after the
unit has run its budget (--max-train-unit-ms) while serving wants the engine (`serving_waits`: rows are
decoding or a request arrived; an idle engine lets the unit run on to its yield, without handoffs). A
micro-batch's pass can therefore span several units, so units need no sizing in examples and
micro-batches keep one size: the arithmetic is the same wherever the units end, and so is the trained
adapter.

To stop mid-pass the loop runs in a thread of its own (`PreemptibleRun`); the engine thread hands it one
unit at a time and waits (never both at once). A torch function mode in that thread is the pause point:
after each linear layer of a forward, and at each linear output's gradient in a backward (a tensor hook),
it hands the engine back once the unit's time is spent. The model code has no seam for it. The budget is
counted on the host clock; on CUDA, kernels already queued are waited for before the handoff, so a slice
can outlast the budget by what the GPU had queued (measured on CPU only so far).

A parked loop holds its pass's activations until it is resumed or closed. A job ends its loops through a
`RunScope`: the job queue makes the job's scope current while the job runs a unit, a loop started then
joins it, and the scope closes them when the job ends (done, cancelled, failed) or starts another loop
(AUTO leaving a candidate when its time budget is spent)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hotlora.kernels.omp_teams import release_thread_team

_LINEAR = (F.linear, torch._C._nn.linear)
_engine = threading.local()  # the engine thread's serving_waits, if it set one (else: always)


class Closed(BaseException):
    """Raised at a parked loop's pause point to unwind it: its run was closed (BaseException, so the
    trainer's `except Exception` blocks do not catch it)."""


class PreemptibleRun:
    """Runs `loop()` (a generator) in its own thread, one unit per `advance()`."""

    def __init__(self, loop: Callable[[], Iterator[None]], budget_s: float):
        if not budget_s > 0:
            raise ValueError(f"a training unit needs a positive budget (got {budget_s} s)")
        self.loop = loop
        self.budget_s = budget_s
        self.unit_started = 0.0
        self._serving_waits: Callable[[], bool] = _true
        self.mid_pass = 0
        """Units that ended inside a forward or backward pass."""
        self._cond = threading.Condition()
        self._loop_turn = False  # True while the loop runs a unit (the caller of advance() waits)
        self._closing = False
        self._done = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def advance(self) -> bool:
        """Run one unit; False once the loop has ended (or was closed). The loop's error is raised here."""
        if self._thread is None and not self._done:
            RunScope.join_current(self)
            self._thread = threading.Thread(target=self._main, name="hotlora-training-loop", daemon=True)
            self._thread.start()
        with self._cond:
            if self._done or self._closing:
                return False
            release_thread_team()  # the cores are the loop's until it hands back (kernels/omp_teams.py)
            self.unit_started = time.perf_counter()
            self._serving_waits = getattr(_engine, "serving_waits", None) or _true
            self._loop_turn = True
            self._cond.notify_all()
            while self._loop_turn:
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error
        return not self._done

    def pause_point(self) -> None:
        """In the loop's thread, inside a pass: hand the engine back if this unit's time is spent and
        serving wants it."""
        if time.perf_counter() - self.unit_started >= self.budget_s and self._serving_waits():
            if torch.cuda.is_initialized():  # the slice's kernels finish within its unit (and its time)
                torch.cuda.current_stream().synchronize()
            self.mid_pass += 1
            self._hand_back()

    def close(self) -> None:
        """End the loop for good, unwinding a parked pass (its activations are freed). From any thread;
        a loop running a unit meanwhile ends at its next pause point."""
        with self._cond:
            if self._done or self._thread is None:
                self._done = True
                return
            self._closing = True
            self._cond.notify_all()
            if self._loop_turn:
                return
            while not self._done:
                self._cond.wait()

    # ---- the loop's thread -------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._wait_turn()
            with torch.inference_mode(False), torch.enable_grad(), _PausePoints(self):
                for _ in self.loop():
                    self._hand_back()
        except Closed:
            pass
        except BaseException as exc:  # raised in the engine thread by advance()
            self._error = exc
        finally:
            release_thread_team()
            with self._cond:
                self._done = True
                self._loop_turn = False
                self._cond.notify_all()

    def _hand_back(self) -> None:
        release_thread_team()  # and the engine's again
        with self._cond:
            self._loop_turn = False
            self._cond.notify_all()
        self._wait_turn()

    def _wait_turn(self) -> None:
        with self._cond:
            while not self._loop_turn and not self._closing:
                self._cond.wait()
            if self._closing:
                raise Closed


@contextmanager
def serving_waits(wants: Callable[[], bool]):
    """Units run meanwhile (in this thread) end mid-pass only while `wants()` (read from the training
    loop's thread: it must be cheap and thread-safe)."""
    saved = getattr(_engine, "serving_waits", None)
    _engine.serving_waits = wants
    try:
        yield
    finally:
        _engine.serving_waits = saved


def _true() -> bool:
    return True


class _PausePoints(TorchFunctionMode):
    """Each linear layer of a pass is a pause point: after its forward, and when its output's gradient
    arrives in the backward (before the layer's own backward runs)."""

    def __init__(self, run: PreemptibleRun):
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _LINEAR:
            if out.requires_grad:
                out.register_hook(self._in_backward)
            self.run.pause_point()
        return out

    def _in_backward(self, grad: torch.Tensor) -> None:
        self.run.pause_point()


class RunScope:
    """The loops one job started; it runs one at a time, so starting one closes the others."""

    _current = threading.local()

    def __init__(self):
        self._runs: list[PreemptibleRun] = []
        self._lock = threading.Lock()

    @contextmanager
    def current(self):
        """Loops first advanced meanwhile (in this thread) join this scope."""
        saved = getattr(RunScope._current, "scope", None)
        RunScope._current.scope = self
        try:
            yield self
        finally:
            RunScope._current.scope = saved

    @staticmethod
    def join_current(run: PreemptibleRun) -> None:
        scope = getattr(RunScope._current, "scope", None)
        if scope is None:
            return
        with scope._lock:
            others, scope._runs = scope._runs, [run]
        for other in others:
            other.close()

    def close(self) -> None:
        with self._lock:
            runs, self._runs = self._runs, []
        for run in runs:
            run.close()
