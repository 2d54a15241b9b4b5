"""inference.GRPCInferenceService (KServe v2 / Triton) on the hotlora port: thin wire layer
over InferenceFrontend and AdapterService, like the hotlora.v1 servicers.

Models: `base` (the foundation model, version "1") and each of the caller's adapters
(versions 1..N, "" = latest). The tenant comes from the bearer token, as for every rpc.
Handlers are registered by hand (grpc.method_handlers_generic_handler) because the
message classes live in a private descriptor pool (see kserve_conversion)."""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from hotlora.adapters.errors import FailedPrecondition, HotloraError, InvalidArgument, NotFound, Unavailable
from hotlora.server.frontend.events import request_events
from hotlora.server.rpc import kserve_conversion as kc
from hotlora.server.rpc.conversion import deadline_of
from hotlora.server.rpc.interceptors import current_tenant
from hotlora.server.rpc.kserve_conversion import BASE_MODEL, SERVICE, ModelSpec, pb
from hotlora.server.rpc.kserve_stats import ModelStats

log = logging.getLogger("hotlora.kserve")

PLATFORM = "hotlora"
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "parameters"]
_UNIMPLEMENTED = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


class KServeServicer:
    def __init__(self, state):
        self.state = state
        self._stats = ModelStats()

    # ---- helpers ------------------------------------------------------------------------
    def _frontend(self):
        fe = self.state.frontend
        if fe is None:
            raise Unavailable("the server is starting: the model is still loading")
        return fe

    def _adapters(self):
        svc = self.state.adapters
        if svc is None:
            raise Unavailable(
                "adapters are available once the model is loaded (or this server has no registry)"
            )
        return svc

    def _model(self, tenant: str, name: str, version: str) -> ModelSpec:
        if not name:
            raise InvalidArgument("model_name is required: `base` or one of your adapters")
        if name == BASE_MODEL:
            if version not in ("", "1"):
                raise NotFound(f"model 'base' has only version 1 (asked for {version!r})")
            return ModelSpec(BASE_MODEL, ("1",), "1", "CAUSAL_LM", "")
        ref = kc.adapter_ref(name, version)
        if self.state.adapters is None:
            raise NotFound(f"unknown model {name!r}: this server serves only the base model `base`")
        try:
            rec = self._adapters().get(tenant, ref).record
        except NotFound as exc:
            raise NotFound(
                f"unknown model {name!r} version {version or 'latest'!r}: {exc.message} "
                "(models are `base` and your adapters; RepositoryIndex lists them)"
            ) from None
        versions = sorted(
            v.record.version
            for v in self._adapters().list(tenant, rec.name, all_versions=True)
            if v.record.name == rec.name
        )
        return ModelSpec(
            rec.name, tuple(str(v) for v in versions), str(rec.version), rec.task, rec.ref, tuple(rec.labels)
        )

    def _record(self, tenant: str, model: ModelSpec, items: int, ok: bool, t0: float) -> None:
        self._stats.record(tenant, model.name, model.version, items, ok, time.monotonic() - t0)

    # ---- health and metadata ----------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.frontend is not None and not self.state.draining)

    def ModelReady(self, request, context):
        if self.state.frontend is None or self.state.draining:
            return pb.ModelReadyResponse(ready=False)
        try:
            self._model(current_tenant(), request.name, request.version)
        except (NotFound, InvalidArgument):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("hotlora")
        except PackageNotFoundError:
            ver = "0"
        return pb.ServerMetadataResponse(name="hotlora", version=ver, extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        return kc.model_metadata(self._model(current_tenant(), request.name, request.version), PLATFORM)

    def ModelConfig(self, request, context):
        model = self._model(current_tenant(), request.name, request.version)
        return pb.ModelConfigResponse(config=kc.model_config(model, PLATFORM))

    # ---- inference ------------------------------------------------------------------------
    def ModelInfer(self, request, context):
        tenant = current_tenant()
        model = self._model(tenant, request.model_name, request.model_version)
        t0 = time.monotonic()
        ok, items = False, 0
        try:
            texts, shape = kc.text_input(request, self.state.config.max_texts)
            items = len(texts)
            if model.task == "SEQ_CLS":
                response = self._classify(tenant, model, request, texts, shape, context)
            else:
                response = self._generate(tenant, model, request, texts, shape, context)
            ok = True
            return response
        finally:
            self._record(tenant, model, items, ok, t0)

    def _response(self, model: ModelSpec, request):
        return pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)

    def _classify(self, tenant, model, request, texts, shape, context):
        outputs = kc.requested_outputs(request, model)
        kc.check_no_params(request, model)
        results, resolved = self._frontend().classify(tenant, model.adapter_ref, texts, deadline_of(context))
        response = self._response(model, request)
        response.parameters["adapter"].string_param = resolved
        for name in outputs:
            if name == "label":
                kc.add_output(
                    response, "label", "BYTES", shape, kc.encode_bytes([r.label.encode() for r in results])
                )
            else:
                rows = [[score for _, score in r.scores] for r in results]
                kc.add_output(
                    response, "probabilities", "FP32", (len(rows), len(model.labels)), kc.fp32_raw(rows)
                )
        return response

    def _generate(self, tenant, model, request, prompts, shape, context):
        outputs = kc.requested_outputs(request, model)
        inputs = kc.generate_inputs(request, model, prompts)
        fe = self._frontend()
        fe.check_counts(prompts, "prompts")  # before any prompt is tokenized
        deadline = deadline_of(context)
        prepared = [fe.prepare_generation(g) for g in inputs]  # all checked before any is submitted
        fe.check_request_tokens(sum(len(ids) for ids, _ in prepared), "prompts")
        started, resolved = [], ""
        try:
            for g, p in zip(inputs, prepared, strict=True):  # all submitted before waiting: batched
                req, resolved = fe.start_generation(tenant, g, deadline, prepared=p)
                started.append(req)
            for req in started:
                for ev in request_events(req, alive=context.is_active):
                    if ev.finish_reason is not None and not ev.finish_reason.completed:
                        fe.raise_for_finish(ev.finish_reason, req.error)
        finally:
            for req in started:
                if not req.done:
                    req.cancel()
        response = self._response(model, request)
        response.parameters["adapter"].string_param = resolved
        response.parameters["finish_reason"].string_param = ",".join(r.finish_reason for r in started)
        response.parameters["completion_tokens"].int64_param = sum(len(r.output_ids) for r in started)
        if "text_output" in outputs:
            kc.add_output(
                response, "text_output", "BYTES", shape, kc.encode_bytes([r.text.encode() for r in started])
            )
        return response

    def ModelStreamInfer(self, request_iterator, context):
        """Requests are served concurrently; generation answers once per chunk, the last response
        flagged `triton_final_response` (Triton's decoupled models do the same). A failed
        request answers `error_message` and the stream goes on."""
        tenant = current_tenant()
        out: queue.SimpleQueue = queue.SimpleQueue()
        cancel = threading.Event()
        context.add_callback(cancel.set)
        workers: list[threading.Thread] = []
        # at most this many requests of the stream in flight: the reader stops reading (and HTTP/2 flow
        # control stops the client) until one finishes, so one stream cannot start unbounded threads
        slots = threading.BoundedSemaphore(self.state.config.max_stream_requests)

        def serve(request):
            try:
                for response in self._stream_one(tenant, request, context, cancel):
                    out.put(pb.ModelStreamInferResponse(infer_response=response))
            except HotloraError as exc:  # the error travels to the client in the stream
                out.put(pb.ModelStreamInferResponse(error_message=exc.message))
            except Exception:
                log.exception("ModelStreamInfer request failed")
                msg = "internal error; the server log has the details"
                out.put(pb.ModelStreamInferResponse(error_message=msg))
            finally:
                slots.release()

        def read():
            try:
                for request in request_iterator:
                    while not slots.acquire(timeout=0.25):
                        if cancel.is_set():
                            return
                    t = threading.Thread(target=serve, args=(request,), daemon=True, name="kserve-stream")
                    t.start()
                    workers.append(t)
                    workers[:] = [w for w in workers if w.is_alive()]
            except HotloraError as exc:  # e.g. bytes that are no ModelInferRequest: say so, then stop
                out.put(pb.ModelStreamInferResponse(error_message=exc.message))
            except Exception:  # the client went away: stop the stream
                cancel.set()
            finally:
                for t in workers:
                    t.join()
                out.put(None)

        threading.Thread(target=read, daemon=True, name="kserve-stream-reader").start()
        while True:
            item = out.get()
            if item is None:
                return
            yield item

    def _stream_one(self, tenant, request, context, cancel: threading.Event):
        model = self._model(tenant, request.model_name, request.model_version)
        key = "triton_enable_empty_final_response"
        empty_final = kc.param_bool(request.parameters[key], key) if key in request.parameters else False
        t0 = time.monotonic()
        texts, shape = kc.text_input(request, self.state.config.max_texts)
        if model.task == "SEQ_CLS":
            ok = False
            try:
                response = self._classify(tenant, model, request, texts, shape, context)
                ok = True
            finally:
                self._record(tenant, model, len(texts), ok, t0)
            response.parameters["triton_final_response"].bool_param = True
            yield response
            return
        if len(texts) != 1:
            raise InvalidArgument(
                f"streaming generation takes one prompt per request (got {len(texts)}); "
                "send several requests on the stream instead"
            )
        outputs = kc.requested_outputs(request, model)
        (g,) = kc.generate_inputs(request, model, texts)
        fe = self._frontend()
        req, resolved = fe.start_generation(tenant, g, deadline_of(context))
        ok = False
        try:
            for ev in request_events(req, alive=lambda: not cancel.is_set() and context.is_active()):
                last = ev.finish_reason is not None
                if last and not ev.finish_reason.completed:
                    fe.raise_for_finish(ev.finish_reason, req.error)
                response = self._response(model, request)
                response.parameters["adapter"].string_param = resolved
                if "text_output" in outputs:
                    kc.add_output(response, "text_output", "BYTES", [1], kc.encode_bytes([ev.text.encode()]))
                if last:
                    response.parameters["finish_reason"].string_param = ev.finish_reason
                    response.parameters["completion_tokens"].int64_param = len(req.output_ids)
                response.parameters["triton_final_response"].bool_param = last and not empty_final
                yield response
            ok = True
        finally:
            if not req.done:
                req.cancel()
            self._record(tenant, model, 1, ok, t0)
        if empty_final:
            final = self._response(model, request)
            final.parameters["triton_final_response"].bool_param = True
            yield final

    # ---- repository ------------------------------------------------------------------------
    def RepositoryIndex(self, request, context):
        tenant = current_tenant()
        index = pb.RepositoryIndexResponse()
        index.models.add(
            name=BASE_MODEL,
            version="1",
            state="READY" if self.state.frontend else "UNAVAILABLE",
            reason="the base model",
        )
        if self.state.adapters is not None:
            for view in self._adapters().list(tenant, all_versions=True):
                rec = view.record
                reason = (
                    f"hotlora state {view.state}" + (", pinned" if view.pinned else "") + f"; task {rec.task}"
                )
                index.models.add(name=rec.name, version=str(rec.version), state="READY", reason=reason)
        return index

    def RepositoryModelLoad(self, request, context):
        tenant, name = current_tenant(), request.model_name
        files, config = kc.load_request_files(request, self.state.config.max_upload_bytes)
        pin = kc.param_bool(request.parameters["pin"], "pin") if "pin" in request.parameters else False
        if name == BASE_MODEL:
            if files:
                raise InvalidArgument(
                    "`base` is the foundation model's name on this protocol; "
                    "upload adapters under another name"
                )
            self._frontend()
            return pb.RepositoryModelLoadResponse()
        svc = self._adapters()
        ref = name
        if files:
            if "@" in name:
                raise InvalidArgument("an upload creates the next version itself; give the bare adapter name")
            labels, description = kc.config_labels_description(config)
            with svc.uploads.budget.held(sum(len(d) for d in files.values())):  # --upload-buffer-bytes
                ref = svc.upload(tenant, name, files, description=description, labels=labels).record.ref
        timeout = context.time_remaining()
        timeout = 30.0 if timeout is None or timeout > 30 else max(0.1, timeout - 0.05)
        svc.load(tenant, ref, pin, timeout)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        if request.model_name == BASE_MODEL:
            raise FailedPrecondition("the base model stays resident; only adapters can be unloaded")
        self._adapters().unload(current_tenant(), request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def ModelStatistics(self, request, context):
        tenant = current_tenant()
        if request.name:
            model = self._model(tenant, request.name, request.version)
            keys = [(model.name, model.version)]
        else:
            keys = [("base", "1")]
            if self.state.adapters is not None:
                keys += [
                    (v.record.name, str(v.record.version))
                    for v in self._adapters().list(tenant, all_versions=True)
                ]
        return self._stats.response(tenant, keys)


def _unimplemented(name: str):
    def handler(request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} is not supported by hotlora (no shared-memory tensors, trace or log settings)",
        )

    return handler


def register(state, server) -> list[str]:
    """Add inference.GRPCInferenceService to `server`; returns its full name for health/reflection."""
    servicer = KServeServicer(state)
    service = kc.pool().FindServiceByName(SERVICE)
    handlers = {}
    for method in service.methods:
        req_cls = kc.message_class(method.input_type.name)
        resp_cls = kc.message_class(method.output_type.name)
        impl = (
            _unimplemented(method.name) if method.name in _UNIMPLEMENTED else getattr(servicer, method.name)
        )
        if method.client_streaming and method.server_streaming:
            factory = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming or method.server_streaming:
            raise AssertionError(f"unexpected streaming shape of {method.full_name}")
        else:
            factory = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(
            impl, request_deserializer=req_cls.FromString, response_serializer=resp_cls.SerializeToString
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return [SERVICE]
