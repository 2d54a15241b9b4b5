"""Synchronous Python client for a hotlora server.

    from hotlora.clients import Client

    with Client("127.0.0.1:50051", token="...") as c:
        print(c.generate("Hello", max_new_tokens=16).text)
        for chunk in c.generate_stream("Once upon a time"):
            print(chunk.text, end="", flush=True)

Every method returns the protobuf message of the rpc (see proto/hotlora/v1); errors are `grpc.RpcError`
(`.code()`, `.details()`) from the server and `ClientError` for requests refused before sending.
Enum arguments take friendly names: task "SEQ_CLS"/"CAUSAL_LM", method "AUTO"/"HEAD_ONLY"/"LORA",
promote "GATED"/"ALWAYS" (or the proto enum values).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from hotlora.clients import _common as c
from hotlora.clients._connection import Connection
from hotlora.v1 import (
    adapters_pb2,
    common_pb2,
    inference_pb2,
    training_pb2,
)

T = TypeVar("T")


class Stream(Generic[T]):
    """Iterator over a server-streaming call. `close()` (or leaving a `with` block, or breaking out of a
    `for` loop over a `with`-managed stream) cancels the call on the server."""

    def __init__(self, call: Any):
        self.call = call
        self._it = iter(call)

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        return next(self._it)

    def cancel(self) -> None:
        self.call.cancel()

    close = cancel

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            self.call.cancel()
        except Exception:  # interpreter shutdown
            pass


class Client(Connection):
    """A connection to a hotlora server (Inference, Adapters, Training and Health services).

    address: "host:port". token: sent as `authorization: Bearer <token>` on every call.
    timeout: default deadline in seconds for every call except `watch_finetune` (None = no deadline).
    root_certificates / private_key / certificate_chain: PEM bytes or file paths; any of them turns TLS on
    (key + chain = mTLS). tls=True uses TLS with the system roots. options: extra gRPC channel options,
    merged over the defaults (64 MiB max send/receive message length).
    """

    _grpc = grpc

    # ------------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected (raises grpc.FutureTimeoutError after `timeout`)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        resp = self._health_check(self._health_request(service), **self._kw(timeout))
        return self._health_name(resp)

    # ------------------------------------------------------------------------------------------ inference

    def generate(
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
        """Generate a completion of `prompt`, or of chat `messages` ([{role, content}] or (role, content)
        pairs; the server applies the chat template). max_new_tokens 0 = server default, temperature 0 =
        greedy, top_p/top_k 0 = off.
        Returns GenerateResponse {text, token_ids, finish_reason, usage, adapter}."""
        req = c.generate_request(
            prompt, messages=messages, adapter=adapter, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, request_id=request_id,
        )  # fmt: skip
        return self.inference.Generate(req, **self._kw(timeout))

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
    ) -> Stream[inference_pb2.GenerateChunk]:
        """Like `generate`, streaming GenerateChunk messages (new text/token_ids each; the last one carries
        finish_reason and usage). `close()` on the returned stream cancels the generation on the server."""
        req = c.generate_request(
            prompt, messages=messages, adapter=adapter, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, request_id=request_id,
        )  # fmt: skip
        return Stream(self.inference.GenerateStream(req, **self._kw(timeout)))

    def embed(
        self, texts: Iterable[str] | str, adapter: str = "", *, timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        """Pooled hidden states: EmbedResponse {embeddings: [{values}], adapter}, one per text."""
        req = inference_pb2.EmbedRequest(adapter=adapter, texts=c.texts_list(texts))
        return self.inference.Embed(req, **self._kw(timeout))

    def classify(
        self, texts: Iterable[str] | str, adapter: str, *, timeout: float | None = None
    ) -> inference_pb2.ClassifyResponse:
        """Classify with an adapter that carries a head.
        Returns ClassifyResponse {results: [{label, score, scores}], adapter}, one result per text."""
        req = inference_pb2.ClassifyRequest(adapter=adapter, texts=c.texts_list(texts))
        return self.inference.Classify(req, **self._kw(timeout))

    # ------------------------------------------------------------------------------------------ adapters

    def upload_adapter(
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
        """Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors; any other file
        but PEFT's README.md is refused before sending) as `name`, a new version when it exists.
        `progress(sent_bytes, total_bytes)` is called as chunks go out. Returns the stored Adapter."""
        files = c.peft_files(directory)
        chunks = c.upload_chunks(
            files, name, description=description, labels=labels, chunk_size=chunk_size, progress=progress
        )
        return self.adapters.UploadAdapter(chunks, **self._kw(timeout))

    def list_adapters(
        self, prefix: str = "", all_versions: bool = False, *, timeout: float | None = None
    ) -> adapters_pb2.ListAdaptersResponse:
        """ListAdaptersResponse {adapters}: latest version of each name (every version if all_versions)."""
        req = adapters_pb2.ListAdaptersRequest(prefix=prefix, all_versions=all_versions)
        return self.adapters.ListAdapters(req, **self._kw(timeout))

    def get_adapter(self, ref: str, *, timeout: float | None = None) -> adapters_pb2.Adapter:
        """The Adapter `name` (latest) or `name@N`."""
        return self.adapters.GetAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))

    def delete_adapter(self, ref: str, *, timeout: float | None = None) -> common_pb2.Ack:
        """Delete every version of `name`, or only `name@N`. Returns Ack {message}."""
        return self.adapters.DeleteAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))

    def load_adapter(
        self, ref: str, pin: bool = False, *, timeout: float | None = None
    ) -> adapters_pb2.Adapter:
        """Warm the adapter into a device slot now; pin=True keeps it there (never evicted)."""
        return self.adapters.LoadAdapter(common_pb2.AdapterRef(name=ref, pin=pin), **self._kw(timeout))

    def unload_adapter(self, ref: str, *, timeout: float | None = None) -> adapters_pb2.Adapter:
        """Evict the adapter from device and host memory (it stays stored) and unpin it."""
        return self.adapters.UnloadAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))

    def export_adapter(
        self, ref: str, dest_dir: str | os.PathLike[str], *, timeout: float | None = None
    ) -> list[Path]:
        """Download the adapter as a PEFT directory into `dest_dir` (created). Server filenames must be
        plain base names; files appear only once the whole stream arrived. Returns the written paths."""
        writer = c.ExportWriter(dest_dir)
        call = self.adapters.ExportAdapter(common_pb2.AdapterRef(name=ref), **self._kw(timeout))
        try:
            for chunk in call:
                writer.write(chunk)
        except BaseException:
            call.cancel()
            writer.abort()
            raise
        return writer.commit()

    # ------------------------------------------------------------------------------------------ training

    def create_finetune(
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
        """Start a fine-tune creating adapter `adapter` (or its next version). examples: dicts
        {text, label} (SEQ_CLS) or {prompt, completion} (CAUSAL_LM). hyperparameters: dict with rank, alpha,
        learning_rate, epochs, batch_size, target_modules, layers_to_transform (alias layers), seed.
        Returns the FineTuneJob (state QUEUED); follow it with `watch_finetune(job.id)`."""
        req = c.finetune_request(
            adapter, task, examples, validation=validation, method=method, labels=labels,
            hyperparameters_=hyperparameters, promote=promote, use_chat_template=use_chat_template,
            description=description, max_seconds=max_seconds,
        )  # fmt: skip
        return self.training.CreateFineTune(req, **self._kw(timeout))

    def watch_finetune(
        self, job_id: str, *, timeout: float | None = None
    ) -> Stream[training_pb2.FineTuneEvent]:
        """FineTuneEvent {job, message} as the job progresses, until it ends. No deadline unless `timeout`."""
        call = self.training.WatchFineTune(common_pb2.JobRef(id=job_id), **self._kw(timeout, default=False))
        return Stream(call)

    def get_finetune(self, job_id: str, *, timeout: float | None = None) -> training_pb2.FineTuneJob:
        return self.training.GetFineTune(common_pb2.JobRef(id=job_id), **self._kw(timeout))

    def list_finetunes(self, *, timeout: float | None = None) -> training_pb2.ListFineTunesResponse:
        return self.training.ListFineTunes(training_pb2.ListFineTunesRequest(), **self._kw(timeout))

    def cancel_finetune(self, job_id: str, *, timeout: float | None = None) -> training_pb2.FineTuneJob:
        return self.training.CancelFineTune(common_pb2.JobRef(id=job_id), **self._kw(timeout))

    def evaluate_adapter(
        self,
        adapter: str,
        examples: Iterable[Mapping[str, Any] | training_pb2.Example],
        *,
        job_id: str = "",
        task: str | int | None = None,
        use_chat_template: bool = False,
        timeout: float | None = None,
    ) -> training_pb2.EvaluateResponse:
        """Score `adapter` (`name`, `name@N`), a job's trained adapter (`job_id`) or the base model
        (neither; give `task`) on labelled examples: accuracy, macro-F1 and the confusion matrix for
        SEQ_CLS; loss, perplexity and exact match for CAUSAL_LM. Returns EvaluateResponse."""
        req = c.evaluate_request(
            adapter, examples, job_id=job_id, task=task, use_chat_template=use_chat_template
        )
        return self.training.EvaluateAdapter(req, **self._kw(timeout))
