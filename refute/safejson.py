"""JSON from untrusted bytes, with bounded nesting.

CPython's JSON decoder recurses once per nested array or object, on the C stack, and only the
interpreter's recursion limit stops it; importing py_ecc (through eth-account, or our BLS
transcript) raises that limit process-wide to 100,000, so a 200 KB body of nested brackets
overflowed the C stack and killed the process. The defence is a bound on the input, not on the
stack: :func:`loads` (and :func:`check_depth`, for decoders refute does not call itself, such
as FastAPI's) measures the nesting depth *before* anything decodes it (:func:`json_depth`:
linear time, bounded memory, brackets inside strings not counted) and refuses anything deeper
than :data:`MAX_DEPTH` with a :class:`~refute.errors.InputError`. Every JSON document refute
reads from outside goes through it.
"""

from __future__ import annotations

import json
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
