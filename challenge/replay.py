"""Dispute bundles (``refute.dispute/1``) and their offline replay.

A bundle is an uncompressed ZIP holding: ``transcript.json`` (the result's hash-chained
transcript, its head co-signed with BLS), ``manifest.json``, ``states/<k>/<j>.f32`` for every
state the dispute revealed or proved on (raw little-endian float32), and for the proven step
``settings.json``, ``vk.key``, ``srs.bin`` (the KZG parameters the proof was made with).

:func:`replay` trusts nothing in it and checks, reporting each as a line: the transcript chain
and signature; that every included state hashes to its committed leaf; that the moves, replayed
through the game engine from the challenge event, are legal and lead to the recorded verdict
(clocks included); the proof with EZKL's verifier; that the proof's hash instances are the
committed leaves of the step; and the verdict rule (maxdiff vs τ).
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from challenge.game import (
    Actor,
    Answer,
    Choice,
    Disclose,
    DisputeState,
    Open,
    ProofOutcome,
    RangeOutcome,
    Reveal,
    Tick,
    TimeControl,
    apply,
)
from challenge.transcript import check_bundle
from prover.step import split_instances, verify_proof_file
from refute.commitment import state_leaf
from refute.errors import RefuteError
from refute.manifest import Manifest, canonical_json
from refute.trace import leaf_of_state

FORMAT = "refute.dispute/1"


@dataclass
class ReplayReport:
    """Each check of a replay, in order, with pass/fail and where it failed."""

    lines: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        """Record one check; returns ``ok``."""
        self.lines.append((name, ok, detail))
        return ok

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return bool(self.lines) and all(ok for _n, ok, _d in self.lines)


def _events_of(transcript: dict[str, Any], dispute_id: str) -> list[dict[str, Any]]:
    return [e for e in transcript["events"]
            if e["body"].get("dispute_id") == dispute_id]


def write_bundle(path: Path, *, transcript: dict[str, Any], manifest: Manifest,
                 dispute_id: str, states: dict[int, tuple[np.ndarray, ...]],
                 circuit_files: dict[str, bytes]) -> Path:
    """Write a dispute bundle (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("dispute.json", canonical_json({"format": FORMAT,
                                                         "dispute_id": dispute_id}))
        archive.writestr("transcript.json", canonical_json(transcript))
        archive.writestr("manifest.json", canonical_json(manifest.to_json()))
        for k, tensors in states.items():
            for j, tensor in enumerate(tensors):
                archive.writestr(f"states/{k}/{j}.f32", tensor.astype("<f4").tobytes())
        for name, data in circuit_files.items():
            archive.writestr(name, data)
    return path


def replay(path: Path, trusted_keys: list[str] | None = None) -> ReplayReport:
    """Re-check a dispute bundle offline; never raises on tampered content."""
    report = ReplayReport()
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        report.add("bundle", False, f"not a readable bundle: {exc}")
        return report
    with archive:
        names = set(archive.namelist())
        try:
            head = json.loads(archive.read("dispute.json"))
            transcript = json.loads(archive.read("transcript.json"))
            manifest = Manifest.from_json(json.loads(archive.read("manifest.json")))
            dispute_id = str(head["dispute_id"])
        except (KeyError, ValueError, RefuteError) as exc:
            report.add("bundle", False, f"malformed: {exc}")
            return report
        report.add("bundle", head.get("format") == FORMAT, f"dispute {dispute_id}")
        keys = trusted_keys or [s["public_key"] for s in transcript.get("signatures", [])]
        try:
            chain = check_bundle(transcript, keys)
            failures = [f"{c.name}: {c.detail}" for c in chain.failures]
            report.add("transcript", chain.ok, "; ".join(failures) or
                       f"{transcript['length']} events, head signed by {len(keys)} key(s)")
        except RefuteError as exc:
            report.add("transcript", False, exc.reason)
        events = transcript.get("events", [])
        submission = next((e for e in events if e["kind"] == "submission"), None)
        if submission is None:
            report.add("leaves", False, "no submission event")
            return report
        leaves = submission["body"]["leaves"]
        states: dict[int, list[np.ndarray]] = {}
        for name in sorted(names):
            if name.startswith("states/"):
                _, k, j = name.split("/")
                spec = manifest.states[int(k)][int(j.split(".")[0])]
                raw = np.frombuffer(archive.read(name), dtype="<f4")
                states.setdefault(int(k), []).append(raw.reshape(spec.shape))
        bad = [k for k, tensors in states.items()
               if "0x" + leaf_of_state(manifest, tensors).hex() != leaves[k]]
        report.add("leaves", not bad, f"state {bad[0]} does not hash to its committed leaf"
                   if bad else f"states {sorted(states)} match their committed leaves")
        mine = _events_of(transcript, dispute_id)
        _replay_moves(report, mine, leaves, states, manifest)
        _replay_proof(report, archive, names=names, events=mine, leaves=leaves,
                      manifest=manifest)
    return report


def _replay_moves(report: ReplayReport, events: list[dict[str, Any]], leaves: list[str],
                  states: dict[int, list[np.ndarray]], manifest: Manifest) -> None:
    opened = next((e for e in events if e["kind"] == "challenge"), None)
    verdict = next((e for e in events if e["kind"] == "verdict"), None)
    if opened is None or verdict is None:
        report.add("moves", False, "the dispute has no challenge or no verdict event")
        return
    body = opened["body"]
    clocks = TimeControl(**body["clocks"])
    state: DisputeState | None = None
    try:
        state, _ = apply(None, Open(actor=Actor.CHALLENGER, at=opened["at"], n=body["n"],
                                    lo=body["lo"], hi=body["hi"], clocks=clocks,
                                    disclosed=bool(body.get("disclosed", True))))
        for event in events:
            kind, b = event["kind"], event["body"]
            at = b.get("move_at", event["at"])  # the move's own time (see orchestrator.drive)
            if kind == "disclose":  # the service checked the upload against the leaves
                state, _ = apply(state, Disclose(actor=Actor.PROVIDER, at=at,
                                                 matches_commitment=True))
            elif kind == "reveal":
                k = b["state"]
                matches = k in states and "0x" + leaf_of_state(
                    manifest, states[k]).hex() == leaves[k]
                in_range = manifest.range is None or all(
                    float(np.max(np.abs(t))) <= manifest.range for t in states.get(k, []))
                state, _ = apply(state, Reveal(actor=Actor.PROVIDER, at=at, state=k,
                                               matches_leaf=matches, in_range=in_range))
            elif kind == "answer":
                state, _ = apply(state, Answer(actor=Actor.CHALLENGER, at=at,
                                               state=b["state"], choice=Choice(b["choice"])))
            elif kind == "timeout":
                state, _ = apply(state, Tick(actor=Actor.SERVICE, at=at))
            elif kind == "rangeoutcome":
                state, _ = apply(state, RangeOutcome(
                    actor=Actor.SERVICE, at=at, state=b["state"],
                    max_abs_units=Fraction(b["max_abs_units"]), bound=b["bound"], valid=True))
            elif kind == "proofoutcome":
                state, _ = apply(state, ProofOutcome(
                    actor=Actor.SERVICE, at=at, step=b["step"],
                    maxdiff_units=Fraction(b["maxdiff_units"]), tolerance=b["tolerance"],
                    valid=True))
    except RefuteError as exc:
        report.add("moves", False, f"illegal move: {exc.reason}")
        return
    recorded = verdict["body"]["verdict"]
    reached = state.verdict.value.upper() if state is not None and state.verdict else None
    report.add("moves", reached == recorded,
               f"{state.rounds if state else 0} rounds replayed to {reached} "
               f"(recorded {recorded})")


def _replay_proof(report: ReplayReport, archive: zipfile.ZipFile, *, names: set[str],
                  events: list[dict[str, Any]], leaves: list[str], manifest: Manifest) -> None:
    outcome = next((e for e in events if e["kind"] == "proofoutcome"), None)
    if outcome is None:
        report.add("proof", True, "no proof in this dispute (decided by a timeout)")
        return
    body = outcome["body"]
    if not {"settings.json", "vk.key", "srs.bin"} <= names:
        report.add("proof", False, "bundle lacks settings.json, vk.key or srs.bin")
        return
    from prover.offline import materialize_files

    with tempfile.TemporaryDirectory(prefix="refute-replay-") as tmp:
        circuit = materialize_files(Path(tmp), archive.read("settings.json"),
                                    archive.read("vk.key"), archive.read("srs.bin"),
                                    manifest.scale)
        valid = verify_proof_file(circuit, body["proof"])
    report.add("proof", valid, "EZKL verifies the proof with the bundle's vk" if valid
               else "the proof does not verify")
    step = int(body["step"])
    x, y, raw = split_instances(body["proof"], len(manifest.states[step - 1]))
    bound = (state_leaf(x).hex(), state_leaf(y).hex())
    ok = ("0x" + bound[0], "0x" + bound[1]) == (leaves[step - 1], leaves[step])
    report.add("binding", ok, f"instances are leaves {step - 1} and {step}" if ok
               else f"instances do not hash to leaves {step - 1} and {step}")
    units = Fraction(raw * 2**manifest.scale, 2**circuit.output_scale)
    tau = manifest.tolerances[step - 1] if manifest.tolerances else 0
    rule = "PROVIDER_FAULT" if units > tau else "CHALLENGER_FAULT"
    verdict: dict[str, Any] = next((e for e in events if e["kind"] == "verdict"),
                                   {"body": {}})
    report.add("verdict", rule == verdict["body"].get("verdict"),
               f"maxdiff {float(units):.4g} vs τ={tau} → {rule}")
