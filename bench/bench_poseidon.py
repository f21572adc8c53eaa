"""Benchmark refute.poseidon against EZKL's own Poseidon binding.

Usage: ``python bench/bench_poseidon.py [--elements N] [--python-elements M]``

For N quantized elements (scale 7, i.e. multiples of 1/128) it times, in one process:

* EZKL, the obvious path: ``[ezkl.float_to_felt(v, 7) for v in x]`` then ``ezkl.poseidon_hash``
  (the baseline every speed-up is relative to), and the binding alone on ready-made felts;
* the pure-Python reference backend on M elements (default ``min(N, 10000)``), extrapolated
  linearly to N (the hash is one sequential sponge, so its cost is linear in length);
* the native backend on one thread (best of three);
* ``poseidon_hash_many`` on 8 tensors of N/8 elements with ``workers=2`` (and ``workers=1``).

Every figure is checked to give the same hash as EZKL before it is printed.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import ezkl
import numpy as np
from rich.console import Console
from rich.table import Table

from refute.poseidon import poseidon_hash, poseidon_hash_many

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    name: str
    seconds: float  # for the full N elements (extrapolated when ``note`` says so)
    note: str = ""


def timed(fn: Callable[[], T], repeat: int = 1) -> tuple[T, float]:
    """Result of ``fn`` and its best wall-clock time over ``repeat`` runs."""
    best = float("inf")
    result: T | None = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return result, best


def check(ok: bool, what: str) -> None:
    """Stop with an error when a result disagrees (not an assert: survives ``python -O``)."""
    if not ok:
        raise SystemExit(f"MISMATCH: {what}")


def felt_to_int(felt: str) -> int:
    """EZKL's 32-byte little-endian hex felt as an int."""
    return int.from_bytes(bytes.fromhex(felt), "little")


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=100_000, help="N (default 100000)")
    parser.add_argument(
        "--python-elements", type=int, default=None, help="M for the python backend"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n: int = args.elements
    if n < 8:
        parser.error("--elements must be at least 8")
    m: int = min(n, args.python_elements or 10_000)

    console = Console(width=130)
    rng = np.random.default_rng(args.seed)
    q = rng.integers(-(2**15), 2**15, size=n, dtype=np.int64)  # quantized values
    x = q / 128.0  # the floats they stand for (exact)

    kernel = importlib.import_module("refute._poseidon").KERNEL
    console.print(
        f"[bold]Poseidon over {n:,} elements[/bold] (scale 7, values in ±256); "
        f"native kernel: {kernel}"
    )

    # EZKL, obvious path and binding alone.
    start = time.perf_counter()
    felts = [ezkl.float_to_felt(v, 7) for v in x]
    convert_s = time.perf_counter() - start
    (h_ezkl,), binding_s = timed(lambda: ezkl.poseidon_hash(felts))
    expected = felt_to_int(h_ezkl)
    rows = [
        Row("ezkl: float_to_felt + poseidon_hash", convert_s + binding_s, "baseline"),
        Row("ezkl: float_to_felt only", convert_s, "part of the baseline"),
        Row("ezkl: poseidon_hash binding only", binding_s, "part of the baseline"),
    ]

    # Pure-Python reference on M elements, checked against EZKL on the same M elements.
    h_py, py_s = timed(lambda: poseidon_hash(q[:m], backend="python"))
    check(h_py == felt_to_int(ezkl.poseidon_hash(felts[:m])[0]), "python backend != ezkl")
    note = f"measured on {m:,}, x{n / m:g}" if m < n else ""
    rows.append(Row("refute python backend", py_s * n / m, note))

    # Native, one thread.
    h_native, native_s = timed(lambda: poseidon_hash(q), repeat=3)
    check(h_native == expected, "native backend != ezkl")
    rows.append(Row("refute native, 1 thread", native_s, "best of 3"))

    # Many tensors.
    parts = np.array_split(q, 8)
    singles = [poseidon_hash(part) for part in parts]
    first = felt_to_int(ezkl.poseidon_hash(felts[: len(parts[0])])[0])
    check(singles[0] == first, "native backend != ezkl on the first part")
    for workers in (1, 2):

        def many(w: int = workers) -> list[int]:
            return poseidon_hash_many(parts, workers=w)

        hashes, many_s = timed(many, repeat=3)
        check(hashes == singles, "poseidon_hash_many != single hashes")
        name = f"refute native, hash_many 8 x {n // 8:,} w={workers}"
        rows.append(Row(name, many_s, "best of 3"))

    baseline = rows[0].seconds
    binding = rows[2].seconds
    table = Table(title=f"{n:,} elements; all hashes equal EZKL's")
    for col in ("path", "seconds", "elements/s", "speed-up vs baseline", "vs binding", "note"):
        table.add_column(col, justify="left" if col in ("path", "note") else "right")
    for row in rows:
        table.add_row(
            row.name,
            f"{row.seconds:.4f}",
            f"{n / row.seconds:,.0f}",
            f"{baseline / row.seconds:.1f}x",
            f"{binding / row.seconds:.1f}x",
            row.note,
        )
    console.print(table)


if __name__ == "__main__":
    main()
