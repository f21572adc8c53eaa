"""Benchmark the service: result acceptance throughput and latency, and spot-check cost.

1. A real API process (``refute serve``) on SQLite and on PostgreSQL (a throwaway local
   cluster): a network and a model are registered, then N pre-signed results are submitted
   from C client threads; prints accepted results per second and p50/p99 latency.
2. Spot-check CPU time per result at p=0.1, k=1, as a fraction of the provider's own inference
   time for the model: expected cost = p × (verify the uploaded trace + re-run one segment).

Run: ``.venv/bin/python -m bench.bench_service [--results 400] [--clients 4] [--model mlp_8x256]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eth_account import Account
from rich.console import Console
from rich.table import Table

from refute import zoo
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import prepare_model, run_trace
from refute.segmentation import run_whole
from tests.servers import free_port, postgres_server
from verifier.client import RefuteClient, sign_result
from verifier.db import migrate
from verifier.spotcheck import check_segment

PROVIDER = Account.from_key(b"\x09" * 32)


@contextmanager
def api_process(database_url: str, workdir: Path) -> Iterator[str]:
    """``refute serve`` on a free port against ``database_url``."""
    migrate(database_url)
    port = free_port()
    env = {**os.environ, "REFUTE_DATABASE_URL": database_url,
           "REFUTE_BLOB_DIR": str(workdir / "blobs"), "REFUTE_SPOT_KEY": "ee" * 16,
           "REFUTE_REDIS_URL": "redis://127.0.0.1:1/0"}
    process = subprocess.Popen([sys.executable, "-m", "verifier", "serve", "--port", str(port)],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/v1/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def _submissions(url: str, model_name: str, n: int) -> tuple[RefuteClient, list[dict[str, Any]]]:
    admin = RefuteClient(url)
    network_id, key = admin.create_network("bench")
    client = RefuteClient(url, key)
    model = getattr(zoo, model_name)()
    registered = client.register_model(model.onnx_bytes, calibration_samples=2)
    manifest = Manifest.from_json(registered["manifest"])
    prepared = dataclasses.replace(prepare_model(model.onnx_bytes), manifest=manifest)
    trace = run_trace(prepared, model.sample_input(0))
    deadline = int(time.time()) + 3600
    bodies = [sign_result(network_id=network_id, model_id=registered["id"],
                          model_sha256=registered["model_sha256"], trace=trace,
                          input_hash=i.to_bytes(32, "big"), output_hash=b"\x00" * 32, stake=1,
                          nonce=i, deadline=deadline, private_key=PROVIDER.key,
                          provider=PROVIDER.address) for i in range(n)]
    return client, bodies


def _submit_all(client: RefuteClient, bodies: list[dict[str, Any]], clients: int
                ) -> tuple[float, list[float]]:
    def one(body: dict[str, Any]) -> float:
        start = time.perf_counter()
        client.submit_result(body)
        return time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, bodies))
    return time.perf_counter() - start, latencies


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    """Run both benchmarks and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", default="mlp_8x256")
    args = parser.parse_args()
    console = Console(width=160)
    table = Table(title=f"result acceptance: {args.results} signed results, "
                        f"{args.clients} client threads, model {args.model}")
    for column in ("database", "accepted/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="refute-bench-") as tmp:
        work = Path(tmp)
        backends: list[tuple[str, Any]] = [("SQLite", None), ("PostgreSQL", postgres_server)]
        for label, server in backends:
            console.print(f"[dim]{label}: registering and submitting…[/dim]")
            if server is None:
                ctx: Any = contextmanager(lambda: iter([f"sqlite:///{work / 'bench.db'}"]))()
            else:
                ctx = server()
            with ctx as database_url, api_process(database_url, work / label) as url:
                client, bodies = _submissions(url, args.model, args.results)
                elapsed, latencies = _submit_all(client, bodies, args.clients)
                table.add_row(label, f"{len(bodies) / elapsed:,.0f}",
                              f"{statistics.median(latencies) * 1e3:.1f}",
                              f"{_pct(latencies, 0.99) * 1e3:.1f}")
    console.print(table)
    _spotcheck_cost(console, args.model)


def _spotcheck_cost(console: Console, model_name: str) -> None:
    model = getattr(zoo, model_name)()
    prepared = prepare_model(model.onnx_bytes)
    n = prepared.segmentation.num_segments
    manifest = dataclasses.replace(prepared.manifest, tolerances=(1,) * n, range=1e6)
    prepared = dataclasses.replace(prepared, manifest=manifest)
    inputs = model.sample_input(0)
    executor = DeterministicExecutor()
    trace = run_trace(prepared, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = trace.write(Path(tmp) / "t.rtrace")
        reps = 20
        run_whole(executor, prepared.loaded, inputs)
        start = time.process_time()
        for _ in range(reps * 10):
            run_whole(executor, prepared.loaded, inputs)
        inference = (time.process_time() - start) / (reps * 10)
        start = time.process_time()
        for i in range(reps):
            from refute.trace import Trace

            loaded = Trace.read(bundle)
            check_segment(executor, prepared.segmentation, loaded, 1 + i % n)
        check_with_verify = (time.process_time() - start) / reps
        start = time.process_time()
        for i in range(reps * 10):
            stored = Trace.read(bundle, rehash=False)
            check_segment(executor, prepared.segmentation, stored, 1 + i % n)
        check_stored = (time.process_time() - start) / (reps * 10)
        start = time.process_time()
        for i in range(reps * 10):
            check_segment(executor, prepared.segmentation, trace, 1 + i % n)
        check_only = (time.process_time() - start) / (reps * 10)
    p = 0.1
    table = Table(title=f"spot-check CPU per result at p={p}, k=1 ({model_name}, {n} segments)")
    for column in ("", "CPU ms", "per result (×p) ms", "÷ provider inference"):
        table.add_column(column, justify="right")
    table.add_row("provider inference (whole model)", f"{inference * 1e3:.3f}", "", "1.00x")
    table.add_row("check: re-verify whole bundle + re-run 1 segment",
                  f"{check_with_verify * 1e3:.2f}", f"{p * check_with_verify * 1e3:.3f}",
                  f"{p * check_with_verify / inference:.1f}x")
    table.add_row("check as the worker does it: read stored bundle + re-run 1 segment",
                  f"{check_stored * 1e3:.3f}", f"{p * check_stored * 1e3:.4f}",
                  f"{p * check_stored / inference:.2f}x")
    table.add_row("check: re-run 1 segment only", f"{check_only * 1e3:.3f}",
                  f"{p * check_only * 1e3:.4f}", f"{p * check_only / inference:.3f}x")
    console.print(table)


if __name__ == "__main__":
    main()
