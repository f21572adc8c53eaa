"""JSON nesting depth of large bodies in linear time and bounded memory.

:func:`refute.safejson.nesting_depth` blanks strings with a regular expression first: exact,
but about 20 s on a 60 MiB body that is one long string (a base64 model), which the API would
spend before every registration. :func:`json_depth` gives the same bound in well under a second:

* a text with at most ``limit`` opening brackets cannot nest deeper than that (a ``bytes.count``
  pass, which settles every body that is mostly one long string);
* otherwise the text is scanned in 1 MiB windows with numpy, carrying across windows whether the
  scan is inside a string, the length of the run of backslashes, and the depth.

Like ``nesting_depth`` it never under-counts what a JSON parser would recurse into: inside the
valid prefix a parser reads, strings and escapes are tracked exactly; past the first invalid byte
the parser stops, so what is counted there can only raise the result.
"""

from __future__ import annotations

import numpy as np

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
