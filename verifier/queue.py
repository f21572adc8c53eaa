"""The task-queue port's Celery adapter: background work sent to the workers by task name.

It satisfies :class:`challenge.context.TaskQueue` (proofs) and also carries the service's own
tasks (spot-checks, the watcher). The Celery app is obtained on first use, never at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from celery import Celery


class CeleryTasks:
    """Sends tasks through the Celery app ``app()`` returns (built on first use)."""

    def __init__(self, app: Callable[[], Celery]) -> None:
        self._make_app = app

    @functools.cached_property
    def _app(self) -> Celery:
        return self._make_app()

    def _send(self, name: str, *args: str) -> None:
        self._app.send_task(name, args=list(args))

    def schedule_proof(self, dispute_id: str) -> None:
        """Have the proof a dispute waits for made (task ``refute.prove``)."""
        self._send("refute.prove", dispute_id)

    def schedule_spotcheck(self, result_id: str) -> None:
        """Have a result's owed spot-checks run (task ``refute.spotcheck``)."""
        self._send("refute.spotcheck", result_id)

    def schedule_watch(self, result_id: str) -> None:
        """Have the service's watcher check a whole result (task ``refute.watch``)."""
        self._send("refute.watch", result_id)
