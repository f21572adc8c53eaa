"""Real dispute bundles and seeded, randomized tamperings of them (shared by
``tests/test_replay_tamper.py`` and ``bench/bench_tamper.py``).

:func:`build_bundles` runs two real disputes through the orchestrator in one process (a
cheating trace convicted by an EZKL step proof, and a revealed state outside the range R
convicted by an EZKL range proof) and exports their bundles. :func:`tamperings` yields
``(label, bytes)`` pairs: each a bundle differing from the original, built by one seeded edit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import random
import warnings
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from challenge import orchestrator
from challenge.context import DisputeContext
from challenge.orchestrator import open_dispute, prove_pending, service_signing_key
from challenge.replay import archive_bytes
from challenge.transcript import SigningKey, Transcript, sign_head
from refute.manifest import canonical_json
from tests.dispute_world import add_result, make_world

#: A key nobody trusts (a forger's).
FOREIGN = SigningKey.generate(b"a forger's own BLS key, 32+ bytes of seed")


@dataclasses.dataclass(frozen=True)
class Bundles:
    """The exported bundles and the service key that signed them."""

    step: Path
    range: Path
    service_key: SigningKey

    @property
    def service_hex(self) -> str:
        """The service's public key as ``0x`` + hex."""
        return "0x" + self.service_key.public_key.hex()


def build_bundles(workdir: Path) -> Bundles:
    """Run a step-proof and a range-proof dispute for real (EZKL) and export both bundles.

    ``REFUTE_HOME`` must point into ``workdir`` (the caller sets it, and clears the prover's
    cached settings) so circuits and the development SRS are built there.
    """
    world = make_world(workdir, network_id="net_t", model_id="mdl_t")
    ctx = world.disputes
    step_rid = add_result(world, seed=8, lie_at=3)
    step_dispute = open_dispute(ctx, step_rid, challenger="service", lo=0, hi=3, bond=10,
                                now=datetime.now(UTC))
    world.tasks.drain_proofs(lambda d: _prove_now(ctx, d))
    range_rid = add_result(world, seed=11, out_of_range_at=1)
    range_dispute = open_dispute(ctx, range_rid, challenger="service", lo=0, hi=3, bond=4,
                                 now=datetime.now(UTC))
    _prove_now(ctx, range_dispute)
    return Bundles(
        step=orchestrator.export_dispute(ctx, step_dispute, workdir / "step.rdispute"),
        range=orchestrator.export_dispute(ctx, range_dispute, workdir / "range.rdispute"),
        service_key=service_signing_key(ctx))


def _prove_now(ctx: DisputeContext, dispute_id: str) -> None:
    prove_pending(ctx, dispute_id, datetime.now(UTC))


# --- editing bundles ---------------------------------------------------------------------------


