"""``refute replay`` trusts only the auditor's keys and turns every tampering into a failed check
that names its place — never an exception, a traceback or a crash (issue 9, finding 6).

Two real bundles (a step proof and a range proof, both made with EZKL) are tampered with in
seeded, randomized ways (``tests/tamper.py``); ``bench/bench_tamper.py`` runs 200 of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from challenge.replay import ReplayReport, replay
from refute import settings as refute_settings
from refute.manifest import canonical_json
from tests.tamper import (
    FOREIGN,
    Bundles,
    build_bundles,
    edit_transcript,
    members,
    pack,
    rechain,
    tamperings,
)

#: Tamperings replayed here (all 200 in bench/bench_tamper.py).
CI_TAMPERINGS = int(os.environ.get("REFUTE_TAMPERINGS", "50"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bundles]:
    workdir = tmp_path_factory.mktemp("tamper")
    mp = pytest.MonkeyPatch()
    mp.setenv("REFUTE_HOME", str(workdir / "home"))
    mp.setenv("REFUTE_BLS_SEED", "5e" * 32)
    refute_settings.get_settings.cache_clear()
    yield build_bundles(workdir)
    mp.undo()
    refute_settings.get_settings.cache_clear()


def _write(tmp_path: Path, data: bytes, name: str = "t.rdispute") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _failed(report: ReplayReport) -> dict[str, str]:
    return {c.name: f"{c.place}: {c.detail}" for c in report.failures}


def _assert_rejected(report: ReplayReport, label: str) -> None:
    assert not report.ok, f"{label}: accepted\n" + "\n".join(map(str, report.lines))
    for line in report.failures:
        assert line.place, f"{label}: check {line.name} failed without a place: {line.detail}"
        assert not line.residual, \
            f"{label}: reached the last-resort handler: {line.place}: {line.detail}"


@pytest.mark.slow
@pytest.mark.ezkl
def test_the_untampered_bundles_pass_with_the_service_key(bundles: Bundles) -> None:
    for path in (bundles.step, bundles.range):
        report = replay(path, [bundles.service_hex])
        assert report.ok, report.lines
        assert report.trusted and report.signers == [bundles.service_hex]
        names = [c.name for c in report.checks]
        assert names == ["bundle", "transcript", "signature", "manifest", "artifacts",
                         "leaves", "moves", "proof", "binding", "verdict"]
    ranged = replay(bundles.range, [bundles.service_hex])
    assert "range of state 1" in dict((n, d) for n, _ok, d in ranged.lines)["proof"]


@pytest.mark.slow
@pytest.mark.ezkl
def test_without_a_trusted_key_the_signature_fails_and_names_the_signer(
        bundles: Bundles) -> None:
    report = replay(bundles.step)
    assert _failed(report).keys() == {"signature", "proof"}  # proofs need a trusted signer
    signature = _failed(report)["signature"]
    assert bundles.service_hex in signature and "--key" in signature
    assert report.signers == [bundles.service_hex] and not report.trusted


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_transcript_re_signed_by_another_key_fails_with_or_without_a_key(
        bundles: Bundles, tmp_path: Path) -> None:
    """The attacker's report: without --key, a transcript re-chained and re-signed with any
    key (bond edited) was accepted, and replay did not say which key signed."""
    def raise_bond(doc: dict[str, Any]) -> None:
        next(e for e in doc["events"] if e["kind"] == "challenge")["body"]["bond"] = "1"

    path = _write(tmp_path, edit_transcript(bundles.step.read_bytes(), raise_bond, FOREIGN))
    foreign = "0x" + FOREIGN.public_key.hex()
    alone = replay(path)
    assert not alone.ok and alone.signers == [foreign]
    assert foreign in _failed(alone)["signature"]
    trusted = replay(path, [bundles.service_hex])
    assert not trusted.ok and "not a trusted key" in _failed(trusted)["signature"]
    assert foreign in _failed(trusted)["signature"]
    # Trusting the forger's key is the auditor's decision: then the bundle is consistent.
    assert replay(path, [foreign]).ok


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_vk_replaced_is_caught_with_the_service_key(bundles: Bundles, tmp_path: Path) -> None:
    """The attacker's report: an edited vk.key passed (vk_sha256 was recorded, never compared)."""
    parts = members(bundles.step.read_bytes())
    transcript = json.loads(parts["transcript.json"])
    outcome = next(e for e in transcript["events"] if e["kind"] == "proofoutcome")["body"]
    member = f"artifacts/{outcome['vk_sha256']}"
    vk = parts[member]
    parts[member] = vk[:100] + bytes([vk[100] ^ 0x40]) + vk[101:]
    report = replay(_write(tmp_path, pack(parts)), [bundles.service_hex])
    failed = _failed(report)
    assert failed["artifacts"].startswith(member) and "vk_sha256" in failed["artifacts"]
    assert "not verified" in failed["proof"]  # EZKL never sees an unauthenticated vk


