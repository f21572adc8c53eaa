"""Benchmark the service: result acceptance throughput and latency, a load test, spot-check cost.

1. **Acceptance** (issue 14). The real API (``refute serve --workers N``) on SQLite (a temp file)
   and on PostgreSQL (a throwaway local cluster), and, as the ceiling, a bare FastAPI app
   (``bench/bare_api.py``: the same request bodies parsed by the same framework, nothing
   checked, no database) served by uvicorn with the same worker count, in the same run. On each
   database a network and a model are registered; every result is signed and serialized before
   any timing. The results are then sent from C client threads, each over one persistent
   loopback HTTP connection (``http.client``), two ways: one result a request
   (``POST /v1/results``) and batches of ``--batch`` results (``POST /v1/result-batches``). The
   bare app gets the last database's bodies, the same two ways, sent over and over for at least
   ``--bare-seconds`` (it keeps nothing; one pass would be over too soon to time). A few
   requests a client warm each run up, untimed. Every answer is checked: a result not accepted
   as new (202) voids that target (the end of its server log is printed), the others are still
   measured, and the bench exits with status 1 naming the first refusal. Per row: results,
   requests, accepted results/s, p50 and p99 request latency (closed loop: C requests in
   flight, so latency ≈ C ÷ requests/s) and the ratio to the bare route in the same mode.
   Then a verdict on each of issue 14's targets for PostgreSQL batches (≥ 2,000 results/s,
   p99 < 50 ms, ≥ 0.3× the bare route): reported, not enforced.
2. **Load test** (``--locust``, not in CI). locust (``bench/locustfile.py``) headless against the
   PostgreSQL API (else the last database's) on loopback: ``--locust-users`` users posting
   pre-signed batches (or single results), each body sent once, for at most
   ``--locust-seconds`` (less when the ``--locust-results`` run out) under a hard subprocess
   timeout; prints its requests/s, results/s, failures and p50/p99 (from its CSV). A failed
   request makes the bench exit 1 too.
3. **Spot-check cost** (unless ``--no-spotcheck``): CPU time per result at p=0.1, k=1, as a
   fraction of the provider's own inference time for the model: expected cost = p × (verify
   the uploaded trace + re-run one segment).

Servers, client threads and locust all share the machine's cores, as they would on one box.
Everything printed is also written to ``--out`` (JSON).

Run (from the repository root)::

    .venv/bin/python -m bench.bench_service [--results 4000] [--single-results 1000]
        [--batch 50] [--clients 4] [--workers N] [--databases sqlite,postgresql] [--locust]

A quick check that it works: ``--results 200 --single-results 100 --no-spotcheck``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account
from rich.console import Console
from rich.table import Table

from bench.bare_api import refusal
from refute import zoo
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import prepare_model, run_trace
from refute.segmentation import run_whole
from refute.trace import Trace
from tests.servers import free_port, postgres_server
from verifier.api.schemas import MAX_BATCH
from verifier.client import RefuteClient, sign_result
from verifier.spotcheck import check_segment

PROVIDER = Account.from_key(b"\x09" * 32)
REPO = Path(__file__).resolve().parent.parent
SINGLE_PATH = "/v1/results"
BATCH_PATH = "/v1/result-batches"
#: Seconds a server has to answer its health check after it is started.
START_TIMEOUT_S = 120.0
#: Pause after the first health answer, so that every worker process is listening before the
#: clients connect (a persistent connection stays with the worker that accepted it).
SETTLE_S = 2.0
#: Socket timeout of one request.
REQUEST_TIMEOUT_S = 60.0
#: Issue 14's targets, for PostgreSQL batches.
TARGET_RATE = 2000.0
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.3


class Refused(Exception):
    """A result was not accepted, or a request failed: the measurement is void."""

    #: The results signed for the run that failed (the bare app can still be measured).
    workload: Workload | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """One pre-serialized request body and how many results it carries."""

    body: bytes
    results: int


def requests_of(results: Sequence[bytes], batch: int | None) -> list[Request]:
    """The request bodies sending ``results`` (each a serialized signed result): one a request
    when ``batch`` is None, else ``{"results": [...]}`` bodies of ``batch`` results."""
    if batch is None:
        return [Request(body, 1) for body in results]
    return [Request(b'{"results":[' + b",".join(results[i:i + batch]) + b"]}",
                    len(results[i:i + batch])) for i in range(0, len(results), batch)]


@dataclasses.dataclass
class Signer:
    """Signs results for a network and model registered on a running API."""

    network_id: str
    api_key: str
    model_id: str
    model_sha256: str
    trace: Trace
    nonce: int = 0

    def sign(self, n: int) -> list[bytes]:
        """``n`` new signed results (fresh nonces), each serialized as its JSON body."""
        deadline = int(time.time()) + 3600
        bodies = [json.dumps(sign_result(
            network_id=self.network_id, model_id=self.model_id, model_sha256=self.model_sha256,
            trace=self.trace, input_hash=nonce.to_bytes(32, "big"), output_hash=b"\x00" * 32,
            stake=1, nonce=nonce, deadline=deadline, private_key=PROVIDER.key,
            provider=PROVIDER.address), separators=(",", ":")).encode()
            for nonce in range(self.nonce, self.nonce + n)]
        self.nonce += n
        return bodies


def register(url: str, model_name: str) -> Signer:
    """Create a network and register ``model_name`` (from :mod:`refute.zoo`) on the API at
    ``url``; compute the trace the results will commit to."""
    with RefuteClient(url) as admin:
        network_id, key = admin.create_network("bench")
    model = getattr(zoo, model_name)()
    with RefuteClient(url, key) as client:
        registered = client.register_model(model.onnx_bytes, calibration_samples=2)
    manifest = Manifest.from_json(registered["manifest"])
    prepared = dataclasses.replace(prepare_model(model.onnx_bytes), manifest=manifest)
    trace = run_trace(prepared, model.sample_input(0))
    return Signer(network_id, key, registered["id"], registered["model_sha256"], trace)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session, with every worker process it forked."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def _serving(command: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Run ``command --port P`` (an HTTP server) on a free loopback port until its
    ``/v1/health`` answers; yields its URL, stops it (and its workers) afterwards."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, "--port", str(port)], env=env, cwd=REPO,
                                   start_new_session=True, stdin=subprocess.DEVNULL,
                                   stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/health", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"{command[2:4]} did not start:\n{tail}") from None
                time.sleep(0.2)
        time.sleep(SETTLE_S)
        try:
            yield url
        except Refused as exc:
            tail = log.read_text(errors="replace").strip()[-2000:]
            if tail:
                exc.args = (f"{exc}\n{log.name} ends:\n{tail}",)
            raise
    finally:
        _stop_group(process)


def api_server(database_url: str, workdir: Path, workers: int) -> AbstractContextManager[str]:
    """``refute serve --workers N`` against ``database_url`` (its schema is created first)."""
    env = {key: value for key, value in os.environ.items() if key != "REFUTE_ADMIN_TOKEN"}
    env.update(REFUTE_DATABASE_URL=database_url, REFUTE_BLOB_DIR=str(workdir / "blobs"),
               REFUTE_SPOT_KEY="ee" * 16, REFUTE_REDIS_URL="redis://127.0.0.1:1/0")
    return _serving([sys.executable, "-m", "verifier", "serve", "--workers", str(workers)],
                    env, workdir / "serve.log")


def bare_server(workdir: Path, workers: int) -> AbstractContextManager[str]:
    """The bare ceiling app (``bench/bare_api.py``), served by uvicorn with ``workers``."""
    return _serving([sys.executable, "-m", "uvicorn", "bench.bare_api:create", "--factory",
                     "--workers", str(workers), "--host", "127.0.0.1", "--log-level",
                     "warning"], dict(os.environ), workdir / "bare.log")


@dataclasses.dataclass(frozen=True)
class Run:
    """What one timed run of requests gave."""

    results: int
    requests: int
    seconds: float
    latencies: list[float]
    #: The run hit its time limit before every request was sent.
    truncated: bool


def load(url: str, path: str, requests: Sequence[Request], clients: int, *, api_key: str,
         max_seconds: float, min_seconds: float = 0.0) -> Run:
    """Send ``requests`` to ``url`` + ``path`` from ``clients`` threads, each over one
    persistent connection, taking the next unsent request as soon as its last one is answered;
    timed from when every client is connected to the last answer, stopped at ``max_seconds``.
    With ``min_seconds`` (for the bare app, which keeps nothing) the requests are sent again
    and again until that long has passed. Raises :class:`Refused` when an answer does not
    accept every result it carries."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"Content-Type": "application/json", "X-API-Key": api_key}
    batch = path == BATCH_PATH
    if not requests:
        raise ValueError("no requests to send")
    sent = [0]
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[str] = []
    latencies: list[list[float]] = [[] for _ in range(clients)]
    accepted = [0] * clients
    finished = [0.0] * clients
    start: list[float] = []
    truncated: list[bool] = []
    barrier = threading.Barrier(clients, action=lambda: start.append(time.perf_counter()))

    def client(k: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.request("GET", "/v1/health")
            connection.getresponse().read()
            barrier.wait(timeout=REQUEST_TIMEOUT_S)
            deadline = start[0] + max_seconds
            while not stop.is_set():
                began = time.perf_counter()
                with lock:
                    index = sent[0]
                    sent[0] += 1
                if index >= len(requests) and began - start[0] >= min_seconds:
                    break
                item = requests[index % len(requests)]
                if began > deadline:
                    truncated.append(True)
                    break
                connection.request("POST", path, body=item.body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                latencies[k].append(time.perf_counter() - began)
                why = refusal(answer.status, data, batch)
                if why is not None:
                    raise Refused(why)
                accepted[k] += item.results
        except (Refused, OSError, http.client.HTTPException, threading.BrokenBarrierError,
                ValueError, KeyError) as exc:
            errors.append(str(exc) if isinstance(exc, Refused) else
                          f"{type(exc).__name__}: {exc}")
            stop.set()
            barrier.abort()
        finally:
            finished[k] = time.perf_counter()
            connection.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max_seconds + 2 * REQUEST_TIMEOUT_S)
    if any(thread.is_alive() for thread in threads):
        raise Refused(f"{url}{path}: client threads still running past the time limit")
    if errors:
        raise Refused(f"{url}{path}: {errors[0]}")
    every = [latency for per_client in latencies for latency in per_client]
    return Run(sum(accepted), len(every), max(finished) - start[0], every, bool(truncated))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 < q < 1) of ``values`` (the nearest rank above)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the acceptance table."""

    target: str
    mode: str
    results: int
    requests: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    truncated: bool
    ratio: float | None = None

    @classmethod
    def of(cls, target: str, mode: str, run: Run) -> Row:
        """The row of a run."""
        return cls(target, mode, run.results, run.requests, run.seconds,
                   run.results / run.seconds if run.seconds > 0 else 0.0,
                   statistics.median(run.latencies) * 1e3 if run.latencies else 0.0,
                   percentile(run.latencies, 0.99) * 1e3 if run.latencies else 0.0,
                   run.truncated)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Serialized signed results for each mode (``single``, ``batch``): the timed ones, and
    the ones sent untimed before them to warm the server up."""

    results: Mapping[str, Sequence[bytes]]
    warmup: Mapping[str, Sequence[bytes]]

    @classmethod
    def sign(cls, signer: Signer, args: argparse.Namespace) -> Workload:
        """Sign the results ``args`` ask for: warm-up (``--warmup`` requests a client), then
        ``--single-results`` and ``--results``."""
        warmup = {"single": signer.sign(args.clients * args.warmup),
                  "batch": signer.sign(args.clients * args.warmup * args.batch)}
        return cls({"single": signer.sign(args.single_results),
                    "batch": signer.sign(args.results)}, warmup)


