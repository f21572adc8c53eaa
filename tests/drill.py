"""The fault drill of issue 9: results submitted (some lying) while the stack is being broken.

:func:`run_drill` starts a :class:`~verifier.stack.LocalStack` (redis-server, ``refute serve``,
the spot-check, prove and timer workers), registers the zoo's small MLP, creates a network that
samples every result (``spot_probability`` 1, ``spot_count`` = N−1 of its N segments) with a
short challenge window, and submits ``results`` signed results from a few client threads. Liars
move one interior state k far beyond its tolerance; the drill checks locally, before submitting,
that segments k and k+1 both see the lie, so every liar is caught whatever two segments are
sampled. During the submissions it SIGKILLs the spot-check worker in the middle of a check (and
restarts it), kills and restarts Redis, and kills and restarts the API; the clients retry
refused connections and server errors a bounded number of times (a retried signed submission
is idempotent).

With ``upload_traces`` the providers upload their whole trace after each submission. Without,
they never do: an honest provider discloses exactly the states the service asks for
(``disclosure`` in the submission's answer, or later by polling its result), a lying one either
discloses its lying states (and is convicted) or stays silent (and loses by timeout). One honest
provider without a trace is caught by the API outage: the API is killed right after its 202 and
before its disclosure, which it retries until the API is back (a service outage must not run a
provider's disclosure window out, as it must not run a dispute clock out).

When every result is terminal (or the wait runs out), the drill reads the database (read-only)
and the API and reports every violation of DESIGN.md "Result lifecycle" and "Spot-checks":

* a submission lost (a 202 the client saw with no row) or doubled (one signed message, two ids);
* a sampled check missing (recomputed from the spot key with
  :func:`verifier.spotcheck.sample_segments`), recorded twice, or recorded for a segment that was
  not sampled;
* a result FINALIZED before all its sampled checks were recorded;
* a liar FINALIZED, or an honest result not FINALIZED;
* a result left non-terminal; a 5xx answer from the API; the API and the database disagreeing.

The drill is bounded everywhere (every wait, retry and poll has a deadline). ``tests/
test_fault_drill.py`` runs it at CI size, ``bench/bench_fault_drill.py`` at full size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import http.server
import json
import random
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from eth_account import Account
from sqlalchemy import Engine, create_engine, func, select

from challenge.records import DeadLetter, Dispute, Result, SpotCheck, TaskDelivery
from refute import zoo
from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, run_trace
from refute.trace import Trace
from verifier.client import TERMINAL, ApiError, RefuteClient, ResultView, sign_result
from verifier.spotcheck import Finding, check_segment, sample_segments
from verifier.stack import LocalStack
from verifier.webhooks import verify_signature

T = TypeVar("T")

#: The kills of one drill, in order, spread over the submissions.
DEFAULT_KILLS = ("worker-spotcheck", "redis", "api")
#: How many violations a rendered report lists one by one.
_SHOWN = 40


class DrillError(RefuteError):
    """The drill itself could not run (not a finding about the service)."""

    code = "drill_error"


@dataclasses.dataclass
class DrillReport:
    """What one drill did and found."""

    variant: str
    results: int
    liars: int
    workdir: Path
    accepted: int = 0
    sampled_checks: int = 0
    recorded_once: int = 0
    finalized: int = 0
    convicted: int = 0
    timeouts: int = 0
    provider_fault_other: int = 0
    honest_finalized: int = 0
    liars_provider_fault: int = 0
    non_terminal: int = 0
    retries: int = 0
    redelivered_tasks: int = 0
    dead_letters: int = 0
    disclosures: int = 0
    submit_latency_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    kills: list[str] = dataclasses.field(default_factory=list)
    violations: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No invariant was violated."""
        return not self.violations

    def render(self) -> str:
        """The report as text (one fact a line)."""
        p50, p95, worst = self.submit_latency_ms
        lines = [
            f"fault drill ({self.variant}) in {self.workdir}",
            f"  results submitted      {self.results} ({self.liars} lying)",
            f"  accepted (rows)        {self.accepted}",
            f"  sampled checks         {self.sampled_checks}",
            f"  recorded exactly once  {self.recorded_once}",
            f"  finalized              {self.finalized} (honest: {self.honest_finalized} of "
            f"{self.results - self.liars})",
            f"  liars PROVIDER_FAULT   {self.liars_provider_fault} of {self.liars}: convicted "
            f"{self.convicted}, timeouts {self.timeouts}, other {self.provider_fault_other}",
            f"  left non-terminal      {self.non_terminal}",
            f"  disclosures sent       {self.disclosures}",
            f"  client retries         {self.retries}",
            f"  tasks redelivered      {self.redelivered_tasks}, dead letters {self.dead_letters}",
            f"  submit latency (ms)    p50 {p50:.0f}, p95 {p95:.0f}, max {worst:.0f}",
            "  phases (s)             " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                   self.phases.items()),
            "  kills:",
            *(f"    {k}" for k in self.kills),
            f"  violations: {len(self.violations)}" + (" (" + ", ".join(
                f"{kind}: {n}" for kind, n in Counter(
                    v.split(":")[0] for v in self.violations).most_common()) + ")"
                if self.violations else ""),
            *(f"    {v}" for v in self.violations[:_SHOWN]),
            *([f"    … {len(self.violations) - _SHOWN} more"]
              if len(self.violations) > _SHOWN else []),
        ]
        if self.notes:
            lines += ["  notes:", *(f"    {n}" for n in self.notes)]
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    """One submission: its trace, its signed body, and what its client saw."""

    index: int
    provider: Any
    liar: bool
    lie_at: int | None
    silent: bool
    trace: Trace
    body: dict[str, Any]
    bundle: bytes | None
    #: An honest provider without a trace whose disclosure meets the API outage: the API is
    #: killed right after its result's 202 and before its disclosure, which it retries.
    caught: bool = False
    ids_seen: set[str] = dataclasses.field(default_factory=set)
    result_id: str | None = None
    disclosed: set[int] = dataclasses.field(default_factory=set)
    disclose_refused: str | None = None
    errors: list[str] = dataclasses.field(default_factory=list)
    latency_s: float = 0.0


