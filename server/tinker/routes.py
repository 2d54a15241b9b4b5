"""The Tinker API's routes on the HTTP door (/api/v1/...): the wire of the official `tinker` SDK.

Same tenants and admission as every route of the door (its gate takes the SDK's `X-API-Key` as the token;
each request holds one lease of the door's `Admitted` dependency until it is answered; a token or admission
refusal answers in the door's error shape). Errors answer in the shape of Tinker's own
server, `{"detail": message}` with the status the SDK acts on: 400 bad input (never retried), 403 a tenant's
limit, 404 not found (another tenant's ids too), 410 an ended session, 429 and 503 (the SDK retries). A route
the SDK may call but this server does not offer answers 404 with a message naming it."""

from __future__ import annotations

import json
import logging

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from hotlora.adapters.errors import (
    AlreadyExists,
    FailedPrecondition,
    HotloraError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from hotlora.server.http.door import Admitted
from hotlora.server.tinker import wire
from hotlora.server.tinker.service import Gone, TinkerService

log = logging.getLogger("hotlora.tinker")

STATUS = {
    InvalidArgument: 400,
    FailedPrecondition: 400,
    AlreadyExists: 400,  # 409 would be retried by the SDK
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    Gone: 410,
    ResourceExhausted: 429,
    Unavailable: 503,
}
NOT_OFFERED = {  # routes of the SDK this server does not serve, and why
    "/api/v1/create_custom_loss": "server-side custom losses (forward_backward_custom runs in the client)",
    "/api/v1/save_weights_external": "external-format weights (export a sampler version as PEFT instead)",
    "/api/v1/copy_weights": "copying weights between projects",
    "/api/v1/join_sampling_session": "joining a sampling session from another process",
    "/api/v1/retrieve_futures": "the session futures poller (retrieve_future serves every future)",
    "/api/v1/auth/token": "JWT credentials (use the tenant's token as TINKER_API_KEY)",
}

router = APIRouter(prefix="/api/v1")


def _service(request: Request) -> TinkerService:
    svc = request.app.state.door.state.tinker
    if svc is None or request.app.state.door.state.draining:
        raise Unavailable("the server is starting or draining; retry shortly")
    return svc


def error_response(exc: BaseException) -> JSONResponse:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
    message = exc.message if isinstance(exc, HotloraError) else "internal error"
    if status == 500:
        log.error("unexpected error in a Tinker route", exc_info=exc)
    return JSONResponse({"detail": message}, status_code=status)


async def _call(fn, *args):
    """Run the service call in a worker thread; a domain error becomes the Tinker error shape."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except Exception as exc:
        return error_response(exc)


async def _body(request: Request) -> dict:
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError:
        raise InvalidArgument("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return data


def _future(request_id: str, model_id: str | None = None) -> dict:
    out = {"request_id": request_id}
    if model_id:
        out["model_id"] = model_id
    return out


def _route(path: str, method: str | list[str] = "POST"):
    """Register an async handler whose HotloraErrors (also from reading the body) become error responses."""

    def deco(fn):
        async def handler(request: Request, tenant: Admitted):
            try:
                return await fn(request, tenant)
            except Exception as exc:
                return error_response(exc)

        handler.__name__ = fn.__name__
        router.add_api_route(path, handler, methods=[method] if isinstance(method, str) else method)
        return fn

    return deco


# ---- service -------------------------------------------------------------------------------------
@_route("/healthz", "GET")
async def healthz(request, tenant):
    _service(request)
    return {"status": "ok"}


@_route("/client/config")
async def client_config(request, tenant):
    # no JWT exchange (the tenant's token is the API key), forward_backward uncompressed, httpx's transport
    return {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False, "use_pyqwest_transport": False}


@_route("/client/dynamic_config")
async def client_dynamic_config(request, tenant):
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": True}


@_route("/get_server_capabilities", "GET")
async def get_server_capabilities(request, tenant):
    return _service(request).capabilities()


@_route("/telemetry")
async def telemetry(request, tenant):
    return {"status": "accepted"}  # the SDK's diagnostics: accepted and dropped


@_route("/create_session")
async def create_session(request, tenant):
    body = await _body(request)
    return await _call(_service(request).create_session, tenant, body.get("display_name") or "")


@_route("/session_heartbeat")
async def session_heartbeat(request, tenant):
    body = await _body(request)
    return await _call(_service(request).heartbeat, tenant, body.get("session_id", ""))


@_route("/sessions/{session_id}/finish")
async def finish_session(request, tenant):
    svc = _service(request)
    await _call(svc.end_session, tenant, request.path_params["session_id"])
    return {}


# ---- training ------------------------------------------------------------------------------------
@_route("/create_model")
async def create_model(request, tenant):
    body = await _body(request)
    fid = await _call(_service(request).create_model, tenant, body)
    return fid if isinstance(fid, Response) else _future(fid)


@_route("/get_info")
async def get_info(request, tenant):
    body = await _body(request)
    return await _call(_service(request).get_info, tenant, body.get("model_id", ""))


@_route("/unload_model")
async def unload_model(request, tenant):
    body = await _body(request)
    fid = await _call(_service(request).unload_model, tenant, body.get("model_id", ""))
    return fid if isinstance(fid, Response) else _future(fid)


@_route("/forward_backward")
async def forward_backward(request, tenant):
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise InvalidArgument("a compressed forward_backward body is not accepted (client config says so)")
    if wire.PROTO not in request.headers.get("content-type", ""):
        raise InvalidArgument(f"forward_backward takes a protobuf ForwardBackwardRequest ({wire.PROTO})")
    call = wire.parse_forward_backward(await request.body())
    fid = await _call(_service(request).forward_backward, tenant, call)
    return fid if isinstance(fid, Response) else _future(fid, call.model_id)


@_route("/forward")
async def forward(request, tenant):
    raise NotFound(
        "/api/v1/forward is not offered: the SDK sends forward_only=true to /api/v1/forward_backward"
    )


@_route("/optim_step")
async def optim_step(request, tenant):
    body = await _body(request)
    fid = await _call(_service(request).optim_step, tenant, body)
    return fid if isinstance(fid, Response) else _future(fid, body.get("model_id"))


@_route("/save_weights")
async def save_weights(request, tenant):
    body = await _body(request)
    fid = await _call(_service(request).save_weights, tenant, body, False)
    return fid if isinstance(fid, Response) else _future(fid, body.get("model_id"))


@_route("/save_weights_for_sampler")
async def save_weights_for_sampler(request, tenant):
    body = await _body(request)
    fid = await _call(_service(request).save_weights, tenant, body, True)
    return fid if isinstance(fid, Response) else _future(fid, body.get("model_id"))


@_route("/load_weights")
async def load_weights(request, tenant):
    body = await _body(request)
    fid = await _call(_service(request).load_weights, tenant, body)
    return fid if isinstance(fid, Response) else _future(fid, body.get("model_id"))


# ---- sampling ------------------------------------------------------------------------------------
@_route("/create_sampling_session")
async def create_sampling_session(request, tenant):
    body = await _body(request)
    sid = await _call(_service(request).create_sampling_session, tenant, body)
    return (
        sid if isinstance(sid, Response) else {"type": "create_sampling_session", "sampling_session_id": sid}
    )


@_route("/samplers/{sampler_id}", "GET")
async def get_sampler(request, tenant):
    return await _call(_service(request).get_sampler, tenant, request.path_params["sampler_id"])


@_route("/asample")
async def asample(request, tenant):
    body = await _body(request)
    return await _call(_service(request).asample, tenant, body)


@_route("/cancel_future")
async def cancel_future(request, tenant):
    body = await _body(request)
    svc = _service(request)
    fut = svc.futures.get(tenant, str(body.get("request_id", "")))
    if fut is not None and not fut.done and fut.kind == "Sample":
        svc.futures.fail(fut, "cancelled by the client")
    return {}


# ---- futures -------------------------------------------------------------------------------------
@_route("/retrieve_future")
async def retrieve_future(request, tenant):
    body = await _body(request)
    svc = _service(request)
    rid = str(body.get("request_id", ""))
    fut = svc.futures.get(tenant, rid)
    if fut is None:
        return {
            "error": f"the server restarted after request {rid} was made; its work was lost "
            "(saved checkpoints are kept): make the request again",
            "category": "server",
        }
    if not await svc.futures.wait(fut):
        return {"type": "try_again", "request_id": rid, "queue_state": "active"}
    if fut.error is not None:
        return {"error": fut.error, "category": fut.category}
    if isinstance(fut.result, bytes):
        return Response(fut.result, media_type=wire.PROTO)
    return fut.result


# ---- training runs and checkpoints ---------------------------------------------------------------
@_route("/training_runs", "GET")
async def training_runs(request, tenant):
    q = request.query_params
    limit, offset = int(q.get("limit", 20)), int(q.get("offset", 0))
    return await _call(_service(request).training_runs, tenant, limit, offset)


@_route("/training_runs/{run_id}", "GET")
async def training_run(request, tenant):
    return await _call(_service(request).training_run, tenant, request.path_params["run_id"])


@_route("/training_runs/{run_id}/checkpoints", "GET")
async def checkpoints(request, tenant):
    return await _call(_service(request).checkpoints, tenant, request.path_params["run_id"])


@_route("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", "DELETE")
async def delete_checkpoint(request, tenant):
    p = request.path_params
    out = await _call(_service(request).delete_checkpoint, tenant, p["run_id"], p["checkpoint_id"])
    return out if isinstance(out, Response) else Response(status_code=204)


@_route("/weights_info")
async def weights_info(request, tenant):
    body = await _body(request)
    return await _call(_service(request).weights_info, tenant, body.get("tinker_path", ""))


def _not_offered(path: str, what: str):
    async def handler(request, tenant):
        raise NotFound(f"{path} is not offered by this server: {what}")

    handler.__name__ = "not_offered_" + path.rsplit("/", 1)[-1]
    _route(path.removeprefix("/api/v1"))(handler)


for _path, _what in NOT_OFFERED.items():
    _not_offered(_path, _what)


async def _unknown(request: Request, tenant: str):
    raise NotFound(f"{request.method} {request.url.path} is not offered by this server")


# last: whatever else the SDK may call under /api/v1
_route("/{rest:path}", ["GET", "POST", "PUT", "PATCH", "DELETE"])(_unknown)
