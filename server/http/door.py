"""The OpenAI-compatible HTTP door (FastAPI): completions, chat completions (SSE streaming), embeddings,
models, and vLLM's load/unload_lora_adapter routes, so llm-d's adapter sidecar and every OpenAI client
work unchanged.

Same tenants (Bearer tokens of --tokens-file, checked by `gate.RequestGate` before the body is read), same
admission (the gRPC side's RpcAdmission: one lease per HTTP request, taken by the `Admitted` dependency and
held until the response, a stream's last event included, has been sent), same frontend and engine, same
metrics. `model` names the served base model, an adapter (`name`, `name@N`) or vLLM's `base:adapter`.
Handlers are plain functions: FastAPI runs them on its thread pool, where they wait on the engine's events
as the gRPC servicers do."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hotlora.adapters.errors import (
    HotloraError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from hotlora.adapters.local_dirs import LocalAdapterDirs
from hotlora.adapters.peft.format import IGNORED_FILES
from hotlora.server.frontend.inference import GenerateInput
from hotlora.server.frontend.samples import SampleSet
from hotlora.server.http import schemas as hs
from hotlora.server.http.errors import body_for, error_body
from hotlora.server.http.gate import RequestGate
from hotlora.server.http.inputs import generate_input, split_model
from hotlora.server.http.render import Renderer, model_card
from hotlora.server.logs import log_rpc

log = logging.getLogger("hotlora.http")

OPEN_PATHS = ("/health", "/metrics")  # no token, as on the metrics port; every other path needs one


async def admitted(request: Request) -> AsyncIterator[str]:
    """The caller's tenant (the gate checked the token), admitted: one lease of the door's admission, released
    once the response has been sent (scope="request": a stream holds it until its last event)."""
    door: HttpDoor = request.app.state.door
    lease = door.admission.enter(request.state.tenant)
    try:
        yield lease.tenant
    finally:
        lease.release()


Admitted = Annotated[str, Depends(admitted, scope="request")]


class HttpDoor:
    def __init__(self, state, auth, admission, metrics=None):
        self.state = state
        self.config = state.config
        self.auth = auth
        self.admission = admission
        self.metrics = metrics
        self.local_dirs = LocalAdapterDirs(
            self.config.allowed_local_adapter_dir_list, self.config.max_upload_bytes
        )
        self.app = self._build()

    # ---- the app ----------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        door = self

        @contextlib.asynccontextmanager
        async def lifespan(app):
            # handlers wait on the engine in threads: as many as the gRPC side's --workers
            anyio.to_thread.current_default_thread_limiter().total_tokens = door.config.workers
            yield

        app = FastAPI(title="hotlora", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
        app.state.door = self  # routers of their own (the Tinker API) reach the door's state and admission
        app.add_middleware(
            RequestGate,
            auth=self.auth,
            max_body_bytes=self.config.max_message_bytes,
            body_timeout_seconds=self.config.http_body_timeout_seconds,
            open_paths=OPEN_PATHS,
        )

        @app.middleware("http")  # added last: outside the gate, so its refusals are counted and logged
        async def observe(request: Request, call_next):
            t0 = time.monotonic()
            response = await call_next(request)
            route = getattr(request.scope.get("route"), "path", "unmatched")
            seconds = time.monotonic() - t0
            door._observe(route, response.status_code, seconds)
            if route not in ("/health", "/metrics"):
                name = "http " + route.strip("/").replace("/", ".")  # the access log's `rpc` field
                tenant = getattr(request.state, "tenant", "")
                log_rpc(name, response.status_code, seconds, tenant, request.headers.get("x-request-id", ""))
            return response

        @app.exception_handler(HotloraError)
        async def domain_error(request, exc):
            return _error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def bad_body(request, exc):
            first = exc.errors()[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            msg = (
                f"{where}: {first.get('msg', 'invalid value')}" if where else "the request body is not valid"
            )
            return JSONResponse(error_body(msg, "invalid_request_error", 400, where or None), status_code=400)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, exc):
            return JSONResponse(
                error_body(str(exc.detail), "invalid_request_error", exc.status_code),
                status_code=exc.status_code,
            )

        @app.exception_handler(Exception)
        async def unexpected(request, exc):
            log.error("unexpected error in %s", request.url.path, exc_info=exc)
            return _error_response(exc)

        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/embeddings", self.embeddings, methods=["POST"])
        app.add_api_route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"])
        app.add_api_route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        from hotlora.server.tinker.routes import router as tinker_routes  # it imports this module

        app.include_router(tinker_routes)  # the Tinker API, /api/v1/... (docs/tinker.md)
        return app

    def _observe(self, route: str, status: int, seconds: float) -> None:
        if self.metrics is not None and route not in ("/health", "/metrics"):
            try:
                self.metrics.http_finished(route, status, seconds)
            except Exception:  # metrics never break a request
                log.debug("metrics observer failed", exc_info=True)

    def _frontend(self):
        fe = self.state.frontend
        if fe is None or self.state.draining:
            raise Unavailable("the server is starting or draining; retry shortly")
        return fe

    @property
    def served_name(self) -> str:
        loaded = self.state.loaded
        return self.config.served_model_name or (loaded.name if loaded is not None else "hotlora")

    def _adapter_of(self, tenant: str, model: str) -> str:
        """`model` -> the adapter reference ("" = base). Unknown (`""` too), or another tenant's: 404."""
        if model == self.served_name:
            return ""
        _, ref = split_model(model, self.served_name)
        unknown = NotFound(
            f"the model {model!r} does not exist; GET /v1/models lists the base model and your adapters"
        )
        if not ref:  # "" (or "base:") names no model
            raise unknown
        try:
            self._frontend().adapters.resolve(tenant, ref)
        except (NotFound, InvalidArgument):
            raise unknown from None
        return ref

    # ---- routes -----------------------------------------------------------------------------------------
    def health(self):
        if self.state.frontend is None or self.state.draining:
            return PlainTextResponse("not ready", status_code=503)
        return PlainTextResponse("ok")

    def prometheus(self):
        """Every metric, and vLLM's gauge names (--vllm-compatible-metrics): llm-d scrapes the model
        server's HTTP port, as it would vLLM's. Unauthenticated, like the metrics port."""
        if self.metrics is None:
            raise NotFound("metrics are off (--metrics-port -1)")
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.exposition(vllm=True), media_type=CONTENT_TYPE_LATEST)

    def models(self, tenant: Admitted):
        base = self.served_name
        created = int(time.time())
        data = [model_card(base, created, None)]
        svc = self.state.adapters
        if svc is not None:
            views = svc.list(tenant, "", True)
            latest = {}
            for v in views:
                rec = v.record
                latest[rec.name] = max(latest.get(rec.name, 0), rec.version)
                data.append(model_card(rec.ref, int(rec.created_at.timestamp()), base, v))
            data += [model_card(name, created, base) for name in sorted(latest)]
        return {"object": "list", "data": data}

    def completions(self, body: hs.CompletionRequest, tenant: Admitted):
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidArgument(
                "prompt must be a string or a list of strings (token id prompts are not served)"
            )
        if body.suffix:
            raise InvalidArgument("suffix is not supported")
        inputs = [
            generate_input(body, prompt=p, max_tokens=body.max_tokens, logprobs=body.logprobs)
            for p in prompts
        ]
        if body.echo and body.logprobs is not None:  # the legacy API scores the echoed prompt too
            for g in inputs:
                g.prompt_logprobs = max(g.prompt_logprobs or 0, body.logprobs)
        return self._generate(tenant, body, inputs, "text_completion", echo=prompts if body.echo else None)

    def chat_completions(self, body: hs.ChatCompletionRequest, tenant: Admitted):
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
            messages.append(("system" if m.role == "developer" else m.role, content))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        g = generate_input(body, messages=messages, max_tokens=max_tokens, logprobs=logprobs)
        return self._generate(tenant, body, [g], "chat.completion")

    def _generate(self, tenant: str, body, inputs: list[GenerateInput], kind: str, echo=None):
        fe = self._frontend()
        adapter = self._adapter_of(tenant, body.model)
        for g in inputs:
            g.adapter = adapter
        samples = SampleSet(fe, tenant, inputs, body.n)
        render = Renderer(fe.tokenizer, kind, body.model, body.n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._sse(render, samples, include_usage, echo)
            return StreamingResponse(events, media_type="text/event-stream")
        for _ in samples.stream():
            pass
        for req in samples.requests:
            _raise_for(fe, req)
        return render.response(samples, echo)

    def _sse(self, render: Renderer, samples: SampleSet, include_usage: bool, echo):
        fe = self.state.frontend
        try:
            for choice, event in samples.stream():
                if event.finish_reason is not None and not event.finish_reason.completed:
                    _raise_for(fe, samples.requests[choice])
                prefix = echo[choice // samples.n] if echo and not render.started(choice) else ""
                for chunk in render.chunks(choice, event, prefix):
                    yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(render.usage_chunk(samples))}\n\n"
        except HotloraError as exc:  # the status line is gone: the error travels as an event
            yield f"data: {json.dumps(body_for(exc)[1])}\n\n"
        except Exception as exc:
            log.error("unexpected error while streaming", exc_info=exc)
            yield f"data: {json.dumps(body_for(exc)[1])}\n\n"
        finally:
            samples.cancel()  # a no-op for finished samples; frees the rows when the client left
        yield "data: [DONE]\n\n"

    def embeddings(self, body: hs.EmbeddingRequest, tenant: Admitted):
        texts = body.input if isinstance(body.input, list) else [body.input]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgument(
                "input must be a string or a list of strings (token id inputs are not served)"
            )
        if body.dimensions is not None:
            raise InvalidArgument("dimensions is not supported: embeddings have the model's hidden size")
        fe = self._frontend()
        adapter = self._adapter_of(tenant, body.model)
        vectors, _ = fe.embed(tenant, adapter, texts)
        prompt_tokens = sum(len(fe.tokenizer(t)["input_ids"]) for t in texts)
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                value = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return {"object": "list", "data": data, "model": body.model, "usage": usage}

    def load_lora_adapter(self, body: hs.LoadLoraAdapterRequest, tenant: Admitted):
        svc = self.state.adapters
        if svc is None:
            raise Unavailable("adapters are available once the model is loaded; retry shortly")
        listing = self.local_dirs.listing(body.lora_path)
        total = sum(f.size for f in listing)
        # the bytes count against --upload-buffer-bytes while they are read and validated, as an upload's
        held = svc.uploads.budget.held(total) if svc.uploads is not None else contextlib.nullcontext()
        with held:
            files = self.local_dirs.read(listing)
            ref = self._stored_copy(svc, tenant, body.lora_name, files)
            if ref is None:
                description = f"loaded from {body.lora_path}"
                ref = svc.upload(tenant, body.lora_name, files, description=description).record.ref
        svc.load(tenant, ref)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully ({ref}).")

    def unload_lora_adapter(self, body: hs.UnloadLoraAdapterRequest, tenant: Admitted):
        svc = self.state.adapters
        if svc is None:
            raise Unavailable("adapters are available once the model is loaded; retry shortly")
        view = svc.unload(tenant, body.lora_name)
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully ({view.record.ref} stays stored)."
        )

    # ---- load_lora_adapter helpers ----------------------------------------------------------------------
    @staticmethod
    def _stored_copy(svc, tenant: str, name: str, files: dict[str, bytes]) -> str | None:
        """The latest stored version when it has exactly these files: loading twice stores nothing new."""
        try:
            rec = svc.get(tenant, name).record
        except (NotFound, InvalidArgument):
            return None
        sums = {f: hashlib.sha256(d).hexdigest() for f, d in files.items() if f not in IGNORED_FILES}
        return rec.ref if sums == dict(rec.files) else None


def _raise_for(fe, req) -> None:
    if not req.finish_reason.completed:
        fe.raise_for_finish(req.finish_reason, req.error)


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = body_for(exc)
    return JSONResponse(body, status_code=status)


__all__ = ["HttpDoor"]
