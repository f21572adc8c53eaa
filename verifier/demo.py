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
that tile and the proof is verified on anvil.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import numpy as np
from eth_account import Account
from eth_typing import HexStr
from rich.console import Console
from rich.table import Table
from web3 import Web3

from challenge.replay import replay
from challenge.whistleblower import Whistleblower
from prover.evm import Anvil
from refute import large_models, zoo
from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, prepare_model, run_trace
from refute.segmentation import Segmentation, run_segment
from refute.settings import Settings, get_settings
from refute.trace import Trace
from verifier.api.schemas import MAX_SPOT_COUNT
from verifier.client import RefuteClient, ResultView, sign_result
from verifier.service import ServiceContext
from verifier.stack import LocalStack

_T = TypeVar("_T")

PROVIDER = Account.from_key(b"\x31" * 32)
WHISTLEBLOWER = Account.from_key(b"\x32" * 32)

#: What ``refute demo --model`` accepts: the 8×256 MLP (the default) or a real-size model.
MODELS = ("mlp", "mobilenet", "gpt2")

#: The settings a real-size model's demo raises over the defaults, for its stack and for the
#: demo's own process (which loads the model and reads its disputes): GPT-2-small is ≈ 340 MB
#: of file and weights and ≈ 2^34 multiply-accumulates a run, its trace ≈ 90 MB; registration
#: calibrates every segment (tiles in EZKL child processes), for hours, within 16 GiB of address
#: space; one proof task may take longer than ten minutes (its limit stays below the broker's
#: visibility timeout, one hour).
LARGE_MODEL_ENV: Mapping[str, str] = {
    "REFUTE_MAX_MODEL_BYTES": str(2**30),
    "REFUTE_MAX_INITIALIZER_BYTES": str(2**30),
    "REFUTE_MAX_MODEL_WORK": str(2**36),
    "REFUTE_MAX_UPLOAD_BYTES": str(2**30),
    "REFUTE_REGISTRATION_TIMEOUT_S": str(8 * 3600),
    "REFUTE_REGISTRATION_MEMORY_MB": str(16 * 1024),
    "REFUTE_TASK_TIME_LIMIT_S": str(3000),
}

#: The challenge window of a real-size model's network when every segment is spot-checked,
#: and when the watcher may have to check a whole result (it must dispute within the window).
WINDOW_SPOT_CHECKED_S = 60
WINDOW_WATCHED_S = 900

#: How long the demo waits for a real-size model's cheat to be convicted (spot-check, dispute,
#: the tile's circuit setup and proof, on-chain verification).
LARGE_CONVICTION_TIMEOUT_S = 3 * 3600.0


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


def _submit(client: RefuteClient, network_id: str, model: dict[str, Any], *,
            prepared: PreparedModel, seed: int, workdir: Path, lie_at: int | None) -> str:
    inputs = zoo.mlp_8x256().sample_input(seed)
    trace = run_trace(prepared, inputs)
    if lie_at is not None:  # the provider returns garbage from segment lie_at on
        states = [list(s) for s in trace.states]
        for k in range(lie_at, len(states)):
            states[k] = [t * 0.5 + 0.25 for t in states[k]]
        trace = Trace.from_states(prepared.manifest, states)
    return _send(client, network_id, model, trace, seed=seed, workdir=workdir)


