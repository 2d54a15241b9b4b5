"""What the HTTP door checks before FastAPI reads a request: the caller's token, then the body, counted as it
arrives whatever its framing (Content-Length or chunked), within a deadline.

FastAPI reads a route's whole body, and parses its JSON, before any route code or dependency runs: a caller
without a token could make the server hold hundreds of megabytes, or send a 10,000-deep JSON body for the
parser. Here, as an ASGI middleware in front of the app, a request without a valid token is answered 401
before a byte of its body is read; a body that passes --max-message-bytes is answered 413 as soon as it does
(before reading it when Content-Length announces it); a body that has not arrived within
--http-body-timeout-seconds is answered 408. A refused body is never kept or parsed: after the answer, what
still arrives of it is discarded for at most LINGER_SECONDS (so a client that sends its whole body before
reading reads the answer instead of a reset connection, as nginx's lingering close), then the connection is
closed. A body that passes is handed to the app as it was received."""

from __future__ import annotations

import json
from collections.abc import Iterable

import anyio

from hotlora.adapters.errors import HotloraError
from hotlora.server.http.errors import body_for, error_body

LINGER_SECONDS = 2.0


class RequestGate:
    """ASGI middleware. `open_paths` need no token (health and metrics, as on the metrics port)."""

    def __init__(
        self, app, *, auth, max_body_bytes: int, body_timeout_seconds: float, open_paths: Iterable[str]
    ):
        self.app = app
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if scope["path"] not in self.open_paths:
            header = headers.get("authorization")
            if header is None and "x-api-key" in headers:  # the Tinker SDK sends the token as its API key
                header = "Bearer " + headers["x-api-key"]
            try:
                tenant = self.auth.tenant_for([("authorization", header)] if header else [])
            except HotloraError as exc:
                await _refuse(send, receive if has_body else None, *body_for(exc))
                return
            scope.setdefault("state", {})["tenant"] = tenant  # request.state.tenant, for admission and logs
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(send, receive, f"is {length} bytes")
            return
        chunks: list[bytes] = []
        received = 0
        with anyio.move_on_after(self.body_timeout_seconds) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left: nobody to answer
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    await self._too_large(send, receive, f"passed {self.max_body_bytes} bytes")
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            message = (
                f"the request body did not arrive within {self.body_timeout_seconds:g} s "
                f"({received} bytes came; --http-body-timeout-seconds)"
            )
            await _refuse(send, receive, 408, error_body(message, "timeout_error", 408))
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, send, receive, how: str) -> None:
        message = f"the request body {how}; at most {self.max_body_bytes} (--max-message-bytes)"
        await _refuse(send, receive, 413, error_body(message, "request_too_large_error", 413))


def _replay(body: bytes, receive):
    """The app's `receive`: the body read above, then the client's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def _refuse(send, receive, status: int, body: dict) -> None:
    """Answer and close. `receive`: the body may still be arriving; what comes within LINGER_SECONDS is
    dropped unread (closing on unread bytes resets the connection, and the client may lose the answer)."""
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": True})
    if receive is not None:
        with anyio.move_on_after(LINGER_SECONDS):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    break
    await send({"type": "http.response.body", "body": b""})  # the answer is complete: uvicorn closes
