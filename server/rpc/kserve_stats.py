"""The KServe door's per-model statistics (ModelStatistics): counts and durations of each tenant's requests
to each model version, in Triton's terms."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hotlora.server.rpc.kserve_conversion import pb


@dataclass
class _Stats:
    """Per-model counters in Triton's terms (durations in ns)."""

    inference_count: int = 0  # prompts/texts served
    execution_count: int = 0  # requests
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0


class ModelStats:
    def __init__(self):
        self._stats: dict[tuple[str, str, str], _Stats] = {}  # (tenant, model, version)
        self._lock = threading.Lock()

    def record(self, tenant: str, model: str, version: str, items: int, ok: bool, seconds: float) -> None:
        """One request to `model` `version` with `items` prompts or texts, served (`ok`) or failed."""
        ns = int(seconds * 1e9)
        with self._lock:
            s = self._stats.setdefault((tenant, model, version), _Stats())
            s.execution_count += 1
            if ok:
                s.inference_count += items
                s.success_count += 1
                s.success_ns += ns
            else:
                s.fail_count += 1
                s.fail_ns += ns
            s.last_inference_ms = int(time.time() * 1000)

    def response(self, tenant: str, keys: list[tuple[str, str]]):
        """A ModelStatisticsResponse with the tenant's counters of each (model, version) in `keys`."""
        response = pb.ModelStatisticsResponse()
        with self._lock:
            for name, ver in keys:
                s = self._stats.get((tenant, name, ver), _Stats())
                m = response.model_stats.add(
                    name=name,
                    version=ver,
                    last_inference=s.last_inference_ms,
                    inference_count=s.inference_count,
                    execution_count=s.execution_count,
                )
                m.inference_stats.success.count, m.inference_stats.success.ns = s.success_count, s.success_ns
                m.inference_stats.fail.count, m.inference_stats.fail.ns = s.fail_count, s.fail_ns
        return response
