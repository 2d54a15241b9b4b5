"""What the engine needs from the adapter side, and the runtime of a server without adapters.
hotlora.adapters.runtime implements the protocol: device slots for adapters, installed between steps."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from hotlora.adapters.head_features import HeadFeatures


class AdapterRuntime(Protocol):
    """What the engine needs from the adapter side (hotlora.adapters.runtime implements it)."""

    def try_acquire(self, handle: Any) -> int | None: ...  # device slot, or None = not resident yet
    def release(self, handle: Any) -> None: ...
    def begin_forward(self, token_slots: list[int]) -> None: ...  # one slot per token of the step
    def end_forward(self) -> None: ...
    def head_features(self, handle: Any) -> HeadFeatures: ...  # what an acquired adapter's head reads
    def classify(self, handle: Any, pooled: torch.Tensor) -> torch.Tensor: ...
    def maintenance(self) -> None: ...  # engine thread, between steps: install loaded adapters


class BaseOnlyRuntime:
    """No adapters: every row runs on the base model."""

    def try_acquire(self, handle):
        return -1

    def release(self, handle):
        pass

    def begin_forward(self, token_slots):
        pass

    def end_forward(self):
        pass

    def head_features(self, handle):
        return HeadFeatures()

    def classify(self, handle, pooled):
        raise ValueError("the base model has no classification head")

    def maintenance(self):
        pass
