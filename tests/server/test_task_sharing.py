"""Training's share of a busy engine (--train-share) is kept over recent time: a stretch in which serving held
training back is not paid back later with a training unit after every serving step. On a fake clock."""

from __future__ import annotations

import threading
import types

from hotlora.adapters.observer import NoObserver
from hotlora.server.engine import task_sharing
from hotlora.server.engine.task_sharing import TaskSharing

DECODE_S, UNIT_S = 0.025, 0.05


class Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class Units:
    def __init__(self, clock: Clock):
        self.clock, self.units = clock, 0

    def step(self) -> bool:
        self.clock.now += UNIT_S
        self.units += 1
        return True


def _decode_steps(sharing: TaskSharing, clock: Clock, n: int, waiting: int = 0) -> None:
    cond = threading.Condition()
    for _ in range(n):
        clock.now += DECODE_S
        sharing.served(DECODE_S)
        sharing.run_step(True, True, cond, lambda: waiting)


def test_training_held_back_for_a_while_does_not_burst_afterwards(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(task_sharing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    sharing = TaskSharing(share=0.2, idle_grace_s=0.0, observer=NoObserver())
    task = Units(clock)
    sharing.add(task)
    _decode_steps(sharing, clock, 400, waiting=1)  # 10 s of serving with requests always waiting
    assert task.units == 0
    _decode_steps(sharing, clock, 40)  # then one second of plain decoding
    # 20% of ~1.2 s is ~5 units of 50 ms, and the last half second held back pays ~2 more; paying the
    # whole 10 s back would be a unit after every step (40)
    assert 3 <= task.units <= 10, task.units