@pytest.mark.slow
@pytest.mark.ezkl
@pytest.mark.parametrize("field", ["tolerances", "segments", "model", "versions", "range"])
def test_a_manifest_edit_is_caught_with_the_service_key(bundles: Bundles, tmp_path: Path,
                                                         field: str) -> None:
    """The attacker's report: manifest edits (τ, hashes, range, versions) passed."""
    parts = members(bundles.step.read_bytes())
    doc = json.loads(parts["manifest.json"])
    if field == "tolerances":
        doc["tolerances"][2] += 1
    elif field == "segments":
        doc["segments"][0]["sha256"] = "00" * 32
    elif field == "model":
        doc["model"]["sha256"] = "11" * 32
    elif field == "versions":
        doc["versions"]["onnxruntime"] = "0.1"
    else:
        doc["range"] = doc["range"] + 1
    parts["manifest.json"] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    report = replay(_write(tmp_path, pack(parts)), [bundles.service_hex])
    assert _failed(report)["manifest"].startswith("manifest.json: sha256")


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_transcript_without_the_manifest_hash_fails(bundles: Bundles, tmp_path: Path) -> None:
    def drop(doc: dict[str, Any]) -> None:
        del doc["events"][0]["body"]["manifest_sha256"]

    path = _write(tmp_path, edit_transcript(bundles.step.read_bytes(), drop,
                                            bundles.service_key))
    report = replay(path, [bundles.service_hex])
    assert _failed(report)["manifest"].startswith(
        "transcript.json event 0 (submission) body: missing field 'manifest_sha256'")


@pytest.mark.slow
@pytest.mark.ezkl
@pytest.mark.parametrize("which", ["step", "range"])
def test_a_bad_proof_signed_by_the_service_fails_the_proof_check(
        bundles: Bundles, tmp_path: Path, which: str) -> None:
    """Range proofs were never verified by replay; now both kinds are, with EZKL. Even a
    transcript the trusted service signed does not make a broken proof pass."""
    def corrupt(doc: dict[str, Any]) -> None:
        outcome = next(e for e in doc["events"]
                       if e["kind"] in ("proofoutcome", "rangeoutcome"))["body"]
        proof = outcome["proof"]  # EZKL's proof.json: "proof" is its bytes, "hex_proof" too
        raw = bytearray(proof["proof"])
        raw[40] ^= 1
        proof["proof"], proof["hex_proof"] = list(raw), "0x" + raw.hex()

    source = bundles.step if which == "step" else bundles.range
    path = _write(tmp_path, edit_transcript(source.read_bytes(), corrupt, bundles.service_key))
    report = replay(path, [bundles.service_hex])
    failed = _failed(report)
    assert failed.keys() == {"proof"}, report.lines
    assert "does not verify" in failed["proof"]


@pytest.mark.slow
@pytest.mark.ezkl
def test_seeded_tamperings_are_failed_checks_with_a_place(bundles: Bundles,
                                                          tmp_path: Path) -> None:
    started = time.perf_counter()
    seen: list[str] = []
    for i, (label, data) in enumerate(tamperings(bundles, CI_TAMPERINGS, seed=9)):
        report = replay(_write(tmp_path, data), [bundles.service_hex])
        _assert_rejected(report, f"#{i} {label}")
        seen.append(label)
    elapsed = time.perf_counter() - started
    assert len(seen) == CI_TAMPERINGS
    assert elapsed < 180, f"{CI_TAMPERINGS} replays took {elapsed:.0f} s"


@pytest.mark.slow
@pytest.mark.ezkl
def test_the_cli_exits_1_with_a_readable_message(bundles: Bundles, tmp_path: Path) -> None:
    def cli(path: Path, *keys: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "verifier", "replay", str(path)]
        for key in keys:
            args += ["--key", key]
        return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False,
                              cwd=REPO)

    good = cli(bundles.step, bundles.service_hex)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"signed by: {bundles.service_hex} (trusted)" in good.stdout
    unkeyed = cli(bundles.step)
    assert unkeyed.returncode == 1
    assert f"signed by: {bundles.service_hex} (NOT trusted)" in unkeyed.stdout
    assert f"--key {bundles.service_hex}" in unkeyed.stdout
    for i, (label, data) in enumerate(tamperings(bundles, 4, seed=77)):
        path = _write(tmp_path, data, f"cli{i}.rdispute")
        done = cli(path, bundles.service_hex)
        assert done.returncode == 1, f"{label}: {done.returncode}\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stdout + done.stderr, label
        assert "FAIL" in done.stdout and "signed by:" in done.stdout, label
    raw = bundles.step.read_bytes()
    flipped = _write(tmp_path, raw[:500] + bytes([raw[500] ^ 1]) + raw[501:], "flip.rdispute")
    done = cli(flipped, bundles.service_hex)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "FAIL bundle" in done.stdout
    deep = members(raw)
    deep["transcript.json"] = b"[" * 200_000 + b"]" * 200_000
    done = cli(_write(tmp_path, pack(deep), "deep.rdispute"), bundles.service_hex)
    assert done.returncode == 1 and "Traceback" not in done.stderr  # no segfault (-11)
    assert "nests" in done.stdout


