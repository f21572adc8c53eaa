"""Content-addressed blob storage for models, states, traces, circuits and proofs.

A blob's key is the sha256 (hex) of its bytes, so storing is idempotent and reading verifies
integrity. :class:`LocalBlobStore` keeps blobs in a folder (``ab/cdef…``) with atomic writes;
:class:`MemoryBlobStore` is the in-memory implementation for unit tests of code around storage.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

from refute.errors import RefuteError

_KEY = re.compile(r"^[0-9a-f]{64}$")


class BlobError(RefuteError):
    """A blob is missing, corrupt, or its key is malformed."""

    code = "blob_error"
    #: Keys come from the service's own records: a missing or corrupt blob is its fault.
    http_status = 500


def blob_key(data: bytes) -> str:
    """The key of ``data``: its sha256 in hex."""
    return hashlib.sha256(data).hexdigest()


#: Streams are hashed and copied in pieces of this many bytes.
_PIECE = 2**20


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise BlobError(f"malformed blob key {key[:80]!r}")
    return key


class BlobStore(Protocol):
    """What the service needs from blob storage."""

    def put(self, data: bytes) -> str:
        """Store ``data``; return its key (idempotent)."""
        ...

    def put_stream(self, source: BinaryIO) -> str:
        """Store what ``source`` holds from where it stands to its end, read in pieces; return
        its key."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; raises BlobError if absent or corrupt."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        ...


class LocalBlobStore:
    """Blobs in a local folder, written atomically, verified on read."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / key[2:]

    def put(self, data: bytes) -> str:
        """Store ``data`` (a no-op if present); return its key."""
        key = blob_key(data)
        return key if self._path(key).exists() else self.put_stream(io.BytesIO(data))

    def put_stream(self, source: BinaryIO) -> str:
        """Store what ``source`` holds from where it stands (a no-op if present); return its
        key. It is hashed as it is written, a piece at a time, then moved into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        # Unique per writer even across containers sharing the volume (PIDs repeat there).
        tmp = self.root / f".incoming.{uuid.uuid4().hex}.tmp"
        digest = hashlib.sha256()
        try:
            with tmp.open("wb") as handle:
                while piece := source.read(_PIECE):
                    digest.update(piece)
                    handle.write(piece)
                handle.flush()
                os.fsync(handle.fileno())
            key = digest.hexdigest()
            path = self._path(key)
            if path.exists():
                tmp.unlink()
                return key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BlobError(f"cannot store blob: {exc.strerror}") from exc
        return key

    def get(self, key: str) -> bytes:
        """Read and verify the blob ``key``."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BlobError(f"blob {key} is not stored") from exc
        except OSError as exc:
            raise BlobError(f"cannot read blob {key}: {exc.strerror}") from exc
        if blob_key(data) != key:
            raise BlobError(f"blob {key} is corrupt (its bytes hash differently)")
        return data

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return self._path(key).exists()


class MemoryBlobStore:
    """In-memory blobs (tests)."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        """Store ``data``; return its key."""
        key = blob_key(data)
        self._blobs[key] = bytes(data)
        return key

    def put_stream(self, source: BinaryIO) -> str:
        """Store what ``source`` holds from where it stands; return its key."""
        return self.put(source.read())

    def get(self, key: str) -> bytes:
        """The bytes under ``key``."""
        try:
            return self._blobs[_check_key(key)]
        except KeyError as exc:
            raise BlobError(f"blob {key} is not stored") from exc

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return _check_key(key) in self._blobs
