"""TLS and mTLS (--tls-cert/--tls-key/--tls-client-ca) with certificates made by `openssl` in a tmp dir,
and the rule that bearer tokens never reach the logs."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.server.harness import running_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

TOKEN = "s3cret-token-value-9f8e7d"
WRONG = "wrong-token-value-0a1b2c"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem; server.pem/key (SAN localhost, 127.0.0.1) signed by the CA; client.pem/key signed by it;
    rogue.pem/key self-signed."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=hotlora-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            *ext,
            cwd=d,
        )
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=rogue",
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.pem",
        cwd=d,
    )
    return d


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"acme {TOKEN}\n")
    return path


def _stub(channel):
    return inference_pb2_grpc.InferenceStub(channel)


def _generate(channel, token=TOKEN, timeout=60):
    md = (("authorization", f"Bearer {token}"),) if token else None
    return _stub(channel).Generate(
        inference_pb2.GenerateRequest(prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=2)),
        metadata=md,
        timeout=timeout,
    )


def _tls_channel(port, pki, client=None):
    key = chain = None
    if client:
        key, chain = (pki / f"{client}.key").read_bytes(), (pki / f"{client}.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


def test_tls_server_accepts_a_tls_client_and_refuses_plaintext(tiny_model_dir, tmp_path, pki, tokens_file):
    with running_server(
        tiny_model_dir,
        tmp_path,
        tokens_file=str(tokens_file),
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
    ) as run:
        with _tls_channel(run.server.port, pki) as ch:
            assert _generate(ch).finish_reason in ("length", "eos")
            with pytest.raises(grpc.RpcError) as e:
                _generate(ch, token=None)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with (
            grpc.insecure_channel(f"127.0.0.1:{run.server.port}") as plain,
            pytest.raises(grpc.RpcError) as e,
        ):
            _generate(plain, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client that does not trust the server's CA refuses the connection
        rogue_trust = grpc.ssl_channel_credentials(root_certificates=(pki / "rogue.pem").read_bytes())
        with (
            grpc.secure_channel(f"localhost:{run.server.port}", rogue_trust) as ch,
            pytest.raises(grpc.RpcError) as e,
        ):
            _generate(ch, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(tiny_model_dir, tmp_path, pki, tokens_file):
    with running_server(
        tiny_model_dir,
        tmp_path,
        tokens_file=str(tokens_file),
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"),
    ) as run:
        port = run.server.port
        with _tls_channel(port, pki, client="client") as ch:
            assert _generate(ch).finish_reason in ("length", "eos")
        for client in (None, "rogue"):  # no certificate; a certificate the CA did not sign
            with _tls_channel(port, pki, client=client) as ch, pytest.raises(grpc.RpcError) as e:
                _generate(ch, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, client
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain, pytest.raises(grpc.RpcError) as e:
            _generate(plain, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_are_never_logged(tiny_model_dir, tmp_path, tokens_file, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with running_server(tiny_model_dir, tmp_path, tokens_file=str(tokens_file), log_level="debug") as run:
        for token in (WRONG, TOKEN + "x", f"{TOKEN} {TOKEN}"):
            with pytest.raises(grpc.RpcError) as e:
                _generate(run.channel, token=token)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert token not in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # wrong scheme
            _stub(run.channel).Generate(
                inference_pb2.GenerateRequest(prompt="hi"),
                metadata=(("authorization", f"Basic {WRONG}"),),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _generate(run.channel).finish_reason in ("length", "eos")
        with pytest.raises(grpc.RpcError):  # an error after authentication
            _stub(run.channel).Generate(
                inference_pb2.GenerateRequest(prompt=""),
                metadata=(("authorization", f"Bearer {TOKEN}"),),
                timeout=10,
            )
        metrics_port = run.server.metrics_port
        import urllib.request

        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
    out, err = capfd.readouterr()
    logged = caplog.text + out + err + metrics
    assert caplog.records, "no log records were captured: the test would prove nothing"
    for secret in (TOKEN, WRONG):
        assert secret not in logged