@pytest.mark.slow
@pytest.mark.ezkl
def test_an_artifact_hash_is_the_signed_one(bundles: Bundles) -> None:
    """Every artifact in the bundle is exactly what a signed proof event names."""
    parts = members(bundles.step.read_bytes())
    doc = json.loads(parts["transcript.json"])
    named = {e["body"][f] for e in doc["events"] if e["kind"] == "proofoutcome"
             for f in ("settings_sha256", "vk_sha256", "srs_sha256")}
    present = {n.removeprefix("artifacts/") for n in parts if n.startswith("artifacts/")}
    assert named == present == {hashlib.sha256(parts["artifacts/" + h]).hexdigest()
                                for h in present}


# --- fast: no bundle needs to be built ------------------------------------------------------


def test_unreadable_files_are_a_failed_bundle_check(tmp_path: Path) -> None:
    for name, data in (("empty", b""), ("text", b"not a zip"), ("half", pack(
            {"dispute.json": b"{}"})[:30])):
        report = replay(_write(tmp_path, data, name), [FOREIGN.public_key.hex()])
        _assert_rejected(report, name)
        assert [c.name for c in report.failures] == ["bundle"]
    missing = replay(tmp_path / "nowhere.rdispute")
    _assert_rejected(missing, "missing file")


def test_a_deeply_nested_or_non_json_transcript_is_a_failed_check(tmp_path: Path) -> None:
    head = b'{"dispute_id":"dsp_1","format":"refute.dispute/2"}'
    for label, transcript in (("deep", b"[" * 100_000 + b"]" * 100_000),
                              ("deep object", b'{"a":' * 5000 + b"1" + b"}" * 5000),
                              ("not json", b"\xff\xfe"), ("NaN", b"NaN"), ("list", b"[]")):
        parts = {"dispute.json": head, "transcript.json": transcript, "manifest.json": b"{}"}
        report = replay(_write(tmp_path, pack(parts)), [FOREIGN.public_key.hex()])
        _assert_rejected(report, label)
        assert report.failures[0].place == "transcript.json", report.lines


def test_a_malformed_trusted_key_is_a_failed_signature_check(tmp_path: Path) -> None:
    report = replay(_write(tmp_path, b"x"), ["0x1234", "zz" * 48])
    assert [(c.name, c.place.split(" (")[0]) for c in report.failures][:2] == [
        ("signature", "trusted key 1"), ("signature", "trusted key 2")]


@pytest.mark.slow
@pytest.mark.ezkl
def test_replay_pinpoints_a_proof_not_bound_to_the_revealed_states(bundles: Bundles,
                                                                   tmp_path: Path) -> None:
    """A state of the proven step edited together with its signed leaf (and the root, the
    transcript re-signed by the service's own key): the leaves hold, the proof verifies, and
    replay names the binding — the proof's instances are not Poseidon of that state. An edited
    state whose leaf was left alone fails the leaves check instead."""
    import numpy as np

    from refute.leaves import state_leaf
    from refute.merkle import merkle_root

    parts = members(bundles.step.read_bytes())
    doc = json.loads(parts["transcript.json"])
    submission = next(e for e in doc["events"] if e["kind"] == "submission")["body"]
    outcome = next(e for e in doc["events"] if e["kind"] == "proofoutcome")["body"]
    k = int(outcome["step"])  # the claimed state of the proven step
    names = sorted(n for n in parts if n.startswith(f"states/{k}/"))
    tensors = [np.frombuffer(parts[n], dtype="<f4").copy() for n in names]
    tensors[0][0] += np.float32(0.25)
    edited = dict(parts)
    edited.update({n: t.tobytes() for n, t in zip(names, tensors, strict=True)})
    only_state = replay(_write(tmp_path, pack(edited), "state.rdispute"),
                        [bundles.service_hex])
    failed = _failed(only_state)
    assert failed.keys() == {"leaves", "binding"}, only_state.lines
    assert failed["leaves"].startswith(f"states/{k}")
    assert f"revealed state {k} does not match its committed leaf" in failed["binding"]
    manifest = json.loads(parts["manifest.json"])
    shaped = [t.reshape(spec["shape"]) for t, spec in zip(tensors, manifest["states"][k],
                                                          strict=True)]
    leaves = list(submission["leaves"])
    leaves[k] = "0x" + state_leaf(shaped).hex()
    submission["leaves"] = leaves
    submission["trace_root"] = "0x" + merkle_root([bytes.fromhex(x[2:]) for x in leaves]).hex()
    edited["transcript.json"] = canonical_json(rechain(doc, bundles.service_key))
    report = replay(_write(tmp_path, pack(edited), "bound.rdispute"), [bundles.service_hex])
    failed = _failed(report)
    assert failed.keys() == {"binding"}, report.lines
    assert f"is not Poseidon of state {k}" in failed["binding"]
