"""Dispute bundles (``refute.dispute/2``) and their offline replay.

A bundle is an uncompressed ZIP holding exactly:

* ``dispute.json`` — ``{"format": "refute.dispute/2", "dispute_id": "..."}``;
* ``transcript.json`` — the result's hash-chained transcript, its head co-signed with BLS;
* ``manifest.json`` — the model's manifest, named by its sha256 (``manifest_sha256``) in the
  signed submission event (event 0);
* ``states/<k>/<j>.f32`` — tensor j of state k (raw little-endian float32), for every state the
  dispute revealed, and states i-1, i of a proven step and k of a range proof;
* ``artifacts/<sha256>`` — every settings file, verifying key and SRS a proof event of the
  dispute names by hash (``settings_sha256``, ``vk_sha256``, ``srs_sha256``), content-addressed;
* ``segments/<i>.onnx`` — the graph of every tiled segment i whose tile a proof event proves
  (its sha256 is the manifest's segment hash): a tile's slices of states i-1 and i are cut by
  that graph's receptive fields.

:func:`replay` takes nothing in the bundle on its own word. Its checks, in order, each one a
line of the report (a failed one says where: the member, the event, the field):

``bundle``     the archive reads (CRCs), holds only the members above, ``dispute.json`` is right;
``transcript`` the hash chain, length and head;
``signature``  the head's signature, against the keys the *auditor* trusts (``trusted_keys``,
               never taken from the bundle); without any, this check fails and names the key
               that signed, so the auditor can decide to trust it;
``manifest``   ``manifest.json`` hashes to the signed ``manifest_sha256`` (it covers the model
               and segment hashes, every τ, the range R, the circuits' settings, the versions);
``artifacts``  every artifact a proof event names is present and hashes to its signed sha256,
               and each settings file is the one the manifest records for its circuit;
``leaves``     the committed leaves rebuild the signed trace root, the bundle holds exactly the
               states the dispute needs, and each hashes to its committed leaf;
``moves``      the dispute's events, read into moves by the codec the orchestrator writes them
               with (``challenge/events.py``) and replayed through the game engine from the
               challenge, are legal (clocks included), match their recorded phases and reach
               the verdict;
``proof``      every step and range proof verifies with EZKL (only when the transcript is
               signed by a trusted key and every artifact matched its hash: the expensive,
               native verifier never sees unauthenticated input);
``binding``    the proof's hash instances are Poseidon of the quantized tensors of the states
               it was made on (of the named tile's slices of them, cut by the segment graph
               the manifest's hash authenticates; of the named chunk of a chunked state, which
               must hold its largest |v|), states that reproduce their committed leaves;
``verdict``    the proven maxdiff (max |v|) and τ (R) are the ones recorded, and the rule holds
               (``refute/verdict.py``, the rule the game and the prover apply).

A malformed bundle is a failed check naming its place, never an exception: every part is
validated before use, and anything that still raises is caught and reported with the place the
replay had reached.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from challenge.events import (
    DISPUTE_KINDS,
    PROOF_KINDS,
    Decoded,
    EventError,
    RevealFacts,
    decode,
    decode_verdict,
    outcome_move,
    proof_target,
    states_of,
    verdict_name,
)
from challenge.game import Actor, Close, DisputeState, ProofOutcome, RangeOutcome, apply
from challenge.transcript import (
    Event,
    SigningKey,
    TranscriptError,
    check_bundle,
    parse_events,
    parse_public_key,
)
from circuits.adjudication import adjudication_bytes
from circuits.range_graph import chunk_circuit
from refute import safejson
from refute.chunks import Chunking, range_chunking
from refute.errors import BindingError, BundleError, RefuteError
from refute.instances import check_binding
from refute.manifest import Manifest, canonical_json
from refute.merkle import merkle_root
from refute.segmentation import Segment
from refute.tiling import Tile, Tiling, segment_tiling, tile_segment
from refute.trace import leaf_of_state
from refute.verdict import (
    VerdictError,
    proven_units,
    range_bound_units,
    range_fault,
    step_verdict,
    within_range,
)

FORMAT = "refute.dispute/2"
#: Largest member read from a bundle (an SRS for 2^20 rows is 128 MB).
MAX_MEMBER_BYTES = 1 << 30
#: Largest JSON member (transcript, manifest, dispute head, settings).
MAX_JSON_BYTES = 64 << 20
#: Largest bundle file.
MAX_BUNDLE_BYTES = 2 << 30
#: At most this many members.
MAX_MEMBERS = 4096
ARTIFACT_FIELDS = ("settings_sha256", "vk_sha256", "srs_sha256")
#: The kinds of a dispute's proof events.
PROOF_EVENTS = frozenset(PROOF_KINDS.values())

_STATE_MEMBER = re.compile(r"states/(0|[1-9][0-9]{0,5})/(0|[1-9][0-9]{0,5})\.f32")
_ARTIFACT_MEMBER = re.compile(r"artifacts/([0-9a-f]{64})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LEAF = re.compile(r"0x[0-9a-f]{64}")
_DISPUTE_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")
_JSON_MEMBERS = ("dispute.json", "transcript.json", "manifest.json")
_SEGMENT_MEMBER = re.compile(r"segments/([1-9][0-9]{0,5})\.onnx")


class ReplayError(RefuteError):
    """A part of a bundle is malformed; ``place`` names it (member, event, field)."""

    code = "replay_error"

    def __init__(self, reason: str, place: str) -> None:
        super().__init__(reason)
        self.place = place


@dataclass(frozen=True)
class Line:
    """One check of a replay: its name, whether it passed, what it found and where it failed."""

    name: str
    ok: bool
    detail: str
    place: str = ""
    residual: bool = False
    """Caught by the last-resort handler (an error no earlier validation anticipated)."""

    def text(self) -> str:
        """``detail``, prefixed with the place when the check failed."""
        return f"{self.place}: {self.detail}" if self.place and not self.ok else self.detail


@dataclass
class ReplayReport:
    """Each check of a replay, in order, with pass/fail and where it failed."""

    checks: list[Line] = field(default_factory=list)
    signers: list[str] = field(default_factory=list)
    """The public keys (``0x`` + hex) the bundle says signed its head (verified or not)."""
    trusted: bool = False
    """Whether the head's signature verified against a key the auditor gave."""

    def add(self, name: str, ok: bool, detail: str, place: str = "", *,
            residual: bool = False) -> bool:
        """Record one check; returns ``ok``. A failed check should name its ``place``."""
        self.checks.append(Line(name, ok, detail, place, residual))
        return ok

    @property
    def lines(self) -> list[tuple[str, bool, str]]:
        """``(name, ok, detail)`` per check; a failure's detail starts with its place."""
        return [(c.name, c.ok, c.text()) for c in self.checks]

    @property
    def failures(self) -> list[Line]:
        """The checks that failed."""
        return [c for c in self.checks if not c.ok]

    def passed(self, *names: str) -> bool:
        """Whether every check called one of ``names`` was run and passed."""
        found = [c for c in self.checks if c.name in names]
        return bool(found) and all(c.ok for c in found)

    @property
    def ok(self) -> bool:
        """Every check passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)


def sha256_hex(data: bytes) -> str:
    """sha256 of ``data`` in lowercase hex (how bundles name artifacts)."""
    return hashlib.sha256(data).hexdigest()


def write_bundle(path: Path, *, transcript: dict[str, Any], manifest: Manifest,
                 dispute_id: str, states: dict[int, tuple[np.ndarray, ...]],
                 circuit_files: dict[str, bytes],
                 segment_graphs: dict[int, bytes] | None = None) -> Path:
    """Write a dispute bundle (see the module docstring); ``circuit_files`` maps member names
    (``artifacts/<sha256>``) to bytes, ``segment_graphs`` a tiled segment's index to its ONNX
    bytes. The archive is canonical (:func:`archive_bytes`)."""
    members = {"dispute.json": canonical_json({"format": FORMAT, "dispute_id": dispute_id}),
               "transcript.json": canonical_json(transcript),
               "manifest.json": canonical_json(manifest.to_json())}
    for k, tensors in states.items():
        for j, tensor in enumerate(tensors):
            members[f"states/{k}/{j}.f32"] = np.asarray(tensor).astype("<f4").tobytes()
    members.update(circuit_files)
    members.update({f"segments/{i}.onnx": data for i, data in (segment_graphs or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive_bytes(members))
    return path


def _member_order(name: str) -> tuple[int, int, int, str]:
    state = _STATE_MEMBER.fullmatch(name)
    segment = _SEGMENT_MEMBER.fullmatch(name)
    if name in _JSON_MEMBERS:
        return (0, _JSON_MEMBERS.index(name), 0, name)
    if state is not None:
        return (1, int(state.group(1)), int(state.group(2)), name)
    if segment is not None:
        return (3, int(segment.group(1)), 0, name)
    return (2, 0, 0, name)


def archive_bytes(members: dict[str, bytes]) -> bytes:
    """The one encoding of a bundle: an uncompressed ZIP of ``members`` in canonical order
    (``dispute.json``, ``transcript.json``, ``manifest.json``, states by (k, j), artifacts by
    name), every entry dated 1980-01-01 00:00:00, mode 0644, made on Unix, no comments or
    extra fields. Replay rebuilds it from the members it read and compares the bytes, so any
    byte edited anywhere in the file (headers included) is detected."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(members, key=_member_order):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, members[name])
    return buffer.getvalue()


