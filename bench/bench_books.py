"""What a dispute costs as the service's history grows: one journal per result (issue 10).

Accepts results in batches (each locks its stake in its own journal) and, after each batch,
times whole disputes on fresh results — opened, bisected by the watcher, proven by the fake
prover, settled — plus the finalization of honest ones. With one global journal every open and
resolve replayed every entry ever written, so the cost grew with the history; per result it
stays flat. Prints the time per dispute at each history size and its ratio to the first.

    .venv/bin/python -m bench.bench_books [--sizes 0,200,1000] [--disputes 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from challenge.orchestrator import open_dispute, prove_pending
from challenge.records import LedgerEntry
from tests.dispute_world import add_result, make_world


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,200,1000",
                        help="history sizes (accepted results) to time disputes at")
    parser.add_argument("--disputes", type=int, default=10, help="disputes timed per size")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    console = Console()
    table = Table(title="one dispute (open, bisect, prove, settle) vs history size")
    for column in ("accepted results", "ledger rows", "ms per dispute (median)",
                   "ratio to first"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="refute-bench-books-") as tmp:
        world = make_world(Path(tmp), network_id="net_b", model_id="mdl_b", ezkl=False)
        world.tasks.inline["proofs"] = lambda d: prove_pending(world.disputes, d,
                                                               datetime.now(UTC))
        accepted, baseline = 0, None
        for size in sizes:
            with console.status(f"accepting results up to {size}…"):
                while accepted < size:
                    add_result(world, seed=accepted % 50)
                    accepted += 1
            timings = []
            for n in range(args.disputes):
                rid = add_result(world, seed=n % 50, lie_at=1 + n % 3)
                start = time.perf_counter()
                open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=1,
                             now=datetime.now(UTC))
                timings.append(time.perf_counter() - start)
            accepted += args.disputes
            with world.ctx.sessions() as s:
                rows = s.scalar(select(func.count()).select_from(LedgerEntry))
            median = statistics.median(timings) * 1000
            baseline = baseline or median
            table.add_row(str(accepted), str(rows), f"{median:.1f}", f"{median / baseline:.2f}")
        from verifier.service import finalize_due

        finalized = finalize_due(world.ctx, datetime.now(UTC) + timedelta(hours=2))
    console.print(table)
    console.print(f"honest results finalized (each stake released once): {finalized}")


if __name__ == "__main__":
    main()
