"""Model registration: safe loading, segmentation and calibration, isolated per request.

Each registration runs in its own child process (``spawn``), so one network's model can neither
stall nor break another's:

* **time** — the child gets ``registration_timeout_s`` of wall-clock time, then it is killed and
  the request is refused with :class:`RegistrationTimeout` (the model's fault: 422);
* **memory** — the child caps its own address space (``RLIMIT_AS``) at
  ``registration_memory_mb`` before importing anything; running out is refused with
  :class:`RegistrationMemoryExceeded` (422);
* **death** — a child killed by a signal (the OOM killer, an operator, a crash in native code)
  fails that request only, with :class:`RegistrationCrashed` (422); nothing is shared with the
  next registration, which starts a fresh child;
* **admission** — at most ``registrations_concurrent`` children run at once, and a network runs
  at most ``registrations_per_network`` of them; up to ``registrations_queued`` more wait for a
  slot (at most ``registration_timeout_s``). Anything beyond is refused at once with
  :class:`RegistrationBusy` (503 with ``Retry-After``), never queued without bound.

Calibration runs EZKL, which holds the GIL: the API's thread only waits on the child.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.blobs import BlobStore
from challenge.records import RegisteredModel, new_id
from refute.errors import InputError, ModelRejected, RefuteError, UnprovableModel
from refute.settings import Settings, get_settings


class RegistrationTimeout(ModelRejected):
    """The registration ran past its wall-clock bound; its process was killed."""

    code = "registration_timeout"
    http_status = 422


class RegistrationMemoryExceeded(ModelRejected):
    """The registration needed more memory than its bound."""

    code = "registration_memory"
    http_status = 422


class RegistrationCrashed(ModelRejected):
    """The registration's process died (killed by a signal or crashed) before answering."""

    code = "registration_crashed"
    http_status = 422


class RegistrationBusy(RefuteError):
    """Every registration slot (and the bounded queue) is taken: try again later."""

    code = "registration_busy"
    http_status = 503

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RegistrationLimits:
    """Bounds of one registration and of how many run at once (from the service settings)."""

    timeout_s: float = 600.0
    memory_mb: int = 4096
    concurrent: int = 2
    queued: int = 8
    per_network: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> RegistrationLimits:
        """The limits configured by ``REFUTE_REGISTRATION*`` settings."""
        return cls(timeout_s=settings.registration_timeout_s,
                   memory_mb=settings.registration_memory_mb,
                   concurrent=settings.registrations_concurrent,
                   queued=settings.registrations_queued,
                   per_network=settings.registrations_per_network)


