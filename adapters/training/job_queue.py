"""Fine-tune jobs share the engine's training time fairly across tenants.

The engine runs background tasks one after another (first in, first out), so a small job would wait
behind another tenant's job of thousands of units. `FairTaskQueue` is the one task the engine sees: each
of its steps runs one unit of one job, the tenants taking turns (a tenant's own jobs in the order they
came). A job of 20 examples then finishes after about twice its own units, whatever else is queued.
A job's training loops may be parked mid-pass between its units: its `RunScope` closes them when it ends."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Protocol

from hotlora.adapters.training.train_units import RunScope


class Task(Protocol):
    def step(self) -> bool: ...  # one bounded unit; False when finished


class FairTaskQueue:
    def __init__(self, submit: Callable[[FairTaskQueue], None]):
        """`submit`: hands this queue to the engine (engine.submit_task); called whenever the queue
        gets work after being empty."""
        self._submit = submit
        self._lock = threading.Lock()
        self._by_owner: collections.OrderedDict[Hashable, collections.deque[Task]] = collections.OrderedDict()
        self._scopes: dict[int, RunScope] = {}  # id(task) -> the training loops it started
        self._with_engine = False

    def add(self, owner: Hashable, task: Task) -> None:
        with self._lock:
            self._by_owner.setdefault(owner, collections.deque()).append(task)
            submit, self._with_engine = not self._with_engine, True
        if submit:
            self._submit(self)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._by_owner.values())

    def step(self) -> bool:
        """One unit of the next owner's first task; False (the engine drops us) once nothing is left."""
        with self._lock:
            if not self._by_owner:
                self._with_engine = False
                return False
            owner, queue = next(iter(self._by_owner.items()))
            self._by_owner.move_to_end(owner)  # the next step is another owner's turn
            task = queue[0]
            scope = self._scopes.setdefault(id(task), RunScope())
        with scope.current():
            more = task.step()
        if not more:
            scope.close()  # a cancelled or failed job's loop may be parked mid-pass
        with self._lock:
            if not more:
                self._scopes.pop(id(task), None)
                queue = self._by_owner.get(owner)
                if queue and queue[0] is task:
                    queue.popleft()
                if queue is not None and not queue:
                    del self._by_owner[owner]
            if self._by_owner:
                return True
            self._with_engine = False
            return False

    def close(self) -> None:
        """Close every job's parked training loops (the server stops; the jobs are ended elsewhere)."""
        with self._lock:
            scopes, self._scopes = list(self._scopes.values()), {}
        for scope in scopes:
            scope.close()