def _send(client: RefuteClient, network_id: str, model: dict[str, Any], trace: Trace, *,
          seed: int, workdir: Path) -> str:
    """Sign and submit a result with ``trace``'s commitment, then upload the trace."""
    body = sign_result(network_id=network_id, model_id=model["id"],
                       model_sha256=model["model_sha256"], trace=trace,
                       input_hash=seed.to_bytes(32, "big"), output_hash=b"\x00" * 32,
                       stake=1000, nonce=time.time_ns(), deadline=int(time.time()) + 3600,
                       private_key=PROVIDER.key, provider=PROVIDER.address)
    result = client.submit_result(body)
    client.upload_trace(result.id, trace.write(workdir / f"{result.id}.rtrace"))  # streamed
    return result.id


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
        large = _LARGE[model]
        zoo_model = large.build(console)
        prepared = _status_call(
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
            return _run_large(workdir, chain.rpc_url, console, large=large, model=zoo_model,
                              prepared=prepared, step=step)


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
        with _DisputeClock(stack.env["REFUTE_DATABASE_URL"], [cheat_a, cheat_b]) as clock:
            start = time.monotonic()
            verdict_b = blower.challenge(cheat_b, prepared_b, zoo.mlp_8x256().sample_input(3),
                                         bond=100, report=lambda m: console.print(f"  {m}"))
            time_b = time.monotonic() - start
            console.print("waiting for the spot-check, the watcher's dispute and its proof…")
            final_a = watched.wait(cheat_a, until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                                   timeout=900, poll=1.0)
            final_honest = watched.wait(honest, timeout=300, poll=1.0)
        ctx = _service_context(stack)
        rows = []
        ok = final_honest.status == "FINALIZED" and final_a.status == "PROVIDER_FAULT" and \
            verdict_b["verdict"] == "PROVIDER_FAULT"
        for label, rid in (("spot-check + watcher", cheat_a), ("whistleblower", cheat_b)):
            row, passed = _settle_row(ctx, label, rid, workdir=workdir, rpc_url=rpc_url,
                                      console=console, clock=clock)
            rows.append(row)
            ok = ok and passed
        _print_summary(console, honest, final_honest.status, rows)
        console.print(f"registration took {registration_s:.0f} s a network; the whistleblower "
                      f"dispute took {time_b:.0f} s (bisection + proof)")
        _print_replay_hint(console, ctx)
    return ok


# --- real-size models -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Large:
    """How the demo runs one real-size model."""

    title: str
    build: Callable[[Console], zoo.ZooModel]
    #: The cheat's step (1-based segment) and a phrase saying what it is.
    cheat: Callable[[Segmentation], tuple[int, str]]
    #: What registering it costs, said before the wait.
    expect: str


def middle_convolution(segmentation: Segmentation) -> tuple[int, str]:
    """The middle one of the segments that hold a convolution, and what it is."""
    convs = [s.index for s in segmentation.segments if "Conv" in s.op_types]
    if not convs:
        raise RefuteError("the model has no convolution segment to cheat at")
    step = convs[len(convs) // 2]
    return step, f"convolution {len(convs) // 2 + 1} of {len(convs)}"


def middle_attention_scores(segmentation: Segmentation) -> tuple[int, str]:
    """The Q·Kᵀ segment of the middle attention block, found by its operators: a MatMul scaled
    (Mul) and masked (Add), without LayerNorm or Softmax, writing square token×token scores."""
    found = []
    for s in segmentation.segments:
        fed = {spec.name for spec in s.inputs}
        scores = any(len(o.shape) == 4 and o.shape[-1] == o.shape[-2] and o.name not in fed
                     for o in s.outputs)
        if s.op_types[:1] == ("MatMul",) and {"Mul", "Add"} <= set(s.op_types) and \
                not {"LayerNormalization", "Softmax"} & set(s.op_types) and scores:
            found.append(s.index)
    if not found:
        raise RefuteError("the model has no attention-scores (Q·Kᵀ) segment to cheat at")
    block = len(found) // 2
    return found[block], f"the Q·Kᵀ scores of attention block {block} (of 0–{len(found) - 1})"


_LARGE: dict[str, _Large] = {
    "mobilenet": _Large(
        "MobileNet v1 224×224", lambda console: large_models.mobilenet_v1(console=console),
        middle_convolution,
        "about half an hour on two cores or more, up to ≈ 16 GB of memory"),
    "gpt2": _Large(
        "GPT-2 small (12 blocks, 128 tokens)",
        lambda console: large_models.gpt2_small(console=console), middle_attention_scores,
        "hours on two cores, up to ≈ 16 GB of memory"),
}


def cheat_step(model: str, segmentation: Segmentation) -> tuple[int, str]:
    """The step at which the demo of real-size ``model`` cheats, and what that segment is."""
    _check_model(model)
    if model == "mlp":
        raise RefuteError("the MLP demo lies from state 5 (and 3) on: no single cheat step")
    return _LARGE[model].cheat(segmentation)


def lying_states(prepared: PreparedModel, states: Sequence[Sequence[np.ndarray]], step: int,
                 executor: DeterministicExecutor) -> tuple[list[list[np.ndarray]], str]:
    """The states of a provider whose segment ``step`` went wrong in one element and which
    computed the rest honestly from there (so ``step`` is the one faulty step), and a phrase
    saying where. The element, in the middle of the largest tensor the segment writes, moves by
    4·τ + 64 units (far beyond the spot-check's 2·τ), towards zero when that would leave R."""
    manifest = prepared.manifest
    if manifest.tolerances is None or manifest.range is None:
        raise RefuteError("the manifest is not calibrated: no τ or R to lie against")
    segments = prepared.segmentation.segments
    segment = segments[step - 1]
    fed = {spec.name for spec in segment.inputs}
    produced = [j for j, spec in enumerate(segment.outputs) if spec.name not in fed] or \
        list(range(len(segment.outputs)))
    j = max(produced, key=lambda i: math.prod(segment.outputs[i].shape))
    claimed = [np.array(t, dtype=np.float32, copy=True) for t in states[step]]
    flat = claimed[j].reshape(-1)
    at = flat.size // 2
    units = 4 * manifest.tolerances[step - 1] + 64
    delta = units / 2**manifest.scale
    value = float(flat[at])
    flat[at] = np.float32(value + delta if abs(value + delta) <= manifest.range
                          else value - delta)
    lied = [*[list(s) for s in states[:step]], claimed]
    for later in segments[step:]:
        lied.append(run_segment(executor, later, lied[-1]))
    return lied, (f"element {at} of {segment.outputs[j].name} "
                  f"{list(segment.outputs[j].shape)} off by {delta:g} ({units} units)")


def _run_large(workdir: Path, rpc_url: str, console: Console, *, large: _Large,
               model: zoo.ZooModel, prepared: PreparedModel, step: int) -> bool:
    """A real-size model's demo: one network with spot-checks, an honest result and a cheat at
    ``step``, against the anvil chain at ``rpc_url``."""
    n = prepared.segmentation.num_segments
    # TMPDIR inside the stack's folder: the registration's calibration folders
    # (refute-cal<segment>-*) show which segment it is on.
    tmp = workdir / "stack" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(workdir / "stack", extra_env={
        "REFUTE_FINALIZE_EVERY_S": "1", "REFUTE_CHAIN_RPC_URL": rpc_url, "TMPDIR": str(tmp),
        **LARGE_MODEL_ENV})
    with stack:
        os.environ["REFUTE_HOME"] = stack.env["REFUTE_HOME"]
        console.print(f"API {stack.api_url} (logs in {stack.workdir})")
        admin = RefuteClient(stack.api_url)
        # Every segment is spot-checked when the API allows it (MobileNet); otherwise the
        # watcher may be asked to check the whole result, within a longer window (GPT-2).
        window_s = WINDOW_SPOT_CHECKED_S if n <= MAX_SPOT_COUNT else WINDOW_WATCHED_S
        network_id, key = admin.create_network(
            "watched", admin_token=stack.admin_token, spot_probability=1.0,
            spot_count=min(n, MAX_SPOT_COUNT), challenge_window_s=window_s)
        settings = get_settings()
        client = RefuteClient(stack.api_url, key,
                              timeout=settings.registration_timeout_s + 600.0)
        console.print(
            f"registering {large.title} through the API (POST /v1/model-files, "
            f"{len(model.onnx_bytes) / 1e6:.0f} MB): safe load, {n} segments, then every "
            "segment's circuit calibrated with EZKL; a segment too large to prove whole is "
            "tiled, and each tile shape is calibrated in EZKL child processes. This takes "
            f"{large.expect} (bounded by {settings.registration_timeout_s / 3600:g} h and "
            f"{settings.registration_memory_mb} MB); the API answers when it is done.",
            highlight=False)
        probe = _RegistrationProbe(stack.process("api").pid, tmp, prepared.segmentation)
        start = time.monotonic()
        # The request runs on a daemon thread: an interrupted demo stops the stack (which ends
        # the request) instead of waiting for it.
        # Sent as a file (multipart, streamed): the JSON route's base64 body would hold the
        # whole model in memory on both sides.
        model_file = workdir / "model.onnx"
        model_file.write_bytes(model.onnx_bytes)
        call = _Background(lambda: client.register_model(model_file, calibration_samples=2))
        _watch(console, "registration",
               lambda: (call.done(), probe()),
               timeout=settings.registration_timeout_s + 900.0)
        registered = call.result()
        registration_s = time.monotonic() - start
        console.print(f"registered {registered['id']} in {_duration(registration_s)}")
        _print_report(console, registered.get("report") or {})
        manifest = Manifest.from_json(registered["manifest"])
        if manifest.cuts != prepared.manifest.cuts:
            raise RefuteError("the service segmented the model otherwise than the provider did")
        prepared = dataclasses.replace(prepared, manifest=manifest)
        executor = DeterministicExecutor()
        honest_trace = _status_call(
            console, "running the honest result and committing to its states",
            lambda: run_trace(prepared, model.sample_input(1)))
        honest = _send(client, network_id, registered, honest_trace, seed=1, workdir=workdir)
        cheat_inputs = model.sample_input(2)
        own = _status_call(console, "running the cheat's job",
                           lambda: run_trace(prepared, cheat_inputs))
        lied, where = _status_call(
            console, f"making segment {step} go wrong and running the rest from there",
            lambda: lying_states(prepared, own.states, step, executor))
        cheat_trace = _status_call(console, "committing to the cheat's states",
                                   lambda: Trace.from_states(prepared.manifest, lied))
        cheat = _send(client, network_id, registered, cheat_trace, seed=2, workdir=workdir)
        console.print(f"submitted: honest {honest}, cheat {cheat} (segment {step} wrong: "
                      f"{where})", highlight=False)
        ctx = _service_context(stack)
        with _DisputeClock(stack.env["REFUTE_DATABASE_URL"], [cheat]) as clock:
            label = _catch(ctx, console, cheat, step=step, api_url=stack.api_url, api_key=key)
            final_cheat = _wait_result(
                console, clock, client, cheat, "the watcher's dispute, the tile it names and "
                "the tile's proof", until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                timeout=LARGE_CONVICTION_TIMEOUT_S)
            final_honest = _wait_result(console, clock, client, honest, "the honest result",
                                        until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                                        timeout=window_s + 1800.0)
        row, passed = _settle_row(ctx, label, cheat, workdir=workdir, rpc_url=rpc_url,
                                  console=console, clock=clock)
        ok = passed and final_cheat.status == "PROVIDER_FAULT" and \
            final_honest.status == "FINALIZED"
        _print_summary(console, honest, final_honest.status, [row])
        console.print(f"registration {_duration(registration_s)}; dispute {row[9]} s, of "
                      f"which the proof {row[10]} s (the tile's circuit setup, proof, "
                      "verification on anvil)", highlight=False)
        _print_replay_hint(console, ctx)
    return ok


class _Background(Generic[_T]):
    """``call()`` running on a daemon thread."""

    def __init__(self, call: Callable[[], _T]) -> None:
        self._value: list[_T] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._value.append(call())
            except BaseException as exc:
                self._error.append(exc)

        self._thread = threading.Thread(target=run, name="refute-demo-call", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        """Whether the call has returned or raised."""
        return not self._thread.is_alive()

    def result(self) -> _T:
        """The call's value (waiting for it), or its exception raised again."""
        self._thread.join()
        if self._error:
            raise self._error[0]
        return self._value[0]


def _catch(ctx: ServiceContext, console: Console, rid: str, *, step: int, api_url: str,
           api_key: str) -> str:
    """How the service will catch cheat ``rid`` at ``step``: the spot-check when it sampled
    that step (sampling is decided at acceptance: the demo, as the operator, reads it), else
    the service's watcher, asked to check the whole result (it bisects to the step). Returns
    the summary's "caught by"."""
    from challenge.records import Result

    with ctx.sessions() as session:
        result = session.get(Result, rid)
        sampled = [int(i) for i in (result.spot_segments or [])] if result is not None else []
    if step in sampled:
        console.print(f"the spot-check re-executes {len(sampled)} segments, segment {step} "
                      "among them: it will find the fault and the watcher will dispute it",
                      highlight=False)
        return "spot-check + watcher"
    console.print(f"the spot-check re-executes {len(sampled)} segments (at most "
                  f"{MAX_SPOT_COUNT} a result), not segment {step}: asking the service's watcher "
                  "to check the whole result (POST /v1/results/{id}/watch); it bisects",
                  highlight=False)
    answer = httpx.post(f"{api_url}/v1/results/{rid}/watch", headers={"X-API-Key": api_key},
                        timeout=60.0)
    if answer.status_code != 202:
        raise RefuteError(f"the watcher was not queued: HTTP {answer.status_code} "
                          f"{answer.text[:200]}")
    return "watcher (whole result)"


def _status_call(console: Console, what: str, call: Callable[[], _T]) -> _T:
    """``call()`` under a live status line saying ``what`` is being done, then its time."""
    start = time.monotonic()
    with console.status(f"{what}…"):
        value = call()
    console.print(f"{what}: {time.monotonic() - start:.1f} s", highlight=False)
    return value


def _duration(seconds: float) -> str:
    """``1 h 02 min 03 s``, ``4 min 05 s`` or ``6 s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


#: A non-terminal console (a log file, CI) gets one line this often while the demo waits.
_HEARTBEAT_S = 60.0


def _watch(console: Console, what: str, poll: Callable[[], tuple[bool, str]], *,
           timeout: float, every: float = 1.0) -> float:
    """Call ``poll()`` (→ done, what is happening) every ``every`` seconds until it is done,
    showing the elapsed time and its words on a live status line (on a terminal; otherwise a
    line a minute); returns the seconds waited. RefuteError past ``timeout``."""
    start = time.monotonic()
    done, detail = poll()
    with contextlib.ExitStack() as stack:
        status = stack.enter_context(console.status(what)) if console.is_terminal else None
        next_line = start + _HEARTBEAT_S
        while not done:
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                raise RefuteError(f"{what} did not finish within {_duration(timeout)}")
            line = f"{what}: {_duration(elapsed)}" + (f" — {detail}" if detail else "")
            if status is not None:
                status.update(line)
            elif time.monotonic() >= next_line:
                console.print(f"  {line}", highlight=False)
                next_line += _HEARTBEAT_S
            time.sleep(every)
            done, detail = poll()
    return time.monotonic() - start


class _RegistrationProbe:
    """What the registration is doing, as far as this machine shows: the segment being
    calibrated (from its calibration folders, ``refute-cal<segment>-*`` and ``refute-range-*``,
    under the stack's ``TMPDIR``; the last one seen is kept between folders), and the processes
    under the API (the registration child and its EZKL children) with their resident memory."""

    def __init__(self, api_pid: int, tmp: Path, segmentation: Segmentation) -> None:
        self.api_pid, self.tmp, self.segmentation = api_pid, tmp, segmentation
        self.stage = ""

    def __call__(self) -> str:
        """One line: the stage, then the processes."""
        try:
            folders = [p.name for p in self.tmp.iterdir()]
        except OSError:
            folders = []
        calibrating = sorted({int(digits) for name in folders if name.startswith("refute-cal")
                              and (digits := name[len("refute-cal"):].split("-")[0]).isdigit()})
        n = self.segmentation.num_segments
        if any(name.startswith("refute-range-") for name in folders):
            self.stage = "calibrating the states' range circuits"
        elif calibrating and 1 <= calibrating[-1] <= n:
            i = calibrating[-1]
            ops = " ".join(self.segmentation.segments[i - 1].op_types)
            self.stage = f"calibrating segment {i}/{n} ({ops})"
        parts = [self.stage or "loading, segmenting, running the calibration inputs"]
        children, rss = _process_tree(self.api_pid)
        if children:
            parts.append(f"{children} process{'es' if children > 1 else ''} under the API, "
                         f"{rss / 2**30:.1f} GiB resident")
        return "; ".join(parts)


def _process_tree(root: int) -> tuple[int, int]:
    """How many processes descend from ``root`` and their resident bytes (Linux ``/proc``;
    ``(0, 0)`` elsewhere)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [child for child, parent in parents.items() if parent == pid]
        found += kids
        frontier += kids
    rss = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in found:
        with contextlib.suppress(OSError, ValueError, IndexError):
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
    return len(found), rss


def _print_report(console: Console, report: Mapping[str, Any]) -> None:
    """The registration report in a few lines: segments, tiled segments and their tile counts,
    logrows, scale and range."""
    segments = list(report.get("segments") or [])
    if not segments:
        return
    tiled = [(s["segment"], s["tiles"]) for s in segments if s.get("tiles")]
    logrows = Counter(s["logrows"] for s in segments if s.get("logrows") is not None)
    calibration = sum(float(s.get("calibration_seconds") or 0) for s in segments)
    console.print(f"registration report: {len(segments)} segments, {len(tiled)} tiled; scale "
                  f"{report.get('scale')} (tried {report.get('scales_tried')}), R = "
                  f"{report.get('range')}; calibration {_duration(calibration)} in all",
                  highlight=False)
    if tiled:
        console.print("  tiles per tiled segment: " + ", ".join(
            f"{i}: {count}" for i, count in tiled), highlight=False, soft_wrap=True)
    console.print("  logrows (of a segment, or of one tile): " + ", ".join(
        f"{rows}: {count} segment{'s' if count > 1 else ''}"
        for rows, count in sorted(logrows.items())), highlight=False, soft_wrap=True)


def _wait_result(console: Console, clock: _DisputeClock, client: RefuteClient, rid: str,
                 what: str, *, until: frozenset[str], timeout: float) -> ResultView:
    """Poll result ``rid`` until its status is in ``until``, with a live status line (its
    status and its dispute's phase)."""
    seen: list[ResultView] = []

    def poll() -> tuple[bool, str]:
        view = client.result(rid)
        clock.look()
        seen.append(view)
        del seen[:-1]
        return view.status in until, f"{rid} {view.status}{clock.describe(rid)}"

    waited = _watch(console, f"waiting for {what}", poll, timeout=timeout, every=2.0)
    console.print(f"{rid}: {seen[-1].status} after {_duration(waited)}", highlight=False)
    return seen[-1]


class _DisputeClock:
    """Watches the disputes of some results from a daemon thread (their rows, every half
    second, through an engine of its own): when each was first seen open, first seen in its
    step-proof phase, and first seen resolved. The transcript's times are game times (a proof
    counts as made when it was asked for), so a proof's wall-clock time is observed here."""

    def __init__(self, database_url: str, result_ids: Sequence[str], every: float = 0.5) -> None:
        from verifier.db import make_engine, session_factory

        self._engine = make_engine(database_url)
        self._sessions = session_factory(self._engine)
        self._results = list(result_ids)
        self._every = every
        self._seen: dict[str, dict[str, float]] = {}
        self._latest: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refute-demo-clock",
                                        daemon=True)

    def __enter__(self) -> _DisputeClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.look()  # what happened since the thread's last look
        self._engine.dispose()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.look()
            self._stop.wait(self._every)

    def look(self) -> None:
        """Look at the disputes now (the thread does every half second; a caller that has
        just seen a result change looks too, so that the change is timed when it is seen)."""
        with contextlib.suppress(Exception):  # a busy database: look again next time
            self._look()

    def _look(self) -> None:
        from sqlalchemy import select

        from challenge.records import Dispute

        now = time.monotonic()
        with self._sessions() as session:
            rows = session.scalars(select(Dispute).where(
                Dispute.result_id.in_(self._results)).order_by(Dispute.opened_at)).all()
            with self._lock:
                for row in rows:
                    seen = self._seen.setdefault(row.id, {"open": now})
                    state = dict(row.state)
                    phase = str(state.get("phase"))
                    if phase == "step_proof":
                        seen.setdefault("proof", now)
                    if row.status == "RESOLVED" or phase == "resolved":
                        seen.setdefault("resolved", now)
                    self._latest[row.result_id] = (row.id, state)

    def seconds(self, dispute_id: str) -> tuple[float | None, float | None]:
        """Wall-clock seconds of the dispute (open to resolved) and of its step proof (asked
        for to resolved), as observed; None where not observed."""
        with self._lock:
            seen = dict(self._seen.get(dispute_id, {}))
        end = seen.get("resolved")
        if end is None:
            return None, None
        proof = seen.get("proof")
        return end - seen["open"], None if proof is None else end - proof

    def describe(self, result_id: str) -> str:
        """``; dispute dsp_…: phase tile (step 14)`` for the result's latest dispute, or
        nothing while it has none."""
        with self._lock:
            latest = self._latest.get(result_id)
        if latest is None:
            return ""
        dispute_id, state = latest
        tile = f", tile {state['tile']}" if state.get("tile") is not None else ""
        return f"; dispute {dispute_id}: phase {state.get('phase')} (step {state.get('hi')}{tile})"


# --- summary ------------------------------------------------------------------------------------


def _service_context(stack: LocalStack) -> ServiceContext:
    """The service's stores, opened from this process (to read and export the disputes)."""
    return ServiceContext.create(Settings(
        database_url=stack.env["REFUTE_DATABASE_URL"],
        blob_dir=Path(stack.env["REFUTE_BLOB_DIR"]), spot_key=stack.env["REFUTE_SPOT_KEY"]))


_COLUMNS = ("result", "caught by", "rounds", "step", "tile", "maxdiff / τ", "verdict",
            "on-chain gas", "replay", "dispute s", "proof s")


def _print_summary(console: Console, honest: str, honest_status: str,
                   rows: Sequence[Sequence[str]]) -> None:
    """The summary table (one row per result) and the dispute bundles."""
    table = Table(title="refute demo: summary")
    for column in _COLUMNS:
        table.add_column(column, overflow="fold")  # a narrow terminal folds cells, never cuts
    table.add_row(honest, "—", "—", "—", "—", "—", honest_status, "—", "—", "—", "—")
    for row in rows:
        table.add_row(*row[:-1])
    if console.is_terminal:
        console.print(table)
    else:  # a file or a pipe: the table at its own width, not the default 80 columns
        Console(file=console.file, width=max(console.width, 200), color_system=None).print(
            table)
    for row in rows:
        console.print(f"bundle {row[-1]}", highlight=False, soft_wrap=True)


def _print_replay_hint(console: Console, ctx: ServiceContext) -> None:
    from challenge.orchestrator import service_signing_key

    key = "0x" + service_signing_key(ctx.disputes).public_key.hex()
    console.print(f"check any bundle offline with: refute replay <bundle> --key {key}",
                  highlight=False, soft_wrap=True)


def _settle_row(ctx: ServiceContext, label: str, rid: str, *, workdir: Path, rpc_url: str,
                console: Console, clock: _DisputeClock) -> tuple[list[str], bool]:
    """The summary row of a cheat (the columns of :data:`_COLUMNS`, then its bundle) and
    whether it was convicted, its bundle replays and its proof was verified on anvil; the
    dispute's and the proof's times are ``clock``'s."""
    from sqlalchemy import select

    from challenge.orchestrator import export_dispute, service_signing_key
    from challenge.records import Dispute

    with ctx.sessions() as session:
        dispute = session.scalars(select(Dispute).where(
            Dispute.result_id == rid, Dispute.verdict == "PROVIDER_FAULT")).first()
    if dispute is None:
        return [rid, label, "-", "-", "-", "-", "NO VERDICT", "-", "-", "-", "-", "-"], False
    bundle = export_dispute(ctx.disputes, dispute.id, workdir / f"{dispute.id}.rdispute")
    report = replay(bundle, ["0x" + service_signing_key(ctx.disputes).public_key.hex()])
    transcript = json.loads(_member(bundle, "transcript.json"))
    own = [e for e in transcript["events"]
           if isinstance(e.get("body"), dict) and e["body"].get("dispute_id") == dispute.id]
    outcome = next(e["body"] for e in own if e["kind"] == "proofoutcome")
    gas = _on_chain(outcome, rpc_url, console)
    tiles = next((e["body"].get("tiles") or [] for e in own if e["kind"] == "challenge"), [])
    step = int(outcome["step"])
    tile = outcome.get("tile")
    of = f" of {tiles[step - 1]}" if len(tiles) >= step else ""
    dispute_s, proof_s = clock.seconds(dispute.id)
    state = dispute.state
    row = [rid, label, str(state["rounds"]), str(step), "—" if tile is None else f"{tile}{of}",
           f"{float(eval_fraction(outcome['maxdiff_units'])):.1f} / "
           f"{outcome['tolerance']}", str(dispute.verdict), f"{gas:,}" if gas else "-",
           "OK" if report.ok else "FAILED", _seconds(dispute_s), _seconds(proof_s), str(bundle)]
    return row, report.ok and gas > 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def eval_fraction(text: str) -> float:
    """A fraction written as ``a/b`` (or an integer) as a float."""
    from fractions import Fraction

    return float(Fraction(text))


def _member(bundle: Path, name: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(bundle) as archive:
        return archive.read(name)


def _on_chain(body: dict[str, Any], rpc_url: str, console: Console) -> int:
    """The gas of the transaction by which the prove worker verified the proof of a
    ``proofoutcome`` event body on anvil (recorded under ``chain``), once its receipt on the
    chain at ``rpc_url`` confirms it: mined, successful, sent to the recorded verifier, with the
    recorded gas. 0 when the proof was not verified on chain."""
    recorded = body.get("chain")
    if not isinstance(recorded, dict):
        console.print(f"  proof for step {body['step']} was NOT verified on chain")
        return 0
    receipt = Web3(Web3.HTTPProvider(rpc_url)).eth.get_transaction_receipt(
        HexStr(str(recorded["tx"])))
    gas = int(recorded["gas"])
    if receipt["status"] != 1 or receipt["gasUsed"] != gas or \
            receipt["to"] != recorded["contract"]:
        console.print(f"  proof for step {body['step']}: transaction {recorded['tx']} on anvil "
                      "does not match the transcript")
        return 0
    console.print(f"  proof for step {body['step']} verified on anvil: gas {gas:,}")
    return gas