def decode_model(onnx_base64: str) -> bytes:
    """The model bytes from base64; InputError if not base64."""
    try:
        return base64.b64decode(onnx_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("onnx_base64 is not valid base64") from exc


def build_registration(data: bytes, options: dict[str, Any]) -> dict[str, Any]:
    """Load, segment and calibrate; return ``{"manifest": …, "report": …}``: the calibrated
    manifest's JSON and the registration report (:mod:`prover.report`), or raise.

    The ``scale`` option is the starting scale: calibration raises it while the only refusals
    are τ-rule ones (:func:`prover.registration.calibrate_for_registration`).

    A ``sample_input`` (EZKL's ``input.json`` form) pins the symbolic dimensions and is the
    first calibration input; ``proving_budget_bytes`` (set by the service, not the caller)
    bounds the estimated proving memory of every segment."""
    from refute.executor import DeterministicExecutor
    from refute.provider import calibration_inputs, input_sizes, prepare_model, read_inputs_json

    executor = DeterministicExecutor()
    sample = options.get("sample_input")
    prepared = prepare_model(data, dims=options.get("dims") or None,
                             shapes=options.get("shapes") or None,
                             input_sizes=input_sizes(sample) if sample is not None else None,
                             cuts=options.get("cuts"), max_segments=options.get("max_segments"),
                             scale=int(options.get("scale", 7)), executor=executor)
    samples = calibration_inputs(
        prepared, read_inputs_json(sample, prepared.loaded) if sample is not None else None,
        int(options.get("calibration_samples", 4)), executor=executor)
    # Cheap checks first: EZKL is only imported once the model has loaded and segmented.
    from prover.registration import calibrate_for_registration

    budget = int(options.get("proving_budget_bytes") or get_settings().proving_budget_bytes)
    manifest, _calibration, report = calibrate_for_registration(
        prepared, samples, budget_bytes=budget, executor=executor)
    if report.refusals:
        # DESIGN, registration step 4: a segment that cannot be proven (or not within the
        # proving budget) is refused now, never discovered in a dispute.
        raise UnprovableModel(f"{report.refusals[0]}"[:300])
    return {"manifest": manifest.to_json(), "report": report.to_json()}


# --- the child process ---------------------------------------------------------------------

#: The child's own deadline runs this long after the parent's (which normally kills it first).
_CHILD_GRACE_S = 30.0
#: Exit status of a child ended by its own watchdog.
_EXIT_OVERTIME = 70

#: What a child sends back: ("ok", manifest) | ("refused", code, reason) | ("memory",) |
#: ("failed", reason).
_Outcome = tuple[Any, ...]


def _child_main(conn: Connection, workdir: str, memory_bytes: int, lifetime_s: float) -> None:
    """Entry point of a registration child: cap memory, build, send one outcome, exit.

    The parent kills the child at its deadline; ``lifetime_s`` is the child's own backstop (a
    watchdog thread ends it) should the parent die first.

    The model and the options are read from ``workdir`` (written by the parent), not passed as
    arguments: ``Process.start`` writes its arguments down a pipe and blocks until the child has
    read them, so a child killed early would hang the parent on a large model.
    """
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    watchdog = threading.Timer(lifetime_s, os._exit, args=(_EXIT_OVERTIME,))
    watchdog.daemon = True
    watchdog.start()
    outcome: _Outcome
    try:
        from refute import safejson

        folder = Path(workdir)
        options = safejson.loads((folder / "options.json").read_bytes(),
                                 what="the registration options")
        outcome = ("ok", build_registration((folder / "model.onnx").read_bytes(), options))
    except MemoryError:
        outcome = ("memory",)
    except RefuteError as exc:
        out_of_memory = memory_bytes > 0 and _allocation_failed(exc)
        outcome = ("memory",) if out_of_memory else ("refused", exc.code, exc.reason)
    except Exception as exc:  # any other failure is reported, never a traceback to the client
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        out_of_memory = memory_bytes > 0 and _allocation_failed(exc)
        outcome = ("memory",) if out_of_memory else ("failed", f"{type(exc).__name__}: {first}")
    conn.send(outcome)
    conn.close()


#: How native libraries report a failed allocation (ONNX Runtime's arena, C++ new, libc).
_ALLOCATION_FAILURES = ("failed to allocate", "bad_alloc", "cannot allocate memory",
                        "out of memory", "memoryerror", "memory allocation failed")


def _allocation_failed(exc: BaseException) -> bool:
    """Whether ``exc`` or what caused it says an allocation failed (under the memory cap)."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return False
        if isinstance(seen, MemoryError):
            return True
        lowered = str(seen).lower()
        if any(marker in lowered for marker in _ALLOCATION_FAILURES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_isolated(data: bytes | BinaryIO, options: dict[str, Any], limits: RegistrationLimits,
                 *, on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run :func:`build_registration` in a fresh spawned child bounded in time and memory.

    ``data`` is the model's bytes or a file holding them from where it stands (copied in
    pieces, never read whole here). Returns its ``{"manifest", "report"}`` or raises: the
    child's own refusal (same code and reason), :class:`RegistrationTimeout`,
    :class:`RegistrationMemoryExceeded` or :class:`RegistrationCrashed`. ``on_start(pid)`` is
    called once the child runs (tests use it to kill the child). The child never outlives this
    call.
    """
    with tempfile.TemporaryDirectory(prefix="refute-register-") as workdir:
        with (Path(workdir) / "model.onnx").open("wb") as model:
            if isinstance(data, bytes):
                model.write(data)
            else:
                shutil.copyfileobj(data, model, 2**20)
        (Path(workdir) / "options.json").write_text(json.dumps(options))
        return _run_child(workdir, limits, on_start)


def _run_child(workdir: str, limits: RegistrationLimits,
               on_start: Callable[[int], None] | None) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_main,
                            args=(sender, workdir, limits.memory_mb * 2**20,
                                  limits.timeout_s + _CHILD_GRACE_S),
                            name="refute-registration", daemon=True)
    outcome: _Outcome | None = None
    timed_out = False
    deadline = time.monotonic() + limits.timeout_s
    try:
        # The bound runs from before start(), so it covers the child's whole life (its imports
        # included); its arguments are small, so start() does not wait on the child.
        child.start()
        sender.close()
        if on_start is not None and child.pid is not None:
            on_start(child.pid)
        if receiver.poll(max(0.0, deadline - time.monotonic())):
            with contextlib.suppress(EOFError, OSError):
                outcome = receiver.recv()
        else:
            timed_out = True
        if not timed_out:
            # The child exits right after answering (or has died); one that lingers is stopped.
            child.join(5.0)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        receiver.close()
        exitcode = child.exitcode
        child.close()
    if timed_out:
        raise RegistrationTimeout(
            f"registration exceeded its time limit of {limits.timeout_s:g} s and was stopped")
    if outcome is None:
        raise _died(exitcode, limits)
    return _unpack(outcome, limits)