class _Drill:
    """One drill's moving parts (see :func:`run_drill`)."""

    def __init__(self, stack: LocalStack, report: DrillReport, *, network_id: str, api_key: str,
                 prepared: PreparedModel, retry_for_s: float,
                 log: Callable[[str], None]) -> None:
        self.stack = stack
        self.report = report
        self.network_id = network_id
        self.api_key = api_key
        self.prepared = prepared
        self.retry_for_s = retry_for_s
        self.log = log
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[RefuteClient] = []
        self.submitted = 0
        self.server_errors: list[str] = []
        self.caught_accepted = threading.Event()
        self.api_killed = threading.Event()
        self.engine = _read_only(Path(stack.workdir) / "refute.db")

    # -- clients ------------------------------------------------------------------------------

    def client(self) -> RefuteClient:
        """This thread's API client."""
        client: RefuteClient | None = getattr(self._local, "client", None)
        if client is None:
            client = RefuteClient(self.stack.api_url, self.api_key, timeout=30)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every client and the database engine."""
        for client in self._clients:
            client.close()
        self.engine.dispose()

    def elapsed(self) -> float:
        """Seconds since the drill started."""
        return time.monotonic() - self.t0

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on refused connections and 5xx answers (each 5xx is recorded) for
        at most ``retry_for_s`` seconds; other refusals are raised at once."""
        deadline = time.monotonic() + self.retry_for_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except ApiError as exc:
                if exc.status >= 500:
                    with self._lock:
                        self.server_errors.append(
                            f"t={self.elapsed():.1f}s {what}: HTTP {exc.status} {exc.code}: "
                            f"{str(exc)[:160]}")
                if not (exc.status == 0 or exc.status >= 500) or time.monotonic() > deadline:
                    raise
                with self._lock:
                    self.report.retries += 1
                time.sleep(min(2.0, 0.2 * attempt))

    # -- providers ----------------------------------------------------------------------------

    def submit(self, job: _Job, *, upload: bool, pace_s: float) -> None:
        """Submit one result (and upload its trace, or disclose what is asked)."""
        client = self.client()
        started = time.monotonic()
        try:
            view = self.call(f"POST /v1/results #{job.index}",
                             lambda: self._submit_once(client, job))
        except ApiError as exc:
            job.errors.append(f"submission refused: HTTP {exc.status} {exc.code}: {exc}")
            return
        finally:
            job.latency_s = time.monotonic() - started
            with self._lock:
                self.submitted += 1
        job.result_id = view.id
        try:
            if upload:
                assert job.bundle is not None
                bundle = job.bundle
                self.call(f"PUT /v1/results/{view.id}/trace",
                          lambda: client.upload_trace(view.id, bundle))
            elif not job.silent:
                if job.caught:  # the API dies between this 202 and the disclosure
                    self.caught_accepted.set()
                    self.api_killed.wait(timeout=120)
                    self.log(f"t={self.elapsed():.1f}s #{job.index} ({view.id}) discloses "
                             "while the API is down (retrying)")
                self.disclose(job, view, wait_s=5.0)
        except ApiError as exc:
            job.errors.append(f"upload/disclosure refused: HTTP {exc.status} {exc.code}: {exc}")
        time.sleep(pace_s)

    def _submit_once(self, client: RefuteClient, job: _Job) -> ResultView:
        view = client.submit_result(job.body)
        with self._lock:
            job.ids_seen.add(view.id)
        return view

    def disclose(self, job: _Job, view: ResultView | None, *, wait_s: float) -> None:
        """As a provider that keeps its trace: disclose exactly the states the service asks
        for (from ``view``, else by polling the result for up to ``wait_s``)."""
        assert job.result_id is not None
        rid = job.result_id
        client = self.client()
        deadline = time.monotonic() + wait_s
        if view is None:
            view = self.call(f"GET /v1/results/{rid}", lambda: client.result(rid))
        while (view.disclosure is None and view.status not in TERMINAL
               and time.monotonic() < deadline):
            time.sleep(0.5)
            view = self.call(f"GET /v1/results/{rid}", lambda: client.result(rid))
        if view.disclosure is None or job.disclose_refused:
            return
        wanted = set(view.disclosure.states) - job.disclosed
        if not wanted:
            return
        for k in sorted(wanted):  # one state at a time, streamed as its canonical bytes
            try:
                self.call(f"PUT /v1/results/{rid}/states/{k}",
                          functools.partial(client.disclose_state, rid, k, job.trace.states[k]))
            except ApiError as exc:
                job.disclose_refused = f"HTTP {exc.status} {exc.code}: {exc}"
                return
            job.disclosed.add(k)
        with self._lock:
            self.report.disclosures += 1

    # -- chaos --------------------------------------------------------------------------------

    def _spotcheck_deliveries(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.coalesce(func.sum(
                TaskDelivery.deliveries), 0)).where(
                TaskDelivery.task_name == "refute.spotcheck")).scalar_one())

    def _liar_mid_check(self, jobs: Sequence[_Job], spot_count: int) -> str | None:
        """A lying result whose spot-check task is running: some, not all, of its sampled
        checks are recorded (the watcher's dispute and its proof come at the task's end)."""
        liars = [job.result_id for job in jobs if job.liar and job.result_id is not None]
        if not liars:
            return None
        with self.engine.connect() as connection:
            counts = connection.execute(select(SpotCheck.result_id, func.count()).where(
                SpotCheck.result_id.in_(liars)).group_by(SpotCheck.result_id)).all()
        return next((str(rid) for rid, n in counts if 0 < n < spot_count), None)

    def chaos(self, kills: Sequence[str], jobs: Sequence[_Job], *, spot_count: int,
              check_s: float, api_down_s: float, caught: _Job | None,
              stop: threading.Event) -> None:
        """Kill and restart the processes named in ``kills``, evenly spread over the
        submissions of ``jobs``. The spot-check worker is killed just after it took a task
        (mid-check: its acknowledgement dies with it); Redis while the spot-check of a liar is
        running (so the watcher's dispute and proof are queued while it is down), else just
        after a task was taken; the API (down ``api_down_s``) just after the 202 of ``caught``,
        if any."""
        total = len(jobs)
        for n, name in enumerate(kills):
            threshold = total * (n + 1) / (len(kills) + 1)
            while self.submitted < threshold and not stop.is_set():
                time.sleep(0.05)
            detail = "" if not stop.is_set() else " (the submissions had ended)"
            liar: str | None = None
            if name == "redis" and spot_count > 1:
                deadline = time.monotonic() + 30
                while (liar := self._liar_mid_check(jobs, spot_count)) is None \
                        and time.monotonic() < deadline:
                    time.sleep(0.02)
                if liar is not None:
                    detail += f" while the spot-check of liar {liar} was running"
            if name.startswith("worker-spotcheck") or (name == "redis" and liar is None):
                before = self._spotcheck_deliveries()
                deadline = time.monotonic() + 20
                while self._spotcheck_deliveries() == before and time.monotonic() < deadline:
                    time.sleep(0.05)
                took = self._spotcheck_deliveries() > before
                time.sleep(min(check_s / 2, 1.0))
                detail += (" just after it took a task (mid-check)" if took
                           else " (no task taken within 20 s)")
            if name == "api" and caught is not None:
                took = self.caught_accepted.wait(timeout=60)
                detail += (f" right after the 202 of #{caught.index}, before its disclosure"
                           if took else f" (#{caught.index} was not accepted within 60 s)")
            at = self.elapsed()
            self.stack.kill(name)
            if name == "api":
                self.api_killed.set()
            down_s = {"redis": 3.0, "api": api_down_s}.get(name, 1.0)
            time.sleep(down_s)
            self.stack.restart(name)
            self.report.kills.append(
                f"t={at:.1f}s SIGKILL {name}{detail} after {self.submitted} submissions; "
                f"down {down_s:.0f} s, serving again at t={self.elapsed():.1f}s")
            self.log(self.report.kills[-1])

    # -- waiting ------------------------------------------------------------------------------

    def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        """Current status of each result, from the database."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(Result.id, Result.status).where(
                Result.network_id == self.network_id)).all()
        wanted = set(ids)
        return {rid: str(getattr(status, "value", status)) for rid, status in rows
                if rid in wanted}


class _Hooks:
    """A loopback webhook endpoint that keeps every delivery it receives (signature checked)."""

    def __init__(self) -> None:
        self.secret = ""
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.bad_signatures = 0
        self._lock = threading.Lock()
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items()}
                with hooks._lock:
                    if not verify_signature(hooks.secret, headers, body, datetime.now(UTC)):
                        hooks.bad_signatures += 1
                    hooks.received.append((headers.get("X-Refute-Event", ""),
                                           json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                del format, args

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Where the service delivers."""
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def events(self, name: str) -> dict[str, list[dict[str, Any]]]:
        """The payloads of every delivery of event ``name``, by result id."""
        found: dict[str, list[dict[str, Any]]] = {}
        with self._lock:
            for event, payload in self.received:
                if event == name:
                    found.setdefault(str(payload.get("result_id")), []).append(payload)
        return found

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_only(db: Path) -> Engine:
    """A read-only SQLAlchemy engine on the stack's SQLite database."""
    return create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")


