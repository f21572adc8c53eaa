"""JSON from untrusted bytes, with bounded nesting, and the interpreter's recursion limit kept.

CPython's JSON decoder recurses once per nested array or object, on the C stack. The recursion
limit is what stops it, and importing py_ecc (through eth-account, or our BLS transcript) raises
that limit process-wide to 100,000: a 200 KB body of nested brackets then overflows the C stack
and the process dies with a segmentation fault. Two defences, both here:

* :func:`loads` measures the nesting depth with C-speed regular expressions *before* decoding
  and refuses anything deeper than :data:`MAX_DEPTH` with a :class:`~refute.errors.InputError`
  (strings are blanked first, so brackets inside them do not count);
* :func:`keep_recursion_limit` undoes any change a third-party import makes to the limit; every
  import of py_ecc and eth-account in refute goes through it (see :func:`import_py_ecc_safely`).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from refute.errors import InputError

#: Deepest nesting of arrays and objects accepted from outside (refute's own documents use < 10).
MAX_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")
#: The recursion limit the interpreter started with (before any import could raise it).
_STARTUP_LIMIT = min(sys.getrecursionlimit(), 10_000)


def nesting_depth(data: bytes | str) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (brackets inside strings ignored).

    Malformed text may be over-counted, never under-counted, so a check on it is safe.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b'""', raw))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def check_depth(data: bytes | str, *, what: str = "the JSON document",
                max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`InputError` if ``data`` nests deeper than ``max_depth``."""
    depth = nesting_depth(data)
    if depth > max_depth:
        raise InputError(f"{what} nests {depth} levels deep; at most {max_depth} are accepted")


def loads(data: bytes | str, *, what: str = "the JSON document",
          max_depth: int = MAX_DEPTH) -> Any:
    """Decode untrusted JSON: depth checked first, then ``json.loads``; any failure is an
    :class:`InputError` naming ``what`` (never a crash, never a bare ``ValueError``)."""
    check_depth(data, what=what, max_depth=max_depth)
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc


@contextlib.contextmanager
def keep_recursion_limit() -> Iterator[None]:
    """Restore the interpreter's recursion limit after the block (a third-party import that
    raises it process-wide, as py_ecc does, must not lower our guard against deep recursion)."""
    before = sys.getrecursionlimit()
    try:
        yield
    finally:
        sys.setrecursionlimit(min(before, max(_STARTUP_LIMIT, 1000)))


def import_py_ecc_safely() -> None:
    """Import py_ecc's package (31 ms) with the recursion limit kept: its ``__init__`` raises the
    limit to 100,000 on first import, and only then. Called from ``refute/__init__.py``, so that
    eth-account, eth-keys and our BLS transcript find it loaded and the limit stays unchanged.
    """
    with keep_recursion_limit():
        import py_ecc  # noqa: F401
