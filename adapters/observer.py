"""What the serving stack reports as it works, and the observer that ignores it.

The adapters tier (cache, fine-tune jobs) and the engine call these hooks; `server.metrics.Metrics` implements
them for Prometheus. Components take an `Observer` and default to `NO_OBSERVER`, so no caller probes with
`hasattr` or checks for None. The protocol lives in the lowest tier that calls it (dependency direction
server -> adapters -> kernels).
"""

from __future__ import annotations

from typing import Any, Protocol


class AdapterObserver(Protocol):
    """Hooks called by the adapter cache and the fine-tune job manager."""

    def adapter_cache_event(self, event: str, tier: str) -> None:
        """`event` is hit | miss | eviction; `tier` is device | host."""

    def adapter_load_seconds(self, tier: str, seconds: float) -> None:
        """A load into `tier` finished after `seconds`."""

    def adapter_load_failed(self, tier: str) -> None:
        """A load into `tier` failed."""

    def finetune_step(self, seconds: float) -> None:
        """One optimiser step (or training unit) took `seconds`."""

    def finetune_job_state_changed(self) -> None:
        """A fine-tune job changed state; counts by state may have moved."""


class Observer(AdapterObserver, Protocol):
    """Everything the server reports: the adapter hooks plus the engine's and the doors'."""

    def forward_finished(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        """One engine forward of `kind` (prefill | decode) over `rows` sequences and `tokens` tokens."""

    def request_finished(self, req: Any) -> None:
        """A generation or pooling request ended (any finish reason)."""

    def set_train_share(self, share: float) -> None:
        """The fraction of engine time background tasks took lately."""

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """A gRPC call ended with status `code`."""

    def http_finished(self, route: str, status: int, seconds: float) -> None:
        """An HTTP request ended with `status`."""

    def upload_finished(self, outcome: str) -> None:
        """An adapter upload ended: `ok` or a short reason (invalid_config, too_large, ...)."""


class NoObserver:
    """Observes nothing: the default where metrics are off and in unit tests."""

    def adapter_cache_event(self, event: str, tier: str) -> None:
        pass

    def adapter_load_seconds(self, tier: str, seconds: float) -> None:
        pass

    def adapter_load_failed(self, tier: str) -> None:
        pass

    def finetune_step(self, seconds: float) -> None:
        pass

    def finetune_job_state_changed(self) -> None:
        pass

    def forward_finished(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        pass

    def request_finished(self, req: Any) -> None:
        pass

    def set_train_share(self, share: float) -> None:
        pass

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        pass

    def http_finished(self, route: str, status: int, seconds: float) -> None:
        pass

    def upload_finished(self, outcome: str) -> None:
        pass


NO_OBSERVER: Observer = NoObserver()
