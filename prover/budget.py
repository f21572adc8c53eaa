"""What proving a circuit will cost, estimated from its EZKL settings, and the proving budget.

EZKL's halo2 prover works on polynomials of ``2^logrows`` rows: the proving key holds every
fixed and permutation column (values, coefficients and an extended coset), so its size, the
prover's memory and its time all grow with ``2^logrows`` times the number of columns. Settings
name ``logrows`` and ``num_inner_cols`` but not the final column count (``columns`` stays None),
so the model below is fitted on measured adjudication circuits (EZKL 23.0.5, 2 cores shared
with other jobs, development SRS; ``bench/bench_circuit_tuning.py``) plus the EZKL-NOTES.md
table for the times::

    pk_bytes      = 2^logrows × (PK_PER_ROW + (PK_PER_ROW_COL + E × PK_PER_ROW_EINSUM_COL)
                                 × num_inner_cols)      E = 1 if the circuit has einsum columns
    peak_bytes    = PEAK_FIXED + PEAK_PER_PK × pk_bytes        (resident set while proving)
    setup_seconds = SETUP_C × pk_bytes^SETUP_K
    prove_seconds = PROVE_C × pk_bytes^PROVE_K

Measured points (:data:`POINTS`; pk and peak in MiB):

=================================  =======  ====  ======  ==========  =======  =======
circuit (segment 1)                logrows  cols  pk      prove peak  setup s  prove s
=================================  =======  ====  ======  ==========  =======  =======
2l_relu_sigmoid_conv, EZKL default 15       2     374     857         12.3     16.1
2l_relu_sigmoid_conv, tuned        14       2     187     444         5.0      7.4
3l_relu_conv_fc, EZKL default      16       2     748     1,722       37.0     20.8
3l_relu_conv_fc, tuned             16       1     608     1,288       14.4     36.4
LeNet-5 conv1, EZKL default        18       2     2,993   6,655       189.7    186.6
LeNet-5 conv1, tuned               17       4     2,057   5,080       116.7    176.0
dense 256→256 (mlp_8x256), default 16       2     748     1,729       36.1     59.7
dense 256→256 (mlp_8x256), tuned   15       4     514     1,304       25.2     47.6
EZKL-NOTES dense 64→64             15       2     300     —           15       15
EZKL-NOTES dense 256→256           16       2     599     —           31.5     37
EZKL-NOTES conv 3→8 16×16          17       2     1,202   —           62.5     68
EZKL-NOTES LeNet-5 conv1           19       2     6,008   > 9 GB      540      —
GPT-2 identity tile (residual)     18       1     2,432   4,915       50.3     54.9
GPT-2 Q·Kᵀ tile (einsum)           18       1     3,473   6,554       73.8     82.5
GPT-2 MLP-up+GELU tile (einsum)    18       2     5,074   11,059      174.7    121.0
=================================  =======  ====  ======  ==========  =======  =======

The GPT-2 tiles (``bench/bench_tiled_disputes.py --model gpt2``; setup and proof each in a child
process, peak = its ``ru_maxrss``) fixed the einsum term: EZKL 23 lays a product of two
activations (Q·Kᵀ) or a multi-row matrix product out in einsum columns, which
``total_einsum_col_size`` > 0 announces and which cost about 4,164 bytes per row and inner
column of proving key (the identity tile, with none, is the no-einsum formula to 0.1 %); a
product with a constant weight row by row (a conv, a one-row MatMul) has none. The proving
peak is 1.8–2.0 × the proving key for those three, under the 2.283 fitted on small circuits
(conservative).

The proving-key model reproduces every measured adjudication circuit within 0.1 % (the
EZKL-NOTES circuits, without the max |f(x) − y| tail, have about 20 % fewer columns); peak
memory within 11 %; times within a factor of 2 (the machine was shared: ratios measured in one
run are more telling than any single time). The estimate is for planning (does a segment fit the
prover's machine, roughly how long will a dispute's proof take), not a guarantee.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from prover.errors import ProverError

#: Measured points the coefficients below were fitted on:
#: (label, logrows, num_inner_cols, pk bytes, prove peak bytes, setup s, prove s).
POINTS: tuple[tuple[str, int, int, int, int, float, float], ...] = (
    ("2l_relu_sigmoid_conv default", 15, 2, 392_260_659, 898_478_080, 12.3, 16.1),
    ("2l_relu_sigmoid_conv tuned", 14, 2, 196_131_891, 465_924_096, 5.0, 7.4),
    ("3l_relu_conv_fc default", 16, 2, 784_518_195, 1_805_668_352, 37.0, 20.8),
    ("3l_relu_conv_fc tuned", 16, 1, 637_667_787, 1_350_307_840, 14.4, 36.4),
    ("lenet5_conv1 default", 18, 2, 3_138_063_411, 6_978_482_176, 189.7, 186.6),
    ("lenet5_conv1 tuned", 17, 4, 2_156_433_667, 5_326_299_136, 116.7, 176.0),
    ("mlp_8x256 default", 16, 2, 784_518_195, 1_812_475_904, 36.1, 59.7),
    ("mlp_8x256 tuned", 15, 4, 539_111_683, 1_366_859_776, 25.2, 47.6),
)

#: Proving-key bytes per row, and per row and inner column (least squares on POINTS).
PK_PER_ROW = 7489.3
PK_PER_ROW_COL = 2240.7
#: More proving-key bytes per row and inner column when the circuit has einsum columns (fitted
#: on the GPT-2 Q·Kᵀ and MLP tiles: 4,165 and 4,162).
PK_PER_ROW_EINSUM_COL = 4164.0
#: Resident memory while proving: a fixed part plus a multiple of the proving key.
PEAK_FIXED = 38_700_000
PEAK_PER_PK = 2.283
#: Seconds as a power of the proving-key size (log-log least squares, POINTS and EZKL-NOTES).
SETUP_C, SETUP_K = 1.266e-10, 1.285
PROVE_C, PROVE_K = 1.578e-09, 1.173


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
        einsum = int((settings.get("einsum_params") or {}).get("total_einsum_col_size") or 0)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProverError(f"EZKL settings without logrows: {exc}") from exc
    per_col = PK_PER_ROW_COL + (PK_PER_ROW_EINSUM_COL if einsum > 0 else 0.0)
    pk = 2**logrows * (PK_PER_ROW + per_col * inner)
    return ProvingEstimate(
        logrows=logrows,
        rows=rows,
        columns=None,
        pk_bytes=int(pk),
        peak_bytes=int(PEAK_FIXED + PEAK_PER_PK * pk),
        setup_seconds=round(SETUP_C * pk**SETUP_K, 1),
        prove_seconds=round(PROVE_C * pk**PROVE_K, 1),
    )
