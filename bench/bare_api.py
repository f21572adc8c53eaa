"""The ceiling ``bench/bench_service.py`` measures the real API against: a bare FastAPI app.

It serves ``POST /v1/results`` and ``POST /v1/result-batches`` with the real API's request
bodies (:class:`verifier.api.schemas.ResultSubmit` and :class:`~verifier.api.schemas.ResultBatch`,
parsed and validated by pydantic exactly as there, by plain ``def`` routes as there), but checks
no key, signature or nonce and touches no database: what remains is uvicorn, FastAPI and the
body's parsing. A single result is answered 202 with a small JSON; a batch with the real
:class:`~verifier.api.schemas.BatchOut` (every item 202 with an id). ``GET /v1/health`` tells
when it is up. :func:`refusal` reads an answer of either app (the bench and its locust user
check every one).

Served as the real API is, with the same worker count::

    uvicorn.run("bench.bare_api:create", factory=True, workers=N, host="127.0.0.1", port=P)
"""

from __future__ import annotations

import itertools
import json

from fastapi import FastAPI

from verifier.api.schemas import BatchItem, BatchOut, ResultBatch, ResultSubmit

#: Ids handed out by this worker process (unique within it; nothing is stored).
_IDS = itertools.count()


def _next_id() -> str:
    return f"res_bare{next(_IDS):016x}"


def refusal(status: int, answer: bytes, batch: bool) -> str | None:
    """Why an answer of ``POST /v1/results`` (``batch`` false) or ``POST /v1/result-batches``
    did not accept every result it carried as new (202); ``None`` when it did."""
    if status >= 400 or (not batch and status != 202):
        return f"HTTP {status}: {answer[:300].decode(errors='replace')}"
    if batch:
        for item in json.loads(answer)["items"]:
            if item["status"] != 202:
                error = item.get("error") or {}
                return (f"result {item['index']} of a batch: {item['status']} "
                        f"{error.get('code')}: {error.get('reason')}")
    return None


def create() -> FastAPI:
    """The bare app (a factory, so that each uvicorn worker process builds its own)."""
    app = FastAPI(title="refute bare ceiling", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        """Up."""
        return {"status": "ok"}

    @app.post("/v1/results", status_code=202)
    def submit(body: ResultSubmit) -> dict[str, str]:
        """Parse one signed result; accept it without looking at it."""
        return {"id": _next_id(), "model_id": body.model_id, "status": "ACCEPTED"}

    @app.post("/v1/result-batches", response_model=BatchOut)
    def submit_batch(body: ResultBatch) -> BatchOut:
        """Parse a batch of signed results; accept every one without looking at it."""
        items = [BatchItem(index=i, status=202, id=_next_id()) for i in range(len(body.results))]
        return BatchOut(items=items, accepted=len(items), refused=0)

    return app
