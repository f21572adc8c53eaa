"""The API as a worker process of ``refute serve --workers N`` builds it: from the environment.

uvicorn starts each worker by importing :func:`app_from_environment` (``factory=True``); the
parent has already checked the settings and upgraded the schema.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from refute.logs import configure_logging
from refute.settings import get_settings
from verifier.api.app import create_app
from verifier.service import ServiceContext

#: The environment variable that carries ``--admin-token`` to the worker processes.
ADMIN_TOKEN_ENV = "REFUTE_ADMIN_TOKEN"


def app_from_environment() -> FastAPI:
    """The API over the settings of the environment (``REFUTE_*``), network creation guarded by
    ``REFUTE_ADMIN_TOKEN`` when it is set."""
    settings = get_settings()
    configure_logging(settings)
    return create_app(ServiceContext.create(settings),
                      admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
