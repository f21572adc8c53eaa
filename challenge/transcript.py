"""The append-only, hash-chained dispute transcript and its BLS-signed head.

DESIGN.md, "Transcript and replay": every event of a dispute (submission, spot-check, challenge,
reveal, answer, timeout, proof, verdict, bond, ...) is appended with the hash of the previous one,
and the head is signed with BLS12-381 keys so that several independent verifier nodes can co-sign
and an auditor checks one aggregate signature.

Event hash (format ``refute.transcript/1``)
-------------------------------------------
An event is ``(seq, kind, at, body, prev)``. Its hash is::

    keccak256(b"refute.transcript/1\\x00" + canonical_json({
        "at": at, "body": body, "kind": kind, "prev": prev, "seq": seq,
    }))

* ``keccak256`` is the original Keccak-256 (Ethereum's, :func:`refute.merkle.keccak256`), not
  NIST SHA3-256. The domain tag is the 19 ASCII bytes
  ``refute.transcript/1`` followed by one zero byte (20 bytes).
* ``canonical_json`` is :func:`refute.manifest.canonical_json`: keys sorted, separators ``,``
  and ``:`` without spaces, UTF-8 without ``\\u`` escapes for non-ASCII characters. The
  preimage therefore reads ``{"at":...,"body":{...},"kind":"...","prev":"0x...","seq":N}``.
* ``seq`` is a JSON integer (0, 1, 2, ...); ``kind`` matches ``^[a-z_]{1,32}$``; ``at`` is unix
  seconds, always encoded as a JSON *float* with Python's shortest round-trip ``repr``
  (``1700000000.0``, ``1700000000.25``, ``1e+16``); ``body`` is a JSON object.
* ``prev`` is the previous event's hash as ``"0x"`` + 64 lowercase hex digits; for ``seq`` 0 it
  is the zero hash ``"0x" + "00" * 32``. Event hashes and the head use the same spelling.

Head signature
--------------
The head is the hash of the last event (the zero hash for an empty transcript). Co-signers sign,
with ``py_ecc.bls.G2ProofOfPossession`` (BLS12-381, public keys in G1 as 48 compressed bytes,
signatures in G2 as 96 bytes, the ciphersuite of Ethereum's consensus layer), the message::

    b"refute.head/1" + head (32 raw bytes) + len(events).to_bytes(8, "big")

(13 + 32 + 8 = 53 bytes; hashed to G2 by the ciphersuite with the DST
``BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_``).
Binding the length as well as the head means a signature over a head cannot be replayed for a
different claimed length, and a truncated transcript cannot reuse it. Signatures over the same
message aggregate into one, checked with FastAggregateVerify against the signers' public keys.

Rogue-key attacks and proofs of possession
------------------------------------------
FastAggregateVerify checks the aggregate signature against the *sum* of the public keys. A node
that is allowed to pick its key after seeing the others' can publish ``pk_evil = x*G1 - pk_a -
pk_b`` (for which it knows no secret key): the sum is ``x*G1``, so it alone can produce a
"signature by a, b and evil" on any message. A proof of possession (:func:`pop_prove`, a
signature over the key itself under a separate domain tag) can only be made by someone who knows
the secret key, so such keys fail :func:`pop_verify`. **Admit a co-signer's public key to a
trusted set only after** :func:`pop_verify` **accepts its proof;** the verification functions here
assume the keys they are given were admitted that way.

Bundle (``to_json``)
--------------------
``{"format": "refute.transcript/1", "events": [...], "head": "0x..", "length": N,
"signatures": [{"public_key": "0x..", "signature": "0x.."}], "aggregate_signature": "0x.."|null}``
where each event is ``{"seq", "kind", "at", "body", "prev", "hash"}``.
:meth:`Transcript.from_json` loads it strictly (raising :class:`TranscriptError`);
:func:`check_bundle` checks it against trusted keys and reports every check without raising.
"""

from __future__ import annotations

import copy
import json
import math
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from eth_typing import BLSPubkey, BLSSignature
from eth_utils.exceptions import ValidationError
from py_ecc.bls.ciphersuites import G2ProofOfPossession as _Bls
from py_ecc.bls.g2_primitives import signature_to_G2
from py_ecc.optimized_bls12_381.optimized_curve import curve_order

from refute.errors import RefuteError
from refute.manifest import canonical_json
from refute.merkle import keccak256

