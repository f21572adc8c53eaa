"""Database schema of the verification service (SQLAlchemy 2 ORM).

Every row that matters to money or to a verdict is written before it is acted on; uniqueness
constraints make re-deliveries harmless (a result signed twice is one row; a spot-check of one
segment of one result is recorded once). Migrations live in ``verifier/migrations`` (Alembic);
``0001``-``0005`` build the tables, ``0006_sha256_leaves`` adds ``results.leaf_format`` and moves
manifests to ``refute.manifest/2``; ``0007`` keys shared proofs by tile; ``0008`` records what each
proof cost (``prove_seconds``, ``peak_bytes``) and indexes spot-checks by outcome (metrics).
"""

from __future__ import annotations

import enum
import secrets
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from refute.leaves import LEAF_FORMAT


def new_id(prefix: str) -> str:
    """A fresh random identifier such as ``res_4f1c…``."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    """Declarative base of every table; constraints get stable names (migrations need them)."""

    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class ResultStatus(enum.StrEnum):
    """DESIGN.md "Result lifecycle". There is no "upheld": a dispute the challenger loses settles
    that dispute only, and the result stays open to other challengers until its window closes
    (migration 0004 turned stored ``UPHELD`` results back into ``ACCEPTED``)."""

    ACCEPTED = "ACCEPTED"
    DISPUTED = "DISPUTED"
    FINALIZED = "FINALIZED"
    PROVIDER_FAULT = "PROVIDER_FAULT"


class CheckOutcome(enum.StrEnum):
    """What one spot-check of one segment found."""

    PASS = "PASS"
    FAULT = "FAULT"
    INVALID = "INVALID"  # committed states do not match their leaves


class Network(Base):
    """A customer network: its own API keys, models, results and sampling policy."""

    __tablename__ = "networks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spot_probability: Mapped[float] = mapped_column(Float, default=0.1)
    spot_count: Mapped[int] = mapped_column(Integer, default=1)
    challenge_window_s: Mapped[int] = mapped_column(Integer, default=3600)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: The smallest bond a challenger may post (covers the proof a dispute can cause).
    min_bond: Mapped[str] = mapped_column(String(78), default="1")  # uint256 as decimal text
    #: How long a sampled provider has to disclose the states its spot-check needs.
    disclosure_window_s: Mapped[int] = mapped_column(Integer, default=600)


class ApiKey(Base):
    """An API key of a network, stored only as its sha256."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RegisteredModel(Base):
    """A model registered by a network, with its (calibrated) manifest."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("network_id", "manifest_sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64), index=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, object]] = mapped_column(JSON)
    model_blob: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Result(Base):
    """A provider's signed claim, accepted optimistically."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("provider", "nonce"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    #: EIP-712 digest of the signed message: the idempotency key.
    message_hash: Mapped[str] = mapped_column(String(64), unique=True)
    provider: Mapped[str] = mapped_column(String(42), index=True)
    nonce: Mapped[str] = mapped_column(String(78))  # uint256 as decimal text
    deadline: Mapped[int] = mapped_column(BigInteger)
    stake: Mapped[str] = mapped_column(String(78))
    input_hash: Mapped[str] = mapped_column(String(66))
    output_hash: Mapped[str] = mapped_column(String(66))
    trace_root: Mapped[str] = mapped_column(String(66))
    leaves: Mapped[list[str]] = mapped_column(JSON)
    #: How the leaves were made (:data:`refute.leaves.LEAF_FORMAT`); results stored before
    #: migration 0006 keep ``poseidon-keccak/1`` and were all closed when it ran.
    leaf_format: Mapped[str] = mapped_column(String(40), default=LEAF_FORMAT,
                                             server_default=LEAF_FORMAT)
    signature: Mapped[str] = mapped_column(String(132))
    status: Mapped[ResultStatus] = mapped_column(Enum(ResultStatus, native_enum=False,
                                                      length=20), index=True)
    accepted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    challenge_deadline: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finalized_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    trace_blob: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: When the trace was uploaded (a provider's disclosure counts from then).
    trace_uploaded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                               nullable=True)
    #: The segments sampled for spot-checks, decided and written with the acceptance: the
    #: result cannot finalize until each has its SpotCheck row.
    spot_segments: Mapped[list[int]] = mapped_column(JSON, default=list)
    #: True while a sampled check is not recorded (set with the acceptance, cleared by the
    #: transaction that records the last one).
    spot_pending: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    #: When the owed checks were last queued (the sweep queues them again after a while).
    spot_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                            nullable=True)
    #: Until when the provider may disclose the states its sampled checks need (None: nothing
    #: to disclose, the trace or the states are stored, or the result was not sampled).
    disclosure_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True, index=True)


