"""hotlora.v1.Adapters: thin wire layer over hotlora.adapters.service.AdapterService."""

from __future__ import annotations

from hotlora.adapters.errors import Cancelled, InvalidArgument, Unavailable
from hotlora.adapters.peft.files import refuse_model_files
from hotlora.server.rpc.conversion import adapter_pb
from hotlora.server.rpc.interceptors import current_tenant
from hotlora.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2

EXPORT_CHUNK = 1 << 20


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, state):
        self.state = state

    def _service(self):
        svc = self.state.adapters
        if svc is None:
            raise Unavailable("the server is starting: adapters are available once the model is loaded")
        return svc

    def _observe_upload(self, outcome: str) -> None:
        m = self.state.metrics
        if m is not None:
            m.upload_finished(outcome)

    def UploadAdapter(self, request_iterator, context):
        svc = self._service()
        name = description = None
        labels: list[str] = []
        ended = False  # the request iterator ended (the client closed its side, or cancelled)
        try:
            # spooled to disk as it arrives, within --upload-buffer-bytes; removed whatever happens
            with svc.uploads.spool() as spool:
                for i, chunk in enumerate(request_iterator):
                    if i == 0:
                        if not chunk.name:
                            raise InvalidArgument("the first UploadChunk must carry the adapter `name`")
                        name, description, labels = chunk.name, chunk.description, list(chunk.labels)
                    elif chunk.name and chunk.name != name:
                        raise InvalidArgument("`name` may only be given in the first UploadChunk")
                    if chunk.data or chunk.filename:
                        if not chunk.filename:
                            raise InvalidArgument("an UploadChunk with data must name its `filename`")
                        refuse_model_files((chunk.filename,))  # at once: a model is no adapter, however big
                        spool.add(chunk.filename, chunk.data)
                ended = True
                if not context.is_active():
                    # grpc may end the request iterator normally when the client cancels: what arrived is
                    # not the client's whole upload, and it must never be stored
                    raise Cancelled("the client cancelled the upload")
                if name is None:
                    raise InvalidArgument("empty upload: send the name, then the PEFT adapter files")
                view = svc.upload(
                    current_tenant(), name, spool.read(), description=description or "", labels=labels
                )
        except Exception as exc:
            if ended and not isinstance(exc, Cancelled) and not context.is_active():
                # a cancel ended the request iterator and grpc marked the call cancelled only after the
                # check above (while the upload was validated): what failed was a cut-off upload, not the
                # client's, and whoever cancelled sees no status anyway
                self._observe_upload("cancelled")
                raise Cancelled("the client cancelled the upload") from exc
            self._observe_upload(_reason(exc, context))
            raise
        self._observe_upload("ok")
        return adapter_pb(view)

    def ListAdapters(self, request, context):
        views = self._service().list(current_tenant(), request.prefix, request.all_versions)
        return adapters_pb2.ListAdaptersResponse(adapters=[adapter_pb(v) for v in views])

    def GetAdapter(self, request, context):
        svc = self._service()
        view = svc.get(current_tenant(), request.name)
        record = svc.training_record(view.record)  # the version `get` resolved, not resolved again
        features = svc.head_features(view.record)
        return adapter_pb(view, None if record is None else record.summary, features)

    def DeleteAdapter(self, request, context):
        removed = self._service().delete(current_tenant(), request.name)
        return common_pb2.Ack(message="deleted " + ", ".join(r.ref for r in removed))

    def LoadAdapter(self, request, context):
        timeout = context.time_remaining()
        timeout = 30.0 if timeout is None or timeout > 30 else max(0.1, timeout - 0.05)
        return adapter_pb(self._service().load(current_tenant(), request.name, request.pin, timeout))

    def UnloadAdapter(self, request, context):
        return adapter_pb(self._service().unload(current_tenant(), request.name))

    def ExportAdapter(self, request, context):
        svc = self._service()
        if request.name.startswith("job:"):  # the adapter a fine-tune trained, promoted or not
            training = self.state.training
            if training is None:
                raise Unavailable("fine-tuning is not available yet")
            job_id = request.name[len("job:") :]
            manifest = training.artifact_files(current_tenant(), job_id)
            labels = tuple(training.get(current_tenant(), job_id).metrics.get("labels", ()))
            chunks = svc.stream_export(manifest, labels, EXPORT_CHUNK)
        else:
            chunks = svc.export_chunks(current_tenant(), request.name, EXPORT_CHUNK)
        for filename, data in chunks:  # read from disk a chunk at a time, as the client takes them
            yield common_pb2.FileChunk(filename=filename, data=data)


def _reason(exc: Exception, context) -> str:
    """A bounded label for the uploads metric."""
    from hotlora.adapters import errors

    msg = getattr(exc, "message", "").lower()
    if isinstance(exc, errors.Cancelled) or (
        not isinstance(exc, errors.HotloraError) and not context.is_active()
    ):
        return "cancelled"  # the client went away (or sent nothing for --request-idle-seconds)
    if isinstance(exc, errors.DeadlineExceeded):
        return "deadline_exceeded"  # never committed: the commit checks the caller still waits
    if isinstance(exc, errors.Unavailable):
        return "unavailable"  # the registry's database or blob store is unreachable
    if isinstance(exc, errors.ResourceExhausted):
        return "too_large"
    if isinstance(exc, errors.FailedPrecondition):
        return "does_not_fit"
    if isinstance(exc, errors.InvalidArgument):
        if "not supported" in msg or "unsupported" in msg or "refuse" in msg:
            return "unsupported_option"
        if "adapter_config" in msg or "config" in msg:
            return "invalid_config"
        return "invalid_tensor"
    return "error"
