"""``refute demo``: a real end-to-end dispute on a fresh machine.

Starts the local stack (redis-server, API, spot-check / prove / timer workers), registers an
8-segment model for two networks, and submits through the API: an honest result, a cheat on a
network with spot-checks (the service's watcher catches it and disputes the faulty step), and a
cheat on a network without spot-checks (a whistleblower challenges it and bisects). Each cheat is
settled by a real EZKL proof, which the prove worker verifies again on a local anvil chain through
the chain port (``REFUTE_CHAIN_RPC_URL``: :class:`prover.chain.RpcChain` deploys the circuit's
verifier and sends a transaction); the demo reads that transaction's receipt back from anvil. The
honest result finalizes. Prints a summary table and the dispute bundles for ``refute replay``;
stops what it started.

``model="mobilenet"`` or ``"gpt2"`` runs the same story on a real-size model
(:mod:`refute.large_models`: MobileNet v1 224×224, 29 segments; a GPT-2-small-shaped
transformer, 73 segments) with the load, upload, registration and task limits raised
(:func:`demo_env`): one network with spot-checks, an honest result that finalizes and a cheat
whose segment in the middle of the model (a convolution; the Q·Kᵀ scores of an attention block)
went wrong in one element. Registration calibrates every segment, tiling those too large to
prove whole (half an hour for MobileNet on two cores, hours for GPT-2): a live status line
shows the time and what the registration is doing. The spot-check finds the faulty step, the
watcher disputes it and names the tile where its own execution differs most, the service proves
that tile and the proof is verified on anv

The real-size models' run is :mod:`verifier.demo_models`; what both runs share is
:mod:`verifier.demo_results` (submitting a result, the summary of its dispute) and
:mod:`verifier.demo_progress` (live status lines, the disputes' wall-clock times).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from eth_account import Account
from rich.console import Console

from challenge.whistleblower import Whistleblower
from prover.evm import Anvil
from refute import zoo
from refute.errors import RefuteError
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, run_trace
from refute.segmentation import Segmentation
from refute.settings import get_settings
from refute.trace import Trace
from verifier.client import RefuteClient
from verifier.demo_models import LARGE_MODEL_ENV, LARGE_MODELS, run_large
from verifier.demo_progress import DisputeClock, status_call
from verifier.demo_results import (
    print_replay_hint,
    print_summary,
    send_result,
    service_context,
    settle_row,
)
from verifier.stack import LocalStack

WHISTLEBLOWER = Account.from_key(b"\x32" * 32)

#: What ``refute demo --model`` accepts: the 8×256 MLP (the default) or a real-size model.
MODELS = ("mlp", "mobilenet", "gpt2")


def demo_env(model: str) -> dict[str, str]:
    """The ``REFUTE_*`` settings the demo of ``model`` raises over the defaults (for its stack
    and its own process): none for the MLP, :data:`LARGE_MODEL_ENV` for a real-size model."""
    _check_model(model)
    return {} if model == "mlp" else dict(LARGE_MODEL_ENV)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise RefuteError(f"unknown demo model {model!r}: choose from {', '.join(MODELS)}")


@contextlib.contextmanager
def _settings_env(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment with ``env`` set, and the cached settings re-read
    (:func:`refute.settings.get_settings` is cached); both restored afterwards."""
    if not env:
        yield
        return
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def cheat_step(model: str, segmentation: Segmentation) -> tuple[int, str]:
    """The step at which the demo of real-size ``model`` cheats, and what that segment is."""
    _check_model(model)
    if model == "mlp":
        raise RefuteError("the MLP demo lies from state 5 (and 3) on: no single cheat step")
    return LARGE_MODELS[model].cheat(segmentation)


def run_demo(workdir: Path, console: Console, model: str = "mlp") -> bool:
    """Run the demo of ``model`` (one of :data:`MODELS`) in ``workdir``; returns True when every
    expectation held."""
    _check_model(model)
    workdir = workdir.resolve()
    console.rule("[bold]refute demo" + ("" if model == "mlp" else f" --model {model}"))
    with _settings_env(demo_env(model)):
        if model == "mlp":
            console.print("starting anvil, redis-server, API and workers…")
            with Anvil() as chain:
                return _run(workdir, chain.rpc_url, console)
        large = LARGE_MODELS[model]
        zoo_model = large.build(console)
        prepared = status_call(
            console, f"loading {large.title} safely and segmenting it (default cuts) here, "
            "as a provider does", lambda: prepare_model(zoo_model.onnx_bytes))
        step, what = large.cheat(prepared.segmentation)
        segment = prepared.segmentation.segments[step - 1]
        console.print(f"{large.title}: {prepared.segmentation.num_segments} segments; the "
                      f"cheat will go wrong at segment {step} ({' '.join(segment.op_types)}): "
                      f"{what}", highlight=False)
        console.print("starting anvil, redis-server, API and workers (limits raised: "
                      f"{', '.join(f'{k}={v}' for k, v in LARGE_MODEL_ENV.items())})…",
                      highlight=False, soft_wrap=True)
        with Anvil() as chain:
            return run_large(workdir, chain.rpc_url, console, large=large, model=zoo_model,
                             prepared=prepared, step=step)


