"""Results: optimistic acceptance of signed claims, trace upload, reading and listing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from challenge.blobs import BlobStore
from challenge.messages import AuthError, Domain, network_word, typed_data_hash, verify_signed
from challenge.messages import Result as SignedResult
from challenge.outbox import enqueue
from challenge.records import Network, RegisteredModel, Result, ResultStatus, new_id
from challenge.result_lifecycle import accept
from refute.errors import BundleError, Conflict, InputError, NotFound, RefuteError
from refute.manifest import Manifest
from refute.merkle import merkle_root
from refute.trace import Trace
from verifier.api.schemas import ResultSubmit
from verifier.spotcheck import sample_segments


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


def submit_result(
    session: Session, network: Network, body: ResultSubmit, *, domain: Domain, now: datetime,
    spot_key: bytes,
) -> tuple[Result, bool]:
    """Accept a signed result at once; returns (result, created). Idempotent per message.

    The spot-checks the result owes are decided here (keyed by ``spot_key`` and the new id) and
    written with it, so a lost task is found and run again and the result cannot finalize with
    one missing; when sampled, the provider is asked (webhook ``spotcheck.disclosure_requested``)
    for exactly the states those checks need, unless it uploads them first."""
    model = owned_model(session, network, body.model_id)
    m = body.message
    claim = SignedResult(network=_word(m.network), model=_word(m.model), input=_word(m.input),
                         output=_word(m.output), trace_root=_word(m.traceRoot), stake=m.stake,
                         nonce=m.nonce, deadline=m.deadline)
    claimed = Domain(chain_id=body.domain.chainId,
                     verifying_contract=body.domain.verifyingContract,
                     name=body.domain.name, version=body.domain.version)
    signer = verify_signed(claim, claimed, body.signature, expected_signer=body.provider,
                           now=int(now.timestamp()), expected_domain=domain)
    if claim.network != network_word(network.id):
        raise AuthError("the signed message names another network")
    if claim.model.hex() != model.model_sha256:
        raise InputError("the signed message names another model than model_id")
    manifest = Manifest.from_json(model.manifest)
    leaves = [_word(leaf) for leaf in body.leaves]
    if len(leaves) != len(manifest.states) or any(len(x) != 32 for x in leaves):
        raise InputError(f"a trace of this model has {len(manifest.states)} 32-byte leaves")
    if merkle_root(leaves) != claim.trace_root:
        raise InputError("leaves do not hash to the signed trace root")
    digest = typed_data_hash(claim, domain).hex()
    existing = session.scalars(select(Result).where(Result.message_hash == digest)).first()
    if existing is not None:
        if existing.network_id != network.id:
            raise NotFound("result not found")
        return existing, False
    replay = session.scalars(select(Result).where(Result.provider == signer,
                                                  Result.nonce == str(m.nonce))).first()
    if replay is not None:
        raise Conflict(f"nonce {m.nonce} of provider {signer} was already used")
    result_id = new_id("res")
    picks = sample_segments(spot_key, result_id, num_segments=manifest.num_segments,
                            probability=network.spot_probability, count=network.spot_count)
    disclosure = now + timedelta(seconds=network.disclosure_window_s) if picks else None
    result = Result(
        id=result_id, network_id=network.id, model_id=model.id, message_hash=digest,
        provider=signer, nonce=str(m.nonce), deadline=m.deadline, stake=str(m.stake),
        input_hash=m.input, output_hash=m.output, trace_root=m.traceRoot,
        leaves=["0x" + leaf.hex() for leaf in leaves], signature=body.signature,
        accepted_at=now,
        challenge_deadline=now + timedelta(seconds=network.challenge_window_s),
        spot_segments=picks, spot_pending=bool(picks), disclosure_deadline=disclosure,
    )
    accept(session, result)
    if disclosure is not None:
        enqueue(session, network.id, "spotcheck.disclosure_requested", f"disclose:{result_id}",
                {"result_id": result_id, "states": needed_states(picks),
                 "deadline": disclosure.isoformat(),
                 "how": f"PUT /v1/results/{result_id}/states (or the whole trace)"}, now)
    return result, True


def submit_results(
    session: Session, network: Network, bodies: Sequence[ResultSubmit], *, domain: Domain,
    now: datetime, spot_key: bytes,
) -> list[tuple[Result, bool] | RefuteError]:
    """Accept each of a batch of signed results on its own (:func:`submit_result`), in one
    transaction the caller commits: a result refused (a 4xx :class:`RefuteError`, returned in
    its place) is rolled back to its own savepoint and the others stand. A server fault
    aborts the whole batch."""
    outcomes: list[tuple[Result, bool] | RefuteError] = []
    for body in bodies:
        try:
            with session.begin_nested():
                outcomes.append(submit_result(session, network, body, domain=domain, now=now,
                                              spot_key=spot_key))
        except RefuteError as exc:
            if exc.http_status >= 500:
                raise
            outcomes.append(exc)
    return outcomes


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
