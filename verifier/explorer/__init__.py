"""The dispute explorer: static pages served by the API under ``/explorer/``.

``/explorer/`` lists a network's results and disputes once its API key is entered (the key
stays in the tab's ``sessionStorage`` and travels only as the ``X-API-Key`` header of the JSON
API's requests, never in a URL); ``/explorer/disputes/{id}`` is a dispute's public page
(``GET /v1/disputes/{id}/record``). Plain HTML, one script and one style sheet shipped as
package data: no build step, no third-party host, and no data in the markup (the script renders
every value as text), under a strict Content-Security-Policy.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from refute.errors import NotFound

#: The files the explorer serves, with their media types (nothing else is served).
STATIC: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "dispute.html": "text/html; charset=utf-8",
    "explorer.js": "text/javascript; charset=utf-8",
    "explorer.css": "text/css; charset=utf-8",
}

#: Headers of every explorer answer: only this origin's script, style and API; no framing.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_file(name: str) -> Response:
    """The explorer's file ``name`` (one of :data:`STATIC`) with its media type and the
    explorer's headers; :class:`NotFound` for any other name."""
    media_type = STATIC.get(name)
    if media_type is None:
        raise NotFound(f"no explorer file {name[:100]!r}")
    data = resources.files(__name__).joinpath("static", name).read_bytes()
    return Response(content=data, media_type=media_type, headers=HEADERS)


def pages() -> APIRouter:
    """The explorer's routes (pages and their static files; not part of the OpenAPI
    document: they serve HTML, the data comes from the JSON API)."""
    api = APIRouter(include_in_schema=False)

    @api.get("/explorer")
    def explorer_root() -> RedirectResponse:
        return RedirectResponse("/explorer/", status_code=308)

    @api.get("/explorer/")
    def network_page() -> Response:
        return static_file("index.html")

    @api.get("/explorer/disputes/{dispute_id}")
    def dispute_page(dispute_id: str) -> Response:
        del dispute_id  # the page reads it from its own URL
        return static_file("dispute.html")

    @api.get("/explorer/static/{name}")
    def explorer_static(name: str) -> Response:
        return static_file(name)

    return api
