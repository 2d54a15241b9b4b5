"""hotlora Python client: `Client` (sync), `AsyncClient` (asyncio) and the `hotlora` CLI's client commands.

Needs only grpcio, protobuf and rich (`pip install hotlora[client]`); never imports torch or the server.
`hotlora.clients.exported_heads` (not imported here) loads an exported classification adapter the way the
server computes it, and needs transformers and PEFT.
"""

from hotlora.clients._common import ClientError
from hotlora.clients.aio import AsyncClient, AsyncStream
from hotlora.clients.client import Client, Stream

__all__ = ["AsyncClient", "AsyncStream", "Client", "ClientError", "Stream"]
