"""asyncio Python client for a hotlora server: the same methods as `Client`, awaitable.

    from hotlora.clients import AsyncClient

    async with AsyncClient("127.0.0.1:50051", token="...") as c:
        resp = await c.generate("Hello", max_new_tokens=16)
        async for chunk in c.generate_stream("Once upon a time"):
            print(chunk.text, end="", flush=True)

Streams are async iterators; `await stream.aclose()` (or `stream.cancel()`, or leaving `async with stream`)
cancels the call on the server. Errors are `grpc.aio.AioRpcError` (a `grpc.RpcError`) and `ClientError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from hotlora.clients import _common as c
from hotlora.clients._connection import Connection
from hotlora.v1 import (
    adapters_pb2,
    common_pb2,
    inference_pb2,
    training_pb2,
)

T = TypeVar("T")


class AsyncStream(Generic[T]):
    """Async iterator over a server-streaming call; `aclose()`/`cancel()` cancel it on the server."""

    def __init__(self, call: Any):
        self.call = call
        self._it = call.__aiter__()

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        return await self._it.__anext__()

    def cancel(self) -> None:
        self.call.cancel()

    async def aclose(self) -> None:
        self.call.cancel()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()


class AsyncClient(Connection):
    """asyncio twin of `hotlora.clients.Client`; same arguments, same methods (coroutines)."""

    _grpc = grpc.aio

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected (asyncio.TimeoutError after `timeout`)."""
        import asyncio

        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        resp = await self._health_check(self._health_request(service), **self._kw(timeout))
        return self._health_name(resp)

    # ------------------------------------------------------------------------------------------ inference

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Any] | None = None,
        adapter: str = "",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Iterable[str] | str = (),
        request_id: str = "",
        timeout: float | None = None,
    ) -> inference_pb2.GenerateResponse:
        """See `Client.generate`."""
        req = c.generate_request(
            prompt, messages=messages, adapter=adapter, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, request_id=request_id,
        )  # fmt: skip
        return await self.inference.Generate(req, **self._kw(timeout))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Any] | None = None,
        adapter: str = "",
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Iterable[str] | str = (),
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncStream[inference_pb2.GenerateChunk]:
        """See `Client.generate_stream`; returns an async iterator (not a coroutine)."""
        req = c.generate_request(
            prompt, messages=messages, adapter=adapter, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, request_id=request_id,
        )  # fmt: skip
        return AsyncStream(self.inference.GenerateStream(req, **self._kw(timeout)))

    async def embed(
        self, texts: Iterable[str] | str, adapter: str = "", *, timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        req = inference_pb2.EmbedRequest(adapter=adapter, texts=c.texts_list(texts))
        return await self.inference.Embed(req, **self._kw(timeout))

    async def classify(
        self, texts: Iterable[str] | str, adapter: str, *, timeout: float | None = None
    ) -> inference_pb2.ClassifyResponse:
        req = inference_pb2.ClassifyRequest(adapter=adapter, texts=c.texts_list(texts))
        return await self.inference.Classify(req, **self._kw(timeout))

    # ------------------------------------------------------------------------------------------ adapters

    async def upload_adapter(
        self,
        directory: str | os.PathLike[str],
        name: str,
        *,
        description: str = "",
        labels: Iterable[str] = (),
        chunk_size: int = c.DEFAULT_CHUNK_SIZE,
        progress: c.ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> adapters_pb2.Adapter:
        """See `Client.upload_adapter`."""
        files = c.peft_files(directory)
        chunks = c.upload_chunks(
            files, name, description=description, labels=labels, chunk_size=chunk_size, progress=progress
        )
        return await self.adapters.UploadAdapter(chunks, **self._kw(timeout))

    async def list_adapters(
        self, prefix: str = "", all_versions: bool = False, *, timeout: float | None = None
    ) -> adapters_pb2.ListAdaptersResponse:
        req = adapters_pb2.ListAdaptersRequest(prefix=prefix, all_versions=all_versions)
        return await self.adapters.ListAdapters(req, **self._kw(timeout))

    async def get_adapter(self, ref: str, *, timeout: float | None = None) -> adapters_pb2.Adapter:
        return await self.adapters.GetAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))

    async def delete_adapter(self, ref: str, *, timeout: float | None = None) -> common_pb2.Ack:
        return await self.adapters.DeleteAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))

    async def load_adapter(
        self, ref: str, pin: bool = False, *, timeout: float | None = None
    ) -> adapters_pb2.Adapter:
        return await self.adapters.LoadAdapter(common_pb2.AdapterRef(name=ref, pin=pin), **self._kw(timeout))

    async def unload_adapter(self, ref: str, *, timeout: float | None = None) -> adapters_pb2.Adapter:
        return await self.adapters.UnloadAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))

    async def export_adapter(
        self, ref: str, dest_dir: str | os.PathLike[str], *, timeout: float | None = None
    ) -> list[Path]:
        """See `Client.export_adapter`."""
        writer = c.ExportWriter(dest_dir)
        call = self.adapters.ExportAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))
        try:
            async for chunk in call:
                writer.write(chunk)
        except BaseException:
            call.cancel()
            writer.abort()
            raise
        return writer.commit()

    # ------------------------------------------------------------------------------------------ training

    async def create_finetune(
        self,
        adapter: str,
        task: str | int,
        examples: Iterable[Mapping[str, Any] | training_pb2.Example],
        *,
        validation: Iterable[Mapping[str, Any] | training_pb2.Example] = (),
        method: str | int = "AUTO",
        labels: Iterable[str] = (),
        hyperparameters: Mapping[str, Any] | training_pb2.HyperParameters | None = None,
        promote: str | int = "GATED",
        use_chat_template: bool = False,
        description: str = "",
        max_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> training_pb2.FineTuneJob:
        """See `Client.create_finetune`."""
        req = c.finetune_request(
            adapter, task, examples, validation=validation, method=method, labels=labels,
            hyperparameters_=hyperparameters, promote=promote, use_chat_template=use_chat_template,
            description=description, max_seconds=max_seconds,
        )  # fmt: skip
        return await self.training.CreateFineTune(req, **self._kw(timeout))

    def watch_finetune(
        self, job_id: str, *, timeout: float | None = None
    ) -> AsyncStream[training_pb2.FineTuneEvent]:
        """Async iterator of FineTuneEvent until the job ends. No deadline unless `timeout`."""
        call = self.training.WatchFineTune(common_pb2.JobRef(id=job_id), **self._kw(timeout, default=False))
        return AsyncStream(call)

    async def get_finetune(self, job_id: str, *, timeout: float | None = None) -> training_pb2.FineTuneJob:
        return await self.training.GetFineTune(common_pb2.JobRef(id=job_id), **self._kw(timeout))

    async def list_finetunes(self, *, timeout: float | None = None) -> training_pb2.ListFineTunesResponse:
        return await self.training.ListFineTunes(training_pb2.ListFineTunesRequest(), **self._kw(timeout))

    async def cancel_finetune(self, job_id: str, *, timeout: float | None = None) -> training_pb2.FineTuneJob:
        return await self.training.CancelFineTune(common_pb2.JobRef(id=job_id), **self._kw(timeout))

    async def evaluate_adapter(
        self,
        adapter: str,
        examples: Iterable[Mapping[str, Any] | training_pb2.Example],
        *,
        job_id: str = "",
        task: str | int | None = None,
        use_chat_template: bool = False,
        timeout: float | None = None,
    ) -> training_pb2.EvaluateResponse:
        """See `Client.evaluate_adapter`."""
        req = c.evaluate_request(
            adapter, examples, job_id=job_id, task=task, use_chat_template=use_chat_template
        )
        return await self.training.EvaluateAdapter(req, **self._kw(timeout))