def members(data: bytes) -> dict[str, bytes]:
    """A bundle's members, in archive order."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def pack(parts: dict[str, bytes]) -> bytes:
    """A canonical bundle of ``parts`` (so the only difference is the intended edit)."""
    return archive_bytes(parts)


def rechain(doc: dict[str, Any], key: SigningKey | None) -> dict[str, Any]:
    """Recompute the hash chain of (edited) events and sign the new head with ``key`` (or keep
    the old signatures when ``key`` is None: they no longer match the head)."""
    transcript = Transcript()
    for event in doc["events"]:
        transcript.append(event["kind"], event["at"], event["body"])
    if key is not None:
        transcript.attach_signature(key.public_key, sign_head(transcript, key))
        return transcript.to_json()
    out = transcript.to_json()
    out["signatures"], out["aggregate_signature"] = doc["signatures"], doc["aggregate_signature"]
    return out


def edit_transcript(data: bytes, edit: Callable[[dict[str, Any]], None],
                    key: SigningKey | str | None = "none") -> bytes:
    """Apply ``edit`` to the transcript; ``key``: "none" (no rechain), None (rechain, keep the
    old signature) or a key (rechain and sign with it)."""
    parts = members(data)
    doc = json.loads(parts["transcript.json"])
    edit(doc)
    if not isinstance(key, str):
        doc = rechain(doc, key)
    parts["transcript.json"] = canonical_json(doc)
    return pack(parts)


def _events(doc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in doc["events"] if e["kind"] == kind]


_VALUES: list[Any] = [0, -1, 1, 7, 2**64, 2**255, 10**30, 1.5, -0.0, 1e308, "", "x", "0x",
                      "0x" + "00" * 32, "1/0", "-3/4", "1e999999999", None, True, False, [],
                      {}, [1, [2, [3]]], {"a": {"b": None}}, "\ud7ff", "agree", "disagree",
                      "PROVIDER_FAULT"]


def _random_value(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(_VALUES))


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, (*prefix, k))] + [prefix]
    if isinstance(value, list) and value:
        picks = sorted({0, len(value) - 1})
        return [p for i in picks for p in _leaf_paths(value[i], (*prefix, i))] + [prefix]
    return [prefix]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


def _edit_random_field(rng: random.Random, doc: Any) -> str:
    """Replace one random field (any depth) of ``doc`` with a different random value."""
    paths = [p for p in _leaf_paths(doc) if p]
    path = rng.choice(paths)
    target = doc
    for step in path:
        target = target[step]
    value = _random_value(rng)
    while json.dumps(value) == json.dumps(target):
        value = _random_value(rng)
    if rng.random() < 0.15 and isinstance(path[-1], str):  # or delete it / rename it
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        if rng.random() < 0.5:
            parent[path[-1] + "_x"] = value
        return "/".join(map(str, path)) + " removed"
    _set(doc, path, value)
    return "/".join(map(str, path))


# --- the tamperings ----------------------------------------------------------------------------

Tamper = Callable[[random.Random, bytes, bytes], tuple[str, bytes]]


def t_flip_byte(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    at = rng.randrange(len(data))
    return f"flip byte {at}", data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1:]


def t_flip_member_byte(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    """Flip a byte inside one member and repack (valid CRC): the content itself changed."""
    parts = members(data)
    name = rng.choice(sorted(parts))
    raw = parts[name]
    at = rng.randrange(len(raw))
    if name.startswith("states/"):
        # Leaves commit to values quantized at the manifest's scale: flipping a low mantissa
        # bit changes nothing committed, so flip the sign/exponent byte of a value >= 1/64.
        values = np.frombuffer(raw, dtype="<f4")
        big = np.flatnonzero(np.abs(values) >= 1 / 64)
        at = 4 * int(big[rng.randrange(big.size)]) + 3 if big.size else 3
    parts[name] = raw[:at] + bytes([raw[at] ^ rng.randrange(1, 256)]) + raw[at + 1:]
    return f"flip byte {at} of {name} (CRC fixed)", pack(parts)


def t_transcript_field(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    box: list[str] = []
    mode = rng.choice(["none", "keep", "foreign"])
    key: SigningKey | str | None = {"none": "none", "keep": None, "foreign": FOREIGN}[mode]

    def edit(doc: dict[str, Any]) -> None:
        event = rng.choice(doc["events"])
        target = event["body"] if mode != "none" or rng.random() < 0.7 else event
        box.append(f"event {event['seq']} " + _edit_random_field(rng, target))

    try:
        out = edit_transcript(data, edit, key)
    except Exception:  # the edit cannot be re-chained (e.g. a bad at): submit it unchained
        out = edit_transcript(data, edit, "none")
        mode = "none"
    return f"transcript {box[-1]} ({mode})", out


def t_party_edit(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    """Edit provider, challenger, bond, stake, maxdiff, τ or the clocks; re-chain and re-sign
    with a foreign key."""
    choice = rng.choice(["provider", "challenger", "bond", "stake", "maxdiff", "tolerance",
                         "clock_unknown", "clock_missing", "clock_value", "verdict"])

    def edit(doc: dict[str, Any]) -> None:
        sub = doc["events"][0]["body"]
        opened = _events(doc, "challenge")[0]["body"]
        proof = (_events(doc, "proofoutcome") or _events(doc, "rangeoutcome"))[0]["body"]
        if choice == "provider":
            sub["provider"] = "0x" + "bb" * 20
        elif choice == "challenger":
            opened["challenger"] = "0x" + "cc" * 20
        elif choice == "bond":
            opened["bond"] = str(10**6)
        elif choice == "stake":
            sub["stake"] = "1"
        elif choice == "maxdiff":
            key = "maxdiff_units" if "maxdiff_units" in proof else "max_abs_units"
            proof[key] = "0"
        elif choice == "tolerance":
            key = "tolerance" if "tolerance" in proof else "bound"
            proof[key] = proof[key] + 10**6
        elif choice == "clock_unknown":
            opened["clocks"]["bonus"] = 1e9
        elif choice == "clock_missing":
            del opened["clocks"]["provider"]
        elif choice == "clock_value":
            opened["clocks"]["challenger"] = rng.choice([-1, 1e300, "60", None])
        else:
            _events(doc, "verdict")[0]["body"]["verdict"] = "CHALLENGER_FAULT"

    return f"{choice} edited, re-signed by a foreign key", edit_transcript(data, edit, FOREIGN)


def t_manifest(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    doc = json.loads(parts["manifest.json"])
    choice = rng.choice(["tau", "range", "model", "segment", "versions", "scale", "settings",
                         "random"])
    if choice == "tau":
        i = rng.randrange(len(doc["tolerances"]))
        doc["tolerances"][i] += rng.choice([1, 1000, -1])
    elif choice == "range":
        doc["range"] = doc["range"] * 2
    elif choice == "model":
        doc["model"]["sha256"] = "00" * 32
    elif choice == "segment":
        doc["segments"][rng.randrange(len(doc["segments"]))]["sha256"] = "11" * 32
    elif choice == "versions":
        doc["versions"]["ezkl"] = "0.0.1"
    elif choice == "scale":
        doc["scale"] = doc["scale"] + 1
    elif choice == "settings":
        doc["circuits"][0]["settings"]["run_args"]["logrows"] += 1
    else:
        choice = "random " + _edit_random_field(rng, doc)
    parts["manifest.json"] = canonical_json(doc)
    resign = rng.random() < 0.5
    out = pack(parts)
    if resign:  # and name the edited manifest in a re-chained transcript, signed by a forger

        def name(t: dict[str, Any]) -> None:
            t["events"][0]["body"]["manifest_sha256"] = hashlib.sha256(
                parts["manifest.json"]).hexdigest()

        out = edit_transcript(out, name, FOREIGN)
    return f"manifest {choice}" + (" (re-signed by a foreign key)" if resign else ""), out


def t_artifact(rng: random.Random, data: bytes, other: bytes) -> tuple[str, bytes]:
    """Replace an artifact (settings, vk or SRS) with another valid one, or edit it."""
    parts = members(data)
    theirs = {n: v for n, v in members(other).items() if n.startswith("artifacts/")}
    name = rng.choice(sorted(n for n in parts if n.startswith("artifacts/")))
    choice = rng.choice(["other", "other_renamed", "settings_edit", "truncate", "append"])
    replacement = rng.choice(sorted(v for v in theirs.values() if v != parts[name]))
    if choice == "other":
        parts[name] = replacement
    elif choice == "other_renamed":
        del parts[name]
        parts["artifacts/" + hashlib.sha256(replacement).hexdigest()] = replacement
    elif choice == "settings_edit":
        try:
            settings = json.loads(parts[name])
        except ValueError:
            settings = None
        if isinstance(settings, dict):
            choice += " " + _edit_random_field(rng, settings)
            parts[name] = json.dumps(settings).encode()
        else:
            parts[name] = parts[name] + b"\x00"
    elif choice == "truncate":
        parts[name] = parts[name][: rng.randrange(len(parts[name]))]
    else:
        parts[name] = parts[name] + b"\x00" * rng.randrange(1, 64)
    return f"artifact {name[10:22]} {choice}", pack(parts)


def t_truncate(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    if rng.random() < 0.3:
        cut = rng.randrange(len(data))
        return f"file truncated at {cut}", data[:cut]
    name = rng.choice(sorted(parts))
    cut = rng.randrange(len(parts[name]))
    parts[name] = parts[name][:cut]
    return f"{name} truncated at {cut}", pack(parts)


def t_remove(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    name = rng.choice(sorted(parts))
    del parts[name]
    return f"{name} removed", pack(parts)


def t_extra(rng: random.Random, data: bytes, other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    theirs = members(other)
    choice = rng.choice(["junk", "state", "artifact", "path", "duplicate"])
    if choice == "junk":
        parts["notes.txt"] = b"hello"
    elif choice == "state":
        k = rng.choice([0, 1, 2, 3, 99])
        parts[f"states/{k}/{rng.choice([0, 1, 7])}.f32"] = b"\x00" * 16
    elif choice == "artifact":
        extra = rng.choice(sorted(n for n in theirs if n.startswith("artifacts/")))
        if extra in parts:
            extra = "artifacts/" + "ab" * 32
        parts[extra] = theirs.get(extra, b"x")
    elif choice == "path":
        parts["../states/0/0.f32"] = b"\x00" * 16
    else:  # a second member with an existing name (only a raw ZIP writer allows it)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive, zipfile.ZipFile(io.BytesIO(data)) as a, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": the point of this edit
            for info in a.infolist():
                archive.writestr(info, a.read(info))
            with_name = rng.choice(sorted(parts))
            archive.writestr(with_name, b"{}")
        return f"duplicate member {with_name}", buffer.getvalue()
    return f"extra member ({choice})", pack(parts)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def t_deep_json(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    artifacts = sorted(n for n in parts if n.startswith("artifacts/"))
    name = rng.choice(["transcript.json", "manifest.json", "dispute.json", *artifacts])
    depth = rng.choice([65, 1000, 100_000])
    if name == "transcript.json" and rng.random() < 0.5:  # nested inside a body field
        doc = json.loads(parts[name])
        doc["events"][-1]["body"]["reason"] = "PLACEHOLDER"
        raw = canonical_json(doc)
        parts[name] = raw.replace(b'"PLACEHOLDER"', _deep(depth))
        return f"{name}: a body field nested {depth} deep", pack(parts)
    parts[name] = _deep(depth)
    return f"{name} nested {depth} deep", pack(parts)


def t_not_json(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    name = rng.choice(["transcript.json", "manifest.json", "dispute.json"])
    junk = rng.choice([b"", b"\xff\xfe\x00", b"NaN", b"Infinity", b"[]", b"null", b"1e999999",
                       b'{"format": "refute.dispute/2"', b'"\\ud800"', b"{}",
                       parts[name][: len(parts[name]) // 2], parts[name] + b"x",
                       b'{"a":1,"a":2}'])
    parts[name] = junk
    return f"{name} replaced by {junk[:20]!r}", pack(parts)


def t_state_values(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    name = rng.choice(sorted(n for n in parts if n.startswith("states/")))
    values = np.frombuffer(parts[name], dtype="<f4").copy()
    choice = rng.choice(["nan", "inf", "huge", "step", "negate", "zero", "ulp"])
    i = rng.randrange(values.size)
    # Leaves commit to the float32 bytes: even a one-ulp edit is a change of the state.
    values[i] = {"nan": np.nan, "inf": np.inf, "huge": 3e38, "step": values[i] + 0.25,
                 "negate": -values[i] if abs(values[i]) > 0.01 else 1.0,
                 "zero": 0.0 if abs(values[i]) > 0.01 else 0.5,
                 "ulp": np.nextafter(values[i], np.float32(np.inf))}[choice]
    parts[name] = values.astype("<f4").tobytes()
    return f"{name} value {i} {choice}", pack(parts)


def t_dispute_head(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    parts = members(data)
    doc = json.loads(parts["dispute.json"])
    choice = rng.choice(["id", "format", "extra", "type"])
    if choice == "id":
        doc["dispute_id"] = "dsp_" + "0" * 24
    elif choice == "format":
        doc["format"] = "refute.dispute/2"
    elif choice == "extra":
        doc["trusted_key"] = "0x" + FOREIGN.public_key.hex()
    else:
        doc["dispute_id"] = 12345
    parts["dispute.json"] = canonical_json(doc)
    return f"dispute.json {choice}", pack(parts)


def t_archive(rng: random.Random, data: bytes, _other: bytes) -> tuple[str, bytes]:
    """Same members, other ZIP bytes: dates, compression, order, comment, junk around it."""
    choice = rng.choice(["dates", "deflate", "order", "comment", "trailing", "leading",
                         "noncanonical_json"])
    if choice == "trailing":
        return "junk after the archive", data + b"junk"
    if choice == "leading":
        return "junk before the archive", b"MZ" + data
    parts = members(data)
    if choice == "noncanonical_json":
        parts["transcript.json"] = json.dumps(json.loads(parts["transcript.json"]),
                                              indent=1).encode()
        return "transcript.json re-indented", pack(parts)
    buffer = io.BytesIO()
    names = sorted(parts, reverse=choice == "order")
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0) if choice == "dates"
                                   else (1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if choice == "deflate" \
                else zipfile.ZIP_STORED
            archive.writestr(info, parts[name])
        if choice == "comment":
            archive.comment = b"trust me"
    return f"archive {choice}", buffer.getvalue()


def t_swap_proof(rng: random.Random, data: bytes, other: bytes) -> tuple[str, bytes]:
    """Put the other dispute's proof (a valid proof, of another circuit) in this one's outcome,
    re-chained and re-signed with a foreign key."""
    theirs = json.loads(members(other)["transcript.json"])
    proof = next(e for e in theirs["events"] if e["kind"] in ("proofoutcome", "rangeoutcome"))

    def edit(doc: dict[str, Any]) -> None:
        mine = next(e for e in doc["events"] if e["kind"] in ("proofoutcome", "rangeoutcome"))
        mine["body"]["proof"] = proof["body"]["proof"]

    return "proof swapped, re-signed by a foreign key", edit_transcript(data, edit, FOREIGN)


TAMPERS: list[Tamper] = [t_flip_byte, t_flip_byte, t_flip_member_byte, t_transcript_field,
                         t_transcript_field, t_party_edit, t_manifest, t_artifact, t_truncate,
                         t_remove, t_extra, t_deep_json, t_not_json, t_state_values,
                         t_dispute_head, t_archive, t_swap_proof]


def tamperings(bundles: Bundles, count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` seeded tamperings, alternating between the step and the range bundle; each
    differs from its original."""
    rng = random.Random(seed)
    step, ranged = bundles.step.read_bytes(), bundles.range.read_bytes()
    made = 0
    while made < count:
        data, other = (step, ranged) if made % 2 == 0 else (ranged, step)
        tamper = rng.choice(TAMPERS)
        label, out = tamper(rng, data, other)
        if out == data:
            continue
        made += 1
        yield f"{'step' if data is step else 'range'}: {label}", out
