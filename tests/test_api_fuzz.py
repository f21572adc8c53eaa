"""Schemathesis over the OpenAPI schema: no request, however malformed, gets a 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from verifier.api.app import create_app
from verifier.db import migrate
from verifier.service import ServiceContext
from verifier.settings import ServiceSettings

WORKDIR = Path(tempfile.mkdtemp(prefix="refute-fuzz-"))


def _app() -> tuple[object, str]:
    db = WORKDIR / "fuzz.db"
    service = ServiceSettings(database_url=f"sqlite:///{db}", blob_dir=WORKDIR / "blobs",
                              redis_url="redis://127.0.0.1:1/0", spot_key="cd" * 16)
    migrate(service.database_url)
    app = create_app(ServiceContext.create(service), enqueue=lambda _rid: None)
    with TestClient(app) as client:
        key = client.post("/v1/networks", json={"name": "fuzz"}).json()["api_key"]
    return app, str(key)


schemathesis.serializer.alias("application/zip", "application/octet-stream")
APP, API_KEY = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    """Authenticated as a real network, every generated request answers below 500."""
    response = case.call(headers={"X-API-Key": API_KEY})
    if case.path == "/v1/ready" and response.status_code == 503:
        return  # its documented answer without a broker (none runs here)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