def _lying_trace(prepared: PreparedModel, executor: DeterministicExecutor, honest: Trace,
                 lie_at: int, spot_count: int) -> Trace:
    """The honest trace with state ``lie_at`` moved far beyond its tolerance. Refuses (a drill
    error) a lie that some sample of ``spot_count`` segments would miss."""
    manifest = prepared.manifest
    n = manifest.num_segments
    for delta in (1.0, 0.5, 2.0):
        states = [list(s) for s in honest.states]
        states[lie_at][0] = states[lie_at][0] + np.float32(delta)
        try:
            lying = Trace.from_states(manifest, states)
        except RefuteError:
            continue  # out of the declared range: try another size
        faulty = {i for i in range(1, n + 1) if check_segment(
            executor, prepared.segmentation, lying, i).finding is Finding.FAULT}
        if len(faulty) > n - spot_count:  # every sample of spot_count segments meets one
            return lying
    raise DrillError(f"no lie at state {lie_at} is seen by every sample of {spot_count} of "
                     f"{n} segments")


def run_drill(
    workdir: Path,
    *,
    results: int,
    liars: float,
    upload_traces: bool,
    clients: int = 4,
    challenge_window_s: int = 20,
    disclosure_window_s: int = 8,
    dispute_clock_s: float = 15.0,
    spotcheck_delay_s: float = 0.3,
    submit_span_s: float = 20.0,
    kills: Sequence[str] = DEFAULT_KILLS,
    lie_states: Sequence[int] | None = None,
    api_down_s: float = 1.0,
    outage_discloser: bool = True,
    proof_timeout_s: float = 600.0,
    settle_timeout_s: float | None = None,
    retry_for_s: float = 60.0,
    home: Path | None = None,
    extra_env: dict[str, str] | None = None,
    seed: int = 9,
    log: Callable[[str], None] = print,
) -> DrillReport:
    """Run the fault drill once (see the module docstring) and return its report.

    ``liars`` is the fraction of lying results, each lying at one of ``lie_states`` in turn
    (default: every interior state; fewer states mean fewer step circuits to set up). ``home``
    (REFUTE_HOME: circuits, SRS) may be shared between drills so the prove worker sets each
    circuit up once; ``extra_env`` overrides any service setting. ``api_down_s`` is how long the
    API stays down (before its restart, which takes a few seconds more); without traces and with
    ``outage_discloser``, the API is killed right after one honest provider's 202, before its
    disclosure, which it retries until the API is back. ``proof_timeout_s`` is how long the
    service has for a dispute's proof (queue wait included) before the dispute is aborted.
    Raises :class:`DrillError` only when the drill itself cannot run; what the service got wrong
    is in the report's ``violations``.
    """
    if results < 1 or not 0.0 <= liars <= 1.0 or clients < 1:
        raise DrillError("a drill needs results >= 1, 0 <= liars <= 1 and clients >= 1")
    workdir.mkdir(parents=True, exist_ok=True)
    n_liars = round(results * liars)
    variant = "traces uploaded" if upload_traces else "no traces (disclosure)"
    report = DrillReport(variant=variant, results=results, liars=n_liars, workdir=workdir)
    phases = report.phases
    env = {
        "REFUTE_FINALIZE_EVERY_S": "1",
        "REFUTE_SPOTCHECK_DELAY_S": str(spotcheck_delay_s),
        "REFUTE_SPOTCHECK_REQUEUE_AFTER_S": "5",
        # A killed worker's task comes back after the visibility timeout, long on purpose: the
        # service must not need it (owed checks are swept and queued again). The prove worker's
        # time limit (below it) must fit a cold proof of one MLP step on a loaded machine.
        "REFUTE_VISIBILITY_TIMEOUT_S": "600",
        "REFUTE_TASK_TIME_LIMIT_S": "540",
        "REFUTE_DISPUTE_PROVIDER_CLOCK_S": str(dispute_clock_s),
        "REFUTE_DISPUTE_CHALLENGER_CLOCK_S": str(dispute_clock_s),
        "REFUTE_DISPUTE_PROOF_TIMEOUT_S": str(proof_timeout_s),
        "REFUTE_DISPUTE_RESUME_AFTER_S": "3",
        "REFUTE_WEBHOOKS_ALLOW_PRIVATE": "1",
        **({"REFUTE_HOME": str(home)} if home is not None else {}),
        **(extra_env or {}),
    }
    started = time.monotonic()
    with _Hooks() as hooks, LocalStack(workdir / "stack", extra_env=env) as stack:
        phases["start"] = time.monotonic() - started
        mark = time.monotonic()
        admin = RefuteClient(stack.api_url)
        model = zoo.mlp()
        # Sample N-1 of the N segments (so the sample is not trivially "all"); the service
        # segments the model with the same default policy as prepare_model here.
        local = prepare_model(model.onnx_bytes)
        manifest_n = local.manifest.num_segments
        spot_count = max(1, manifest_n - 1)
        policy: dict[str, Any] = {"spot_probability": 1.0, "spot_count": spot_count,
                                  "challenge_window_s": challenge_window_s}
        try:
            network_id, api_key = admin.create_network(
                "drill", admin_token=stack.admin_token, disclosure_window_s=disclosure_window_s,
                **policy)
        except ApiError as exc:  # a service from before disclosures: run the drill anyway
            if exc.status != 422 or "disclosure_window_s" not in str(exc):
                raise
            report.notes.append(f"the service refuses disclosure_window_s ({exc})")
            network_id, api_key = admin.create_network("drill", admin_token=stack.admin_token,
                                                       **policy)
        admin.close()
        with RefuteClient(stack.api_url, api_key) as owner:
            hooks.secret = str(owner.register_webhook(hooks.url, [
                "result.finalized", "result.disputed", "spotcheck.disclosure_requested"])[
                    "secret"])
            registered = owner.register_model(model.onnx_bytes, calibration_samples=2)
        manifest = Manifest.from_json(registered["manifest"])
        prepared = dataclasses.replace(local, manifest=manifest)
        phases["register"] = time.monotonic() - mark

        mark = time.monotonic()
        rng = random.Random(seed)
        # Liars spread evenly over the submissions (so one is being checked near each kill),
        # each moved by a random step or two.
        lying = {min(results - 1, max(0, round((k + 1) * results / (n_liars + 1))
                                      + rng.randint(-1, 1))) for k in range(n_liars)}
        while len(lying) < n_liars:
            lying.add(rng.randrange(results))
        interior = list(lie_states or range(1, manifest.num_segments)) or [
            manifest.num_segments]
        providers = [Account.from_key(bytes([0x30 + c]) * 32) for c in range(clients)]
        executor = DeterministicExecutor()
        nonce_base = secrets.randbits(40) << 20
        jobs = []
        liar_ordinal = 0
        for i in range(results):
            provider = providers[i % clients]
            trace = run_trace(prepared, model.sample_input(1000 + i))
            lie_at: int | None = None
            silent = False
            if i in lying:
                # Without traces, liars alternate: disclose, stay silent; each kind lies at
                # every lie state in turn.
                silent = not upload_traces and liar_ordinal % 2 == 1
                nth = liar_ordinal if upload_traces else liar_ordinal // 2
                lie_at = interior[nth % len(interior)]
                liar_ordinal += 1
                trace = _lying_trace(prepared, executor, trace, lie_at, spot_count)
            body = sign_result(
                network_id=network_id, model_id=registered["id"],
                model_sha256=registered["model_sha256"], trace=trace,
                input_hash=i.to_bytes(32, "big"), output_hash=b"\x00" * 32, stake=1000,
                nonce=nonce_base + i, deadline=int(time.time()) + 6 * 3600,
                private_key=provider.key, provider=provider.address)
            bundle = (trace.write(workdir / "traces" / f"{i}.rtrace").read_bytes()
                      if upload_traces else None)
            jobs.append(_Job(i, provider, i in lying, lie_at, silent, trace, body, bundle))
        caught: _Job | None = None
        if not upload_traces and outage_discloser and "api" in kills:
            # The first honest result at or after the API kill's turn in the submissions.
            turn = results * (list(kills).index("api") + 1) / (len(kills) + 1)
            caught = next((j for j in jobs[int(turn):] if not j.liar), None)
            if caught is not None:
                caught.caught = True
        phases["prepare"] = time.monotonic() - mark

        drill = _Drill(stack, report, network_id=network_id, api_key=api_key,
                       prepared=prepared, retry_for_s=retry_for_s, log=log)
        log(f"drill ({variant}): {results} results, {n_liars} lying, {clients} clients, "
            f"{manifest.num_segments} segments, {spot_count} sampled each, window "
            f"{challenge_window_s} s; kills {', '.join(kills)}")
        mark = time.monotonic()
        pace_s = submit_span_s * clients / results
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(max_workers=clients + 1) as pool:
            chaos = pool.submit(drill.chaos, kills, jobs, spot_count=spot_count,
                                check_s=spotcheck_delay_s * spot_count, api_down_s=api_down_s,
                                caught=caught, stop=stop)
            submissions = [pool.submit(drill.submit, job, upload=upload_traces, pace_s=pace_s)
                           for job in jobs]
            try:
                for future in submissions:
                    future.result(timeout=submit_span_s + 20 * retry_for_s)
            finally:
                stop.set()
            chaos.result(timeout=300)
        phases["submit"] = time.monotonic() - mark

        mark = time.monotonic()
        if settle_timeout_s is None:
            settle_timeout_s = (challenge_window_s + disclosure_window_s + 2 * dispute_clock_s
                                + results * spotcheck_delay_s * spot_count + 60 * n_liars + 180)
        ids = [job.result_id for job in jobs if job.result_id is not None]
        deadline = time.monotonic() + settle_timeout_s
        last_poll = 0.0
        while True:
            statuses = drill.statuses(ids)
            open_ids = {rid for rid in ids if statuses.get(rid) not in TERMINAL}
            if not open_ids or time.monotonic() > deadline:
                break
            if not upload_traces and time.monotonic() - last_poll > 5.0:
                last_poll = time.monotonic()
                for job in jobs:  # honest providers poll what they are asked for
                    if job.result_id in open_ids and not job.silent:
                        try:
                            drill.disclose(job, None, wait_s=0.0)
                        except ApiError as exc:
                            job.errors.append(f"poll failed: {exc}")
            time.sleep(1.0)
        phases["settle"] = time.monotonic() - mark

        mark = time.monotonic()
        _check(drill, jobs, key=bytes.fromhex(stack.env["REFUTE_SPOT_KEY"]),
               num_segments=manifest.num_segments, spot_count=spot_count)
        _check_hooks(drill, jobs, hooks, key=bytes.fromhex(stack.env["REFUTE_SPOT_KEY"]),
                     num_segments=manifest.num_segments, spot_count=spot_count)
        phases["check"] = time.monotonic() - mark
        drill.close()
    phases["total"] = time.monotonic() - started
    log(report.render())
    return report


