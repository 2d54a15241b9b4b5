"""The HTTP door against what issue 37 found: bodies read before the token was checked, chunked bodies past
the size limit, JSON parsed for callers without a token, slowloris heads and bodies, a 100,000-prompt list
tokenized before its 413, and the admission lease a stream holds. Raw sockets where the framing is the
attack. A server of its own with small limits (1 MiB bodies, 2 s heads, 3 s bodies), so the timeouts are
reached quickly; every wait here waits for the server's answer (bounded only to fail rather than hang)."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time
import urllib.request

import pytest

from tests.server.harness import running_server

TOKENS = {"alpha": "tok-alpha-secret", "beta": "tok-beta-secret"}
LIMIT = 1 << 20
HEAD_TIMEOUT, BODY_TIMEOUT = 2.0, 3.0
WAIT = 60.0  # how long a test waits for an answer the server owes before calling it a failure


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    tokens = root / "tokens"
    tokens.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    with running_server(
        tiny_model_dir,
        root / "data",
        http_port=0,
        tokens_file=str(tokens),
        max_message_bytes=LIMIT,
        http_header_timeout_seconds=HEAD_TIMEOUT,
        http_body_timeout_seconds=BODY_TIMEOUT,
        max_rpcs_per_tenant=1,
        max_new_tokens=16,
        default_max_new_tokens=8,
    ) as run:
        yield run


@pytest.fixture(scope="module")
def base(run) -> str:
    return run.state.loaded.name


def connect(run) -> socket.socket:
    return socket.create_connection(("127.0.0.1", run.server.http_port), timeout=WAIT)


def head(path: str = "/v1/completions", token: str | None = None, **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json"]
    if token:
        lines.append(f"authorization: Bearer {token}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the server's answer; the connection must then be closed by the server."""
    data = b""
    while chunk := sock.recv(65536):  # a socket timeout (WAIT) here is the failure: no answer came
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def post(run, path: str, body, token: str | None = TOKENS["alpha"]) -> tuple[int, dict]:
    """POST `body` (GET when None)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{run.server.http_port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- bodies: the token first, then bytes counted as they arrive --------------------------------------------
def test_a_chunked_body_without_a_token_gets_401_before_it_is_read(run):
    with connect(run) as sock:
        sock.sendall(head(transfer_encoding="chunked") + chunk(b"x" * 1000))  # the body never ends
        status, body = answer(sock)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    with connect(run) as sock:  # a body announced and never sent: the same, at once
        sock.sendall(head(content_length=500_000))
        status, _ = answer(sock)
    assert status == 401
    # a client that sends its whole body before reading still reads its answer (not a reset connection)
    assert post(run, "/v1/completions", b"x" * (LIMIT // 2), token=None)[0] == 401


def test_a_chunked_body_past_the_limit_is_refused_as_it_arrives(run):
    with connect(run) as sock:
        sock.sendall(head(token=TOKENS["alpha"], transfer_encoding="chunked"))
        for _ in range(LIMIT // 65536 + 1):  # one chunk past the limit, and the body never ends
            sock.sendall(chunk(b"x" * 65536))
        status, body = answer(sock)
    assert status == 413
    assert json.loads(body)["error"]["message"] == (
        f"the request body passed {LIMIT} bytes; at most {LIMIT} (--max-message-bytes)"
    )
    status, body = post(run, "/v1/completions", b"x" * (LIMIT + 1))  # announced by Content-Length
    assert status == 413 and f"is {LIMIT + 1} bytes" in body["error"]["message"]


def test_json_is_parsed_only_after_the_token_is_checked(run, base):
    deep = b"[" * 10_000 + b"]" * 10_000
    assert post(run, "/v1/completions", deep, token=None)[0] == 401
    assert post(run, "/v1/completions", deep, token="wrong")[0] == 401
    assert post(run, "/v1/completions", deep)[0] == 400  # with a token: the body's own error


def test_health_and_metrics_need_no_token(run):
    for path in ("/health", "/metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{run.server.http_port}{path}", timeout=WAIT) as resp:
            assert resp.status == 200


# ---- slow clients ------------------------------------------------------------------------------------------
def test_a_body_that_trickles_gets_408_after_the_body_timeout(run):
    with connect(run) as sock:
        sock.sendall(head(token=TOKENS["alpha"], content_length=1000) + b'{"model": ')
        t0 = time.monotonic()
        status, body = answer(sock)
    assert status == 408 and time.monotonic() - t0 >= BODY_TIMEOUT - 0.5
    assert "--http-body-timeout-seconds" in json.loads(body)["error"]["message"]


def _drip(socks: list[socket.socket], byte_every: float) -> dict[socket.socket, bytes]:
    """Send each socket one more header byte every `byte_every` s until the server closes them all;
    returns what each received."""
    got = {s: b"" for s in socks}
    open_socks = set(socks)
    stop = time.monotonic() + WAIT
    while open_socks and time.monotonic() < stop:
        for s in list(open_socks):
            with contextlib.suppress(OSError):  # the server may have closed it already
                s.send(b"a")
        readable, _, _ = select.select(list(open_socks), [], [], byte_every)
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            got[s] += data
            if not data:
                open_socks.discard(s)
    assert not open_socks, f"{len(open_socks)} slow connections were never closed"
    return got


def test_slowloris_heads_are_cut_after_the_header_timeout_while_others_are_served(run, base):
    socks = [connect(run) for _ in range(16)]
    try:
        for s in socks:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ")
        served = []
        t = threading.Thread(
            target=lambda: served.append(
                post(run, "/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 2})[0]
            )
        )
        t.start()
        got = _drip(socks, byte_every=0.25)
        t.join(WAIT)
    finally:
        for s in socks:
            s.close()
    assert served == [200]
    assert all(g.startswith(b"HTTP/1.1 408 ") for g in got.values())


def test_a_kept_alive_connection_whose_next_head_trickles_is_cut(run):
    conn = http.client.HTTPConnection("127.0.0.1", run.server.http_port, timeout=WAIT)
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b"ok"
    sock = conn.sock
    sock.sendall(b"GET /hea")  # the next request's head, never finished
    got = _drip([sock], byte_every=0.25)[sock]
    conn.close()
    assert got.startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_sends_nothing_is_closed(run):
    with connect(run) as sock:
        t0 = time.monotonic()
        assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - t0 >= HEAD_TIMEOUT - 0.5


# ---- cheap counts before expensive work --------------------------------------------------------------------
class CountingTokenizer:
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.real(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_huge_prompt_list_is_refused_before_anything_is_tokenized(run, base, monkeypatch):
    spy = CountingTokenizer(run.state.frontend.tokenizer)
    monkeypatch.setattr(run.state.frontend, "tokenizer", spy)
    status, body = post(run, "/v1/completions", {"model": base, "prompt": ["a"] * 100_000, "max_tokens": 1})
    assert status == 413
    assert body["error"]["message"] == "100000 prompts in one request; the limit is 256 (--max-texts)"
    long_second = ["short", "y" * (run.state.config.max_request_tokens * 32)]
    status, body = post(run, "/v1/completions", {"model": base, "prompt": long_second, "max_tokens": 1})
    assert status == 413 and "far over the" in body["error"]["message"]
    assert spy.calls == 0


# ---- admission: one lease per request, a stream's until its end --------------------------------------------
def test_a_stream_holds_its_lease_until_its_last_event(run, base):
    admission = run.server.admission
    release = threading.Event()

    class Hold:  # keeps the engine busy, so the stream's request waits with its response begun
        def step(self) -> bool:
            release.wait(WAIT)
            return False

    conn = http.client.HTTPConnection("127.0.0.1", run.server.http_port, timeout=WAIT)
    try:
        run.state.engine.submit_task(Hold())
        body = {"model": base, "prompt": "hi", "max_tokens": 4, "stream": True}
        headers = {"authorization": f"Bearer {TOKENS['alpha']}", "content-type": "application/json"}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        stream = conn.getresponse()
        assert stream.status == 200 and admission.in_flight("alpha") == 1
        status, refused = post(run, "/v1/models", None)  # --max-rpcs-per-tenant 1
        assert status == 429 and "--max-rpcs-per-tenant" in refused["error"]["message"]
        release.set()
        assert stream.read().decode().rstrip().endswith("data: [DONE]")
    finally:
        release.set()
        conn.close()
    _until(lambda: admission.in_flight("alpha") == 0)  # released once the response has been sent
    assert post(run, "/v1/models", None)[0] == 200  # admitted again


def test_every_refusal_releases_its_lease(run, base):
    admission = run.server.admission
    for body in (
        {"model": "", "prompt": "hi"},  # 404
        {"model": base, "prompt": "hi", "max_tokens": 10_000},  # 413
        {"model": base, "prompt": "hi", "temperature": -1},  # 400 from the body's schema
        {"model": base, "prompt": ["a"] * 300},  # 413 before tokenizing
    ):
        assert post(run, "/v1/completions", body)[0] in (400, 404, 413)
    _until(lambda: admission.in_flight() == 0)


def _until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)
