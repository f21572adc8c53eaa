"""The fault drill of issue 9 at full size: 200 results per variant (some lying) through the real
stack while the spot-check worker is SIGKILLed mid-check, Redis is killed and restarted and the
API is killed and restarted; first with providers that upload their traces, then with providers
that never do (they disclose the sampled states on request, or lie and disclose, or stay
silent). Prints each drill's report: results, liars, sampled checks, recorded once, finalized,
convicted, timeouts, violations and wall time per phase.

    .venv/bin/python -m bench.bench_fault_drill [--results 200] [--liars 0.1] [--only traces]

Exits 1 when any drill found a violation. The stacks run under a temporary folder (kept with
``--keep``, printed, for the process logs).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from tests.drill import DrillReport, run_drill

#: Without traces, the API stays down past the disclosure window of the honest provider whose
#: disclosure it interrupts.
DISCLOSURE_WINDOW_S = 15


def main(argv: list[str] | None = None) -> int:
    """Run the drills and print their reports; 0 when no invariant was violated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=200, help="results per variant")
    parser.add_argument("--liars", type=float, default=0.05,
                        help="fraction of lying results (each liar costs a proof)")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--only", choices=("traces", "no-traces"), default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the stacks' folders")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refute-drill-"))
    variants = [v for v in (True, False)
                if args.only is None or args.only == ("traces" if v else "no-traces")]
    reports: list[DrillReport] = []
    try:
        for upload in variants:
            name = "traces" if upload else "no-traces"
            reports.append(run_drill(
                workdir / name, results=args.results, liars=args.liars, upload_traces=upload,
                clients=args.clients, home=workdir / "home", submit_span_s=60.0,
                challenge_window_s=30, disclosure_window_s=DISCLOSURE_WINDOW_S,
                dispute_clock_s=20.0, spotcheck_delay_s=0.15,
                api_down_s=3.0 if upload else DISCLOSURE_WINDOW_S + 1.0,
                log=lambda line: print(line, flush=True)))
    finally:
        if args.keep or any(not r.ok for r in reports):
            print(f"stacks kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nsummary")
    print(f"  {'variant':<24} {'results':>7} {'liars':>5} {'sampled':>7} {'once':>5} "
          f"{'final':>5} {'convict':>7} {'timeout':>7} {'violations':>10} {'wall s':>7}")
    for r in reports:
        print(f"  {r.variant:<24} {r.accepted:>7} {r.liars:>5} {r.sampled_checks:>7} "
              f"{r.recorded_once:>5} {r.finalized:>5} {r.convicted:>7} {r.timeouts:>7} "
              f"{len(r.violations):>10} {r.phases.get('total', 0.0):>7.0f}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