def _check(drill: _Drill, jobs: list[_Job], *, key: bytes, num_segments: int,
           spot_count: int) -> None:
    """Compare what the clients saw, the database and the API; fill the report."""
    report = drill.report
    violations = report.violations
    latencies = sorted(job.latency_s * 1000 for job in jobs if job.result_id is not None)
    if latencies:
        report.submit_latency_ms = (statistics.median(latencies),
                                    latencies[min(len(latencies) - 1,
                                                  int(0.95 * len(latencies)))],
                                    latencies[-1])
    with drill.engine.connect() as connection:
        rows = {r.id: r for r in connection.execute(select(
            Result.id, Result.provider, Result.nonce, Result.status, Result.finalized_at,
            Result.trace_blob, Result.challenge_deadline, Result.spot_segments).where(
            Result.network_id == drill.network_id)).all()}
        checks = connection.execute(select(
            SpotCheck.result_id, SpotCheck.segment, SpotCheck.outcome, SpotCheck.checked_at)
            .where(SpotCheck.result_id.in_(list(rows)))).all()
        disputes = connection.execute(select(
            Dispute.result_id, Dispute.challenger, Dispute.verdict, Dispute.status, Dispute.lo,
            Dispute.hi).where(Dispute.result_id.in_(list(rows)))).all()
        report.redelivered_tasks = int(connection.execute(select(func.count()).select_from(
            TaskDelivery).where(TaskDelivery.deliveries > 1)).scalar_one())
        report.dead_letters = int(connection.execute(select(func.count()).select_from(
            DeadLetter)).scalar_one())
    by_result: dict[str, list[Any]] = {}
    for check in checks:
        by_result.setdefault(check.result_id, []).append(check)
    verdicts: dict[str, list[str]] = {}
    for dispute in disputes:
        verdicts.setdefault(dispute.result_id, []).append(str(dispute.verdict))

    def status_of(rid: str) -> str:
        status = rows[rid].status
        return str(getattr(status, "value", status))

    # Lost or doubled.
    by_signed = Counter((str(r.provider).lower(), str(r.nonce)) for r in rows.values())
    expected = {(job.provider.address.lower(), str(job.body["message"]["nonce"]))
                for job in jobs}
    for job in jobs:
        for error in job.errors:
            violations.append(f"client #{job.index}: {error}")
        if job.result_id is None:
            violations.append(f"lost: submission #{job.index} was never accepted")
            continue
        if len(job.ids_seen) > 1:
            violations.append(f"doubled: submission #{job.index} got ids {sorted(job.ids_seen)}")
        for rid in job.ids_seen:
            if rid not in rows:
                violations.append(f"lost: {rid} (submission #{job.index}, answered to the "
                                  "client) has no row")
        signed = (job.provider.address.lower(), str(job.body["message"]["nonce"]))
        if by_signed[signed] != 1:
            violations.append(f"doubled: submission #{job.index} has {by_signed[signed]} rows")
    for signed, count in by_signed.items():
        if signed not in expected:
            violations.append(f"unexpected: {count} row(s) for {signed} nobody submitted")
    report.accepted = len(rows)
    for line in drill.server_errors:
        violations.append(f"server error: {line}")

    # Checks, finalization, verdicts.
    for job in jobs:
        if job.result_id is None or job.result_id not in rows:
            continue
        rid = job.result_id
        row = rows[rid]
        status = status_of(rid)
        sampled = sample_segments(key, rid, num_segments=num_segments, probability=1.0,
                                  count=spot_count)
        report.sampled_checks += len(sampled)
        if sorted(int(i) for i in row.spot_segments or []) != sampled:
            violations.append(f"sample: {rid} owes segments {row.spot_segments}, its sample is "
                              f"{sampled}")
        recorded = Counter(int(c.segment) for c in by_result.get(rid, []))
        who = f"{rid} (#{job.index}, {'liar at state ' + str(job.lie_at) if job.liar else 'honest'}"
        who += ("" if job.bundle is not None else
                ", silent" if job.silent else f", disclosed {sorted(job.disclosed)}")
        who += (", its disclosure met the API outage" if job.caught else "") + ")"
        for segment, count in recorded.items():
            if segment not in sampled:
                violations.append(f"unsampled check: {who} segment {segment} was checked "
                                  f"(sample {sampled})")
            if count > 1:
                violations.append(f"recorded {count} times: {who} segment {segment}")
        missing = [s for s in sampled if recorded[s] == 0]
        report.recorded_once += sum(1 for s in sampled if recorded[s] == 1)
        if status == "FINALIZED":
            report.finalized += 1
            finalized_at = row.finalized_at
            if missing:
                violations.append(f"finalized with checks missing: {who} segments {missing} "
                                  f"never recorded (sample {sampled})")
            late = [c for c in by_result.get(rid, []) if finalized_at is not None
                    and _naive(c.checked_at) > _naive(finalized_at)]
            for c in late:
                gap = (_naive(c.checked_at) - _naive(finalized_at)).total_seconds()
                violations.append(f"finalized before its check: {who} finalized "
                                  f"{gap:.1f} s before segment {c.segment} was recorded "
                                  f"({c.outcome})")
            if job.liar:
                faults = [int(c.segment) for c in by_result.get(rid, [])
                          if str(getattr(c.outcome, "value", c.outcome)) == "FAULT"]
                violations.append(f"liar finalized: {who}; faults recorded at segments "
                                  f"{faults}, disputes {verdicts.get(rid, [])}")
            else:
                report.honest_finalized += 1
        elif status == "PROVIDER_FAULT":
            found = verdicts.get(rid, [])
            if job.liar:
                report.liars_provider_fault += 1
                if "PROVIDER_FAULT" in found:
                    report.convicted += 1
                elif "PROVIDER_TIMEOUT" in found:
                    report.timeouts += 1
                else:
                    report.provider_fault_other += 1
                if job.bundle is None and not job.silent and "PROVIDER_FAULT" not in found:
                    report.notes.append(f"{who} disclosed its lying states but was not "
                                        f"convicted by a proof: verdicts {found}")
                if missing and (job.bundle is not None or not job.silent):
                    report.notes.append(f"{who} convicted with checks {missing} unrecorded")
            else:
                violations.append(f"honest result punished: {who} ended PROVIDER_FAULT, "
                                  f"verdicts {found}, checks {dict(recorded)}; its disclosure "
                                  f"refused: {job.disclose_refused}; errors {job.errors}")
        elif status in TERMINAL:
            violations.append(f"unexpected end: {who} ended {status}")
        else:
            report.non_terminal += 1
            violations.append(f"not terminal: {who} still {status} after the wait; checks "
                              f"recorded {sorted(recorded)}, missing {missing}, disputes "
                              f"{verdicts.get(rid, [])}")

    # The API tells the same story as the database.
    client = drill.client()
    for job in jobs:
        if job.result_id is None or job.result_id not in rows:
            continue
        rid = job.result_id
        try:
            view = drill.call(f"GET /v1/results/{rid}", functools.partial(client.result, rid))
        except ApiError as exc:
            violations.append(f"API: GET {rid} refused: {exc}")
            continue
        if view.status != status_of(rid):
            violations.append(f"API: {rid} is {view.status} in the API, {status_of(rid)} in "
                              "the database")
        if len(view.spot_checks) != len(by_result.get(rid, [])):
            violations.append(f"API: {rid} shows {len(view.spot_checks)} checks, the database "
                              f"{len(by_result.get(rid, []))}")
        if view.status == "FINALIZED" and (view.owed_checks or view.disclosure):
            violations.append(f"API: {rid} is FINALIZED but still owes {view.owed_checks} "
                              f"(disclosure {view.disclosure})")


