"""The API's outermost guard, a pure ASGI middleware (no ``BaseHTTPMiddleware`` buffering).

For every HTTP request it

* counts the body bytes actually received, whatever ``Content-Length`` says (or whether there
  is one: chunked bodies are counted the same way), and answers 413 with the error schema as soon
  as the count passes the limit, without reading or keeping anything beyond it. The limit is
  small (``max_body_bytes``) except on the few routes listed as :class:`LargeBody` (model
  registration, trace upload), and a large body on a route that needs an API key is refused
  with 401 before a byte of it is read when the request carries no well-formed key;
* checks the nesting depth of every body FastAPI would decode as JSON (no content type,
  ``application/json`` or ``application/*+json``) *before* the route sees it, against
  :data:`refute.safejson.MAX_DEPTH` (with :func:`refute.safejson.json_depth`, the same
  bound as :func:`refute.safejson.nesting_depth` in linear time, off the event loop for large
  bodies), so a deeply nested document is a 400, never a recursion crash;
* gives every request one id: the client's ``X-Request-ID`` when it is a sane token (see
  :data:`REQUEST_ID`), else a fresh one. It is in ``request.state.request_id`` for the routes and
  the exception handlers (:func:`request_id`), in the ``X-Request-ID`` header of every answer,
  and in the reason of every 5xx, whose log record carries it too (``extra={"request_id": …}``);
* turns an unexpected exception into a 500 with the error schema and the request id, and logs
  the traceback with that id (the body never carries a traceback);
* reports each answer's status and latency to ``observe`` (metrics).
"""

from __future__ import annotations

import asyncio
import email.message
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from refute.errors import InputError, RefuteError
from refute.safejson import MAX_DEPTH, json_depth

log = logging.getLogger("refute.api")
#: A request id a client may choose: a short token of letters, digits and ``._:=+/-`` (a UUID,
#: a hex id, a tracing header's id); anything else is replaced by a fresh id.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=+/-]{0,127}")
#: The header that carries the request id, both ways.
REQUEST_ID_HEADER = "x-request-id"
#: Bodies up to this size have their JSON depth measured on the event loop (< 5 ms).
_INLINE_DEPTH_CHECK = 256 * 2**10


class BodyTooLarge(RefuteError):
    """The request body is longer than the configured limit."""

    code = "body_too_large"
    http_status = 413


def new_request_id(offered: str | None = None) -> str:
    """``offered`` (a client's ``X-Request-ID``) if it is a sane token, else a fresh id."""
    if offered is not None and REQUEST_ID.fullmatch(offered) is not None:
        return offered
    return secrets.token_hex(8)


def request_id(scope: MutableMapping[str, Any]) -> str:
    """The id the guard gave the request of ``scope`` (``"-"`` for a request it did not see)."""
    state = scope.get("state")
    found = state.get("request_id") if isinstance(state, MutableMapping) else None
    return str(found) if found is not None else "-"


def error_bytes(code: str, reason: str) -> bytes:
    """The JSON error body ``{"error": {"code", "reason"}}``."""
    return json.dumps({"error": {"code": code, "reason": reason}},
                      separators=(",", ":")).encode()