def measure(console: Console, target: str, url: str, work: Workload, args: argparse.Namespace,
            *, api_key: str, min_seconds: float = 0.0) -> list[Row]:
    """Time ``url`` both ways, each after its untimed warm-up (see :func:`load` for
    ``min_seconds``)."""
    rows = []
    for mode, path, batch in (("single", SINGLE_PATH, None), ("batch", BATCH_PATH, args.batch)):
        console.print(f"[dim]{target} {mode}: {len(work.results[mode])} results…[/dim]")
        if work.warmup[mode]:
            load(url, path, requests_of(work.warmup[mode], batch), args.clients,
                 api_key=api_key, max_seconds=args.max_seconds)
        run = load(url, path, requests_of(work.results[mode], batch), args.clients,
                   api_key=api_key, max_seconds=args.max_seconds, min_seconds=min_seconds)
        rows.append(Row.of(target, mode, run))
    return rows


@contextmanager
def sqlite_file(folder: Path) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh SQLite file in ``folder`` (removed with the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    yield f"sqlite:///{folder / 'bench.db'}"


def databases(work: Path, names: Sequence[str]
              ) -> Iterator[tuple[str, Callable[[], AbstractContextManager[str]]]]:
    """(label, context manager giving its SQLAlchemy URL) for each database asked for."""
    known: dict[str, tuple[str, Callable[[], AbstractContextManager[str]]]] = {
        "sqlite": ("SQLite", lambda: sqlite_file(work / "sqlite")),
        "postgresql": ("PostgreSQL", postgres_server)}
    for name in names:
        yield known[name]


@dataclasses.dataclass(frozen=True)
class LocustRun:
    """What the load test gave (locust's own aggregate figures)."""

    target: str
    users: int
    seconds: int
    mode: str
    requests: int
    failures: int
    requests_per_s: float
    results_per_s: float
    p50_ms: float
    p99_ms: float
    first_failure: str | None


def run_locust(url: str, api_key: str, requests: Sequence[Request], *, target: str, mode: str,
               users: int, seconds: int, workdir: Path) -> LocustRun:
    """Run ``bench/locustfile.py`` headless against ``url`` (loopback) with ``requests`` (each
    sent once), for at most ``seconds``; locust is killed if it overruns by a minute."""
    workdir.mkdir(parents=True, exist_ok=True)
    bodies = workdir / "bodies.jsonl"
    bodies.write_bytes(b"\n".join(request.body for request in requests) + b"\n")
    prefix = workdir / "locust"
    env = {**os.environ, "REFUTE_BENCH_BODIES": str(bodies), "REFUTE_BENCH_API_KEY": api_key,
           "REFUTE_BENCH_PATH": BATCH_PATH if mode == "batch" else SINGLE_PATH}
    command = [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"),
               "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
               "--stop-timeout", "10", "--host", url, "--csv", str(prefix), "--only-summary",
               "--loglevel", "WARNING"]
    log = workdir / "locust.log"
    try:
        with log.open("wb") as sink:
            subprocess.run(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink,
                           stderr=subprocess.STDOUT, timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired:
        raise Refused(f"locust overran -t {seconds}s by a minute and was killed:\n"
                      f"{log.read_text(errors='replace')[-1500:]}") from None
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():
        raise Refused(f"locust wrote no statistics:\n{log.read_text(errors='replace')[-1500:]}")
    with stats.open(newline="") as source:
        total = next(row for row in csv.DictReader(source) if row["Name"] == "Aggregated")
    with Path(f"{prefix}_failures.csv").open(newline="") as source:
        failures = list(csv.DictReader(source))
    count = int(total["Request Count"])
    sent = sum(request.results for request in requests[:count])
    per_request = sent / count if count else 0.0
    rps = _number(total["Requests/s"])
    return LocustRun(target, users, seconds, mode, count, int(total["Failure Count"]), rps,
                     rps * per_request, _number(total["50%"]), _number(total["99%"]),
                     failures[0]["Error"] if failures else None)


def _number(text: str) -> float:
    """A figure of locust's CSV (``N/A`` when there was nothing to measure: 0)."""
    try:
        return float(text)
    except ValueError:
        return 0.0


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Issue 14's targets, judged on the PostgreSQL batch row: met, not met, or not measured."""
    row = next((r for r in rows if r.target == "PostgreSQL" and r.mode == "batch"), None)
    checks: list[tuple[str, Callable[[Row], float], Callable[[float], bool], str]] = [
        (f"≥ {TARGET_RATE:,.0f} accepted results/s", lambda r: r.rate,
         lambda v: v >= TARGET_RATE, "{:,.0f} results/s"),
        (f"p99 < {TARGET_P99_MS:.0f} ms", lambda r: r.p99_ms,
         lambda v: v < TARGET_P99_MS, "{:.1f} ms"),
        (f"≥ {TARGET_RATIO}× the bare route", lambda r: r.ratio or 0.0,
         lambda v: v >= TARGET_RATIO, "{:.2f}×")]
    verdicts: list[dict[str, Any]] = []
    for name, value_of, met, shown in checks:
        if row is None or (name.endswith("route") and row.ratio is None):
            verdicts.append({"target": name, "value": None, "met": None})
            continue
        value = value_of(row)
        verdicts.append({"target": name, "value": value, "met": met(value),
                         "shown": shown.format(value)})
    return verdicts


def _table(rows: Sequence[Row], args: argparse.Namespace) -> Table:
    table = Table(title=f"result acceptance: {args.clients} client threads, {args.workers} "
                        f"server workers, batches of {args.batch}, model {args.model}")
    for column in ("target", "mode", "results", "requests", "s", "accepted results/s",
                   "p50 ms", "p99 ms", "× bare"):
        table.add_column(column, justify="left" if column in ("target", "mode") else "right")
    for row in rows:
        table.add_row(row.target, row.mode, f"{row.results:,}" + (" (time limit)"
                                                                  if row.truncated else ""),
                      f"{row.requests:,}", f"{row.seconds:.2f}", f"{row.rate:,.0f}",
                      f"{row.p50_ms:.1f}", f"{row.p99_ms:.1f}",
                      f"{row.ratio:.2f}" if row.ratio is not None else "")
    return table


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--results", type=int, default=4000,
                        help="results sent in batches, per target")
    parser.add_argument("--single-results", type=int, default=1000,
                        help="results sent one a request, per target")
    parser.add_argument("--batch", type=int, default=50, help=f"results a batch (≤ {MAX_BATCH})")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="server worker processes (real and bare alike)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed requests a client before each timed run")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="time limit of one timed run")
    parser.add_argument("--bare-seconds", type=float, default=5.0,
                        help="the bare app's runs repeat their requests for at least this long")
    parser.add_argument("--databases", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql")
    parser.add_argument("--model", default="mlp_8x256", help="refute.zoo model")
    parser.add_argument("--out", type=Path, default=Path("out/bench_service.json"))
    parser.add_argument("--locust", action="store_true",
                        help="also run the bounded locust load test (PostgreSQL, else the last "
                             "database)")
    parser.add_argument("--locust-users", type=int, default=20)
    parser.add_argument("--locust-seconds", type=int, default=20)
    parser.add_argument("--locust-results", type=int, default=20000,
                        help="pre-signed results locust may send (the run stops when sent)")
    parser.add_argument("--locust-mode", choices=("batch", "single"), default="batch")
    parser.add_argument("--no-spotcheck", action="store_true", help="skip the spot-check cost")
    args = parser.parse_args()
    names = [name.strip().lower() for name in args.databases.split(",") if name.strip()]
    if not names or any(name not in ("sqlite", "postgresql") for name in names):
        parser.error("--databases takes sqlite and/or postgresql")
    args.databases = names
    if not 1 <= args.batch <= MAX_BATCH:
        parser.error(f"--batch must be 1..{MAX_BATCH}")
    for name in ("results", "single_results", "clients", "workers", "locust_users",
                 "locust_seconds", "locust_results"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.warmup < 0 or args.bare_seconds < 0 or args.bare_seconds >= args.max_seconds:
        parser.error("--warmup and --bare-seconds must be ≥ 0, --bare-seconds < --max-seconds")
    return args


def _database_rows(console: Console, label: str, database: AbstractContextManager[str],
                   args: argparse.Namespace, work: Path, *, locust: bool
                   ) -> tuple[Workload, list[Row], LocustRun | None]:
    """Serve the real API on one database, register, sign, measure both ways and (``locust``)
    run the load test. Raises :class:`Refused` (after signing: ``exc.workload`` is set)."""
    console.print(f"[dim]{label}: starting, registering {args.model}, signing…[/dim]")
    with database as database_url, api_server(database_url, work / label, args.workers) as url:
        signer = register(url, args.model)
        workload = Workload.sign(signer, args)
        try:
            rows = measure(console, label, url, workload, args, api_key=signer.api_key)
            if not locust:
                return workload, rows, None
            console.print(f"[dim]{label} locust: signing {args.locust_results} results, "
                          f"{args.locust_users} users for at most {args.locust_seconds} s…[/dim]")
            batch = args.batch if args.locust_mode == "batch" else None
            load_test = run_locust(url, signer.api_key,
                                   requests_of(signer.sign(args.locust_results), batch),
                                   target=label, mode=args.locust_mode, users=args.locust_users,
                                   seconds=args.locust_seconds, workdir=work / "locust")
        except Refused as exc:
            exc.workload = workload
            raise
        return workload, rows, load_test


def main() -> None:
    """Run the benchmarks, print their tables and verdicts, write ``--out``; exit 1 when a
    result was refused (the other targets are still measured) or a locust request failed."""
    args = _arguments()
    console = Console(width=160)
    rows: list[Row] = []
    refused: list[str] = []
    locust: LocustRun | None = None
    workload: Workload | None = None
    with tempfile.TemporaryDirectory(prefix="refute-bench-") as tmp:
        work = Path(tmp)
        for label, database in databases(work, args.databases):
            wants_locust = args.locust and (label == "PostgreSQL"
                                            or "postgresql" not in args.databases)
            try:
                workload, more, load_test = _database_rows(console, label, database(), args,
                                                           work, locust=wants_locust)
            except Refused as exc:
                workload = exc.workload or workload
                refused.append(f"{label}: {exc}")
                console.print(f"[red]{label} refused: {exc}[/red]")
                continue
            rows += more
            locust = load_test or locust
        if workload is not None:
            with bare_server(work / "bare", args.workers) as url:
                try:
                    rows += measure(console, "bare FastAPI", url, workload, args, api_key="",
                                    min_seconds=args.bare_seconds)
                except Refused as exc:
                    refused.append(f"bare FastAPI: {exc}")
                    console.print(f"[red]bare FastAPI refused: {exc}[/red]")
    bare = {row.mode: row.rate for row in rows if row.target == "bare FastAPI"}
    rows = [dataclasses.replace(row, ratio=row.rate / bare[row.mode] if bare.get(row.mode)
                                else None) for row in rows]
    console.print(_table(rows, args))
    verdicts = targets(rows)
    for verdict in verdicts:
        state = ("[dim]not measured[/dim]" if verdict["met"] is None else
                 "[green]met[/green]" if verdict["met"] else "[red]not met[/red]")
        shown = f" ({verdict['shown']})" if verdict["met"] is not None else ""
        console.print(f"issue 14, PostgreSQL batches, {verdict['target']}: {state}{shown}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [dataclasses.asdict(row) for row in rows], "targets": verdicts,
        "refused": refused}
    if locust is not None:
        _print_locust(console, locust)
        report["locust"] = dataclasses.asdict(locust)
        if locust.failures:
            refused.append(f"locust: {locust.failures} failed requests, the first: "
                           f"{locust.first_failure}")
    if not args.no_spotcheck:
        report["spotcheck"] = _spotcheck_cost(console, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"[dim]written to {args.out}[/dim]")
    if refused:
        console.print(f"[red]not every result was accepted; the first refusal: "
                      f"{refused[0].splitlines()[0]}[/red]")
        sys.exit(1)


def _print_locust(console: Console, run: LocustRun) -> None:
    table = Table(title=f"locust load test: {run.users} users, ≤ {run.seconds} s, {run.mode} "
                        f"submission, {run.target} API on loopback")
    for column in ("requests", "failures", "requests/s", "results/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row(f"{run.requests:,}", f"{run.failures:,}", f"{run.requests_per_s:,.1f}",
                  f"{run.results_per_s:,.0f}", f"{run.p50_ms:.0f}", f"{run.p99_ms:.0f}")
    console.print(table)


def _spotcheck_cost(console: Console, model_name: str) -> dict[str, float]:
    """Print (and return, in ms) the spot-check CPU cost per result next to inference."""
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
    return {"inference_ms": inference * 1e3, "check_with_verify_ms": check_with_verify * 1e3,
            "check_stored_ms": check_stored * 1e3, "check_only_ms": check_only * 1e3,
            "p": p}


if __name__ == "__main__":
    main()