def _naive(moment: datetime) -> datetime:
    """Compare stored times whether or not the driver kept their time zone."""
    return moment.replace(tzinfo=None) if moment.tzinfo is not None else moment


def _check_hooks(drill: _Drill, jobs: list[_Job], hooks: _Hooks, *, key: bytes,
                 num_segments: int, spot_count: int, wait_s: float = 30.0) -> None:
    """What the webhooks told the network agrees with the database: one ``result.finalized``
    (at least once) for each finalized result and for no other; without traces, a
    ``spotcheck.disclosure_requested`` naming exactly the states of each result's sample."""
    report = drill.report
    ids = [job.result_id for job in jobs if job.result_id is not None]
    statuses = drill.statuses(ids)
    finalized = {rid for rid, status in statuses.items() if status == "FINALIZED"}
    asked = {job.result_id for job in jobs if job.result_id is not None and job.bundle is None}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not (
            finalized <= set(hooks.events("result.finalized"))
            and asked <= set(hooks.events("spotcheck.disclosure_requested"))):
        time.sleep(0.5)
    told_final = hooks.events("result.finalized")
    for rid in sorted(finalized - set(told_final)):
        report.violations.append(f"webhook: no result.finalized for {rid} within {wait_s:.0f} "
                                 "s of the end")
    for rid in sorted(set(told_final) - finalized):
        report.violations.append(f"webhook: result.finalized for {rid}, which is "
                                 f"{statuses.get(rid)}")
    if hooks.bad_signatures:
        report.violations.append(f"webhook: {hooks.bad_signatures} deliveries with a bad "
                                 "signature")
    requests = hooks.events("spotcheck.disclosure_requested")
    for rid in sorted(asked):
        sampled = sample_segments(key, rid, num_segments=num_segments, probability=1.0,
                                  count=spot_count)
        needed = sorted({k for i in sampled for k in (i - 1, i)})
        got = requests.get(rid, [])
        if not got:
            report.violations.append(f"webhook: no spotcheck.disclosure_requested for {rid} "
                                     f"(needs states {needed})")
        elif any(sorted(int(k) for k in payload.get("states", [])) != needed
                 for payload in got):
            report.violations.append(f"webhook: disclosure request for {rid} names "
                                     f"{[p.get('states') for p in got]}, the sample needs "
                                     f"{needed}")
    report.notes.append(f"webhooks received: {len(hooks.received)} ("
                        + ", ".join(f"{e}: {n}" for e, n in Counter(
                            e for e, _ in hooks.received).most_common()) + ")")