class SpotCheck(Base):
    """One re-executed segment of one result; recorded exactly once."""

    __tablename__ = "spot_checks"
    __table_args__ = (UniqueConstraint("result_id", "segment"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), index=True)
    segment: Mapped[int] = mapped_column(Integer)
    #: Indexed: the metrics count checks by outcome at every scrape (migration 0008).
    outcome: Mapped[CheckOutcome] = mapped_column(Enum(CheckOutcome, native_enum=False,
                                                       length=10), index=True)
    maxdiff_units: Mapped[float] = mapped_column(Float)
    tolerance: Mapped[int] = mapped_column(Integer)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DisclosedState(Base):
    """One committed state a provider disclosed on request (checked against its leaf)."""

    __tablename__ = "disclosed_states"

    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), primary_key=True)
    state: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The disclosure bundle (``refute.states/2``) in the blob store that holds this state.
    blob: Mapped[str] = mapped_column(String(64))
    disclosed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


#: ``SharedProof.tile`` of a proof of a whole segment or of a range.
WHOLE_SEGMENT = -1


class SharedProof(Base):
    """The one proof of a disputed step (of one tile of it, when the segment is tiled) or of a
    revealed state's range of a result, shared by every dispute that reaches it: claimed by the
    first prove task, then filled in."""

    __tablename__ = "shared_proofs"

    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), primary_key=True)
    #: ``step`` (index = the segment) or ``range`` (index = the state).
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The tile of a tiled step; :data:`WHOLE_SEGMENT` for a whole segment or a range proof.
    tile: Mapped[int] = mapped_column(Integer, primary_key=True, server_default="-1")
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: What the proof established and its transcript detail; None while it is being proven.
    outcome: Mapped[dict[str, object] | None] = mapped_column(JSON, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: How long the prover took, when it measured it (EZKL's proving child; None for a fake
    #: prover and for proofs stored before migration 0008). Operations only: not in the
    #: transcript.
    prove_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The proving process's peak resident memory (bytes), when measured.
    peak_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Challenge(Base):
    """A challenge filed against a result (by the service's watcher or a whistleblower)."""

    __tablename__ = "challenges"
    __table_args__ = (UniqueConstraint("result_id", "filed_by", "lo", "hi"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), index=True)
    filed_by: Mapped[str] = mapped_column(String(42))
    lo: Mapped[int] = mapped_column(Integer)
    hi: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="OPEN", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TaskDelivery(Base):
    """How many times a task message was delivered (the redelivery cap counts these)."""

    __tablename__ = "task_deliveries"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(200))
    deliveries: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeadLetter(Base):
    """A task that exhausted its deliveries: kept for operators, never silently dropped."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(String(200))
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    args: Mapped[list[object]] = mapped_column(JSON)
    deliveries: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookEndpoint(Base):
    """Where a network wants events delivered (HMAC-signed with ``secret``)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """The durable outbox: one row per (endpoint, event), retried with backoff."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("endpoint_id", "event_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(80))
    event: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, object]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="PENDING", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Dispute(Base):
    """One dispute game over one result (its state is the game engine's, as JSON)."""

    __tablename__ = "disputes"
    __table_args__ = (UniqueConstraint("result_id", "challenger", "lo", "hi"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), index=True)
    challenger: Mapped[str] = mapped_column(String(42))
    lo: Mapped[int] = mapped_column(Integer)
    hi: Mapped[int] = mapped_column(Integer)
    bond: Mapped[str] = mapped_column(String(78))
    state: Mapped[dict[str, object]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)  # OPEN | RESOLVED
    verdict: Mapped[str | None] = mapped_column(String(30), nullable=True)
    #: When the running clock (or proof deadline) expires, for the timer; None when resolved.
    timeout_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When this dispute's proof was last queued (unix seconds); None: never successfully (the
    #: broker was down when it was due), which the timers' recovery queues at its next beat.
    proof_requeued_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class TranscriptEvent(Base):
    """One event of a result's hash-chained transcript (challenge.transcript)."""

    __tablename__ = "transcript_events"
    __table_args__ = (UniqueConstraint("result_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    event: Mapped[dict[str, object]] = mapped_column(JSON)


class LedgerEntry(Base):
    """One journal entry of the bonds ledger (challenge.ledger). Each result keeps its own
    journal (challenge.books), numbered from 0: disputes on different results never write the
    same rows, and opening or resolving one reads its result's entries only (migration 0005
    split the one global journal)."""

    __tablename__ = "ledger_entries"

    result_id: Mapped[str] = mapped_column(ForeignKey("results.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    entry: Mapped[dict[str, object]] = mapped_column(JSON)


class SignedMessage(Base):
    """A challenger's signed message (challenge or move) that the service applied: replay
    protection. The EIP-712 digest identifies a retry of the same message (answered again,
    applied once); ``(signer, nonce)`` may not carry two different messages."""

    __tablename__ = "signed_messages"
    __table_args__ = (UniqueConstraint("signer", "nonce"),)

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    signer: Mapped[str] = mapped_column(String(42))
    nonce: Mapped[str] = mapped_column(String(78))  # uint256 as decimal text
    kind: Mapped[str] = mapped_column(String(20))  # challenge | move
    #: The dispute the message opened or moved.
    dispute_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