def decoded_as_json(content_type: str | None) -> bool:
    """Whether FastAPI decodes a body of this content type as JSON (the same rule it applies:
    no content type, or ``application/json`` or ``application/<anything>+json``)."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


async def _answer(send: Send, status: int, code: str, reason: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_bytes(code, reason)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@dataclass(frozen=True)
class LargeBody:
    """A route that accepts bodies up to ``max_bytes`` (``path`` must match the whole path);
    with ``key_header``, a request without a well-formed API key in that header is refused
    before its body is read."""

    method: str
    path: re.Pattern[str]
    max_bytes: int
    key_header: str | None = None


class Guard:
    """Body limits, JSON depth check, request ids, unexpected failures, metrics (see module)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int,
                 large: Sequence[LargeBody] = (), max_json_depth: int = MAX_DEPTH,
                 key_ok: Callable[[str], bool] | None = None,
                 observe: Callable[[Scope, int, float], None] | None = None) -> None:
        """Wrap ``app``; bodies are limited to ``max_body_bytes`` except on the ``large``
        routes; ``key_ok`` says whether a header value has the shape of an API key;
        ``observe(scope, status, seconds)`` is called once per answer."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.large = tuple(large)
        self.max_json_depth = max_json_depth
        self.key_ok = key_ok
        self.observe = observe

    def _route(self, scope: Scope) -> LargeBody | None:
        method = str(scope.get("method", "")).upper()
        path = str(scope.get("path", ""))
        return next((r for r in self.large
                     if r.method == method and r.path.fullmatch(path) is not None), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 0
        rid = new_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        state = scope.setdefault("state", {})
        state["request_id"] = rid

        async def send_tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(k, v) for k, v in message.get("headers", ())
                           if bytes(k).lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [
                    *headers, (REQUEST_ID_HEADER.encode(), rid.encode("latin-1"))]}
            await send(message)

        try:
            await self._guarded(scope, receive, send_tracked)
        finally:
            if self.observe is not None:
                self.observe(scope, status or 500, time.perf_counter() - began)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        route = self._route(scope)
        limit = route.max_bytes if route is not None else self.max_body_bytes
        too_large = BodyTooLarge(f"bodies of {scope.get('method')} {str(scope.get('path'))[:200]}"
                                 f" are limited to {limit} bytes")
        length = headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.isdigit():
                await _answer(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(length) > limit:
                await _answer(send, 413, too_large.code, too_large.reason)
                return
        if route is not None and route.key_header is not None and self.key_ok is not None:
            key = headers.get(route.key_header)
            if key is None or not self.key_ok(key):
                await _answer(send, 401, "auth_error", f"missing or malformed API key "
                              f"({route.key_header})")
                return
        received = 0
        started = False
        answered = False  # the guard itself answered (413): the app's answer is dropped

        async def send_marking(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def counting_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Answer now and tell the app the client is gone: nothing past the limit
                    # is read, and whatever the app does with the rest is dropped.
                    if not started:
                        await _answer(send, 413, too_large.code, too_large.reason,
                                      [(b"connection", b"close")])
                    answered = True
                    return {"type": "http.disconnect"}
            return message

        try:
            downstream: Receive = counting_receive
            if decoded_as_json(headers.get("content-type")):
                downstream = await self._checked_json(counting_receive, limit)
                if answered:
                    return
            await self.app(scope, downstream, send_marking)
        except RefuteError as exc:  # the guard's own refusals (the app's have handlers)
            if answered:
                return
            if started:
                raise
            reason = exc.reason
            if exc.http_status >= 500:  # every 5xx is logged with its request id
                rid = request_id(scope)
                log.error("%s %s failed (request id %s)", scope.get("method"), scope.get("path"),
                          rid, exc_info=exc, extra={"request_id": rid})
                reason = f"{reason} (request id {rid})"
            await _answer(send_marking, exc.http_status, exc.code, reason)
        except Exception:
            if answered:
                return  # the app failed on the disconnect we made up: already answered 413
            rid = request_id(scope)
            log.exception("unexpected error on %s %s (request id %s)", scope.get("method"),
                          scope.get("path"), rid, extra={"request_id": rid})
            if started:
                raise
            await _answer(send_marking, 500, "internal_error",
                          f"unexpected server error (request id {rid})")

    async def _checked_json(self, receive: Receive, limit: int) -> Receive:
        """Read the whole (limited) body, check its nesting, and return a ``receive`` that
        replays it. Raises :class:`InputError` if it nests too deep."""
        chunks: list[bytes] = []
        for _ in range(limit + 2):  # bounded: past the limit, receive reports a disconnect
            message = await receive()
            if message["type"] != "http.request":
                return _replay(b"".join(chunks), receive, first=message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if len(body) > _INLINE_DEPTH_CHECK:  # a large body is scanned off the event loop
            depth = await asyncio.to_thread(json_depth, body, limit=self.max_json_depth)
        else:
            depth = json_depth(body, limit=self.max_json_depth)
        if depth > self.max_json_depth:
            raise InputError(f"the JSON body nests {depth} levels deep; at most "
                             f"{self.max_json_depth} are accepted")
        return _replay(body, receive)


def _replay(body: bytes, receive: Receive, first: Message | None = None) -> Receive:
    """A ``receive`` that yields ``body`` once (or ``first``, a disconnect), then defers to the
    real one (which reports the disconnect when it comes)."""
    pending: list[Message] = [first] if first is not None else [
        {"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


def scope_route(scope: MutableMapping[str, Any]) -> str:
    """The metrics label of a request: the first path segment after ``/v1/``, else ``other``."""
    path = str(scope.get("path", ""))
    parts = path.split("/")
    return parts[2] if path.startswith("/v1/") and len(parts) > 2 else "other"
