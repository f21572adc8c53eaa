"""The FastAPI application: thin routes over the service modules.

Every error answer is ``{"error": {"code", "reason"}}``. A ``RefuteError`` is answered with
its class's ``http_status`` (never chosen by its text): 4xx for what the caller sent, 5xx for
the service's own faults (:class:`refute.errors.ServerFault`); so are the framework's own
answers: unknown routes (404), wrong methods (405), validation errors (422), and unexpected
failures (500). Every request has one id (``X-Request-ID``, see
:mod:`verifier.api.middleware`); a 5xx is logged with it, with the traceback, and its reason
ends with it. The pure ASGI :class:`~verifier.api.middleware.Guard` counts the body bytes
actually received (chunked or not) and answers 413 past :func:`large_bodies`, and checks the
nesting of every JSON body before a route decodes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, BinaryIO

from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from challenge.messages import AuthError, Domain
from challenge.records import Network, RegisteredModel, Result, SpotCheck
from refute.disclosure import state_record_length
from refute.errors import (
    ExecutionError,
    InputError,
    ModelRejected,
    ModelTooLarge,
    RefuteError,
    ServerFault,
)
from refute.manifest import Manifest
from refute.settings import Settings
from verifier.accounts import add_api_key, authenticate, create_network
from verifier.api.middleware import BodyTooLarge, Guard, LargeBody, request_id, scope_route
from verifier.api.readiness import readiness
from verifier.api.schemas import (
    BatchItem,
    BatchOut,
    DeliveryOut,
    DisclosureRequest,
    ErrorBody,
    ErrorDetail,
    Health,
    ModelOptions,
    ModelOut,
    ModelRegister,
    NetworkCreate,
    NetworkCreated,
    ResultBatch,
    ResultOut,
    ResultPage,
    ResultSubmit,
    WebhookCreate,
    WebhookCreated,
)
from verifier.auth import is_api_key
from verifier.lifecycle import attach_state, attach_states, disclosure_manifest, disclosure_needed
from verifier.metrics import ServiceMetrics
from verifier.registry import decode_model, register_in_subprocess, store_model
from verifier.results import (
    attach_trace,
    list_results,
    needed_states,
    owned_model,
    owned_result,
    submit_result,
    submit_results,
)
from verifier.service import ServiceContext, owed_segments
from verifier.webhooks import list_deliveries, register_endpoint

#: Largest body of every other route (a result with 4,097 leaves is ~0.3 MiB).
MAX_SMALL_BODY_BYTES = 2**20


#: Largest batch of results (500 results of 70 leaves are about 4 MiB).
BATCH_BODY_BYTES = 16 * 2**20


def model_body_bytes(settings: Settings) -> int:
    """Largest registration body: a model of ``max_model_bytes`` in base64 (4/3 of it) plus
    1 MiB for the rest of the JSON (calibration inputs, pins)."""
    return -(-settings.max_model_bytes * 4 // 3) + 2**20


def large_bodies(settings: Settings) -> tuple[LargeBody, ...]:
    """The routes whose bodies may be large, with their limits: registration (JSON or a file)
    up to :func:`model_body_bytes` and batches of results up to :data:`BATCH_BODY_BYTES` (both
    need a well-formed API key header before the body is read: it is decoded before
    authentication runs), trace and state uploads up to ``max_upload_bytes``."""
    return (
        LargeBody("POST", re.compile(r"/v1/model(?:s|-files)"), model_body_bytes(settings),
                  key_header="x-api-key"),
        LargeBody("PUT", re.compile(r"/v1/results/[^/]+/(?:trace|states|states/[0-9]+)"),
                  settings.max_upload_bytes),
        LargeBody("POST", re.compile(r"/v1/result-batches"), BATCH_BODY_BYTES,
                  key_header="x-api-key"),
    )


log = logging.getLogger(__name__)

REQUESTS = Counter("refute_http_requests_total", "HTTP requests", ["route", "status"])
LATENCY = Histogram("refute_http_request_seconds", "HTTP request latency", ["route"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request or refused content"},
    401: {"model": ErrorBody, "description": "Missing, unknown or revoked API key"},
    403: {"model": ErrorBody, "description": "Signature or domain refused"},
    404: {"model": ErrorBody, "description": "No such object for this network"},
    409: {"model": ErrorBody, "description": "Replayed nonce"},
    413: {"model": ErrorBody, "description": "Body too large"},
    422: {"model": ErrorBody, "description": "Body does not match the schema"},
    "4XX": {"model": ErrorBody, "description": "Any other refusal"},
    "5XX": {"model": ErrorBody,
            "description": "The service failed (the reason ends with the request id)"},
}
#: Error answers any route can give (no such path, wrong method, body limits, failures).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: ERRORS[code] for code in (400, 413, 422, "4XX", "5XX")}

#: Codes of the error schema for HTTP errors raised by the framework itself.
_HTTP_CODES = {400: "bad_request", 401: "auth_error", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large",
               415: "unsupported_media_type", 422: "invalid_request"}


class ApiKeyRefused(AuthError):
    """The request has no API key, or one nobody issued or that was revoked: 401 (an
    :class:`AuthError` otherwise refuses a signature or a token with 403)."""

    code = "auth_error"
    http_status = 401


def _error(status: int, code: str, reason: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "reason": reason}},
                        headers=headers)


def _one_line(reason: str, limit: int = 500) -> str:
    """``reason`` on one line, cut to ``limit`` characters (it may echo a caller's input)."""
    flat = " ".join(str(reason).split()) or "request refused"
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _refusal(request: Request, exc: RefuteError,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer to ``exc``: its class's ``http_status`` and the error schema. A 5xx is logged
    with the request id (with the traceback for a :class:`ServerFault`), and its reason ends
    with that id."""
    status = exc.http_status
    reason = _one_line(exc.reason)
    if status >= 500:
        rid = request_id(request.scope)
        message = "%s %s answered %d %s (request id %s): %s"
        args = (request.method, request.url.path[:200], status, exc.code, rid, reason)
        if isinstance(exc, ServerFault) or status == 500:
            log.error(message, *args, exc_info=exc, extra={"request_id": rid})
        else:  # a refusal the service chose (no capacity now): nothing to debug
            log.warning(message, *args, extra={"request_id": rid})
        reason = f"{reason} (request id {rid})"
    return _error(status, exc.code, reason, headers=headers)


def http_registry() -> CollectorRegistry:
    """The registry of the HTTP metrics: this process's, or, when ``refute serve --workers N``
    runs several processes (``PROMETHEUS_MULTIPROC_DIR`` set), every worker's summed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def _observe(scope: MutableMapping[str, Any], status: int, seconds: float) -> None:
    route = scope_route(scope)
    LATENCY.labels(route).observe(seconds)
    REQUESTS.labels(route, str(status)).inc()


@contextmanager
def _write(s: Session) -> Iterator[None]:
    """Commit what the block wrote, or roll it back (the session may already be in a
    transaction opened by authentication)."""
    try:
        yield
        s.commit()
    except BaseException:
        s.rollback()
        raise


def _session(request: Request) -> Iterator[Session]:
    ctx: ServiceContext = request.app.state.ctx
    with ctx.sessions() as s:
        yield s


SessionDep = Annotated[Session, Depends(_session)]


def _network(s: SessionDep, x_api_key: Annotated[str | None, Header()] = None) -> Network:
    try:
        return authenticate(s, x_api_key)
    except AuthError as exc:  # everything authentication refuses is about the API key
        raise ApiKeyRefused(exc.reason) from exc


NetworkDep = Annotated[Network, Depends(_network)]


def create_app(ctx: ServiceContext, *, admin_token: str | None = None) -> FastAPI:
    """The API over ``ctx``; background work (spot-checks, proofs, the watcher) goes to
    ``ctx.tasks``.

    ``admin_token`` guards network creation (``X-Admin-Token``); without one, creating networks
    is open (development only).
    """
    app = FastAPI(title="refute", version="1", description=(
        "Verification of ML inference run on untrusted hardware: optimistic acceptance, "
        "spot-checks, challenges settled by zero-knowledge proofs."))
    app.state.ctx = ctx
    app.openapi = _openapi_builder(app)  # type: ignore[method-assign]
    domain = Domain(chain_id=ctx.settings.chain_id)

    def schedule(result_id: str) -> None:
        """Queue the result's owed spot-checks. What was committed stays committed when the
        broker is down: the timers' sweep queues the check again (never a 500 after a write)."""
        try:
            ctx.tasks.schedule_spotcheck(result_id)
        except Exception:
            log.exception("cannot queue the spot-check of %s: the sweep will", result_id)
            return
        with ctx.sessions() as session, session.begin():
            session.execute(update(Result).where(Result.id == result_id)
                            .values(spot_queued_at=ctx.clock.now()))

    app.add_middleware(Guard, max_body_bytes=MAX_SMALL_BODY_BYTES,
                       large=large_bodies(ctx.settings),
                       key_ok=is_api_key, observe=_observe)

    @app.exception_handler(RefuteError)
    async def refute_error(request: Request, exc: RefuteError) -> JSONResponse:
        return _refusal(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid body"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        reason = " ".join(f"{where}: {first.get('msg', 'invalid')}".split())
        return _error(422, "invalid_request", reason[:300])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = " ".join(str(exc.detail).split())[:300] or "request refused"
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            allowed = _allowed_methods(app, request)
            headers["Allow"] = ", ".join(allowed)
            reason = f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"
        elif exc.status_code == 404 and reason == "Not Found":
            reason = f"no route {request.url.path[:200]}"
        return _error(exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), reason,
                      headers=headers or None)

    @app.get("/v1/health", response_model=Health, responses=COMMON_ERRORS, tags=["operations"])
    def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/v1/ready", response_model=Health,
             responses={**COMMON_ERRORS, 503: {"model": Health}}, tags=["operations"])
    def ready(response: Response) -> Health:
        """Readiness (no authentication): 200 when the database answers at the current schema,
        the broker answers, the blob folder is writable and the spot-check secret is set; else
        503, and ``checks`` names what is missing (``database``, ``schema``: "run `refute db
        upgrade`", ``broker``, ``blobs``, ``spot_key``)."""
        checks = readiness(ctx.engine, ctx.settings)
        ok = all(v == "ok" for v in checks.values())
        response.status_code = 200 if ok else 503
        return Health(status="ok" if ok else "unavailable", checks=checks)

    # This process's HTTP metrics (the default registry) and the service's, derived from the
    # database and Redis at scrape time (verifier/metrics.py: workers are other processes).
    service_metrics = CollectorRegistry(auto_describe=False)
    service_metrics.register(ServiceMetrics(ctx.engine, ctx.settings.redis_url))

    @app.get("/metrics", tags=["operations"], response_class=Response, responses=COMMON_ERRORS)
    def metrics() -> Response:
        """Prometheus metrics: HTTP requests of this process; results, spot-checks, disputes,
        proofs, webhook deliveries and queue depths of the whole service (README
        "Metrics")."""
        return Response(generate_latest(http_registry()) + generate_latest(service_metrics),
                        media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/networks", status_code=201, response_model=NetworkCreated, responses=ERRORS,
              tags=["networks"])
    def new_network(body: NetworkCreate, s: SessionDep,
                    x_admin_token: Annotated[str | None, Header()] = None) -> NetworkCreated:
        """Create a network; its first API key is in the answer (shown once)."""
        if admin_token is not None and x_admin_token != admin_token:
            raise AuthError("network creation needs the admin token (X-Admin-Token)")
        with _write(s):
            net, token = create_network(s, name=body.name, spot_probability=body.spot_probability,
                                        spot_count=body.spot_count,
                                        challenge_window_s=body.challenge_window_s,
                                        now=ctx.clock.now(),
                                        min_bond=body.min_bond,
                                        disclosure_window_s=body.disclosure_window_s)
        return NetworkCreated(id=net.id, name=net.name, api_key=token)

    @app.post("/v1/networks/me/keys", status_code=201, response_model=NetworkCreated,
              responses=ERRORS, tags=["networks"])
    def new_key(net: NetworkDep, s: SessionDep) -> NetworkCreated:
        """Issue another API key for the calling network."""
        with _write(s):
            token = add_api_key(s, net.id, ctx.clock.now())
        return NetworkCreated(id=net.id, name=net.name, api_key=token)

    async def register_model(data: bytes | BinaryIO, options: dict[str, Any], network_id: str,
                             s: Session, request: Request) -> ModelOut | JSONResponse:
        """Build the registration in its bounded child, then store the model and manifest."""
        from verifier.registry import RegistrationBusy, RegistrationLimits

        options["proving_budget_bytes"] = ctx.settings.proving_budget_bytes
        limits = RegistrationLimits.from_settings(ctx.settings)
        s.rollback()  # hold no database transaction while the model is built
        try:
            built = await asyncio.to_thread(
                register_in_subprocess, data, options, limits=limits, network_id=network_id)
        except RegistrationBusy as exc:
            return _refusal(request, exc, headers={"Retry-After": str(exc.retry_after_s)})
        except ExecutionError as exc:  # the submitted model does not run: its fault, not ours
            raise ModelRejected(f"the model cannot be run: {exc.reason}") from exc
        manifest_json = built["manifest"]
        manifest = Manifest.from_json(manifest_json)
        if not isinstance(data, bytes):
            data.seek(0)
        with _write(s):
            row = await asyncio.to_thread(functools.partial(
                store_model, s, ctx.blobs, network_id=network_id, data=data,
                manifest=manifest_json, manifest_sha256=manifest.sha256, now=ctx.clock.now()))
        return _model_out(row, report=built["report"])

    @app.post("/v1/models", status_code=201, response_model=ModelOut, responses=ERRORS,
              tags=["models"])
    async def register(body: ModelRegister, net: NetworkDep, s: SessionDep,
                       request: Request) -> ModelOut | JSONResponse:
        """Register a model: safe loading, segmentation, calibration; returns the manifest.

        Each registration runs in its own child process bounded in time and memory (422
        ``registration_timeout``, ``registration_memory``, ``registration_crashed``); when every
        slot and the bounded queue are taken the answer is 503 ``registration_busy`` with
        ``Retry-After``. A large model is sent as a file: ``POST /v1/model-files``.
        """
        data = decode_model(body.onnx_base64)
        return await register_model(data, body.model_dump(exclude={"onnx_base64"}), net.id, s,
                                    request)

    @app.post("/v1/model-files", status_code=201, response_model=ModelOut, responses=ERRORS,
              tags=["models"], openapi_extra={"requestBody": {
                  "required": True, "content": {"multipart/form-data": {"schema": {
                      "type": "object", "required": ["model"], "properties": {
                          "model": {"type": "string", "format": "binary"},
                          "options": {"type": "string", "description":
                                      "ModelOptions as JSON (optional)"}}}}}}})
    async def register_file(net: NetworkDep, s: SessionDep,
                            request: Request) -> ModelOut | JSONResponse:
        """Register a model sent as a file (``multipart/form-data``: a ``model`` file part and
        an optional ``options`` part, :class:`ModelOptions` as JSON). The file is streamed to
        disk as it arrives and never held in memory, so this is the route for a large model
        (up to the ``max_model_bytes`` setting); otherwise as ``POST /v1/models``."""
        async with request.form(max_files=1, max_fields=1,
                                max_part_size=MAX_SMALL_BODY_BYTES) as form:
            upload, options = _model_parts(form, ctx.settings.max_model_bytes)
            return await register_model(upload.file, options, net.id, s, request)

    @app.get("/v1/models/{model_id}", response_model=ModelOut, responses=ERRORS,
             tags=["models"])
    def get_model(model_id: str, net: NetworkDep, s: SessionDep) -> ModelOut:
        """A registered model of the calling network."""
        return _model_out(owned_model(s, net, model_id))

    @app.post("/v1/results", status_code=202, response_model=ResultOut, responses={
        200: {"model": ResultOut, "description": "Already accepted (same signed message)"},
        **ERRORS}, tags=["results"])
    def submit(body: ResultSubmit, net: NetworkDep, s: SessionDep,
               response: Response) -> ResultOut:
        """Accept a signed result at once (202) with its challenge deadline."""
        with _write(s):
            row, created = submit_result(s, net, body, domain=domain, now=ctx.clock.now(),
                                         spot_key=ctx.settings.spot_key_bytes())
        if not created:
            response.status_code = 200
        return _result_out(s, row, new=created)

    @app.post("/v1/result-batches", response_model=BatchOut, responses=ERRORS,
              tags=["results"])
    def submit_batch(body: ResultBatch, net: NetworkDep, s: SessionDep) -> BatchOut:
        """Accept up to 500 signed results in one request (a body of at most 16 MiB), each
        accepted or refused on its own: ``items[i].status`` is what ``POST /v1/results`` would
        have answered for ``results[i]`` (202, 200 when already accepted, or a 4xx with its
        ``error``). The accepted ones are written in one transaction."""
        with _write(s):
            outcomes = submit_results(s, net, body.results, domain=domain, now=ctx.clock.now(),
                                      spot_key=ctx.settings.spot_key_bytes())
        items = [BatchItem(index=i, status=o.http_status,
                           error=ErrorDetail(code=o.code, reason=o.reason))
                 if isinstance(o, RefuteError) else
                 BatchItem(index=i, status=202 if o[1] else 200, id=o[0].id,
                           challenge_deadline=o[0].challenge_deadline)
                 for i, o in enumerate(outcomes)]
        refused = sum(item.error is not None for item in items)
        return BatchOut(items=items, accepted=len(items) - refused, refused=refused)

    @app.get("/v1/results", response_model=ResultPage, responses=ERRORS, tags=["results"])
    def results(net: NetworkDep, s: SessionDep,
                status: Annotated[str | None, Query(max_length=20)] = None,
                model_id: Annotated[str | None, Query(max_length=40)] = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50,
                cursor: Annotated[str | None, Query(max_length=40)] = None) -> ResultPage:
        """The calling network's results, newest first, filtered and paginated."""
        rows, next_cursor = list_results(s, net, status=status, model_id=model_id, limit=limit,
                                         cursor=cursor)
        return ResultPage(items=[_result_out(s, r) for r in rows], next_cursor=next_cursor)

    @app.get("/v1/results/{result_id}", response_model=ResultOut, responses=ERRORS,
             tags=["results"])
    def get_result(result_id: str, net: NetworkDep, s: SessionDep) -> ResultOut:
        """One result of the calling network, with its spot-checks."""
        return _result_out(s, owned_result(s, net, result_id))

    @app.put("/v1/results/{result_id}/trace", response_model=ResultOut, responses=ERRORS,
             tags=["results"], openapi_extra={"requestBody": {"required": True, "content": {
                 "application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_trace(result_id: str, request: Request, net: NetworkDep,
                           s: SessionDep) -> ResultOut:
        """Upload the result's trace bundle (``refute.trace/2``); it must match the commitment."""
        data = await _read_limited(request)
        with _write(s):
            row = owned_result(s, net, result_id)
            await asyncio.to_thread(attach_trace, s, ctx.blobs, row, data, ctx.clock.now())
        schedule(row.id)
        from challenge.orchestrator import disclose

        # Disputes waiting for this trace (opened before it was uploaded) continue now.
        if await asyncio.to_thread(disclose, ctx.disputes, row.id, ctx.clock.now()):
            s.expire_all()
        return _result_out(s, row)

    @app.put("/v1/results/{result_id}/states", response_model=ResultOut, responses=ERRORS,
             tags=["results"], openapi_extra={"requestBody": {"required": True, "content": {
                 "application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
    async def disclose_states(result_id: str, request: Request, net: NetworkDep,
                              s: SessionDep) -> ResultOut:
        """Disclose committed states (``refute.states/2``) a sampled result's spot-checks need
        (``disclosure`` in the result); each must reproduce its leaf. The alternative to
        uploading the whole trace: only the states a check needs travel."""
        data = await _read_limited(request)
        with _write(s):
            row = owned_result(s, net, result_id)
            await asyncio.to_thread(attach_states, s, ctx.blobs, row, data, ctx.clock.now())
        schedule(row.id)
        from challenge.orchestrator import disclose

        # Disputes waiting for these states (the disclosure window passed) continue now.
        await asyncio.to_thread(disclose, ctx.disputes, row.id, ctx.clock.now())
        s.expire_all()
        return _result_out(s, row)

    @app.put("/v1/results/{result_id}/states/{k}", response_model=ResultOut,
             responses=ERRORS, tags=["results"], openapi_extra={"requestBody": {
                 "required": True, "content": {"application/octet-stream": {
                     "schema": {"type": "string", "format": "binary"}}}}})
    async def disclose_state(result_id: str, k: Annotated[int, Path(ge=0, le=2**20)],
                             request: Request, net: NetworkDep, s: SessionDep) -> ResultOut:
        """Disclose one committed state alone, as its canonical bytes (docs/FORMATS.md "Leaves":
        the bytes its leaf hashes), streamed; it is verified against its leaf as it arrives and
        the body is cut off at the state's length. Disclose a sampled result's states one by one
        this way, or together as a ``refute.states/2`` bundle."""
        with _write(s):
            row = owned_result(s, net, result_id)
            manifest = disclosure_manifest(s, row)
            data = await _read_limited(request, limit=state_record_length(manifest, k))
            await asyncio.to_thread(
                functools.partial(attach_state, k=k, now=ctx.clock.now()), s, ctx.blobs, row,
                data)
        schedule(row.id)
        from challenge.orchestrator import disclose

        await asyncio.to_thread(disclose, ctx.disputes, row.id, ctx.clock.now())
        s.expire_all()
        return _result_out(s, row)

    @app.post("/v1/webhooks", status_code=201, response_model=WebhookCreated, responses=ERRORS,
              tags=["webhooks"])
    def new_webhook(body: WebhookCreate, net: NetworkDep, s: SessionDep) -> WebhookCreated:
        """Register an endpoint for events; deliveries are HMAC-signed with the returned secret."""
        with _write(s):
            endpoint, secret = register_endpoint(
                s, net.id, body.url, body.events,
                allow_loopback=ctx.settings.webhooks_allow_private, now=ctx.clock.now())
        return WebhookCreated(id=endpoint.id, url=endpoint.url, events=list(endpoint.events),
                              secret=secret)

    @app.get("/v1/webhooks/deliveries", response_model=list[DeliveryOut], responses=ERRORS,
             tags=["webhooks"])
    def deliveries(net: NetworkDep, s: SessionDep,
                   status: Annotated[str | None, Query(max_length=20)] = None,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DeliveryOut]:
        """The calling network's webhook deliveries, newest first."""
        return [DeliveryOut(id=d.id, endpoint_id=d.endpoint_id, event=d.event,
                            event_id=d.event_id, status=d.status, attempts=d.attempts,
                            next_attempt_at=d.next_attempt_at, last_error=d.last_error,
                            delivered_at=d.delivered_at)
                for d in list_deliveries(s, net.id, status=status, limit=limit)]

    from verifier.api.disputes import router as dispute_router

    app.include_router(dispute_router(ctx, ERRORS))
    from verifier.explorer import pages as explorer_pages

    app.include_router(explorer_pages())
    return app


#: OpenAPI links (``operationId`` → status → link name → (path, method, parameters)): how the
#: objects an answer creates are used by later calls (stateful testing follows them).
_KEY = {"header.x-api-key": "$response.body#/api_key"}
_LINKS: dict[tuple[str, str], dict[str, dict[str, tuple[str, str, dict[str, str]]]]] = {
    ("/v1/networks", "post"): {"201": {
        "IssueKey": ("/v1/networks/me/keys", "post", _KEY),
        "ListResults": ("/v1/results", "get", _KEY),
        "RegisterWebhook": ("/v1/webhooks", "post", _KEY),
        "ListDeliveries": ("/v1/webhooks/deliveries", "get", _KEY),
        "SubmitResult": ("/v1/results", "post", _KEY),
        "RegisterModel": ("/v1/models", "post", _KEY),
    }},
    ("/v1/networks/me/keys", "post"): {"201": {
        "ListResults": ("/v1/results", "get", _KEY),
        "ListDeliveries": ("/v1/webhooks/deliveries", "get", _KEY),
    }},
    ("/v1/models", "post"): {"201": {
        "GetModel": ("/v1/models/{model_id}", "get", {"path.model_id": "$response.body#/id"}),
    }},
    ("/v1/results", "post"): {"202": {
        "GetResult": ("/v1/results/{result_id}", "get",
                      {"path.result_id": "$response.body#/id"}),
        "GetPublicResult": ("/v1/public/results/{result_id}", "get",
                            {"path.result_id": "$response.body#/id"}),
        "GetTranscript": ("/v1/results/{result_id}/transcript", "get",
                          {"path.result_id": "$response.body#/id"}),
    }},
    ("/v1/results/{result_id}/challenges", "post"): {"201": {
        "GetDispute": ("/v1/disputes/{dispute_id}", "get",
                       {"path.dispute_id": "$response.body#/id"}),
    }},
}


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's own 405 names only
    the first route that matched the path)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _child = route.matches(request.scope)
            if match is not Match.NONE:
                methods |= route.methods
    return sorted(methods)


def _openapi_builder(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI document, with links between operations (:data:`_LINKS`) and every
    error answer documented with the error schema."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        paths: dict[str, dict[str, Any]] = schema.get("paths", {})
        ids = {(path, method): op.get("operationId") for path, ops in paths.items()
               for method, op in ops.items()}
        for (path, method), by_status in _LINKS.items():
            operation = paths.get(path, {}).get(method)
            if operation is None:
                continue
            for status, links in by_status.items():
                response = operation.get("responses", {}).get(status)
                if response is None:
                    continue
                response["links"] = {
                    name: {"operationId": ids[(to_path, to_method)], "parameters": params}
                    for name, (to_path, to_method, params) in links.items()
                    if (to_path, to_method) in ids}
        app.openapi_schema = schema
        return schema

    return build


async def _read_limited(request: Request, *, limit: int | None = None) -> bytes:
    """The request body, refused as soon as it passes ``limit`` bytes (at most the settings'
    ``max_upload_bytes``, the default; the guard middleware answers 413 first for that one)."""
    ceiling = request.app.state.ctx.settings.max_upload_bytes
    limit = ceiling if limit is None else min(limit, ceiling)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"this body is limited to {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise InputError("the body is empty")
    return b"".join(chunks)


def _model_parts(form: FormData, max_model_bytes: int) -> tuple[UploadFile, dict[str, Any]]:
    """The ``model`` file and the validated options of a multipart registration."""
    unknown = sorted(set(form.keys()) - {"model", "options"})
    if unknown:
        raise InputError(f"unknown part {unknown[0]!r}: send a 'model' file and 'options'")
    upload = form.get("model")
    if not isinstance(upload, UploadFile):
        raise InputError("the 'model' part is missing or is not a file")
    if upload.size is None or upload.size == 0:
        raise InputError("the 'model' file is empty")
    if upload.size > max_model_bytes:
        raise ModelTooLarge(f"model is {upload.size} bytes, over the limit of {max_model_bytes}")
    text = form.get("options") or "{}"
    if not isinstance(text, str):
        raise InputError("the 'options' part must be JSON text, not a file")
    try:
        options = ModelOptions.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise InputError(f"options: {where}: {first['msg']}") from exc
    return upload, options.model_dump()


def _model_out(row: RegisteredModel, report: dict[str, Any] | None = None) -> ModelOut:
    return ModelOut(id=row.id, model_sha256=row.model_sha256,
                    manifest_sha256=row.manifest_sha256, manifest=row.manifest,
                    created_at=row.created_at, report=report)


def _result_out(s: Session, row: Result, *, new: bool = False) -> ResultOut:
    """A result as the API shows it; ``new``: just accepted in this request (no check is
    recorded and no state disclosed yet: nothing to read)."""
    checks: Sequence[SpotCheck] = []
    if new:
        owed = [int(i) for i in row.spot_segments]
        needed = needed_states(owed)
    else:
        checks = s.scalars(select(SpotCheck).where(SpotCheck.result_id == row.id)
                           .order_by(SpotCheck.segment)).all()
        owed, needed = owed_segments(s, row), disclosure_needed(s, row)
    return ResultOut(
        id=row.id, model_id=row.model_id, provider=row.provider, status=row.status.value,
        trace_root=row.trace_root, accepted_at=row.accepted_at,
        challenge_deadline=row.challenge_deadline, finalized_at=row.finalized_at,
        trace_uploaded=row.trace_blob is not None,
        spot_checks=[{"segment": c.segment, "outcome": c.outcome.value,
                      "maxdiff_units": c.maxdiff_units, "tolerance": c.tolerance}
                     for c in checks],
        owed_checks=owed,
        disclosure=DisclosureRequest(states=needed, deadline=row.disclosure_deadline)
        if needed and row.disclosure_deadline is not None else None,
    )
