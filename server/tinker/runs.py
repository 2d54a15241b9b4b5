"""A training run (the SDK's training client): its LoRA and the calls made on it, run in the order of their
seq_ids, as bounded units of the engine's fair training queue (the one fine-tune jobs share, --train-share).

The SDK numbers a client's calls (seq_id 1, 2, ...) and may send them out of order (the chunks of a large
forward_backward go in parallel); a call runs once every lower seq_id has arrived and run. A call refused at
submission still takes its seq_id, so the ones after it do not wait for it. The same seq_id sent again (an
SDK retry) gets the same future."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hotlora.adapters.errors import InvalidArgument
from hotlora.adapters.training.loop_lora import AdamStep, LoopLora
from hotlora.adapters.training.loop_losses import LossDatum
from hotlora.server.tinker import wire
from hotlora.server.tinker.futures import Future, Futures

log = logging.getLogger("hotlora.tinker")


@dataclass
class Op:
    kind: str  # "pass" | "optim" | "snapshot" | "load"
    future: Future
    args: dict = field(default_factory=dict)
    run: Any = None  # a pass's PreemptibleRun, once started


@dataclass
class RunInfo:
    """What the SDK's get_info and the training-run listing show."""

    model_id: str
    tenant: str
    session: str
    base_model: str
    rank: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    seed: int
    user_metadata: dict
    created: float = field(default_factory=time.time)
    last_request: float = field(default_factory=time.time)
    bytes: int = 0


class TrainingRun:
    """One live run. `submit` is called from request threads; `step` from the engine thread (RunTask)."""

    def __init__(
        self, info: RunInfo, lora: LoopLora, futures: Futures, enqueue: Callable, io, first_seq: int
    ):
        self.info, self.lora, self.futures = info, lora, futures
        self._enqueue = enqueue  # hands this run's task to the fair queue (owner: the tenant)
        self._io = io  # an executor for the files a snapshot writes
        self._lock = threading.Lock()
        self._ops: dict[int, Op] = {}
        # seq_id -> (future id, request kind): an SDK retry of a call gets the same future
        self._seen: dict[int, tuple[str, str]] = {}
        self._next = first_seq
        self._queued = False
        self.closed: str | None = None  # why, once the run's state is dropped

    # ---- request threads ---------------------------------------------------------------------
    def seen(self, seq_id: int | None, kind: str) -> str | None:
        """The future of an earlier call of `kind` with this seq_id (a retry), else None; a seq_id a call of
        another kind used is refused (two clients driving one training client)."""
        with self._lock:
            fut_id, used_by = self._seen.get(seq_id, (None, kind)) if seq_id is not None else (None, kind)
        if used_by != kind:
            raise InvalidArgument(
                f"seq_id {seq_id} of {self.info.model_id} was already used by another call ({used_by}, "
                f"this is {kind})"
            )
        return fut_id

    def submit(self, seq_id: int | None, kind: str, fut: Future, **args) -> None:
        with self._lock:
            seq = self._claim(seq_id, fut.id, fut.kind)
            self._ops[seq] = Op(kind, fut, args)
            self.info.last_request = time.time()
        self._wake()

    def skip(self, seq_id: int | None, kind: str) -> None:
        """A call refused at submission: its seq_id is used, the calls after it need not wait for it."""
        if seq_id is None:
            return
        with self._lock:
            if seq_id in self._seen or seq_id < self._next:
                return
            self._seen[seq_id] = ("", kind)
            self._ops[seq_id] = Op("skip", None)
        self._wake()

    def _claim(self, seq_id: int | None, fut_id: str, kind: str) -> int:
        if seq_id is None:
            seq_id = max([self._next - 1, *self._ops, *self._seen]) + 1
        if seq_id < self._next or seq_id in self._seen:
            raise InvalidArgument(f"seq_id {seq_id} of {self.info.model_id} was already used")
        self._seen[seq_id] = (fut_id, kind)
        return seq_id

    def _wake(self) -> None:
        with self._lock:
            if self._queued or self.closed or self._ready() is None:
                return
            self._queued = True
        self._enqueue(self)

    def close(self, why: str) -> None:
        """Drop the run's state: pending calls fail with `why`, a pass parked mid-way is unwound."""
        with self._lock:
            if self.closed:
                return
            self.closed = why
            ops, self._ops = list(self._ops.values()), {}
        for op in ops:
            if op.run is not None:
                op.run.close()
            if op.future is not None:
                self.futures.fail(op.future, why)

    # ---- the engine thread -------------------------------------------------------------------------
    def _ready(self) -> Op | None:
        return self._ops.get(self._next)

    def step(self) -> bool:
        """One unit of the next call in order; False when no call is ready (the queue drops the task)."""
        with self._lock:
            op = None if self.closed else self._ready()
            if op is None:
                self._queued = False
                return False
        done = True
        try:
            done = self._run(op)
        except Exception as exc:  # a failed call fails its future; the run and the engine go on
            log.exception("tinker %s on %s failed", op.kind, self.info.model_id)
            self.futures.fail(op.future, f"{op.kind} failed: {type(exc).__name__}: {exc}", "server")
            if op.run is not None:
                op.run.close()
        if done:
            with self._lock:
                self._ops.pop(self._next, None)
                self._next += 1
        return True

    def _run(self, op: Op) -> bool:
        """Run (a unit of) `op`; True once it is finished."""
        a = op.args
        if op.kind == "skip":
            return True
        if op.kind == "pass":
            if op.run is None:
                op.run = self.lora.pass_run(a["data"], a["loss_fn"], a["config"], a["backward"])
            if self.lora.unit(op.run):
                return False
            out = op.run.result
            metrics = {"loss:sum": out.loss_sum}
            self.futures.finish(op.future, wire.forward_backward_output(out.logprobs, out.losses, metrics))
            return True
        if op.kind == "optim":
            metrics = self.lora.optim_step(a["adam"])
            self.futures.finish(op.future, {"metrics": metrics, "type": "optim_step"})
            return True
        if op.kind == "snapshot":
            weights = self.lora.weights()
            optimizer = self.lora.optimizer_state() if a.get("optimizer") else None
            self._io.submit(self._write, op.future, a["write"], weights, optimizer)
            return True
        if op.kind == "load":
            self.lora.load(a["weights"], a.get("optimizer"))
            self.futures.finish(op.future, a["response"])
            return True
        raise AssertionError(op.kind)

    def _write(self, fut: Future, write: Callable, weights, optimizer) -> None:
        try:
            self.futures.finish(fut, write(weights, optimizer))
        except Exception as exc:
            log.exception("tinker save on %s failed", self.info.model_id)
            category = "user" if hasattr(exc, "message") else "server"
            self.futures.fail(fut, f"saving failed: {getattr(exc, 'message', exc)}", category)


def pass_args(data: list[LossDatum], loss_fn: str, config: dict, backward: bool) -> dict:
    return {"data": data, "loss_fn": loss_fn, "config": config, "backward": backward}


def optim_args(adam: AdamStep) -> dict:
    return {"adam": adam}
