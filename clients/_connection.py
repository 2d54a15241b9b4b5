"""What `Client` and `AsyncClient` share: the channel (plain, TLS or mTLS), the service stubs, the health
check and the keyword arguments of every call. They differ only in `_grpc`, the module that makes channels."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import ModuleType
from typing import Any, ClassVar

import grpc

from hotlora.clients import _common as c
from hotlora.clients import _health
from hotlora.v1 import adapters_pb2_grpc, inference_pb2_grpc, training_pb2_grpc

PathOrPem = bytes | str | os.PathLike[str] | None


class Connection:
    """A channel to a hotlora server with its Inference, Adapters, Training and Health stubs."""

    _grpc: ClassVar[ModuleType]
    """`grpc` (blocking calls) or `grpc.aio` (awaitable calls)."""

    def __init__(
        self,
        address: str = c.DEFAULT_ADDRESS,
        token: str | None = None,
        *,
        timeout: float | None = None,
        root_certificates: PathOrPem = None,
        private_key: PathOrPem = None,
        certificate_chain: PathOrPem = None,
        tls: bool | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self._metadata = c.call_metadata(token)
        use_tls, root, key, chain = c.tls_material(root_certificates, private_key, certificate_chain, tls)
        opts = c.channel_options(options)
        if use_tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=key, certificate_chain=chain
            )
            self.channel = self._grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = self._grpc.insecure_channel(address, options=opts)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.training = training_pb2_grpc.TrainingStub(self.channel)
        make, ser, de, self._health_name = _health.codec()
        self._health_request = make
        self._health_check = self.channel.unary_unary(
            _health.CHECK_METHOD, request_serializer=ser, response_deserializer=de
        )

    def _kw(self, timeout: float | None, *, default: bool = True) -> dict[str, Any]:
        if timeout is None and default:
            timeout = self.timeout
        return {"timeout": timeout, "metadata": self._metadata}
