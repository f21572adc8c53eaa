"""Benchmark: 200 seeded tamperings of real dispute bundles, each replayed with the service's key.

Builds a step-proof and a range-proof bundle for real (EZKL, ≈ 2 minutes), then applies the
seeded tamperings of ``tests/tamper.py`` (byte flips anywhere, member edits, transcripts
re-chained and re-signed by a foreign key, artifacts and manifests replaced, truncations,
removed and extra members, deep and non-JSON members) and replays each in a child process, so
that a crash (a signal) would be counted rather than end the run. Prints: tamperings, failed
checks (the tampering was rejected with a place), accepted (0), tracebacks (0), crashes (0),
last-resort catches (0) and the time.

Run: ``.venv/bin/python -m bench.bench_tamper [--count 200] [--seed 1] [--workdir DIR]``
(an existing ``DIR`` with ``step.rdispute``, ``range.rdispute`` and ``service.key`` is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CHILD = """
import json, sys
from challenge.replay import replay
out = []
for path in sys.argv[2:]:
    report = replay(path, [sys.argv[1]])
    out.append({"ok": report.ok, "failures": [[c.name, c.place, c.detail, c.residual]
                                              for c in report.failures]})
print(json.dumps(out))
"""


def _bundles(workdir: Path) -> tuple[Path, Path, str]:
    step, ranged, key = (workdir / "step.rdispute", workdir / "range.rdispute",
                         workdir / "service.key")
    if not (step.exists() and ranged.exists() and key.exists()):
        os.environ["REFUTE_HOME"] = str(workdir / "home")
        os.environ.setdefault("REFUTE_BLS_SEED", "5e" * 32)
        from tests.tamper import build_bundles

        built = build_bundles(workdir)
        key.write_text(built.service_hex)
    return step, ranged, key.read_text().strip()


def _replay_batch(key: str, paths: list[Path]) -> tuple[list[dict[str, object]] | None, str, int]:
    done = subprocess.run([sys.executable, "-c", CHILD, key, *map(str, paths)],
                          capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        return None, done.stderr, done.returncode
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr, 0


def main() -> None:
    """Build (or reuse) the bundles, tamper, replay, and print the counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=25, help="replays per child process")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="refute-tamper-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    step, ranged, key = _bundles(workdir)
    built = time.perf_counter() - started
    from challenge.transcript import SigningKey
    from tests.tamper import Bundles, tamperings

    bundles = Bundles(step=step, range=ranged, service_key=SigningKey(1))
    cases = workdir / "cases"
    cases.mkdir(exist_ok=True)
    labels: list[str] = []
    paths: list[Path] = []
    for i, (label, data) in enumerate(tamperings(bundles, args.count, args.seed)):
        path = cases / f"{i:04d}.rdispute"
        path.write_bytes(data)
        labels.append(label)
        paths.append(path)
    counts: Counter[str] = Counter()
    by_check: Counter[str] = Counter()
    t0 = time.perf_counter()
    for start in range(0, len(paths), args.batch):
        chunk = paths[start:start + args.batch]
        results, _stderr, _code = _replay_batch(key, chunk)
        if results is None:  # a crash or a traceback: replay them one by one to count them
            for path in chunk:
                one, err, rc = _replay_batch(key, [path])
                if one is None:
                    kind = "crashes" if rc < 0 else "tracebacks"
                    counts[kind] += 1
                    print(f"{kind[:-1]}: {labels[paths.index(path)]}: {err.strip()[-300:]}")
                else:
                    _count(one[0], labels[paths.index(path)], counts, by_check)
            continue
        for result, path in zip(results, chunk, strict=True):
            _count(result, labels[paths.index(path)], counts, by_check)
    spent = time.perf_counter() - t0
    print(f"bundles built or loaded in {built:.0f} s ({workdir})")
    print(f"tamperings      {len(paths)}")
    print(f"failed checks   {counts['rejected']}  (rejected, every failure naming its place)")
    print(f"accepted        {counts['accepted']}")
    print(f"no place        {counts['no_place']}")
    print(f"last resort     {counts['last_resort']}  (caught by replay's catch-all)")
    print(f"tracebacks      {counts['tracebacks']}")
    print(f"crashes         {counts['crashes']}")
    print(f"time            {spent:.1f} s ({spent / max(len(paths), 1):.2f} s per replay, "
          "child processes included)")
    print("first failing check: " + ", ".join(f"{k} {v}" for k, v in by_check.most_common()))
    bad = counts["accepted"] + counts["no_place"] + counts["last_resort"] + \
        counts["tracebacks"] + counts["crashes"]
    sys.exit(1 if bad else 0)


def _count(result: dict[str, object], label: str, counts: Counter[str],
           by_check: Counter[str]) -> None:
    failures = result["failures"]
    assert isinstance(failures, list)
    if result["ok"] or not failures:
        counts["accepted"] += 1
        print(f"accepted: {label}")
        return
    if any(not place for _name, place, _detail, _residual in failures):
        counts["no_place"] += 1
        print(f"no place: {label}: {failures}")
        return
    if any(residual for _n, _p, _d, residual in failures):
        counts["last_resort"] += 1
        print(f"last resort: {label}: {failures}")
        return
    counts["rejected"] += 1
    by_check[str(failures[0][0])] += 1


if __name__ == "__main__":
    main()