def replay(path: Path, trusted_keys: Iterable[str | bytes] | None = None) -> ReplayReport:
    """Re-check a dispute bundle offline against ``trusted_keys`` (BLS public keys the auditor
    trusts, hex or bytes); never raises on a malformed or tampered bundle."""
    report = ReplayReport()
    run = _Replay(Path(path), list(trusted_keys or []), report)
    try:
        run.run()
    except ReplayError as exc:
        report.add(run.check, False, exc.reason, exc.place)
    except (RefuteError, LookupError, ValueError, TypeError, AttributeError, ArithmeticError,
            RecursionError, OSError, EOFError, zipfile.BadZipFile, zlib.error,
            NotImplementedError, MemoryError, StopIteration, AssertionError) as exc:
        # The last resort: still a failed check, at the place the replay had reached.
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        report.add(run.check, False, f"malformed ({type(exc).__name__}: {text})", run.where,
                   residual=True)
    return report


# --- strict readers of untrusted values ---------------------------------------------------------


def _field(body: dict[str, Any], key: str, place: str) -> Any:
    if key not in body:
        raise ReplayError(f"missing field {key!r}", place)
    return body[key]


def _str(body: dict[str, Any], key: str, place: str) -> str:
    value = _field(body, key, place)
    if type(value) is not str:
        raise ReplayError(f"{key} must be a string, not {type(value).__name__}", f"{place}.{key}")
    return value


