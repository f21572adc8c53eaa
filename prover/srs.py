"""KZG parameters (the SRS) for EZKL circuits.

Production deployments configure a file from a real ceremony (``REFUTE_SRS_PATH``), sized for the
largest circuit; EZKL cuts a larger SRS down to the circuit's size on its own. For development and
tests, :class:`SrsStore` generates one file per logrows with ``ezkl.gen_srs`` into a cache
folder and marks it **unsafe**: whoever generated it knows the toxic waste and can forge proofs.
Every artifact built with such a file carries ``"unsafe_srs": true``.

Nothing here touches the network: EZKL's downloading SRS fetcher is never called.
"""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ezkl

from prover.errors import SrsError

#: Largest logrows refute will generate a development SRS for (2^20 rows ≈ 128 MB file).
MAX_DEV_LOGROWS = 20
UNSAFE_MARKER = ".UNSAFE-DEVELOPMENT-SRS"


@dataclass(frozen=True)
class SrsFile:
    """One SRS file usable for circuits of ``logrows`` rows (log2)."""

    path: Path
    logrows: int
    unsafe: bool


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class SrsStore:
    """Where SRS files come from: a configured file, or a development cache."""

    def __init__(self, *, srs_path: Path | None = None, dev_cache: Path | None = None) -> None:
        if srs_path is None and dev_cache is None:
            raise SrsError("configure an SRS file (REFUTE_SRS_PATH) or a development SRS cache")
        self.srs_path = srs_path
        self.dev_cache = dev_cache

    def for_logrows(self, logrows: int) -> SrsFile:
        """An SRS file for ``logrows``; generated (unsafe) in the dev cache if needed."""
        if self.srs_path is not None:
            return self._configured(logrows)
        assert self.dev_cache is not None
        if not 1 <= logrows <= MAX_DEV_LOGROWS:
            raise SrsError(
                f"no development SRS above logrows {MAX_DEV_LOGROWS} (asked {logrows})"
            )
        path = self.dev_cache / f"kzg{logrows}.srs"
        marker = path.with_name(path.name + UNSAFE_MARKER)
        if not marker.exists():
            with file_lock(path.with_name(path.name + ".lock")):
                if not marker.exists():
                    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                    try:
                        ezkl.gen_srs(str(tmp), logrows)
                        tmp.replace(path)
                    except Exception as exc:  # EZKL raises bare RuntimeErrors
                        tmp.unlink(missing_ok=True)
                        raise SrsError(f"cannot generate a development SRS: {exc}") from exc
                    marker.write_text("generated locally with ezkl.gen_srs: NOT for production\n")
        return SrsFile(path=path, logrows=logrows, unsafe=True)

    def _configured(self, logrows: int) -> SrsFile:
        assert self.srs_path is not None
        if not self.srs_path.is_file():
            raise SrsError(f"the configured SRS {self.srs_path} is not a file")
        try:
            size = self.srs_path.stat().st_size
        except OSError as exc:
            raise SrsError(f"cannot read the SRS file {self.srs_path}: {exc.strerror}") from exc
        # A KZG SRS for 2^k rows holds 2^k G1 points (64 bytes each, uncompressed) and more.
        if size < (2**logrows) * 64:
            raise SrsError(
                f"SRS file {self.srs_path} is too small for logrows {logrows} ({size} bytes)"
            )
        return SrsFile(path=self.srs_path, logrows=logrows, unsafe=False)
