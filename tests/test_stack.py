"""The whole stack as real processes (redis-server, API, Celery workers) driven by the client:
register a model, submit honest and cheating results with traces, watch the spot-check catch
the cheat and the honest results finalize."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import pytest
from eth_account import Account
from prometheus_client.parser import text_string_to_metric_families

from refute import zoo
from refute.manifest import Manifest
from refute.provider import prepare_model, run_trace
from refute.trace import Trace
from tests.test_metrics import FAMILIES
from verifier.client import ApiError, RefuteClient, sign_result
from verifier.stack import LocalStack
from verifier.webhooks import verify_signature

pytestmark = [pytest.mark.slow]

PROVIDER = Account.from_key(b"\x07" * 32)


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(({k: v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        del format, args


def test_stack_end_to_end(tmp_path: Path) -> None:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {"REFUTE_WEBHOOKS_ALLOW_PRIVATE": "1", "REFUTE_FINALIZE_EVERY_S": "1"}
    with LocalStack(tmp_path / "stack", extra_env=env, flower=True) as stack:
        admin = RefuteClient(stack.api_url)
        with pytest.raises(ApiError) as refused:
            admin.create_network("nope")
        assert refused.value.status == 403
        network_id, key = admin.create_network("demo", admin_token=stack.admin_token,
                                               spot_probability=1.0, spot_count=3,
                                               challenge_window_s=8)
        client = RefuteClient(stack.api_url, key)
        hook = client.register_webhook(f"http://127.0.0.1:{receiver.server_port}/hook",
                                       ["result.finalized", "result.disputed",
                                        "dispute.verdict"])
        model = zoo.mlp()
        registered = client.register_model(model.onnx_bytes, calibration_samples=2)
        manifest = Manifest.from_json(registered["manifest"])
        prepared = dataclasses.replace(prepare_model(model.onnx_bytes), manifest=manifest)
        ids = []
        for n in range(3):
            trace = run_trace(prepared, model.sample_input(n))
            if n == 1:  # the cheat: state 1 moved far beyond 2·τ
                states = [list(s) for s in trace.states]
                states[1][0] = states[1][0] + 1.0
                trace = Trace.from_states(manifest, states)
            body = sign_result(
                network_id=network_id, model_id=registered["id"],
                model_sha256=registered["model_sha256"], trace=trace, input_hash=b"\x01" * 32,
                output_hash=b"\x02" * 32, stake=100, nonce=n, deadline=int(time.time()) + 600,
                private_key=PROVIDER.key, provider=PROVIDER.address)
            accepted = client.submit_result(body)
            assert accepted.status == "ACCEPTED"
            path = trace.write(tmp_path / f"{n}.rtrace")
            # Bytes, or streamed from the file in chunks (the path).
            bundle = path if n == 2 else path.read_bytes()
            assert client.upload_trace(accepted.id, bundle).trace_uploaded
            ids.append(accepted.id)
        cheat = client.wait(ids[1], until=frozenset({"DISPUTED", "PROVIDER_FAULT"}),
                            timeout=120, poll=0.5)
        assert any(c["outcome"] == "FAULT" and c["segment"] == 1 for c in cheat.spot_checks)
        # The watcher disputes the faulty step; the prove worker settles it with a real proof.
        convicted = client.wait(ids[1], until=frozenset({"PROVIDER_FAULT"}), timeout=600,
                                poll=1.0)
        assert convicted.status == "PROVIDER_FAULT"
        for rid in (ids[0], ids[2]):
            final = client.wait(rid, timeout=120, poll=0.5)
            assert final.status == "FINALIZED"
            assert {c["segment"] for c in final.spot_checks} == {1, 2, 3}
            assert all(c["outcome"] == "PASS" for c in final.spot_checks)
        assert client.result(ids[1]).status == "PROVIDER_FAULT"  # never finalized
        assert [r.id for r in client.results(page_size=2)] == list(reversed(ids))
        # Webhooks: one signed delivery per event, delivered from the durable outbox.
        wanted = {(ids[0], "result.finalized"), (ids[1], "result.disputed"),
                  (ids[2], "result.finalized")}

        def delivered() -> bool:  # every event the test checks, not merely a few of them
            seen = {(json.loads(body)["result_id"], h["X-Refute-Event"])
                    for h, body in list(_Receiver.received)}
            return wanted <= seen and any(event == "dispute.verdict" for _rid, event in seen)

        deadline = time.monotonic() + 60
        while not delivered() and time.monotonic() < deadline:
            time.sleep(0.5)
        events = set()
        for sent_headers, sent_body in _Receiver.received:
            assert verify_signature(hook["secret"], sent_headers, sent_body, datetime.now(UTC))
            events.add((json.loads(sent_body)["result_id"], sent_headers["X-Refute-Event"]))
        assert wanted <= events
        assert (ids[1], "result.finalized") not in events
        listed = client.deliveries()
        assert listed and all(d["status"] == "DELIVERED" for d in listed)
        # A batch: each result accepted on its own, the repeated message answered as before.
        batch = [sign_result(
            network_id=network_id, model_id=registered["id"],
            model_sha256=registered["model_sha256"],
            trace=run_trace(prepared, model.sample_input(10 + n)), input_hash=b"\x01" * 32,
            output_hash=b"\x02" * 32, stake=100, nonce=10 + n, deadline=int(time.time()) + 600,
            private_key=PROVIDER.key, provider=PROVIDER.address) for n in range(2)]
        items = client.submit_results([*batch, batch[0]])
        assert [i.status for i in items] == [202, 202, 200] and items[2].id == items[0].id
        assert all(i.accepted and i.challenge_deadline for i in items)
        assert client.result(str(items[1].id)).model_id == registered["id"]
        _metrics_after_the_dispute(stack)
        _flower_sees_the_workers(stack)
    receiver.shutdown()


def _metrics_after_the_dispute(stack: LocalStack) -> None:
    """The issue's check: one scrape of /metrics after the dispute finds every family, counted
    from what the workers (other processes) recorded: the spot-checks, the watcher's dispute and
    its real proof (time and memory measured), the webhooks, the queues."""
    with urllib.request.urlopen(f"{stack.api_url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert FAMILIES | {"refute_http_requests", "refute_http_request_seconds"} <= set(families)

    def value(name: str, **labels: str) -> float:
        return sum(s.value for f in families.values() for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())

    assert value("refute_metrics_source_up", source="database") == 1
    assert value("refute_metrics_source_up", source="broker") == 1
    assert value("refute_results_accepted_total") == 5  # 3 + the batch's 2
    assert value("refute_results", status="PROVIDER_FAULT") == 1
    assert value("refute_results", status="FINALIZED") >= 2
    assert value("refute_spotchecks_sampled_total") >= 9  # 3 segments of each of 3 results
    assert value("refute_spotchecks_total", outcome="PASS") >= 6
    assert value("refute_spotchecks_total", outcome="FAULT") >= 1
    assert value("refute_disputes_opened_total") >= 1
    assert value("refute_disputes_resolved_total", verdict="PROVIDER_FAULT") == 1
    assert value("refute_proofs_total", kind="step") == 1
    assert value("refute_proof_seconds_count", kind="step") == 1
    assert 0 < value("refute_proof_seconds_sum", kind="step") < 600
    assert value("refute_proof_peak_bytes_sum", kind="step") > 2**20
    assert value("refute_webhook_deliveries", status="DELIVERED") >= 4
    assert value("refute_webhook_attempts_total") >= 4
    assert {s.labels["queue"] for s in families["refute_queue_depth"].samples} == {
        "spotcheck", "prove", "timers"}
    assert value("refute_queue_depth", queue="prove") == 0


def _flower_sees_the_workers(stack: LocalStack) -> None:
    """Flower, started beside the workers, reports them online (its own Prometheus gauge)."""
    deadline = time.monotonic() + 60
    online: set[str] = set()
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{stack.flower_url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        online = {s.labels["worker"] for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == "flower_worker_online" and s.value == 1}
        if len(online) >= 3:  # spot-check, prove and timers workers
            return
        time.sleep(1)
    raise AssertionError(f"Flower saw only {sorted(online)} online")


_OWNER = """
import sys, time
from pathlib import Path
from verifier.stack import LocalStack
stack = LocalStack(Path(sys.argv[1]))
child = stack._spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_killed_owner_leaves_no_stack_process_behind(tmp_path: Path) -> None:
    # A test run or demo killed outright (SIGKILL: no cleanup runs) used to leave its API,
    # workers and redis-server running, busy, for good.
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    os.kill(child, 0)  # running
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:  # gone, or a zombie its new parent has not reaped yet
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"):
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    raise AssertionError(f"stack process {child} outlived its killed owner")