def _died(exitcode: int | None, limits: RegistrationLimits) -> RegistrationCrashed:
    if exitcode is not None and exitcode < 0:
        name = _signal_name(-exitcode)
        if -exitcode in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            return RegistrationCrashed(
                f"registration process crashed ({name}), possibly out of its memory limit of "
                f"{limits.memory_mb} MB; nothing was registered")
        return RegistrationCrashed(
            f"registration process was killed ({name}), e.g. by the out-of-memory killer; "
            "nothing was registered")
    return RegistrationCrashed(
        f"registration process exited (status {exitcode}) without an answer")


def _error_classes() -> dict[str, type[RefuteError]]:
    found: dict[str, type[RefuteError]] = {}
    pending: list[type[RefuteError]] = [RefuteError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == "refute.errors":
            found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def _unpack(outcome: _Outcome, limits: RegistrationLimits) -> dict[str, Any]:
    kind = outcome[0]
    if kind == "ok":
        built: dict[str, Any] = outcome[1]
        return built
    if kind == "memory":
        raise RegistrationMemoryExceeded(
            f"registration exceeded its memory limit of {limits.memory_mb} MB")
    if kind == "refused":
        code, reason = str(outcome[1]), str(outcome[2])
        error = _error_classes().get(code, RefuteError)(reason)
        error.code = code
        raise error
    raise RegistrationCrashed(f"registration failed: {outcome[1]}")


# --- admission -----------------------------------------------------------------------------


class _Gate:
    """At most ``concurrent`` holders (``per_network`` per network), ``queued`` waiting."""

    def __init__(self, limits: RegistrationLimits) -> None:
        self.limits = limits
        self._cond = threading.Condition()
        self._running: dict[str, int] = {}
        self._waiting = 0

    def _busy(self, reason: str) -> RegistrationBusy:
        return RegistrationBusy(reason, retry_after_s=max(1, round(self.limits.timeout_s / 4)))

    @contextlib.contextmanager
    def slot(self, network_id: str) -> Iterator[None]:
        """Hold a registration slot for ``network_id`` while the block runs."""
        limits = self.limits
        with self._cond:
            if self._running.get(network_id, 0) >= limits.per_network:
                raise self._busy(f"this network already has {limits.per_network} registration(s) "
                                 "running; retry when it is done")
            if sum(self._running.values()) >= limits.concurrent:
                if self._waiting >= limits.queued:
                    raise self._busy(f"{limits.concurrent} registrations are running and "
                                     f"{limits.queued} waiting; retry later")
                self._waiting += 1
                try:
                    free = self._cond.wait_for(
                        lambda: sum(self._running.values()) < limits.concurrent
                        and self._running.get(network_id, 0) < limits.per_network,
                        timeout=limits.timeout_s)
                finally:
                    self._waiting -= 1
                if not free:
                    raise self._busy("no registration slot became free in time; retry later")
            self._running[network_id] = self._running.get(network_id, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._running[network_id] -= 1
                if not self._running[network_id]:
                    del self._running[network_id]
                self._cond.notify_all()


_GATES: dict[RegistrationLimits, _Gate] = {}
_GATES_LOCK = threading.Lock()


def _gate(limits: RegistrationLimits) -> _Gate:
    with _GATES_LOCK:
        return _GATES.setdefault(limits, _Gate(limits))


def register_in_subprocess(data: bytes | BinaryIO, options: dict[str, Any], *,
                           limits: RegistrationLimits | None = None,
                           network_id: str = "",
                           on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Admit the registration (or raise :class:`RegistrationBusy`), then :func:`run_isolated`.

    Blocking: call it from a worker thread (the API uses ``asyncio.to_thread``).
    """
    limits = limits or RegistrationLimits()
    with _gate(limits).slot(network_id):
        return run_isolated(data, options, limits, on_start=on_start)


def store_model(session: Session, blobs: BlobStore, *, network_id: str,
                data: bytes | BinaryIO,
                manifest: dict[str, Any], manifest_sha256: str, now: datetime) -> RegisteredModel:
    """Record a registered model (idempotent per network and manifest); ``data`` is its bytes
    or a file holding them from where it stands."""
    existing = session.scalars(select(RegisteredModel).where(
        RegisteredModel.network_id == network_id,
        RegisteredModel.manifest_sha256 == manifest_sha256)).first()
    if existing is not None:
        return existing
    row = RegisteredModel(id=new_id("mdl"), network_id=network_id,
                          model_sha256=str(manifest["model"]["sha256"]),
                          manifest_sha256=manifest_sha256, manifest=manifest,
                          model_blob=blobs.put(data) if isinstance(data, bytes)
                          else blobs.put_stream(data), created_at=now)
    session.add(row)
    return row