def _sha(body: dict[str, Any], key: str, place: str) -> str:
    value = _field(body, key, place)
    if type(value) is not str or not _SHA256.fullmatch(value):
        raise ReplayError(f"{key} must be 64 lowercase hex digits, not {_shorten(value)}",
                          f"{place}.{key}")
    return value


def _shorten(value: object) -> str:
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _at(event: Event) -> str:
    return f"transcript.json event {event.seq} ({event.kind})"


def _read(event: Event, exc: EventError) -> ReplayError:
    """The codec's refusal of an event's body, placed in the bundle."""
    place = f"{_at(event)} body"
    return ReplayError(exc.reason, f"{place}.{exc.field}" if exc.field else place)


# --- the replay ---------------------------------------------------------------------------------


class _Replay:
    """One replay: the checks in order, each reading only what earlier checks validated."""

    def __init__(self, path: Path, trusted_keys: list[str | bytes],
                 report: ReplayReport) -> None:
        self.path = path
        self.trusted_keys: list[bytes] = []
        for i, key in enumerate(trusted_keys, start=1):
            raw = parse_public_key(key)
            if raw is None:
                report.add("signature", False, "not a BLS12-381 public key (48 bytes, hex)",
                           f"trusted key {i} ({_shorten(key)})")
            else:
                self.trusted_keys.append(raw)
        self.report = report
        self.check = "bundle"
        """The check running (a residual exception is reported under it)."""
        self.where = str(path)
        """The place being read (a residual exception is reported there)."""
        self.members: dict[str, bytes] = {}
        self.dispute_id = ""
        self.events: list[Event] = []
        self.mine: list[Event] = []
        self.manifest: Manifest | None = None
        self.leaves: list[str] = []
        self.states: dict[int, list[np.ndarray]] = {}
        self._signed: list[Any] = []
        self.matching: dict[int, bool] = {}
        """Whether each included state hashes to its committed leaf."""

    def _stage(self, check: str, where: str) -> None:
        self.check, self.where = check, where

    def run(self) -> None:
        if not self._bundle():
            return
        doc = self._transcript()
        if doc is None:
            return
        self._signature(doc)
        if not self._manifest():
            return
        self._artifacts()
        self._leaves()
        self._moves()
        self._proofs()

    # bundle ------------------------------------------------------------------------------------

    def _bundle(self) -> bool:
        report = self.report
        self._stage("bundle", str(self.path))
        try:
            if self.path.stat().st_size > MAX_BUNDLE_BYTES:
                return report.add("bundle", False, f"more than {MAX_BUNDLE_BYTES} bytes",
                                  str(self.path))
            raw = self.path.read_bytes()
            archive = zipfile.ZipFile(io.BytesIO(raw))
        except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
            return report.add("bundle", False, f"not a readable ZIP archive: {exc}",
                              str(self.path))
        with archive:
            infos = archive.infolist()
            if len(infos) > MAX_MEMBERS:
                return report.add("bundle", False, f"{len(infos)} members, at most "
                                  f"{MAX_MEMBERS} accepted", str(self.path))
            for info in infos:
                name = info.filename
                self.where = name
                problem = self._member_problem(info)
                if problem is not None:
                    return report.add("bundle", False, problem, name)
                try:
                    data = archive.read(info)
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError,
                        NotImplementedError, RuntimeError) as exc:
                    return report.add("bundle", False, f"cannot be read: {exc}", name)
                if len(data) != info.file_size:
                    return report.add("bundle", False, "size differs from its header", name)
                self.members[name] = data
        missing = [m for m in _JSON_MEMBERS if m not in self.members]
        if missing:
            return report.add("bundle", False, "member missing", missing[0])
        self.where = str(self.path)
        canonical = archive_bytes(self.members)
        if canonical != raw:
            offset = next((i for i, (a, b) in enumerate(zip(canonical, raw, strict=False))
                           if a != b), min(len(canonical), len(raw)))
            report.add("bundle", False, "not the canonical encoding of its members (edited "
                       "headers, order, dates, comments or extra bytes)",
                       f"{self.path.name} byte {offset}")  # the members are still checked
        self.where = "dispute.json"
        head = _json(self.members["dispute.json"], "dispute.json")
        if not isinstance(head, dict) or set(head) != {"format", "dispute_id"}:
            return report.add("bundle", False, "must be an object with exactly 'format' and "
                              "'dispute_id'", "dispute.json")
        if head["format"] != FORMAT:
            old = (" (SHA-256 leaves replaced Poseidon leaves: bundles made before are not "
                   "replayed by this version)" if head["format"] == "refute.dispute/1" else "")
            return report.add("bundle", False, f"format {_shorten(head['format'])}, expected "
                              f"{FORMAT!r}{old}", "dispute.json format")
        dispute_id = head["dispute_id"]
        if type(dispute_id) is not str or not _DISPUTE_ID.fullmatch(dispute_id):
            return report.add("bundle", False, f"malformed dispute id {_shorten(dispute_id)}",
                              "dispute.json dispute_id")
        self.dispute_id = dispute_id
        return report.add("bundle", True, f"dispute {dispute_id}, {len(self.members)} members")

    def _member_problem(self, info: zipfile.ZipInfo) -> str | None:
        name = info.filename
        if name in self.members:
            return "member appears twice"
        if not (name in _JSON_MEMBERS or _STATE_MEMBER.fullmatch(name)
                or _ARTIFACT_MEMBER.fullmatch(name) or _SEGMENT_MEMBER.fullmatch(name)):
            return "unexpected member (not part of a refute.dispute/2 bundle)"
        if info.flag_bits & 0x1:
            return "encrypted member"
        if info.compress_type != zipfile.ZIP_STORED:
            return f"compressed member (type {info.compress_type}); bundles are stored"
        limit = MAX_JSON_BYTES if name in _JSON_MEMBERS else MAX_MEMBER_BYTES
        if info.file_size > limit:
            return f"{info.file_size} bytes, more than the {limit} accepted"
        return None

    # transcript and signature ------------------------------------------------------------------

    def _transcript(self) -> dict[str, Any] | None:
        report = self.report
        self._stage("transcript", "transcript.json")
        doc = _json(self.members["transcript.json"], "transcript.json")
        if not isinstance(doc, dict):
            report.add("transcript", False, "not a JSON object", "transcript.json")
            return None
        if _canonical(doc) != self.members["transcript.json"]:
            report.add("transcript", False, "not in canonical JSON form (as written)",
                       "transcript.json")
        self.report.signers = _listed_signers(doc)
        keys: list[str | bytes] = [*self.trusted_keys]
        if not keys:  # nothing trusted: check against the listed signers, to say who signed
            keys = list(self.report.signers) or [SigningKey(1).public_key]
        chain = check_bundle(doc, keys)
        broken = [c for c in chain.checks
                  if c.name in ("format", "chain", "length", "head") and not c.ok]
        if broken:
            first = broken[0]
            place = f"transcript.json event {first.seq}" if first.seq is not None \
                else f"transcript.json {first.name}"
            report.add("transcript", False, f"{first.name}: {first.detail}", place)
        else:
            report.add("transcript", True, f"{doc['length']} events linked, head {doc['head']}")
        self._signed = [c for c in chain.checks if c.name not in
                        ("format", "chain", "length", "head")]
        self.where = "transcript.json events"
        try:
            self.events = parse_events(doc.get("events"))
        except TranscriptError as exc:
            report.add("transcript", False, f"cannot read the events: {exc.reason}",
                       f"transcript.json event {exc.seq}" if exc.seq is not None
                       else "transcript.json")
            return None
        self.mine = [e for e in self.events if e.body.get("dispute_id") == self.dispute_id]
        return doc

    def _signature(self, doc: dict[str, Any]) -> None:
        report = self.report
        self._stage("signature", "transcript.json signatures")
        signers = ", ".join(report.signers) or "nobody"
        valid = all(c.ok for c in self._signed)
        if not self.trusted_keys:
            how = ("verifies over the head" if valid else "does not verify")
            report.add("signature", False,
                       f"signed by {signers} (the signature {how}), but no key is trusted: "
                       "replay never trusts a key the bundle names; if you trust this one, "
                       f"run again with --key {report.signers[0] if report.signers else 'KEY'}",
                       "transcript.json signatures")
            return
        if valid:
            report.trusted = True
            report.add("signature", True, f"head signed by trusted key(s) {signers}")
            return
        first = next(c for c in self._signed if not c.ok)
        report.add("signature", False, f"{first.name}: {first.detail} (signed by {signers})",
                   "transcript.json signatures")

    # manifest ----------------------------------------------------------------------------------

    def _manifest(self) -> bool:
        report = self.report
        self._stage("manifest", "transcript.json event 0")
        if not self.events or self.events[0].kind != "submission":
            return report.add("manifest", False, "the transcript does not start with the "
                              "result's submission event", "transcript.json event 0")
        submission = self.events[0]
        place = f"{_at(submission)} body"
        signed = _sha(submission.body, "manifest_sha256", place)
        raw = self.members["manifest.json"]
        actual = sha256_hex(raw)
        hash_ok = actual == signed
        self.where = "manifest.json"
        try:
            manifest = Manifest.from_json(_json(raw, "manifest.json"))
        except (RefuteError, ValueError, TypeError, LookupError, AttributeError,
                ArithmeticError) as exc:
            report.add("manifest", False, f"malformed: {exc}", "manifest.json")
            return False
        if hash_ok and manifest.sha256 != signed:
            hash_ok = False  # same bytes, but not in canonical form: not what was signed
        if not hash_ok:
            report.add("manifest", False, f"sha256 {actual} is not the manifest_sha256 {signed} "
                       "of the signed submission event (seq 0)", "manifest.json")
        else:
            report.add("manifest", True, f"sha256 {signed} as signed (model "
                       f"{manifest.model_sha256[:12]}…, {manifest.num_segments} segments)")
        self.manifest = manifest
        return True

    # artifacts ---------------------------------------------------------------------------------

    def _artifacts(self) -> None:
        report = self.report
        self._stage("artifacts", "transcript.json")
        manifest = self._calibrated()
        named: set[str] = set()
        problem: tuple[str, str] | None = None
        proofs = [e for e in self.mine if e.kind in PROOF_EVENTS]
        for event in proofs:
            place = f"{_at(event)} body"
            self.where = place
            digests = {f: _sha(event.body, f, place) for f in ARTIFACT_FIELDS}
            named |= set(digests.values())
            for key, digest in digests.items():
                member = f"artifacts/{digest}"
                if member not in self.members:
                    problem = problem or (f"missing: the artifact {key} of {_at(event)} names",
                                          member)
                elif sha256_hex(self.members[member]) != digest:
                    problem = problem or (f"hashes differently from the {key} signed in "
                                          f"{_at(event)}", member)
            if problem is None:
                problem = self._settings_problem(event, manifest, digests["settings_sha256"])
        extra = sorted(n for n in self.members if n.startswith("artifacts/")
                       and n.removeprefix("artifacts/") not in named)
        if problem is None and extra:
            problem = ("no proof event of this dispute names this artifact", extra[0])
        tiled = {_circuit_of(e)[2] for e in proofs if e.body.get("tile") is not None}
        graphs = sorted(n for n in self.members if (match := _SEGMENT_MEMBER.fullmatch(n))
                        and int(match.group(1)) not in tiled)
        if problem is None and graphs:
            problem = ("no tile proof of this dispute needs this segment graph", graphs[0])
        if problem is not None:
            report.add("artifacts", False, problem[0], problem[1])
        elif proofs:
            report.add("artifacts", True, f"{len(named)} artifacts (settings, vk, SRS) of "
                       f"{len(proofs)} proof(s) match their signed sha256")
        else:
            report.add("artifacts", True, "no proof in this dispute: no artifacts")

    def _settings_problem(self, event: Event, manifest: Manifest,
                          digest: str) -> tuple[str, str] | None:
        member = f"artifacts/{digest}"
        self.where = member
        settings = _json(self.members[member], member)
        kind, field_name, index = _circuit_of(event)
        for entry in manifest.circuits or ():
            if entry.get("kind") == kind and entry.get(field_name) == index:
                if event.body.get("tile") is not None:
                    model = self._tile_model(event, manifest, entry)
                    expected = _canonical(model.get("settings"))
                elif kind == "range" and (chunk := self._chunk(event, manifest)) is not None:
                    chunking, named = chunk
                    _graph, recorded = chunk_circuit(
                        entry, chunking.spec(manifest.states[index], named),
                        opset=manifest.opset)
                    expected = _canonical(recorded)
                else:
                    expected = _canonical(entry.get("settings"))
                if expected is not None and expected == _canonical(settings):
                    return None
                return (f"settings differ from the manifest's {kind} circuit {index}", member)
        return (f"the manifest has no {kind} circuit {index}", "manifest.json circuits")

    def _tiled(self, event: Event, manifest: Manifest) -> tuple[Segment, Tiling, Tile]:
        """The segment a tile proof event proves (its graph from the bundle, authenticated by
        the manifest's segment hash), its tiling as the manifest records it, and the tile the
        event names."""
        place = f"{_at(event)} body"
        _kind, _field, index = _circuit_of(event)
        member = f"segments/{index}.onnx"
        data = self.members.get(member)
        if data is None:
            raise ReplayError("missing: a tile's proof needs its segment's graph", member)
        if not 1 <= index <= manifest.num_segments:
            raise ReplayError(f"names step {index}, outside the manifest", f"{place}.step")
        entry = manifest.segments[index - 1]
        if sha256_hex(data) != entry.sha256:
            raise ReplayError(f"hashes differently from segment {index} of the manifest",
                              member)
        try:
            outputs = tuple(o.name for o in onnx.load_model_from_string(data).graph.output)
            segment = Segment(index=index, start=entry.start, end=entry.end,
                              inputs=manifest.states[index - 1],
                              outputs=manifest.states[index], op_types=entry.ops,
                              onnx_bytes=data, graph_outputs=outputs)
            tiling = segment_tiling(manifest.circuits, segment)
        except Exception as exc:  # an authenticated graph the tiler refuses: report, go on
            raise ReplayError(f"the segment's tiling does not rebuild: {exc}"[:200],
                              member) from exc
        tile = event.body.get("tile")
        if tiling is None or type(tile) is not int or not 0 <= tile < len(tiling.tiles):
            raise ReplayError(f"names no tile of tiled segment {index}", f"{place}.tile")
        return segment, tiling, tiling.tiles[tile]

    def _tile_model(self, event: Event, manifest: Manifest,
                    entry: Any) -> dict[str, Any]:
        """The manifest's record of the tile model a tile proof event proves (by the sha256
        of the tile's adjudication graph)."""
        segment, tiling, tile = self._tiled(event, manifest)
        graph = adjudication_bytes(tile_segment(segment, tiling, tile))
        digest = hashlib.sha256(graph).hexdigest()
        for model in (entry.get("tiling") or {}).get("models", []):
            if isinstance(model, dict) and model.get("sha256") == digest:
                return model
        raise ReplayError(f"the manifest records no circuit for tile {tile.index}'s model",
                          "manifest.json circuits")

    def _chunk(self, event: Event, manifest: Manifest) -> tuple[Chunking, int] | None:
        """The chunking of the state a range proof event proves, as the manifest records it,
        and the chunk the event names (``None``: the state is proven whole)."""
        _kind, _field_name, k = _circuit_of(event)
        try:
            chunking = range_chunking(manifest.circuits, k, manifest.states[k])
        except BundleError as exc:
            raise ReplayError(exc.reason, "manifest.json circuits") from exc
        chunk = event.body.get("chunk")
        if chunking is None and chunk is None:
            return None
        if chunking is None or type(chunk) is not int or not 0 <= chunk < chunking.total:
            whole = "is proven whole: names no chunk" if chunking is None else (
                f"is proven on chunks: must name one of 0..{chunking.total - 1}")
            raise ReplayError(f"the range of state {k} {whole}", f"{_at(event)} body.chunk")
        return chunking, chunk

    def _calibrated(self) -> Manifest:
        manifest = self.manifest
        assert manifest is not None
        if manifest.tolerances is None or manifest.range is None or manifest.circuits is None:
            raise ReplayError("the manifest is not calibrated (no τ, range or circuits)",
                              "manifest.json")
        if len(manifest.tolerances) != manifest.num_segments:
            raise ReplayError("one τ per segment is needed", "manifest.json tolerances")
        return manifest

    # leaves and states -------------------------------------------------------------------------

    def _leaves(self) -> None:
        report = self.report
        self._stage("leaves", "transcript.json event 0 body.leaves")
        manifest = self.manifest
        assert manifest is not None
        body = self.events[0].body
        place = "transcript.json event 0 (submission) body"
        leaves = _field(body, "leaves", place)
        if type(leaves) is not list or len(leaves) != len(manifest.states) or not all(
                type(x) is str and _LEAF.fullmatch(x) for x in leaves):
            raise ReplayError(f"must be {len(manifest.states)} leaves, each 0x + 64 lowercase "
                              "hex digits", f"{place}.leaves")
        self.leaves = leaves
        root = _str(body, "trace_root", place)
        if root != "0x" + merkle_root([bytes.fromhex(x[2:]) for x in leaves]).hex():
            report.add("leaves", False, "the leaves do not rebuild the signed trace root",
                       f"{place}.trace_root")
            return
        needed = self._needed_states()
        wanted = {f"states/{k}/{j}.f32" for k in needed
                  for j in range(len(manifest.states[k]))}
        present = {n for n in self.members if n.startswith("states/")}
        if present - wanted:
            report.add("leaves", False, "a state the dispute does not need (or with more "
                       "tensors than the manifest's)", sorted(present - wanted)[0])
            return
        if wanted - present:
            report.add("leaves", False, "missing: the dispute revealed or proved on this state",
                       sorted(wanted - present)[0])
            return
        for k in sorted(needed):
            tensors = []
            for j, spec in enumerate(manifest.states[k]):
                member = f"states/{k}/{j}.f32"
                self.where = member
                raw = self.members[member]
                size = prod(spec.shape)
                if len(raw) != 4 * size:
                    report.add("leaves", False, f"{len(raw)} bytes, but shape {spec.shape} "
                               f"needs {4 * size}", member)
                    return
                tensors.append(np.frombuffer(raw, dtype="<f4").reshape(spec.shape))
            self.states[k] = tensors
        problems: list[tuple[str, str]] = []
        for k, tensors in sorted(self.states.items()):
            self.where = f"states/{k}"
            try:
                leaf = "0x" + leaf_of_state(manifest, k, tensors).hex()
            except RefuteError as exc:
                problems.append((f"cannot be hashed: {exc.reason}", f"states/{k}"))
                continue
            self.matching[k] = leaf == leaves[k]
            if leaf != leaves[k]:
                problems.append((f"state {k} does not hash to its committed leaf", f"states/{k}"))
        if problems:
            report.add("leaves", False, *problems[0])
            return
        report.add("leaves", True, f"{len(leaves)} leaves rebuild the signed root; states "
                   f"{sorted(self.states)} match their leaves")

    def _needed_states(self) -> set[int]:
        n = len(self.leaves) - 1
        needed: set[int] = set()
        for event in self.mine:
            try:
                needed |= states_of(event.kind, event.body, n)
            except EventError as exc:
                raise _read(event, exc) from exc
        return needed

    # moves -------------------------------------------------------------------------------------

    def _moves(self) -> None:
        report = self.report
        self._stage("moves", "transcript.json")
        mine = self.mine
        opened = [e for e in mine if e.kind == "challenge"]
        if len(opened) != 1 or mine[0] is not opened[0]:
            report.add("moves", False, f"dispute {self.dispute_id} must start with exactly one "
                       "challenge event", "transcript.json")
            return
        verdicts = [e for e in mine if e.kind == "verdict"]
        if len(verdicts) != 1 or mine[-1] is not verdicts[0]:
            report.add("moves", False, "the dispute must end with exactly one verdict event",
                       _at(mine[-1]))
            return
        state: DisputeState | None = None
        for event in mine[:-1]:
            self.where = _at(event)
            if event.kind not in DISPUTE_KINDS:
                report.add("moves", False, f"unknown event kind {event.kind!r} in a dispute",
                           _at(event))
                return
            decoded = self._move_of(event)
            if isinstance(decoded.move, Close) and not self._convicted_before(event,
                                                                              decoded.move.by):
                report.add("moves", False, f"closed by dispute {_shorten(decoded.move.by)}, "
                           "which had not convicted the provider before it", f"{_at(event)} "
                           "body.by")
                return
            try:
                state, _effects = apply(state, decoded.move)
            except RefuteError as exc:
                report.add("moves", False, f"illegal move: {exc.reason}", _at(event))
                return
            if decoded.phase is not None and decoded.phase is not state.phase:
                report.add("moves", False, f"recorded phase differs from the replayed "
                           f"{state.phase.value}", f"{_at(event)} body.phase")
                return
        verdict = verdicts[0]
        place = f"{_at(verdict)} body"
        recorded = _str(verdict.body, "verdict", place)
        reached = verdict_name(state.verdict) if state is not None and state.verdict else None
        if recorded != reached:
            report.add("moves", False, f"records {_shorten(recorded)}, but the moves replay "
                       f"to {reached}", f"{place}.verdict")
            return
        assert state is not None
        report.add("moves", True, f"{len(mine) - 1} moves, {state.rounds} rounds replayed to "
                   f"{reached} (as recorded)")

    def _convicted_before(self, event: Event, by: str) -> bool:
        """Whether dispute ``by`` of the same result ended with the provider at fault before
        ``event`` (a Close is legal only then: DESIGN.md, a conviction closes the others)."""
        for earlier in self.events[:self.events.index(event)]:
            if earlier.kind == "verdict" and earlier.body.get("dispute_id") == by:
                try:
                    verdict = decode_verdict(earlier.body)
                except EventError:
                    return False
                return verdict.at_fault() is Actor.PROVIDER
        return False

    def _move_of(self, event: Event) -> Decoded:
        """The move ``event`` records, read by the codec the orchestrator wrote it with."""
        try:
            return decode(event.kind, event.body, at=event.at, n=len(self.leaves) - 1,
                          facts=self._facts)
        except EventError as exc:
            raise _read(event, exc) from exc

    def _facts(self, k: int) -> RevealFacts:
        """What the bundle shows of revealed state ``k``: whether it matched its leaf (hashed
        by the leaves check) and whether it is within range."""
        manifest = self.manifest
        assert manifest is not None
        in_range = k in self.states and within_range(self.states[k], manifest.range)
        return RevealFacts(matches_leaf=self.matching.get(k, False), in_range=in_range)

    # proofs ------------------------------------------------------------------------------------

    def _proofs(self) -> None:
        report = self.report
        self._stage("proof", "transcript.json")
        proofs = [e for e in self.mine if e.kind in PROOF_EVENTS]
        if not proofs:
            report.add("proof", True, "no proof in this dispute (decided without one)")
            return
        untrusted = [n for n in ("bundle", "transcript", "signature", "manifest", "artifacts")
                     if not report.passed(n)]
        if untrusted:
            report.add("proof", False, f"not verified: the {untrusted[0]} check failed, and "
                       "EZKL only runs on artifacts authenticated by a trusted signature",
                       _at(proofs[0]))
            return
        for event in proofs:
            self._proof(event)

    def _proof(self, event: Event) -> None:
        from prover.offline import materialize_files
        from prover.step import split_instances, verify_proof_file

        report = self.report
        manifest = self._calibrated()
        place = f"{_at(event)} body"
        kind, _field_name, index = _circuit_of(event)
        what = f"step {index}" if kind == "step" else f"range of state {index}"
        self._stage("proof", f"{place}.proof")
        proof = _field(event.body, "proof", place)
        if type(proof) is not dict:
            raise ReplayError("the proof must be a JSON object", f"{place}.proof")
        files = {f: self.members[f"artifacts/{_sha(event.body, f, place)}"]
                 for f in ARTIFACT_FIELDS}
        with tempfile.TemporaryDirectory(prefix="refute-replay-") as tmp:
            circuit = materialize_files(Path(tmp), files["settings_sha256"], files["vk_sha256"],
                                        files["srs_sha256"], manifest.scale)
            valid = verify_proof_file(circuit, proof)
        if not report.add("proof", valid, f"EZKL verifies the proof of the {what} with the "
                          "signed vk and SRS" if valid else "the proof does not verify",
                          f"{place}.proof"):
            return
        self._stage("binding", f"{place}.proof.instances")
        n_inputs = len(manifest.states[index - 1] if kind == "step" else manifest.states[index])
        try:
            x, y, raw = split_instances(proof, n_inputs)
        except RefuteError as exc:
            raise ReplayError(exc.reason, f"{place}.proof.instances") from exc
        cut = None
        if event.body.get("tile") is not None:
            _segment, tiling, tile = self._tiled(event, manifest)
            cut = (tiling, tile)
        chunk = self._chunk(event, manifest) if kind == "range" else None
        indices = [index - 1, index] if kind == "step" else [index]
        if any(k not in self.states for k in indices):
            raise ReplayError(f"the bundle lacks state(s) {indices} the proof was made on",
                              f"{place}.proof")
        try:
            check_binding(scale=manifest.scale, specs=manifest.states, indices=indices,
                          states=[self.states[k] for k in indices],
                          leaves=[bytes.fromhex(leaf[2:]) for leaf in self.leaves],
                          instances=x + y, tile=cut, chunk=chunk)
            sliced = (f"tile {cut[1].index}'s slices of " if cut is not None
                      else f"chunk {chunk[1]} (holding its largest |v|) of " if chunk is not None
                      else "")
            ok, detail = True, (f"instances are Poseidon of {sliced}states {indices}, which "
                                "match their leaves")
        except BindingError as exc:
            ok, detail = False, exc.reason
        if not report.add("binding", ok, detail, f"{place}.proof.instances"):
            return
        self._stage("verdict", place)
        try:
            outcome = outcome_move(kind, event.body, at=event.at)
        except EventError as exc:
            raise _read(event, exc) from exc
        assert manifest.tolerances is not None and manifest.range is not None
        try:
            units = proven_units(raw, output_scale=circuit.output_scale, scale=manifest.scale)
            if isinstance(outcome, ProofOutcome):
                self._step_verdict(event, outcome, units, manifest.tolerances[index - 1])
            else:
                self._range_verdict(event, outcome, units,
                                    range_bound_units(manifest.range, manifest.scale))
        except VerdictError as exc:
            report.add("verdict", False, exc.reason, f"{place}.proof")

    def _step_verdict(self, event: Event, outcome: ProofOutcome, units: Fraction,
                      tau: int) -> None:
        """The step proof's recorded numbers are the proven ones, and so is the verdict."""
        place = f"{_at(event)} body"
        if units != outcome.maxdiff_units or outcome.tolerance != tau:
            self.report.add("verdict", False, f"records maxdiff {outcome.maxdiff_units} and τ "
                            f"{outcome.tolerance}, the proof and manifest say {units} and {tau}",
                            place)
            return
        rule = step_verdict(units, tau).value
        verdict = next((e for e in self.mine if e.kind == "verdict"), None)
        recorded = verdict.body.get("verdict") if verdict is not None else None
        self.report.add("verdict", recorded == rule,
                        f"maxdiff {float(units):.4g} vs τ={tau} → {rule}" if recorded == rule
                        else f"maxdiff {float(units):.4g} vs τ={tau} → {rule}, but the "
                        f"transcript records {_shorten(recorded)}",
                        f"{_at(verdict)} body.verdict" if verdict is not None
                        else "transcript.json (no verdict event)")

    def _range_verdict(self, event: Event, outcome: RangeOutcome, units: Fraction,
                       bound: int) -> None:
        """The range proof's recorded numbers are the proven ones (the game, replayed by the
        moves check, drew the consequence)."""
        if units != outcome.max_abs_units or outcome.bound != bound:
            self.report.add("verdict", False, f"records max |v| {outcome.max_abs_units} and R "
                            f"{outcome.bound}, the proof and manifest say {units} and {bound}",
                            f"{_at(event)} body")
            return
        rule = "PROVIDER_FAULT" if range_fault(units, bound) else "the bisection continues"
        self.report.add("verdict", True, f"max |v| {float(units):.4g} vs R={bound} → {rule}")


def _circuit_of(event: Event) -> tuple[str, str, int]:
    """(manifest circuit kind, its index field, index) of a proof event (fields validated)."""
    try:
        target = proof_target(event.kind, event.body)
    except EventError as exc:
        raise _read(event, exc) from exc
    if target is None:  # pragma: no cover - only called on proof events
        raise ReplayError("not a proof event", _at(event))
    kind, index = target
    return kind, "segment" if kind == "step" else "state", index


def _canonical(value: Any) -> bytes | None:
    """Canonical JSON of a decoded value, or ``None`` if it has none (a lone surrogate)."""
    try:
        return canonical_json(value)
    except (ValueError, TypeError, RecursionError):
        return None


def _json(data: bytes, member: str) -> Any:
    try:
        return safejson.loads(data, what=member)
    except RefuteError as exc:
        raise ReplayError(exc.reason, member) from exc


def _listed_signers(doc: dict[str, Any]) -> list[str]:
    entries = doc.get("signatures")
    out: list[str] = []
    for entry in entries[:64] if isinstance(entries, list) else []:
        key = entry.get("public_key") if isinstance(entry, dict) else None
        if isinstance(key, str) and parse_public_key(key) is not None:
            out.append(key)
    return out[:16]
