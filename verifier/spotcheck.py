"""Spot-checks (DESIGN.md "Spot-checks"): which segments to re-execute, and checking one.

Sampling is decided by a keyed hash of the result id (HMAC-SHA256 with the service's secret), so
a provider cannot predict at submission whether, or where, its result will be checked. With the
network's probability p the result is checked at all; then k distinct segments are drawn.

A check re-executes segment i on the provider's own committed state i-1 and compares with its
committed state i in quantized units (the commitment's own representation). A difference beyond
2·τ_i (a margin, so the service never files a challenge it could lose on a borderline case) is a
fault, and the service challenges the result naming step i.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from refute.errors import ServerFault
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.segmentation import Segmentation, step_difference_units
from refute.trace import Trace


class SpotCheckError(ServerFault):
    """A spot-check cannot run (uncalibrated manifest, step out of range)."""

    code = "spotcheck_error"


class Finding(enum.StrEnum):
    """Outcome of checking one segment."""

    PASS = "PASS"
    FAULT = "FAULT"


def sample_segments(
    key: bytes, result_id: str, *, num_segments: int, probability: float, count: int
) -> list[int]:
    """The segments (1-based, sorted) to check for ``result_id``; empty if not sampled."""
    if not 0.0 <= probability <= 1.0 or count < 0 or num_segments < 1:
        raise SpotCheckError("sampling needs 0 <= p <= 1, k >= 0 and at least one segment")
    seed = hmac.new(key, result_id.encode(), hashlib.sha256).digest()
    rng = random.Random(seed)
    if rng.random() >= probability:
        return []
    return sorted(rng.sample(range(1, num_segments + 1), min(count, num_segments)))


@dataclass(frozen=True)
class SegmentCheck:
    """What re-executing one segment found."""

    segment: int
    maxdiff_units: int
    tolerance: int
    finding: Finding


def check_segment(
    executor: DeterministicExecutor, segmentation: Segmentation, trace: Trace, segment: int
) -> SegmentCheck:
    """Re-execute ``segment`` on the committed state i-1 and compare with committed state i."""
    if not 1 <= segment <= segmentation.num_segments:
        raise SpotCheckError(f"segment {segment} is outside 1..{segmentation.num_segments}")
    return check_states(executor, segmentation, trace.manifest, segment,
                        before=trace.states[segment - 1], after=trace.states[segment])


def check_states(
    executor: DeterministicExecutor, segmentation: Segmentation, manifest: Manifest,
    segment: int, *, before: Sequence[np.ndarray], after: Sequence[np.ndarray],
) -> SegmentCheck:
    """Re-execute ``segment`` on ``before`` (committed state i-1, from a trace or a disclosure)
    and compare with ``after`` (committed state i) in quantized units."""
    if manifest.tolerances is None:
        raise SpotCheckError("the manifest is not calibrated: no tolerances to check against")
    if not 1 <= segment <= segmentation.num_segments:
        raise SpotCheckError(f"segment {segment} is outside 1..{segmentation.num_segments}")
    worst = step_difference_units(executor, segmentation.segments[segment - 1], before, after,
                                  manifest.scale)
    tolerance = manifest.tolerances[segment - 1]
    finding = Finding.FAULT if worst > 2 * tolerance else Finding.PASS
    return SegmentCheck(segment, worst, tolerance, finding)