def _submit(client: RefuteClient, network_id: str, model: dict[str, Any], *,
            prepared: PreparedModel, seed: int, workdir: Path, lie_at: int | None) -> str:
    inputs = zoo.mlp_8x256().sample_input(seed)
    trace = run_trace(prepared, inputs)
    if lie_at is not None:  # the provider returns garbage from segment lie_at on
        states = [list(s) for s in trace.states]
        for k in range(lie_at, len(states)):
            states[k] = [t * 0.5 + 0.25 for t in states[k]]
        trace = Trace.from_states(prepared.manifest, states)
    return send_result(client, network_id, model, trace, seed=seed, workdir=workdir)


def _run(workdir: Path, rpc_url: str, console: Console) -> bool:
    """The demo against the anvil chain at ``rpc_url``, which the prove worker verifies every
    proof on (the chain port)."""
    stack = LocalStack(workdir / "stack", extra_env={"REFUTE_FINALIZE_EVERY_S": "1",
                                                     "REFUTE_CHAIN_RPC_URL": rpc_url})
    with stack:
        os.environ["REFUTE_HOME"] = stack.env["REFUTE_HOME"]
        console.print(f"API {stack.api_url} (logs in {stack.workdir})")
        admin = RefuteClient(stack.api_url)
        watched_id, watched_key = admin.create_network(
            "watched", admin_token=stack.admin_token, spot_probability=1.0, spot_count=8,
            challenge_window_s=20)
        open_id, open_key = admin.create_network(
            "unwatched", admin_token=stack.admin_token, spot_probability=0.0,
            challenge_window_s=600)
        watched, unwatched = RefuteClient(stack.api_url, watched_key), RefuteClient(
            stack.api_url, open_key)
        onnx_bytes = zoo.mlp_8x256().onnx_bytes
        console.print("registering an 8×256 MLP (safe load, 8 segments, calibration)…")
        start = time.monotonic()
        model_a = watched.register_model(onnx_bytes, calibration_samples=3)
        model_b = unwatched.register_model(onnx_bytes, calibration_samples=3)
        registration_s = (time.monotonic() - start) / 2
        manifest = Manifest.from_json(model_a["manifest"])
        prepared = dataclasses.replace(prepare_model(onnx_bytes), manifest=manifest)
        prepared_b = dataclasses.replace(
            prepared, manifest=Manifest.from_json(model_b["manifest"]))
        console.print(f"  τ per step = {list(manifest.tolerances or [])}, R = {manifest.range}")
        honest = _submit(watched, watched_id, model_a, prepared=prepared, seed=1,
                         workdir=workdir, lie_at=None)
        cheat_a = _submit(watched, watched_id, model_a, prepared=prepared, seed=2,
                          workdir=workdir, lie_at=5)
        cheat_b = _submit(unwatched, open_id, model_b, prepared=prepared_b, seed=3,
                          workdir=workdir, lie_at=3)
        console.print(f"submitted: honest {honest}, cheat {cheat_a} (lies from state 5, "
                      f"spot-checked), cheat {cheat_b} (lies from state 3, unwatched)")
        blower = Whistleblower(stack.api_url, WHISTLEBLOWER.key, WHISTLEBLOWER.address)
        console.print(f"whistleblower challenges {cheat_b} over the whole trace…")
        with DisputeClock(stack.env["REFUTE_DATABASE_URL"], [cheat_a, cheat_b]) as clock:
            start = time.monotonic()
            verdict_b = blower.challenge(cheat_b, prepared_b, zoo.mlp_8x256().sample_input(3),
                                         bond=100, report=lambda m: console.print(f"  {m}"))
            time_b = time.monotonic() - start
            console.print("waiting for the spot-check, the watcher's dispute and its proof…")
            final_a = watched.wait(cheat_a, until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                                   timeout=900, poll=1.0)
            final_honest = watched.wait(honest, timeout=300, poll=1.0)
        ctx = service_context(stack)
        rows = []
        ok = final_honest.status == "FINALIZED" and final_a.status == "PROVIDER_FAULT" and \
            verdict_b["verdict"] == "PROVIDER_FAULT"
        for label, rid in (("spot-check + watcher", cheat_a), ("whistleblower", cheat_b)):
            row, passed = settle_row(ctx, label, rid, workdir=workdir, rpc_url=rpc_url,
                                     console=console, clock=clock)
            rows.append(row)
            ok = ok and passed
        print_summary(console, honest, final_honest.status, rows)
        console.print(f"registration took {registration_s:.0f} s a network; the whistleblower "
                      f"dispute took {time_b:.0f} s (bisection + proof)")
        print_replay_hint(console, ctx)
    return ok
