"""Schemathesis over the OpenAPI document of a real ``refute serve`` on a fresh home.

All four phases run (examples, coverage, fuzzing, and stateful, which follows the document's
links: ``POST /v1/networks`` hands its ``api_key`` to the calls that need one). Every check runs
except ``positive_data_acceptance``: schema-valid data is routinely and rightly refused here (a
random signature, an unknown id, a cursor of another network), with a 4xx. Among the checks
that run: no 5xx (``not_a_server_error``), every answer's body matches its documented schema,
and every error answer is documented with the error schema (``4XX``/``5XX`` on every operation),
so every error body is validated (``response_schema_conformance``); wrong methods get 405 with a
correct ``Allow`` header; schema-violating data is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api_server import start_server
from tests.servers import redis_server

ROOT = Path(__file__).resolve().parents[1]
#: Test cases per operation and phase: bounds the run (about two minutes on two cores).
MAX_EXAMPLES = 8


@pytest.mark.slow
def test_schemathesis_all_phases_no_server_error_and_documented_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with redis_server(tmp_path / "redis") as redis:
        # A broker, so that /v1/ready answers 200 (its documented 503 means "no broker").
        server = start_server(home, env={"REFUTE_REDIS_URL": redis.url,
                                         "REFUTE_SPOT_KEY": "cd" * 16})
        try:
            created = httpx.post(f"{server.url}/v1/networks", json={"name": "fuzz"}, timeout=30)
            assert created.status_code == 201, created.text
            key = created.json()["api_key"]
            report = tmp_path / "junit.xml"
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
                   "PYTHONPATH": str(ROOT)}
            run = subprocess.run(
                [str(Path(sys.executable).with_name("schemathesis")), "run",
                 f"{server.url}/openapi.json",
                 "--phases", "examples,coverage,fuzzing,stateful",
                 "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                 "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--seed", "20261203",
                 "--request-timeout", "60", "--no-color",
                 "--header", f"X-API-Key: {key}",
                 "--report", "junit", "--report-junit-path", str(report)],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
            print(run.stdout[-2500:])  # the summary, for the log of the run
            assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
            summary = run.stdout.rsplit("SUMMARY", 1)[-1]
            for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
                assert f"✅ {phase}" in summary, summary  # ran, and passed
            assert "Server error" not in run.stdout
            assert server.alive()
            assert "Traceback" not in server.log(), server.log()[-4000:]
        finally:
            server.stop()
