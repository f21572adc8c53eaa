"""Results: optimistic acceptance of signed claims, trace upload, reading and listing."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from challenge.blobs import BlobStore
from challenge.messages import AuthError, Domain, network_word, verify_signed
from challenge.messages import Result as SignedResult
from challenge.outbox import enqueue_all
from challenge.records import Network, RegisteredModel, Result, ResultStatus, new_id
from challenge.result_lifecycle import accept
from refute.errors import BundleError, Conflict, InputError, NotFound, RefuteError
from refute.manifest import Manifest
from refute.merkle import merkle_root
from refute.trace import Trace
from verifier.api.schemas import ResultSubmit
from verifier.spotcheck import sample_segments

log = logging.getLogger(__name__)


def _word(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text.removeprefix("0x"))


def owned_model(session: Session, network: Network, model_id: str) -> RegisteredModel:
    """A model of this network (another network's model is "not found")."""
    model = session.get(RegisteredModel, model_id)
    if model is None or model.network_id != network.id:
        raise NotFound(f"model {model_id} not found")
    return model


def owned_result(session: Session, network: Network, result_id: str) -> Result:
    """A result of this network (another network's result is "not found")."""
    result = session.get(Result, result_id)
    if result is None or result.network_id != network.id:
        raise NotFound(f"result {result_id} not found")
    return result


#: What a result submission comes to: the stored result and whether it is new, or its refusal.
Outcome = tuple[Result, bool] | RefuteError


@dataclass(frozen=True)
class _ModelFacts:
    """What accepting a result needs of its model (a registered model never changes)."""

    id: str
    network_id: str
    model_sha256: str
    num_states: int
    num_segments: int


@dataclass(frozen=True)
class _Checked:
    """A signed result that passed every check that needs no database."""

    model: _ModelFacts
    signer: str
    digest: str
    leaves: list[bytes]
    body: ResultSubmit


class _Models:
    """Registered models' facts, read once per process (the manifest, which can be megabytes,
    is read and parsed only then); the most recently used kept. Safe to share: a registered
    model is never changed or removed."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str], _ModelFacts] = OrderedDict()
        self._lock = threading.Lock()

    def owned(self, session: Session, network: Network, model_id: str) -> _ModelFacts:
        """The facts of ``model_id``, a model of ``network`` (another network's is "not
        found")."""
        key = (str(session.get_bind().engine.url), model_id)  # ids are unique per database
        with self._lock:
            facts = self._items.get(key)
            if facts is not None:
                self._items.move_to_end(key)
        if facts is None:
            facts = self._read(session, model_id)
            with self._lock:
                self._items[key] = facts
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
        if facts.network_id != network.id:
            raise NotFound(f"model {model_id} not found")
        return facts

    @staticmethod
    def _read(session: Session, model_id: str) -> _ModelFacts:
        row = session.execute(select(RegisteredModel.network_id, RegisteredModel.model_sha256,
                                     RegisteredModel.manifest)
                              .where(RegisteredModel.id == model_id)).first()
        if row is None:
            raise NotFound(f"model {model_id} not found")
        manifest = Manifest.from_json(row.manifest)
        return _ModelFacts(id=model_id, network_id=row.network_id,
                           model_sha256=row.model_sha256, num_states=len(manifest.states),
                           num_segments=manifest.num_segments)


_MODELS = _Models()


def submit_result(
    session: Session, network: Network, body: ResultSubmit, *, domain: Domain, now: datetime,
    spot_key: bytes,
) -> tuple[Result, bool]:
    """Accept a signed result at once; returns (result, created). Idempotent per message.

    The spot-checks the result owes are decided here (keyed by ``spot_key`` and the new id) and
    written with it, so a lost task is found and run again and the result cannot finalize with
    one missing; when sampled, the provider is asked (webhook ``spotcheck.disclosure_requested``)
    for exactly the states those checks need, unless it uploads them first. Raises the
    :class:`RefuteError` that refuses it."""
    (outcome,) = submit_results(session, network, [body], domain=domain, now=now,
                                spot_key=spot_key)
    if isinstance(outcome, RefuteError):
        raise outcome
    return outcome


def submit_results(
    session: Session, network: Network, bodies: Sequence[ResultSubmit], *, domain: Domain,
    now: datetime, spot_key: bytes,
) -> list[Outcome]:
    """Accept each of a batch of signed results on its own (as :func:`submit_result`), in the
    caller's transaction: the outcome of ``bodies[i]`` is ``(result, created)`` or the 4xx
    :class:`RefuteError` refusing it (a server fault aborts the whole batch).

    The checks that need no database come first (signature, model, leaves); then one query
    finds the messages already accepted and the nonces already used, and the new results,
    their journals and their disclosure requests are inserted together. When a concurrent
    transaction takes one of the batch's messages or nonces first (a unique constraint fails),
    the transaction is rolled back (the caller's must hold no other write) and the batch stored
    again: the winner's rows are seen then. No savepoint: on SQLite one would open the
    transaction before the reads, and a transaction that read cannot wait for the write lock
    ("database is locked" at once under concurrent writers)."""
    checked: list[_Checked | RefuteError] = []
    for body in bodies:
        try:
            checked.append(_check(session, network, body, domain=domain, now=now))
        except RefuteError as exc:
            if exc.http_status >= 500:
                raise
            checked.append(exc)
    for _attempt in range(_STORE_ATTEMPTS):
        try:
            return _store(session, network, checked, now=now, spot_key=spot_key)
        except IntegrityError:  # a concurrent request took a message or nonce first: the
            session.rollback()  # next attempt sees its row (no savepoint: see the docstring)
            log.info("a concurrent submission took a message or nonce of a batch of %d: "
                     "checking it again", len(checked))
    raise Conflict("concurrent submissions kept taking this batch's messages or nonces: "
                   "send it again")


#: How many times a batch that loses a race to a concurrent one is stored again.
_STORE_ATTEMPTS = 3


def _check(session: Session, network: Network, body: ResultSubmit, *, domain: Domain,
           now: datetime) -> _Checked:
    """The checks of one result that need no query (but its model's, once per process)."""
    model = _MODELS.owned(session, network, body.model_id)
    m = body.message
    claim = SignedResult(network=_word(m.network), model=_word(m.model), input=_word(m.input),
                         output=_word(m.output), trace_root=_word(m.traceRoot), stake=m.stake,
                         nonce=m.nonce, deadline=m.deadline)
    claimed = Domain(chain_id=body.domain.chainId,
                     verifying_contract=body.domain.verifyingContract,
                     name=body.domain.name, version=body.domain.version)
    signer, digest = verify_signed(claim, claimed, body.signature,
                                   expected_signer=body.provider, now=int(now.timestamp()),
                                   expected_domain=domain)
    if claim.network != network_word(network.id):
        raise AuthError("the signed message names another network")
    if claim.model.hex() != model.model_sha256:
        raise InputError("the signed message names another model than model_id")
    leaves = [_word(leaf) for leaf in body.leaves]
    if len(leaves) != model.num_states or any(len(x) != 32 for x in leaves):
        raise InputError(f"a trace of this model has {model.num_states} 32-byte leaves")
    if merkle_root(leaves) != claim.trace_root:
        raise InputError("leaves do not hash to the signed trace root")
    return _Checked(model=model, signer=signer,
                    digest=digest.hex(), leaves=leaves, body=body)


def _store(session: Session, network: Network, items: Sequence[_Checked | RefuteError], *,
           now: datetime, spot_key: bytes) -> list[Outcome]:
    """Insert the new results of ``items``: a message seen before answers its result, a nonce
    used before (by another message) is a conflict, within the batch too."""
    valid = [item for item in items if isinstance(item, _Checked)]
    known: dict[str, Result] = {}
    used: set[tuple[str, str]] = set()
    if valid:  # one query: the messages seen before, and the results holding these nonces
        # (as (provider, nonce) pairs: the unique index finds each; "provider IN … AND nonce
        # IN …" had PostgreSQL read every result of the provider, a batch slower each time)
        pairs = {(item.signer, str(item.body.message.nonce)) for item in valid}
        rows = session.scalars(select(Result).where(
            Result.message_hash.in_({item.digest for item in valid})
            | tuple_(Result.provider, Result.nonce).in_(pairs)))
        for row in rows:
            known[row.message_hash] = row
            used.add((row.provider, row.nonce))
    outcomes: list[Outcome] = []
    fresh: list[Result] = []
    for item in items:
        if isinstance(item, RefuteError):
            outcomes.append(item)
            continue
        prior = known.get(item.digest)
        nonce = str(item.body.message.nonce)
        if prior is not None:
            outcomes.append(NotFound("result not found") if prior.network_id != network.id
                            else (prior, False))
        elif (item.signer, nonce) in used:
            outcomes.append(Conflict(f"nonce {nonce} of provider {item.signer} was already used"))
        else:
            row = _new_result(network, item, now=now, spot_key=spot_key)
            known[item.digest] = row
            used.add((item.signer, nonce))
            fresh.append(row)
            outcomes.append((row, True))
    accept(session, *fresh)
    enqueue_all(session, network.id, "spotcheck.disclosure_requested", [
        (f"disclose:{row.id}", {"result_id": row.id, "states": needed_states(row.spot_segments),
                                "deadline": row.disclosure_deadline.isoformat(),
                                "how": f"PUT /v1/results/{row.id}/states (or the whole trace)"})
        for row in fresh if row.disclosure_deadline is not None], now)
    return outcomes


def _new_result(network: Network, item: _Checked, *, now: datetime, spot_key: bytes) -> Result:
    """The row of a new result, with the spot-checks it owes."""
    m = item.body.message
    result_id = new_id("res")
    picks = sample_segments(spot_key, result_id, num_segments=item.model.num_segments,
                            probability=network.spot_probability, count=network.spot_count)
    return Result(
        id=result_id, network_id=network.id, model_id=item.model.id, message_hash=item.digest,
        provider=item.signer, nonce=str(m.nonce), deadline=m.deadline, stake=str(m.stake),
        input_hash=m.input, output_hash=m.output, trace_root=m.traceRoot,
        leaves=["0x" + leaf.hex() for leaf in item.leaves], signature=item.body.signature,
        accepted_at=now,
        challenge_deadline=now + timedelta(seconds=network.challenge_window_s),
        spot_segments=picks, spot_pending=bool(picks),
        disclosure_deadline=now + timedelta(seconds=network.disclosure_window_s) if picks
        else None,
    )


def needed_states(segments: list[int]) -> list[int]:
    """The committed states that checking ``segments`` needs: i-1 and i for each."""
    return sorted({k for i in segments for k in (i - 1, i)})


def attach_trace(session: Session, blobs: BlobStore, result: Result, data: bytes,
                 now: datetime) -> str:
    """Verify an uploaded trace bundle against the result's commitment and store it.

    The cheap checks come first: the bundle's manifest and claimed leaves are compared with the
    model's manifest and the result's signed leaves before any state is read or hashed."""
    model = session.get(RegisteredModel, result.model_id)
    assert model is not None
    trace = Trace.read(data, expect_manifest_sha256=model.manifest_sha256,
                       expect_leaves=[_word(leaf) for leaf in result.leaves])
    if trace.manifest.sha256 != model.manifest_sha256:
        raise BundleError("the trace was made under another manifest than the model's")
    if ["0x" + leaf.hex() for leaf in trace.commitment.leaves] != list(result.leaves):
        raise BundleError("the trace's leaves differ from the result's signed commitment")
    key = blobs.put(data)
    if result.trace_blob != key or result.trace_uploaded_at is None:
        result.trace_uploaded_at = now
    result.trace_blob = key
    return key


def list_results(
    session: Session, network: Network, *, status: str | None, model_id: str | None,
    limit: int, cursor: str | None,
) -> tuple[list[Result], str | None]:
    """A page of the network's results, newest first; ``cursor`` is the last id seen."""
    query = select(Result).where(Result.network_id == network.id)
    if status is not None:
        try:
            query = query.where(Result.status == ResultStatus(status))
        except ValueError as exc:
            raise InputError(f"unknown status {status!r}") from exc
    if model_id is not None:
        query = query.where(Result.model_id == model_id)
    if cursor is not None:
        anchor = session.get(Result, cursor)
        if anchor is None or anchor.network_id != network.id:
            raise InputError("invalid cursor")
        query = query.where(
            (Result.accepted_at < anchor.accepted_at)
            | ((Result.accepted_at == anchor.accepted_at) & (Result.id < anchor.id))
        )
    rows = list(session.scalars(query.order_by(Result.accepted_at.desc(), Result.id.desc())
                                .limit(limit + 1)))
    next_cursor = rows[limit - 1].id if len(rows) > limit else None
    return rows[:limit], next_cursor
