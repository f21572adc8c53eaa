"""Locust user for ``bench/bench_service.py --locust``: posts pre-signed results to the real API.

Not meant to be run by hand: ``bench_service`` starts the API, signs the results and runs::

    locust -f bench/locustfile.py --headless -u USERS -r USERS -t SECONDS \\
        --host http://127.0.0.1:PORT --csv PREFIX

with the environment naming what to send:

- ``REFUTE_BENCH_BODIES``: a file of request bodies, one JSON document a line (each a signed
  result, or a ``{"results": [...]}`` batch of them), sent once each, in order;
- ``REFUTE_BENCH_PATH``: ``/v1/results`` or ``/v1/result-batches``;
- ``REFUTE_BENCH_API_KEY``: the network's API key.

A request counts as a failure unless every result in it is accepted (202). The run is
bounded twice: by ``-t`` and by the bodies: when they are all sent, the run stops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from locust import FastHttpUser, task
from locust.exception import StopTest

from bench.bare_api import refusal


def _bodies() -> Iterator[str]:
    """The request bodies of ``REFUTE_BENCH_BODIES`` (empty when it is not set)."""
    name = os.environ.get("REFUTE_BENCH_BODIES")
    if not name:
        return iter(())
    return iter(Path(name).read_text().splitlines())


#: Shared by every user of this (single, gevent) process: each body is sent once.
BODIES = _bodies()
PATH = os.environ.get("REFUTE_BENCH_PATH", "/v1/result-batches")
HEADERS = {"Content-Type": "application/json",
           "X-API-Key": os.environ.get("REFUTE_BENCH_API_KEY", "")}


class Submitter(FastHttpUser):
    """Posts the next pre-signed body, with no wait between requests."""

    @task
    def submit(self) -> None:
        """Send one body; stop the whole run when there are none left."""
        body = next(BODIES, None)
        if body is None:
            raise StopTest("every body is sent")  # a headless run quits
        with self.client.post(PATH, data=body, headers=HEADERS, name=PATH,
                              catch_response=True) as answer:
            why = refusal(answer.status_code, answer.content or b"",
                          PATH.endswith("batches"))
            if why is None:
                answer.success()
            else:
                answer.failure(why)
