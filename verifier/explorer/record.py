"""What the dispute explorer shows of one dispute, read from the database: its timeline (the
bisection move by move), its proofs and their on-chain checks, its clocks, the result's bonds
journal, and the result's transcript checked (hash chain and BLS head signature) by the same
functions ``refute replay`` uses.

Event bodies were written by the service, but they carry values parties chose (reasons, ids):
every field is read by type here, and the page renders them as text only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.books import load_ledger
from challenge.game import Actor, DisputeState
from challenge.records import TranscriptEvent
from challenge.transcript import (
    FORMAT,
    ZERO_HASH,
    SigningKey,
    Transcript,
    TranscriptError,
    check_bundle,
    sign_head,
)
from verifier.api.schemas import (
    ChainCheck,
    ClocksOut,
    LedgerEntryOut,
    PostingOut,
    ProofRecord,
    TimelineEntry,
    TranscriptCheck,
    TranscriptCheckLine,
)

#: Transcript checks kept (a BLS signature and its pairing check take about a second).
CHECK_CACHE_SIZE = 256


def _int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    return value if type(value) is int else None


def _str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def _float(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    return float(value) if isinstance(value, int | float) and type(value) is not bool else None


def dispute_events(rows: Sequence[dict[str, Any]], dispute_id: str) -> list[dict[str, Any]]:
    """The events of ``dispute_id`` among a result's transcript events (JSON form)."""
    return [e for e in rows if isinstance(e.get("body"), Mapping)
            and e["body"].get("dispute_id") == dispute_id]


def timeline(events: Sequence[Mapping[str, Any]], leaves: Sequence[str]) -> list[TimelineEntry]:
    """The dispute's events as a timeline, each with the bisection interval (lo, hi] and the
    rounds completed after it: an AGREE with state m moves lo to m, a DISAGREE moves hi to m
    (``challenge.game``)."""
    lo = hi = rounds = 0
    out = []
    for event in events:
        body: Mapping[str, Any] = event["body"]
        kind = str(event.get("kind"))
        if kind == "challenge":
            lo, hi = _int(body, "lo") or 0, _int(body, "hi") or 0
        state = _int(body, "state")
        choice = _str(body, "choice")
        if kind == "answer" and state is not None:
            lo, hi = (state, hi) if choice == "agree" else (lo, state)
            rounds += 1
        out.append(TimelineEntry(
            seq=_int(event, "seq") or 0, kind=kind, at=_float(event, "at") or 0.0,
            move_at=_float(body, "move_at"),
            actor=_str(body, "actor") or ("challenger" if kind == "challenge" else None),
            phase=_str(body, "phase"), round=rounds, lo=lo, hi=hi, state=state,
            leaf=leaves[state] if state is not None and 0 <= state < len(leaves) else None,
            choice=choice, step=_int(body, "step"), tile=_int(body, "tile"),
            verdict=_str(body, "verdict"), reason=_str(body, "reason")))
    return out


def proofs(events: Sequence[Mapping[str, Any]]) -> list[ProofRecord]:
    """The proofs recorded in the dispute's events, with their on-chain checks."""
    out = []
    for event in events:
        kind = {"proofoutcome": "step", "rangeoutcome": "range"}.get(str(event.get("kind")))
        if kind is None:
            continue
        body: Mapping[str, Any] = event["body"]
        chain = body.get("chain")
        out.append(ProofRecord(
            seq=_int(event, "seq") or 0, kind=kind, step=_int(body, "step"),
            state=_int(body, "state"), tile=_int(body, "tile"),
            maxdiff_units=_str(body, "maxdiff_units"), tolerance=_int(body, "tolerance"),
            max_abs_units=_str(body, "max_abs_units"), bound=_int(body, "bound"),
            circuit=_str(body, "circuit"), vk_sha256=_str(body, "vk_sha256"),
            settings_sha256=_str(body, "settings_sha256"),
            proof_bytes=len(json.dumps(body.get("proof"))),
            chain=ChainCheck(contract=_str(chain, "contract"), tx=_str(chain, "tx"),
                             gas=_int(chain, "gas"))
            if isinstance(chain, Mapping) else None))
    return out


def clocks(state: DisputeState, deadline: float | None) -> ClocksOut:
    """The dispute's time control, each party's time left and whose clock runs."""
    turn = state.turn
    return ClocksOut(provider_s=state.clocks.provider, challenger_s=state.clocks.challenger,
                     proof_timeout_s=state.clocks.proof_timeout,
                     provider_left_s=state.remaining(Actor.PROVIDER),
                     challenger_left_s=state.remaining(Actor.CHALLENGER),
                     turn=None if turn is None else turn.value, turn_started=state.turn_started,
                     deadline=deadline)


def ledger_entries(session: Session, result_id: str, dispute_id: str) -> list[LedgerEntryOut]:
    """The result's bonds journal (replayed and checked while loading), each entry marked when
    it is about ``dispute_id`` (its bond, its settlement)."""
    ledger = load_ledger(session, result_id)
    return [LedgerEntryOut(seq=e.seq, kind=e.kind.value, reference=e.reference, memo=e.memo,
                           postings=[PostingOut(account=p.account, amount=p.amount)
                                     for p in e.postings],
                           this_dispute=e.reference == dispute_id
                           or any(dispute_id in p.account for p in e.postings))
            for e in ledger.entries()]


def transcript_rows(session: Session, result_id: str) -> list[dict[str, Any]]:
    """A result's transcript events as stored (JSON form, in order), unverified."""
    return [dict(r) for r in session.scalars(
        select(TranscriptEvent.event).where(TranscriptEvent.result_id == result_id)
        .order_by(TranscriptEvent.seq)).all()]


class TranscriptChecker:
    """Checks transcripts as ``refute replay`` does (:func:`check_bundle`): the hash chain, its
    length and head recomputed, and the head signed with the service's key and verified. Checks
    are cached by the exact events checked (a pairing takes about a second)."""

    def __init__(self, key: SigningKey) -> None:
        """A checker signing heads with ``key``."""
        self._key = key
        self._cache: OrderedDict[str, TranscriptCheck] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, rows: list[dict[str, Any]]) -> TranscriptCheck:
        """The check of a transcript whose events are ``rows``: a broken chain is reported (not
        signed); an intact one is signed and its signature verified."""
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if (cached := self._cache.get(digest)) is not None:
                self._cache.move_to_end(digest)
                return cached
        head = str(rows[-1].get("hash")) if rows else ZERO_HASH
        doc: dict[str, Any] = {"format": FORMAT, "events": rows, "head": head,
                               "length": len(rows), "signatures": [],
                               "aggregate_signature": None}
        signature = None
        try:
            transcript = Transcript.from_json(doc)
        except TranscriptError:
            pass  # reported by check_bundle, not signed
        else:
            raw = sign_head(transcript, self._key)
            transcript.attach_signature(self._key.public_key, raw)
            doc = transcript.to_json()
            signature = "0x" + raw.hex()
        report = check_bundle(doc, [self._key.public_key])
        checked = TranscriptCheck(
            ok=report.ok, head=head, length=len(rows),
            public_key="0x" + self._key.public_key.hex(), signature=signature,
            checks=[TranscriptCheckLine(**c.to_json()) for c in report.checks])
        with self._lock:
            self._cache[digest] = checked
            while len(self._cache) > CHECK_CACHE_SIZE:
                self._cache.popitem(last=False)
        return checked
