"""The fault drill of issue 9 at CI size (``tests/drill.py``; full size: ``bench/
bench_fault_drill.py``): results submitted through the real stack, some lying, while the
spot-check worker is SIGKILLed mid-check, Redis is killed and restarted and the API is killed
and restarted. Nothing is lost or doubled, every sampled check is recorded exactly once, no
result finalizes before its checks, no liar finalizes, and every honest result does; the same
with providers that never upload a trace (they disclose the sampled states, or lie and are
convicted, or stay silent and time out), and one honest provider whose disclosure meets the API
outage (killed right after its 202, down past its disclosure window) still finalizes.

Both variants share one REFUTE_HOME, so the prove worker sets each step circuit up once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.drill import DEFAULT_KILLS, run_drill

pytestmark = [pytest.mark.slow, pytest.mark.ezkl]

RESULTS = 30
LIARS = 0.07  # 2 of 30: without traces, one discloses its lie and one stays silent
DISCLOSURE_WINDOW_S = 6
#: The service's time for a dispute's proof (queue wait included): room for two cold proofs on
#: a loaded machine. Redis is killed while a liar's spot-check runs, so the watcher's dispute and
#: proof are queued while it is down: the proof must still be made (and the liar convicted).
PROOF_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REFUTE_HOME (circuits, SRS) shared by both drills."""
    return tmp_path_factory.mktemp("drill-home")


@pytest.mark.parametrize("upload_traces", [True, False], ids=["traces", "no-traces"])
def test_fault_drill(tmp_path: Path, home: Path, upload_traces: bool) -> None:
    # Without traces, the API stays down past the disclosure window of the honest provider
    # whose disclosure it interrupts.
    report = run_drill(tmp_path / "drill", results=RESULTS, liars=LIARS,
                       upload_traces=upload_traces, home=home, submit_span_s=20.0,
                       challenge_window_s=15, disclosure_window_s=DISCLOSURE_WINDOW_S,
                       dispute_clock_s=12.0, spotcheck_delay_s=0.2, lie_states=(2,),
                       api_down_s=1.0 if upload_traces else DISCLOSURE_WINDOW_S + 1.0,
                       proof_timeout_s=PROOF_TIMEOUT_S)
    # Every kill landed (while results were being submitted, unless a wait for the right
    # moment outlasted them).
    assert len(report.kills) == len(DEFAULT_KILLS), report.kills
    assert report.violations == [], report.render()
    assert report.accepted == RESULTS
    assert report.non_terminal == 0
    assert report.liars >= 2
    assert report.liars_provider_fault == report.liars
    assert report.honest_finalized == report.finalized == RESULTS - report.liars
    # Every sampled check of a finalized result is recorded once (liars' too, when the service
    # held their states: a trace, or a disclosure).
    assert report.recorded_once >= report.finalized * (report.sampled_checks // RESULTS)
    if upload_traces:
        assert report.convicted == report.liars
    else:
        assert report.timeouts >= 1  # the silent liars (those that disclosed may be proven)
        assert report.disclosures >= RESULTS - report.liars
