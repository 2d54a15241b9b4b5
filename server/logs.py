"""Structured logging: text for people, JSON lines for log pipelines."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

# fields a log call may attach with extra={...}; prompt text and tokens are never among them
FIELDS = ("request_id", "tenant", "adapter", "rpc", "status", "latency_s", "job_id")

ACCESS_LOGGER = "hotlora.access"
STARTUP_LOGGER = "hotlora.startup"
_MAX_FIELD = 128  # client-supplied strings (request ids, adapter refs) are truncated in logs
_access = logging.getLogger(ACCESS_LOGGER)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for f in FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class Phase:
    name: str
    note: str = ""
    """What the phase made, for its log line (`SmolLM2-135M-Instruct on cpu/float32`)."""
    seconds: float = 0.0


@contextlib.contextmanager
def startup_phase(name: str, announce: bool = False) -> Iterator[Phase]:
    """One phase of start-up (ports, model load, adapter banks, ...): logs `start-up: NAME in X.XX s` when
    it ends, or that it failed and after how long, so a slow start shows where its time went. `announce`:
    also say when it begins (a phase that may take long, so a start is never silent)."""
    phase, t0 = Phase(name), time.monotonic()
    log = logging.getLogger(STARTUP_LOGGER)
    log.log(logging.INFO if announce else logging.DEBUG, "start-up: %s ...", name)
    try:
        yield phase
    except BaseException:
        log.error("start-up: %s failed after %.2f s", name, time.monotonic() - t0)
        raise
    phase.seconds = time.monotonic() - t0
    log.info("start-up: %s in %.2f s%s", name, phase.seconds, f" ({phase.note})" if phase.note else "")


def log_rpc(method: str, code, seconds: float, tenant: str, request_id: str = "", adapter: str = "") -> None:
    """One access-log line per finished RPC, at INFO on the `hotlora.access` logger.

    method: the full gRPC method (`/hotlora.v1.Inference/Generate`) or the bare rpc name; code: a
    grpc.StatusCode or its name. Carries ids, names, status and latency only: never prompt text,
    messages or token ids. Silence it with `logging.getLogger("hotlora.access").setLevel("WARNING")`."""
    if not _access.isEnabledFor(logging.INFO):
        return
    rpc = method.rsplit("/", 1)[-1]
    status = getattr(code, "name", None) or str(code)
    fields = {
        "rpc": rpc,
        "status": status,
        "latency_s": round(float(seconds), 6),
        "tenant": _clip(tenant),
        "request_id": _clip(request_id),
        "adapter": _clip(adapter),
    }
    text = f"{rpc} {status} {seconds * 1000:.1f}ms tenant={fields['tenant']}"
    if fields["adapter"]:
        text += f" adapter={fields['adapter']}"
    if fields["request_id"]:
        text += f" request_id={fields['request_id']}"
    _access.info(text, extra=fields)


def request_fields(request, metadata=()) -> tuple[str, str]:
    """(request_id, adapter) of a call, for `log_rpc`: the `x-request-id` metadata or the message's
    `request_id` field, and the message's `adapter` (a string or an AdapterRef-like `.name`).
    Streaming requests (iterators) yield ("", "") unless the metadata carries an id."""
    request_id = ""
    for key, value in metadata or ():
        if key == "x-request-id":
            request_id = value if isinstance(value, str) else ""
            break
    if not request_id:
        rid = getattr(request, "request_id", "")
        request_id = rid if isinstance(rid, str) else ""
    adapter = getattr(request, "adapter", "")
    if not isinstance(adapter, str):
        adapter = getattr(adapter, "name", "")
    if not adapter and type(request).__name__ == "AdapterRef":
        adapter = getattr(request, "name", "")
    return request_id, adapter if isinstance(adapter, str) else ""


# control characters (newlines above all) and backslash: a client string must not forge log lines
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(value: str) -> str:
    """`value` with backslash and control characters written as escapes (`\\n` -> `\\x0a`)."""
    return _UNSAFE.sub(lambda m: _escape_char(m.group()), value)


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _clip(value) -> str:
    value = "" if value is None else str(value)
    value = value if len(value) <= _MAX_FIELD else value[:_MAX_FIELD] + "..."
    return escape(value)