def test_a_process_started_from_a_short_lived_thread_outlives_it(tmp_path: Path) -> None:
    # The death signal follows the thread that started a process: the fault drill restarts
    # redis-server from a worker thread, and the restarted server died with that thread.
    stack = LocalStack(tmp_path)
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        started.append(stack._spawn("sleeper",
                                    [sys.executable, "-c", "import time; time.sleep(60)"]))
        time.sleep(1.0)  # the process has set its death signal before this thread ends

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    time.sleep(1.0)
    try:
        assert started[0].poll() is None, "killed when the thread that started it ended"
    finally:
        started[0].kill()
        started[0].wait()


def test_the_stack_command_runs_flower_and_two_api_workers_until_interrupted(
        tmp_path: Path) -> None:
    """`refute stack --flower --api-workers 2` as a person runs it: it prints where everything
    is, all of it answers, and Ctrl-C stops it all."""
    refute = str(Path(sys.executable).with_name("refute"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUTE_")}
    process = subprocess.Popen([refute, "stack", "--workdir", str(tmp_path / "stack"),
                                "--flower", "--api-workers", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    try:
        shown: dict[str, str] = {}
        while "logs" not in shown:
            line = process.stdout.readline()
            assert line, f"refute stack exited: {process.wait(timeout=10)}"
            name, _, rest = line.partition(" ")
            shown[name] = rest.split()[0] if rest.split() else ""
        for url in (f"{shown['API']}/v1/ready", shown["Flower"]):
            with urllib.request.urlopen(url, timeout=30) as answer:
                assert answer.status == 200, url
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            out, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()  # its stack processes die with it (their death signal)
            raise
    assert "stopped" in out
    assert process.returncode == 0


def test_the_stack_command_stops_on_sigint_even_when_started_with_it_ignored(
        tmp_path: Path) -> None:
    """A shell starts background jobs with SIGINT ignored (CI does), and Python then installs no
    Ctrl-C handler: the stack ran on after Ctrl-C. It stops on SIGINT and SIGTERM regardless."""
    refute = str(Path(sys.executable).with_name("refute"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFUTE_")}
    for stop in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen(  # `trap "" INT`: SIGINT ignored, as a shell's background job
            ["sh", "-c", 'trap "" INT; exec "$0" stack --workdir "$1"', refute,
             str(tmp_path / stop.name)], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        try:
            while not process.stdout.readline().startswith("logs"):
                assert process.poll() is None, "refute stack exited"
        finally:
            process.send_signal(stop)
            try:
                out, _ = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        assert "stopped" in out and process.returncode == 0, (stop.name, out[-2000:])
