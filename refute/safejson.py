"""JSON from untrusted bytes, with bounded nesting, and the interpreter's recursion limit kept.

CPython's JSON decoder recurses once per nested array or object, on the C stack. The recursion
limit is what stops it, and importing py_ecc (through eth-account, or our BLS transcript) raises
that limit process-wide to 100,000: a 200 KB body of nested brackets then overflows the C stack
and the process dies with a segmentation fault. Two defences, both here:

* :func:`loads` measures the nesting depth *before* decoding (:func:`json_depth`: linear time,
  bounded memory, brackets inside strings not counted) and refuses anything deeper than
  :data:`MAX_DEPTH` with a :class:`~refute.errors.InputError`;
* :func:`keep_recursion_limit` undoes any change a third-party import makes to the limit; every
  import of py_ecc and eth-account in refute goes through it (see :func:`import_py_ecc_safely`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from refute.errors import InputError

#: Deepest nesting of arrays and objects accepted from outside (refute's own documents use < 10).
MAX_DEPTH = 64

_WINDOW = 2**20
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENERS = (ord("["), ord("{"))
_CLOSERS = (ord("]"), ord("}"))


def json_depth(data: bytes, *, limit: int, window: int = _WINDOW) -> int:
    """The deepest nesting of arrays and objects in ``data`` (brackets in strings ignored), or
    a number of opening brackets no larger than ``limit`` that bounds it (the fast path).
    ``window`` is the scan's window in bytes (any size gives the same answer)."""
    openers = data.count(b"[") + data.count(b"{")
    if openers <= limit:
        return openers
    in_string = False
    run = 0  # backslashes ending the previous window
    depth = 0
    deepest = 0
    view = memoryview(data)
    for start in range(0, len(data), max(1, window)):
        a = np.frombuffer(view[start:start + max(1, window)], dtype=np.uint8)
        quotes = a == _QUOTE
        slash = a == _BACKSLASH
        if run or slash.any():  # a quote after an odd run of backslashes is escaped
            index = np.arange(a.size, dtype=np.int32)
            last_other = np.maximum.accumulate(np.where(slash, -1, index))
            run_end = np.where(last_other >= 0, index - last_other, index + 1 + run)
            before = np.empty(a.size, dtype=np.int32)
            before[0] = run
            before[1:] = run_end[:-1]
            quotes &= before % 2 == 0
            run = int(run_end[-1]) if slash[-1] else 0
        seen = np.cumsum(quotes, dtype=np.int32)
        outside = (seen - quotes + int(in_string)) % 2 == 0
        steps = (((a == _OPENERS[0]) | (a == _OPENERS[1])) & outside).astype(np.int8)
        steps -= ((a == _CLOSERS[0]) | (a == _CLOSERS[1])) & outside
        levels = np.cumsum(steps, dtype=np.int64)
        deepest = max(deepest, depth + int(levels.max()))
        depth += int(levels[-1])
        in_string = bool((int(in_string) + int(seen[-1])) % 2)
    return deepest


#: The recursion limit the interpreter started with (before any import could raise it).
_STARTUP_LIMIT = min(sys.getrecursionlimit(), 10_000)


def nesting_depth(data: bytes | str) -> int:
    """The exact deepest nesting of ``[``/``{`` in a JSON text (brackets in strings ignored)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    return json_depth(raw, limit=0)


def check_depth(data: bytes | str, *, what: str = "the JSON document",
                max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`InputError` if ``data`` nests deeper than ``max_depth``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    depth = json_depth(raw, limit=max_depth)
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
