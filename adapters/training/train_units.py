"""How many examples one training unit takes, so that a unit lasts about --max-train-unit-ms.

The engine serves nothing while a unit runs, so a unit's length is the wait it adds to every request
that arrives meanwhile. Counting units in examples is not enough (an example of 512 tokens costs a
hundred of 5); a `UnitSizer` measures seconds per example of the units that ran and sizes the next one
to fit the budget, between one example (a unit is never smaller) and its usual size."""

from __future__ import annotations

import math

SMOOTHING = 0.5  # weight of the newest measurement: follows a change of example lengths within a unit or two


class UnitSizer:
    def __init__(self, budget_s: float, most: int):
        if not budget_s > 0 or most < 1:
            raise ValueError(f"a unit needs a positive budget and size (got {budget_s} s, {most})")
        self.budget_s = budget_s
        self.most = most
        self.seconds_per_example: float | None = None

    def size(self, remaining: int) -> int:
        """Examples for the next unit (of `remaining` still to do)."""
        if self.seconds_per_example is None:
            n = 1  # measure first
        else:
            n = math.floor(self.budget_s / max(self.seconds_per_example, 1e-9))
        return max(1, min(n, self.most, remaining))

    def observe(self, examples: int, seconds: float) -> None:
        if examples <= 0:
            return
        rate = seconds / examples
        old = self.seconds_per_example
        self.seconds_per_example = rate if old is None else SMOOTHING * rate + (1 - SMOOTHING) * old

    def split(self, idx: list[int]):
        """`idx` in consecutive parts, each sized when it is asked for (after the previous part ran)."""
        start = 0
        while start < len(idx):
            n = self.size(len(idx) - start)
            yield idx[start : start + n]
            start += n
