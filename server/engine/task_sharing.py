"""Background work (fine-tuning) in the engine thread, between serving steps: how much engine time it may
take while serving is busy, and when an idle engine may give it a step."""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Protocol

import torch

from hotlora.adapters.observer import Observer
from hotlora.adapters.training.train_units import serving_waits

log = logging.getLogger("hotlora.engine")

SHARE_WINDOW_S = 0.5
"""The share is kept over about this much recent engine time: a stretch in which training was held back
(requests waiting) is not paid back later by a unit after every serving step."""


class Task(Protocol):
    """Background work (fine-tuning) run in bounded steps between serving steps."""

    def step(self) -> bool: ...  # run one bounded step; False when finished


class TaskSharing:
    """The engine's background tasks, first come first run, and the engine time they had."""

    def __init__(self, share: float, idle_grace_s: float, observer: Observer):
        self.share = share  # max fraction of engine time given to background tasks while serving is busy
        # idle engine time goes to background tasks only this long after the last serving step: a client's
        # next request, sent as the previous one ends, then finds the engine free instead of mid-unit
        self.idle_grace_s = idle_grace_s
        self.observer = observer
        self.tasks: collections.deque[Task] = collections.deque()
        self._task_time = 0.0  # both decay with SHARE_WINDOW_S
        self._serve_time = 0.0
        self._since = time.perf_counter()
        self._last_served = 0.0

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def add(self, task: Task) -> None:
        self.tasks.append(task)

    def served(self, seconds: float) -> None:
        """A serving step (worked or not) took `seconds` of engine time."""
        self._forget()
        self._serve_time += seconds

    def _forget(self) -> None:
        now = time.perf_counter()
        keep = math.exp(-(now - self._since) / SHARE_WINDOW_S)
        self._task_time *= keep
        self._serve_time *= keep
        self._since = now

    def run_step(
        self, served: bool, rows_running: bool, cond: threading.Condition, waiting, arrivals=lambda: 0
    ) -> None:
        """One step of the first task, if it is the tasks' turn. `waiting()`: requests waiting for admission
        (read under `cond`, which a submission notifies); `arrivals()`: requests submitted so far (read
        from the training loop's thread while the unit runs)."""
        if not self.tasks:
            return
        if served and waiting():
            return  # admit the waiting requests first: they would wait a whole training unit
        now = time.perf_counter()
        if served:
            self._last_served = now
        elif now - self._last_served < self.idle_grace_s:
            with cond:  # a request submitted meanwhile wakes us
                if not waiting():
                    cond.wait(self.idle_grace_s - (now - self._last_served))
            return
        # while serving is busy, training gets at most `share` of engine time; idle time is free
        total = self._task_time + self._serve_time
        if served and total > 0 and self._task_time / total > self.share:
            return
        task = self.tasks[0]
        t0 = time.perf_counter()
        seen = arrivals()
        # a unit past its budget ends mid-pass only if serving wants the engine: rows are decoding or a
        # request arrived; alone, training runs on to its next yield (no handoffs)
        wants = (lambda: True) if served or rows_running else (lambda: arrivals() != seen)
        try:
            with torch.inference_mode(False), torch.enable_grad(), serving_waits(wants):
                more = task.step()
        except Exception:
            log.exception("background task failed")
            more = False
        step_seconds = time.perf_counter() - t0
        if served or rows_running:
            self._forget()
            self._task_time += step_seconds
        self.observer.finetune_step(step_seconds)
        self.observer.set_train_share(self._task_time / max(1e-9, self._task_time + self._serve_time))
        if not more:
            self.tasks.popleft()
            if not self.tasks:
                self._task_time = self._serve_time = 0.0