FORMAT = "refute.transcript/1"
#: Prefix of every event-hash preimage (the format name and a zero byte).
HASH_DOMAIN = b"refute.transcript/1\x00"
#: Prefix of every signed head message.
HEAD_DOMAIN = b"refute.head/1"
#: The ``prev`` of event 0 and the head of an empty transcript.
ZERO_HASH = "0x" + "00" * 32
KIND_PATTERN = re.compile(r"[a-z_]{1,32}")
#: Limits on a body, so a hostile bundle cannot exhaust the stack or memory.
MAX_BODY_DEPTH = 64
MAX_BODY_BYTES = 1 << 20
#: Integers in a body must be smaller than this in magnitude (uint256 fits).
MAX_BODY_INT = 1 << 256
#: At most this many individual signatures are re-verified to name a bad signer.
MAX_SIGNER_DIAGNOSTICS = 16

PUBLIC_KEY_BYTES = 48
SIGNATURE_BYTES = 96
HASH_BYTES = 32

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 4


def _short(value: object) -> str:
    """A bounded ``repr`` of untrusted input for error messages (safe on deep nesting)."""
    return _REPR.repr(value)


_EVENT_FIELDS = frozenset({"seq", "kind", "at", "body", "prev", "hash"})
_HEX_RE = re.compile(r"0x[0-9a-f]*")


class TranscriptError(RefuteError):
    """A transcript, an event or a bundle is malformed or its hash chain is broken.

    ``seq`` names the first event at fault (its position in the chain, i.e. the seq it should
    have) or is ``None`` when the fault is not tied to one event; ``check`` says what broke:
    ``event`` (not an object, missing or unknown fields), ``seq`` (gap, duplicate or reorder),
    ``kind``, ``at``, ``body`` (malformed), ``time`` (``at`` going backwards), ``prev`` (broken
    link), ``hash`` (stored hash differs from the recomputed one), ``length``, ``head``,
    ``format``, ``signature`` or ``input``.
    """

    code = "transcript_error"

    def __init__(self, reason: str, *, seq: int | None = None, check: str = "input") -> None:
        super().__init__(reason)
        self.seq = seq
        self.check = check


# --- hashing -----------------------------------------------------------------------------------


def _to_hex(raw: bytes) -> str:
    return "0x" + raw.hex()


def event_preimage(seq: int, kind: str, at: float, body: Mapping[str, Any], prev: str) -> bytes:
    """The exact bytes hashed for an event (see the module docstring)."""
    doc = {"seq": seq, "kind": kind, "at": float(at), "body": body, "prev": prev}
    return HASH_DOMAIN + canonical_json(doc)


def event_hash(seq: int, kind: str, at: float, body: Mapping[str, Any], prev: str) -> str:
    """An event's hash as ``"0x"`` + 64 lowercase hex digits."""
    return _to_hex(keccak256(event_preimage(seq, kind, at, body, prev)))


# --- validation --------------------------------------------------------------------------------


