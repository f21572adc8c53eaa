"""How the demo shows and times what it waits for: a live status line over a call or a
poll, a call on a background thread, and the wall-clock times of the disputes it watches."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from rich.console import Console

from refute.errors import RefuteError

_T = TypeVar("_T")


def status_call(console: Console, what: str, call: Callable[[], _T]) -> _T:
    """``call()`` under a live status line saying ``what`` is being done, then its time."""
    start = time.monotonic()
    with console.status(f"{what}…"):
        value = call()
    console.print(f"{what}: {time.monotonic() - start:.1f} s", highlight=False)
    return value


def format_duration(seconds: float) -> str:
    """``1 h 02 min 03 s``, ``4 min 05 s`` or ``6 s``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


#: A non-terminal console (a log file, CI) gets one line this often while the demo waits.
_HEARTBEAT_S = 60.0


def poll_with_status(console: Console, what: str, poll: Callable[[], tuple[bool, str]], *,
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
                raise RefuteError(f"{what} did not finish within {format_duration(timeout)}")
            line = f"{what}: {format_duration(elapsed)}" + (f" — {detail}" if detail else "")
            if status is not None:
                status.update(line)
            elif time.monotonic() >= next_line:
                console.print(f"  {line}", highlight=False)
                next_line += _HEARTBEAT_S
            time.sleep(every)
            done, detail = poll()
    return time.monotonic() - start


class Background(Generic[_T]):
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


class DisputeClock:
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

    def __enter__(self) -> DisputeClock:
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
