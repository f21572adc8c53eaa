"""The real-size models' demo (``refute demo --model mobilenet|gpt2``, :mod:`verifier.demo`):
the limits it raises, the segment it cheats at and the lie it plants there, its run against
the local stack, and what it shows while a registration of hours is under way."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from refute import large_models, zoo
from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, run_trace
from refute.segmentation import Segmentation, run_segment
from refute.settings import get_settings
from refute.trace import Trace
from verifier.api.schemas import MAX_SPOT_COUNT
from verifier.client import RefuteClient, ResultView
from verifier.demo_progress import (
    Background,
    DisputeClock,
    format_duration,
    poll_with_status,
    status_call,
)
from verifier.demo_results import (
    print_replay_hint,
    print_summary,
    send_result,
    service_context,
    settle_row,
)
from verifier.service import ServiceContext
from verifier.stack import LocalStack

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


@dataclass(frozen=True)
class LargeModel:
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


LARGE_MODELS: dict[str, LargeModel] = {
    "mobilenet": LargeModel(
        "MobileNet v1 224×224", lambda console: large_models.mobilenet_v1(console=console),
        middle_convolution,
        "about half an hour on two cores or more, up to ≈ 16 GB of memory"),
    "gpt2": LargeModel(
        "GPT-2 small (12 blocks, 128 tokens)",
        lambda console: large_models.gpt2_small(console=console), middle_attention_scores,
        "hours on two cores, up to ≈ 16 GB of memory"),
}


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


def run_large(workdir: Path, rpc_url: str, console: Console, *, large: LargeModel,
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
        call = Background(lambda: client.register_model(model_file, calibration_samples=2))
        poll_with_status(console, "registration",
                         lambda: (call.done(), probe()),
                         timeout=settings.registration_timeout_s + 900.0)
        registered = call.result()
        registration_s = time.monotonic() - start
        console.print(f"registered {registered['id']} in {format_duration(registration_s)}")
        _print_report(console, registered.get("report") or {})
        manifest = Manifest.from_json(registered["manifest"])
        if manifest.cuts != prepared.manifest.cuts:
            raise RefuteError("the service segmented the model otherwise than the provider did")
        prepared = dataclasses.replace(prepared, manifest=manifest)
        executor = DeterministicExecutor()
        honest_trace = status_call(
            console, "running the honest result and committing to its states",
            lambda: run_trace(prepared, model.sample_input(1)))
        honest = send_result(client, network_id, registered, honest_trace, seed=1, workdir=workdir)
        cheat_inputs = model.sample_input(2)
        own = status_call(console, "running the cheat's job",
                          lambda: run_trace(prepared, cheat_inputs))
        lied, where = status_call(
            console, f"making segment {step} go wrong and running the rest from there",
            lambda: lying_states(prepared, own.states, step, executor))
        cheat_trace = status_call(console, "committing to the cheat's states",
                                  lambda: Trace.from_states(prepared.manifest, lied))
        cheat = send_result(client, network_id, registered, cheat_trace, seed=2, workdir=workdir)
        console.print(f"submitted: honest {honest}, cheat {cheat} (segment {step} wrong: "
                      f"{where})", highlight=False)
        ctx = service_context(stack)
        with DisputeClock(stack.env["REFUTE_DATABASE_URL"], [cheat]) as clock:
            label = _catch(ctx, console, cheat, step=step, api_url=stack.api_url, api_key=key)
            final_cheat = _wait_result(
                console, clock, client, cheat, "the watcher's dispute, the tile it names and "
                "the tile's proof", until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                timeout=LARGE_CONVICTION_TIMEOUT_S)
            final_honest = _wait_result(console, clock, client, honest, "the honest result",
                                        until=frozenset({"PROVIDER_FAULT", "FINALIZED"}),
                                        timeout=window_s + 1800.0)
        row, passed = settle_row(ctx, label, cheat, workdir=workdir, rpc_url=rpc_url,
                                 console=console, clock=clock)
        ok = passed and final_cheat.status == "PROVIDER_FAULT" and \
            final_honest.status == "FINALIZED"
        print_summary(console, honest, final_honest.status, [row])
        console.print(f"registration {format_duration(registration_s)}; dispute {row[9]} s, "
                      f"of which the proof {row[10]} s (the tile's circuit setup, proof, "
                      "verification on anvil)", highlight=False)
        print_replay_hint(console, ctx)
    return ok


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
                  f"{report.get('range')}; calibration {format_duration(calibration)} in all",
                  highlight=False)
    if tiled:
        console.print("  tiles per tiled segment: " + ", ".join(
            f"{i}: {count}" for i, count in tiled), highlight=False, soft_wrap=True)
    console.print("  logrows (of a segment, or of one tile): " + ", ".join(
        f"{rows}: {count} segment{'s' if count > 1 else ''}"
        for rows, count in sorted(logrows.items())), highlight=False, soft_wrap=True)


def _wait_result(console: Console, clock: DisputeClock, client: RefuteClient, rid: str,
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

    waited = poll_with_status(console, f"waiting for {what}", poll, timeout=timeout, every=2.0)
    console.print(f"{rid}: {seen[-1].status} after {format_duration(waited)}", highlight=False)
    return seen[-1]