def _clean_json(value: object, path: str, depth: int) -> JSONValue:
    """A validated deep copy of a JSON value; raises ``ValueError`` naming the bad path."""
    if depth > MAX_BODY_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_BODY_DEPTH}")
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        if abs(value) >= MAX_BODY_INT:
            raise ValueError(f"{path}: integer too large (|n| must be < 2**256)")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value!r} is not a JSON number")
        return value
    if type(value) is str:
        _check_utf8(value, path)
        return value
    if type(value) is list:
        return [_clean_json(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if type(value) is dict:
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise ValueError(f"{path}: key {_short(key)} is not a string")
            _check_utf8(key, path)
            out[key] = _clean_json(item, f"{path}.{key}", depth + 1)
        return out
    raise ValueError(f"{path}: {type(value).__name__} is not a JSON value")


def _check_utf8(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{path}: string is not valid UTF-8 (lone surrogate)") from exc


def _clean_body(body: object, seq: int) -> dict[str, JSONValue]:
    if type(body) is not dict:
        raise TranscriptError(
            f"event {seq}: body must be a JSON object, not {type(body).__name__}",
            seq=seq,
            check="body",
        )
    try:
        cleaned = _clean_json(body, "body", 0)
        size = len(canonical_json(cleaned))
    except (ValueError, RecursionError) as exc:
        raise TranscriptError(f"event {seq}: malformed body: {exc}", seq=seq, check="body") from exc
    if size > MAX_BODY_BYTES:
        raise TranscriptError(
            f"event {seq}: body is {size} bytes, more than {MAX_BODY_BYTES}", seq=seq, check="body"
        )
    assert isinstance(cleaned, dict)
    return cleaned


def _clean_kind(kind: object, seq: int) -> str:
    if type(kind) is not str or not KIND_PATTERN.fullmatch(kind):
        raise TranscriptError(
            f"event {seq}: kind {_short(kind)} does not match ^[a-z_]{{1,32}}$",
            seq=seq,
            check="kind",
        )
    return kind


def _clean_at(at: object, seq: int) -> float:
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise TranscriptError(
            f"event {seq}: at must be a number of unix seconds, not {type(at).__name__}",
            seq=seq,
            check="at",
        )
    try:
        value = float(at)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < 0:
        raise TranscriptError(
            f"event {seq}: at {_short(at)} is not a finite, non-negative time", seq=seq, check="at"
        )
    return value


def _parse_hex(value: object, size: int) -> bytes | None:
    """Bytes from a strict ``"0x"`` + lowercase hex string of ``size`` bytes, else ``None``."""
    if type(value) is not str or len(value) != 2 + 2 * size or not _HEX_RE.fullmatch(value):
        return None
    return bytes.fromhex(value[2:])


def _coerce_bytes(value: object, size: int, what: str) -> bytes:
    """Caller-supplied bytes or hex (with or without ``0x``) of exactly ``size`` bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = bytes.fromhex(value.removeprefix("0x"))
        except ValueError as exc:
            raise TranscriptError(f"{what} is not hex") from exc
    else:
        raise TranscriptError(f"{what} must be bytes or hex, not {type(value).__name__}")
    if len(raw) != size:
        raise TranscriptError(f"{what} must be {size} bytes, not {len(raw)}")
    return raw


# --- events and the chain ----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One transcript entry; ``hash`` is the stored hash (recomputed by :meth:`compute_hash`).

    The dataclass is frozen but ``body`` is a plain dict: mutating it in place is detected by
    :meth:`Transcript.verify_chain` as a hash mismatch, like any other tampering.
    """

    seq: int
    kind: str
    at: float
    body: dict[str, JSONValue]
    prev: str
    hash: str

    def preimage(self) -> bytes:
        """The exact bytes whose Keccak-256 is this event's hash."""
        return event_preimage(self.seq, self.kind, self.at, self.body, self.prev)

    def compute_hash(self) -> str:
        """The hash recomputed from the fields (``0x`` + hex)."""
        return _to_hex(keccak256(self.preimage()))

    def to_json(self) -> dict[str, Any]:
        """The event's JSON form (a deep copy of the body)."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "at": self.at,
            "body": copy.deepcopy(self.body),
            "prev": self.prev,
            "hash": self.hash,
        }


def _parse_event(obj: object, index: int) -> Event:
    """Validate one event (an :class:`Event` or its JSON form) in isolation, without links."""
    if isinstance(obj, Event):
        fields: Mapping[str, object] = {
            "seq": obj.seq,
            "kind": obj.kind,
            "at": obj.at,
            "body": obj.body,
            "prev": obj.prev,
            "hash": obj.hash,
        }
    elif isinstance(obj, dict):
        keys = set(obj)
        if keys != _EVENT_FIELDS:
            missing = sorted(_EVENT_FIELDS - keys)
            extra = sorted(_short(k) for k in keys - _EVENT_FIELDS)[:5]
            raise TranscriptError(
                f"event {index}: missing fields {missing}, unknown fields {extra}",
                seq=index,
                check="event",
            )
        fields = obj
    else:
        raise TranscriptError(
            f"event {index}: not a JSON object ({type(obj).__name__})", seq=index, check="event"
        )
    seq = fields["seq"]
    if type(seq) is not int:
        raise TranscriptError(
            f"event {index}: seq must be an integer, not {type(seq).__name__}",
            seq=index,
            check="event",
        )
    kind = _clean_kind(fields["kind"], index)
    at = _clean_at(fields["at"], index)
    body = _clean_body(fields["body"], index)
    prev, stored = fields["prev"], fields["hash"]
    if not isinstance(prev, str) or _parse_hex(prev, HASH_BYTES) is None:
        raise TranscriptError(
            f"event {index}: prev {_short(prev)} is not 0x + 64 lowercase hex digits",
            seq=index,
            check="prev",
        )
    if not isinstance(stored, str) or _parse_hex(stored, HASH_BYTES) is None:
        raise TranscriptError(
            f"event {index}: hash {_short(stored)} is not 0x + 64 lowercase hex digits",
            seq=index,
            check="hash",
        )
    return Event(seq=seq, kind=kind, at=at, body=body, prev=prev, hash=stored)


def _verify_events(objs: Sequence[object]) -> list[Event]:
    """Parse and check a whole chain in order; raise :class:`TranscriptError` at the first break.

    Per event, in this order: structure and field types, ``seq`` equal to the position, ``kind``,
    ``at``, ``body``, the ``prev`` link, ``at`` not before the previous event's, and the stored
    hash against the recomputed one.
    """
    events: list[Event] = []
    expected_prev = ZERO_HASH
    last_at = 0.0
    for index, obj in enumerate(objs):
        if isinstance(obj, dict | Event):
            raw_seq = obj.get("seq") if isinstance(obj, dict) else obj.seq
            if type(raw_seq) is int and raw_seq != index:
                what = "events missing before it" if raw_seq > index else "duplicate or reordered"
                raise TranscriptError(
                    f"event {index}: seq is {raw_seq}, expected {index} ({what})",
                    seq=index,
                    check="seq",
                )
        event = _parse_event(obj, index)
        if event.prev != expected_prev:
            raise TranscriptError(
                f"event {index}: prev {event.prev} does not link to the hash of event "
                f"{index - 1} ({expected_prev})"
                if index
                else f"event 0: prev {event.prev} is not the zero hash",
                seq=index,
                check="prev",
            )
        if index and event.at < last_at:
            raise TranscriptError(
                f"event {index}: at {event.at!r} is before event {index - 1}'s {last_at!r} "
                "(time going backwards)",
                seq=index,
                check="time",
            )
        computed = event.compute_hash()
        if event.hash != computed:
            raise TranscriptError(
                f"event {index}: stored hash {event.hash} differs from the recomputed {computed} "
                "(the event was altered)",
                seq=index,
                check="hash",
            )
        events.append(event)
        expected_prev = computed
        last_at = event.at
    return events


def parse_events(objs: object) -> list[Event]:
    """Each event of an untrusted ``events`` list, validated on its own (fields, types, body
    limits), without checking the links between them (:func:`check_bundle` does that).

    Raises :class:`TranscriptError` naming the first malformed event.
    """
    if type(objs) is not list:
        raise TranscriptError("events must be a list", check="event")
    return [_parse_event(obj, index) for index, obj in enumerate(objs)]


def parse_public_key(value: object) -> bytes | None:
    """A BLS12-381 G1 public key from bytes or hex (with or without ``0x``), or ``None`` if
    ``value`` is not a valid one (never raises)."""
    if isinstance(value, str):
        value = value.strip().lower()
    try:
        raw = _coerce_bytes(value, PUBLIC_KEY_BYTES, "public key")
    except TranscriptError:
        return None
    return raw if _valid_public_key(raw) else None


# --- signing keys and head signatures ----------------------------------------------------------


class SigningKey:
    """A BLS12-381 secret key for co-signing transcript heads (never printed)."""

    __slots__ = ("_public_key", "_secret")

    def __init__(self, secret: int) -> None:
        """Wrap a secret scalar; use :meth:`generate` to derive one from a seed."""
        if type(secret) is not int or not 0 < secret < curve_order:
            raise TranscriptError("a BLS secret key must be in [1, r)")
        self._secret = secret
        self._public_key = bytes(_Bls.SkToPk(secret))

    @classmethod
    def generate(cls, seed: bytes) -> SigningKey:
        """KeyGen (IETF BLS draft, as in py-ecc) from at least 32 bytes of secret seed."""
        if not isinstance(seed, bytes | bytearray) or len(seed) < 32:
            raise TranscriptError("a BLS key seed must be at least 32 bytes")
        return cls(_Bls.KeyGen(bytes(seed)))

    @property
    def public_key(self) -> bytes:
        """The 48-byte compressed G1 public key."""
        return self._public_key

    def sign(self, message: bytes) -> bytes:
        """A 96-byte signature over ``message`` (G2ProofOfPossession ciphersuite)."""
        return bytes(_Bls.Sign(self._secret, message))

    def __repr__(self) -> str:
        return f"SigningKey(public_key=0x{self._public_key.hex()})"


def head_message(head: bytes | str, length: int) -> bytes:
    """``b"refute.head/1" + head (32 bytes) + length as 8 bytes big-endian``."""
    raw = _coerce_bytes(head, HASH_BYTES, "head")
    if type(length) is not int or not 0 <= length < 1 << 64:
        raise TranscriptError("length must be an integer in [0, 2**64)")
    return HEAD_DOMAIN + raw + length.to_bytes(8, "big")


def sign_head(transcript: Transcript, key: SigningKey) -> bytes:
    """``key``'s 96-byte signature over the transcript's current head and length."""
    return key.sign(head_message(transcript.head, len(transcript)))


def aggregate(signatures: Sequence[bytes]) -> bytes:
    """Aggregate signatures (over the same head) into one 96-byte signature."""
    if not signatures:
        raise TranscriptError("nothing to aggregate: no signatures")
    try:
        sigs = [BLSSignature(_coerce_bytes(s, SIGNATURE_BYTES, "signature")) for s in signatures]
        return bytes(_Bls.Aggregate(sigs))
    except (ValidationError, ValueError, AssertionError) as exc:
        raise TranscriptError(f"cannot aggregate: not a valid signature ({exc})") from exc


def verify_head(
    head: bytes | str,
    length: int,
    public_keys: Sequence[bytes | str],
    aggregate_signature: bytes | str,
) -> bool:
    """Whether ``aggregate_signature`` is every key's signature over (head, length).

    FastAggregateVerify: one pairing check against the sum of the keys. The keys must be
    distinct and should have been admitted with :func:`pop_verify` (see the module docstring).
    Returns ``False`` for any malformed input rather than raising.
    """
    try:
        message = head_message(head, length)
        keys = [BLSPubkey(_coerce_bytes(k, PUBLIC_KEY_BYTES, "public key")) for k in public_keys]
        signature = BLSSignature(_coerce_bytes(aggregate_signature, SIGNATURE_BYTES, "signature"))
    except TranscriptError:
        return False
    if not keys or len(set(keys)) != len(keys):
        return False
    try:
        return bool(_Bls.FastAggregateVerify(keys, message, signature))
    except (ValidationError, ValueError, AssertionError):
        return False


def pop_prove(key: SigningKey) -> bytes:
    """A proof of possession of ``key``: its signature over its own public key (POP tag)."""
    return bytes(_Bls.PopProve(key._secret))


def pop_verify(public_key: bytes | str, proof: bytes | str) -> bool:
    """Whether ``proof`` proves possession of the secret key behind ``public_key``.

    Check this before admitting a co-signer's key: it defeats rogue-key attacks on aggregates.
    """
    try:
        pk = BLSPubkey(_coerce_bytes(public_key, PUBLIC_KEY_BYTES, "public key"))
        sig = BLSSignature(_coerce_bytes(proof, SIGNATURE_BYTES, "proof"))
    except TranscriptError:
        return False
    try:
        return bool(_Bls.PopVerify(pk, sig))
    except (ValidationError, ValueError, AssertionError):
        return False


def _valid_public_key(raw: bytes) -> bool:
    try:
        return bool(_Bls.KeyValidate(BLSPubkey(raw)))
    except (ValidationError, ValueError, AssertionError):
        return False


def _decodes_as_signature(raw: bytes) -> bool:
    try:
        signature_to_G2(BLSSignature(raw))
    except (ValidationError, ValueError, AssertionError):
        return False
    return True


@dataclass(frozen=True)
class CoSignature:
    """One co-signer's signature over the transcript's current head and length."""

    public_key: bytes
    signature: bytes

    def to_json(self) -> dict[str, str]:
        """``{"public_key": "0x..", "signature": "0x.."}``."""
        return {"public_key": _to_hex(self.public_key), "signature": _to_hex(self.signature)}


# --- the transcript ----------------------------------------------------------------------------


class Transcript:
    """An append-only hash chain of events, with co-signatures over its current head."""

    def __init__(self) -> None:
        """An empty transcript (head = :data:`ZERO_HASH`)."""
        self._events: list[Event] = []
        self._signatures: list[CoSignature] = []

    def __len__(self) -> int:
        return len(self._events)

    @property
    def events(self) -> tuple[Event, ...]:
        """The events, oldest first."""
        return tuple(self._events)

    @property
    def head(self) -> str:
        """The last event's hash, or :data:`ZERO_HASH` when empty (``0x`` + hex)."""
        return self._events[-1].hash if self._events else ZERO_HASH

    @property
    def signatures(self) -> tuple[CoSignature, ...]:
        """Co-signatures collected for the current head (cleared by :meth:`append`)."""
        return tuple(self._signatures)

    def append(self, kind: str, at: float, body: dict[str, Any]) -> Event:
        """Append an event and return it.

        ``at`` must not be before the previous event's; ``body`` is validated and deep-copied.
        Signatures collected for the old head are dropped: they do not sign the new one.
        """
        seq = len(self._events)
        kind = _clean_kind(kind, seq)
        when = _clean_at(at, seq)
        if self._events and when < self._events[-1].at:
            raise TranscriptError(
                f"event {seq}: at {when!r} is before the previous event's {self._events[-1].at!r}",
                seq=seq,
                check="time",
            )
        clean = _clean_body(body, seq)
        prev = self.head
        event = Event(
            seq=seq,
            kind=kind,
            at=when,
            body=clean,
            prev=prev,
            hash=event_hash(seq, kind, when, clean, prev),
        )
        self._events.append(event)
        self._signatures.clear()
        return event

    def verify_chain(self) -> None:
        """Recheck every event; raise :class:`TranscriptError` naming the first broken seq."""
        _verify_events(self._events)

    def attach_signature(self, public_key: bytes | str, signature: bytes | str) -> None:
        """Record a co-signer's signature over the current head (format-checked, not verified).

        The public key must be a valid G1 point and appear once; the signature must decode as a
        G2 point. Cryptographic validity is checked by :func:`verify_head` / :func:`check_bundle`.
        """
        pk = _coerce_bytes(public_key, PUBLIC_KEY_BYTES, "public key")
        sig = _coerce_bytes(signature, SIGNATURE_BYTES, "signature")
        if not _valid_public_key(pk):
            raise TranscriptError(f"public key {_to_hex(pk)} is not a valid BLS12-381 G1 key")
        if not _decodes_as_signature(sig):
            raise TranscriptError("signature is not a valid compressed G2 point")
        if any(s.public_key == pk for s in self._signatures):
            raise TranscriptError(f"public key {_to_hex(pk)} has already signed this head")
        self._signatures.append(CoSignature(public_key=pk, signature=sig))

    def aggregate_signature(self) -> bytes | None:
        """The aggregate of the collected signatures, or ``None`` when there are none."""
        if not self._signatures:
            return None
        return aggregate([s.signature for s in self._signatures])

    def to_json(self) -> dict[str, Any]:
        """The bundle: format, events, head, length, signatures and their aggregate."""
        agg = self.aggregate_signature()
        return {
            "format": FORMAT,
            "events": [event.to_json() for event in self._events],
            "head": self.head,
            "length": len(self._events),
            "signatures": [s.to_json() for s in self._signatures],
            "aggregate_signature": None if agg is None else _to_hex(agg),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | bytes) -> Transcript:
        """Load a bundle, verifying the chain, the length and the head while loading.

        Signatures are format-checked and the aggregate must equal the aggregate of the listed
        signatures, but no pairing is computed: use :func:`check_bundle` for that.
        """
        doc = _load_document(data)
        if doc.get("format") != FORMAT:
            raise TranscriptError(
                f"format is {_short(doc.get('format'))}, expected {FORMAT!r}", check="format"
            )
        raw_events = doc.get("events")
        if type(raw_events) is not list:
            raise TranscriptError("events must be a list", check="event")
        events = _verify_events(raw_events)
        length = doc.get("length")
        if type(length) is not int or length != len(events):
            raise TranscriptError(
                f"length is {_short(length)} but the bundle holds {len(events)} events",
                seq=min(length, len(events)) if type(length) is int and length >= 0 else None,
                check="length",
            )
        head = events[-1].hash if events else ZERO_HASH
        if doc.get("head") != head:
            raise TranscriptError(
                f"head is {_short(doc.get('head'))} but the chain ends in {head}",
                seq=len(events) - 1 if events else None,
                check="head",
            )
        transcript = cls()
        transcript._events = events
        entries = doc.get("signatures", [])
        if type(entries) is not list:
            raise TranscriptError("signatures must be a list", check="signature")
        for entry in entries:
            pk, sig = _parse_signature_entry(entry)
            if pk is None or sig is None:
                raise TranscriptError(
                    f"malformed signature entry {_short(entry)}", check="signature"
                )
            transcript.attach_signature(pk, sig)
        claimed = doc.get("aggregate_signature")
        computed = transcript.aggregate_signature()
        if (claimed is not None or computed is not None) and (
            computed is None or _parse_hex(claimed, SIGNATURE_BYTES) != computed
        ):
            raise TranscriptError(
                "aggregate_signature is not the aggregate of the listed signatures",
                check="signature",
            )
        return transcript


def _load_document(data: object) -> dict[str, Any]:
    if isinstance(data, str | bytes | bytearray):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise TranscriptError(f"bundle is not JSON: {exc}") from exc
    if isinstance(data, Mapping) and not isinstance(data, dict):
        data = dict(data)
    if not isinstance(data, dict):
        raise TranscriptError(f"bundle must be a JSON object, not {type(data).__name__}")
    return data


def _parse_signature_entry(entry: object) -> tuple[bytes | None, bytes | None]:
    if not isinstance(entry, dict) or set(entry) != {"public_key", "signature"}:
        return None, None
    return (
        _parse_hex(entry["public_key"], PUBLIC_KEY_BYTES),
        _parse_hex(entry["signature"], SIGNATURE_BYTES),
    )


# --- replay report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of a :class:`Report`: a named check, whether it passed, and where it failed."""

    name: str
    ok: bool
    detail: str
    seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"name", "ok", "detail", "seq"}``."""
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "seq": self.seq}

    def line(self) -> str:
        """``PASS name  detail`` or ``FAIL name  seq N: detail``."""
        where = f"seq {self.seq}: " if self.seq is not None and not self.ok else ""
        return f"{'PASS' if self.ok else 'FAIL'} {self.name:<10} {where}{self.detail}"


@dataclass(frozen=True)
class Report:
    """Every check :func:`check_bundle` ran, in order (what ``refute replay`` prints)."""

    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        """The checks that failed."""
        return tuple(c for c in self.checks if not c.ok)

    def check(self, name: str) -> Check:
        """The check called ``name`` (``KeyError`` if there is none)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def lines(self) -> list[str]:
        """One human-readable line per check."""
        return [c.line() for c in self.checks]

    def to_json(self) -> dict[str, Any]:
        """``{"ok": bool, "checks": [...]}``."""
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}


def check_bundle(
    data: Mapping[str, Any] | str | bytes,
    trusted_keys: Iterable[bytes | str],
    *,
    quorum: int | None = None,
) -> Report:
    """Check a bundle offline and report each check; never raises on tampered content.

    Checks, in order: ``format``; ``chain`` (the first broken seq and what broke); ``length``;
    ``head`` (the claimed head against the recomputed chain); ``signers`` (well-formed,
    distinct, every signer in ``trusted_keys``, at least ``quorum`` of them, all by default);
    ``signature`` (the aggregate equals the aggregate of the listed signatures and passes
    FastAggregateVerify over the *recomputed* head and the actual number of events). When the
    signature fails, each signer's own signature is checked too (``signer 0x<8 hex>`` lines).

    Raises :class:`TranscriptError` only if ``data`` is not a JSON object (or JSON text of one),
    or if ``trusted_keys``/``quorum`` are unusable.
    """
    doc = _load_document(data)
    trusted: set[bytes] = set()
    for key in trusted_keys:
        raw = _coerce_bytes(key, PUBLIC_KEY_BYTES, "trusted key")
        if not _valid_public_key(raw):
            raise TranscriptError(f"trusted key {_to_hex(raw)} is not a valid BLS12-381 G1 key")
        trusted.add(raw)
    if not trusted:
        raise TranscriptError("no trusted keys")
    needed = len(trusted) if quorum is None else quorum
    if type(needed) is not int or not 1 <= needed <= len(trusted):
        raise TranscriptError(f"quorum must be between 1 and {len(trusted)}")

    checks: list[Check] = []
    fmt = doc.get("format")
    checks.append(Check("format", fmt == FORMAT, f"format {_short(fmt)}"))

    raw_events = doc.get("events")
    computed_head: str | None = None
    count: int | None = None
    if type(raw_events) is not list:
        checks.append(Check("chain", False, "events is not a list"))
    else:
        count = len(raw_events)
        try:
            events = _verify_events(raw_events)
        except TranscriptError as exc:
            checks.append(Check("chain", False, f"{exc.check}: {exc.reason}", exc.seq))
            try:
                computed_head = _parse_event(raw_events[-1], count - 1).compute_hash()
            except TranscriptError:
                computed_head = None
        else:
            computed_head = events[-1].hash if events else ZERO_HASH
            checks.append(Check("chain", True, f"{count} events linked"))

    length = doc.get("length")
    if type(length) is not int:
        checks.append(Check("length", False, f"length {_short(length)} is not an integer"))
    elif count is None:
        checks.append(Check("length", False, "no events to count"))
    elif length != count:
        checks.append(
            Check(
                "length",
                False,
                f"length says {length} but {count} events are present",
                max(0, min(length, count)),
            )
        )
    else:
        checks.append(Check("length", True, f"{count} events"))

    claimed_head = doc.get("head")
    last = count - 1 if count else None
    if computed_head is None:
        checks.append(Check("head", False, "cannot recompute the head: events malformed", last))
    elif claimed_head != computed_head:
        checks.append(
            Check(
                "head",
                False,
                f"head {_short(claimed_head)} but events end in {computed_head}",
                last,
            )
        )
    else:
        checks.append(Check("head", True, computed_head))

    checks.extend(_signature_checks(doc, trusted, needed, computed_head, count))
    return Report(tuple(checks))


def _signature_checks(
    doc: Mapping[str, Any],
    trusted: set[bytes],
    needed: int,
    head: str | None,
    count: int | None,
) -> list[Check]:
    entries = doc.get("signatures")
    if type(entries) is not list or not entries:
        return [
            Check("signers", False, "no signatures"),
            Check("signature", False, "not checked: no signatures"),
        ]
    pairs: list[tuple[bytes, bytes]] = []
    problem: str | None = None
    for i, entry in enumerate(entries):
        pk, sig = _parse_signature_entry(entry)
        if pk is None or sig is None:
            problem = f"signature entry {i} is malformed"
            break
        if pk not in trusted:
            problem = f"signer {_to_hex(pk)} is not a trusted key"
            break
        if any(pk == p for p, _ in pairs):
            problem = f"signer {_to_hex(pk)} is listed twice"
            break
        pairs.append((pk, sig))
    checks: list[Check] = []
    if problem is not None:
        checks.append(Check("signers", False, problem))
    elif len(pairs) < needed:
        checks.append(
            Check(
                "signers",
                False,
                f"{len(pairs)} of {len(trusted)} trusted keys signed, {needed} required",
            )
        )
    else:
        checks.append(Check("signers", True, f"{len(pairs)} of {len(trusted)} trusted keys signed"))

    if problem is not None:
        checks.append(Check("signature", False, "not checked: signers unusable"))
        return checks
    if head is None or count is None:
        checks.append(Check("signature", False, "not checked: the head cannot be recomputed"))
        return checks
    try:
        computed = aggregate([sig for _, sig in pairs])
    except TranscriptError as exc:
        checks.append(Check("signature", False, exc.reason))
        return checks
    claimed_field = doc.get("aggregate_signature")
    claimed = computed if claimed_field is None else _parse_hex(claimed_field, SIGNATURE_BYTES)
    if claimed != computed:
        checks.append(
            Check("signature", False, "aggregate_signature is not the aggregate of the signatures")
        )
    elif verify_head(head, count, [pk for pk, _ in pairs], computed):
        checks.append(
            Check("signature", True, f"aggregate of {len(pairs)} verifies over head and length")
        )
        return checks
    else:
        checks.append(
            Check("signature", False, f"aggregate does not verify over head {head}, length {count}")
        )
    for pk, sig in pairs[:MAX_SIGNER_DIAGNOSTICS]:
        good = verify_head(head, count, [pk], sig)
        checks.append(
            Check(
                f"signer {_to_hex(pk)[:10]}",
                good,
                "signature verifies" if good else "signature does not verify over this head",
            )
        )
    return checks
