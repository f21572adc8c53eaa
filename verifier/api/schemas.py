"""Request and response bodies of the API (pydantic), with examples for the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue

from challenge.messages import checksummed_address
from challenge.outbox import EVENTS, utc

HEX32 = r"^0x[0-9a-fA-F]{64}$"
ADDRESS = r"^0x[0-9a-fA-F]{40}$"
#: The most segments of a result a network may have spot-checked.
MAX_SPOT_COUNT = 64


def _eip55(value: str) -> str:
    if checksummed_address(value) is None:
        raise ValueError("address has a wrong EIP-55 checksum: send it all lowercase or in its "
                         "exact checksummed form")
    return value


#: An Ethereum address: ``0x`` + 40 hex digits, all lowercase or uppercase, or mixed case with a
#: correct EIP-55 checksum (a mixed-case typo is a 422, never a wrong signer).
Address = Annotated[str, Field(pattern=ADDRESS,
                               examples=["0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"]),
                    AfterValidator(_eip55)]
#: A 32-byte word in hex (``0x`` + 64 hex digits).
Hex32 = Annotated[str, Field(pattern=HEX32)]


#: A moment in UTC, always shown with its offset (SQLite hands naive UTC values back).
UtcDatetime = Annotated[datetime, AfterValidator(utc)]


class ErrorDetail(BaseModel):
    """Why a request was refused."""

    code: str = Field(examples=["auth_error"])
    reason: str = Field(examples=["missing or invalid API key"])


class ErrorBody(BaseModel):
    """Every error answer has this body."""

    error: ErrorDetail


class NetworkCreate(BaseModel):
    """A new network and its sampling policy."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=200, examples=["acme-inference"])
    spot_probability: float = Field(default=0.1, ge=0.0, le=1.0)
    spot_count: int = Field(default=1, ge=0, le=MAX_SPOT_COUNT)
    challenge_window_s: int = Field(default=3600, ge=1, le=30 * 24 * 3600)
    #: The smallest bond a challenger may post: it covers the proof a dispute can cause.
    min_bond: int = Field(default=1, ge=1, lt=2**256)
    #: How long a sampled provider without an uploaded trace has to disclose the states its
    #: spot-check needs before the service challenges that step.
    disclosure_window_s: int = Field(default=600, ge=1, le=7 * 24 * 3600)


class NetworkCreated(BaseModel):
    """The network and its first API key (shown once)."""

    id: str = Field(examples=["net_4f1c9a0e2b7d6c5a1e3f9b08"])
    name: str
    api_key: str = Field(examples=["rk_" + "x" * 43])


class ModelOptions(BaseModel):
    """How to register a model: optional shape pins, cut choices and calibration inputs (the
    ``options`` part of a multipart registration, ``POST /v1/model-files``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    dims: dict[str, int] = Field(default_factory=dict, examples=[{"batch_size": 1}])
    shapes: dict[str, list[int]] = Field(default_factory=dict)
    cuts: list[int] | None = None
    max_segments: int | None = Field(default=None, ge=1, le=1024)
    calibration_samples: int = Field(default=4, ge=1, le=64)
    scale: int = Field(default=7, ge=0, le=30)
    #: A sample input in EZKL's ``input.json`` form (``{"input_data": [[…], …]}``): it pins the
    #: model's symbolic dimensions and is the first calibration input.
    sample_input: dict[str, Any] | None = Field(
        default=None, examples=[{"input_data": [[0.5, -1.0, 2.0]]}])


class ModelRegister(ModelOptions):
    """An ONNX model to register (base64) in one JSON body, with its options. A model over
    about 64 MB is sent as a file instead (``POST /v1/model-files``, streamed to disk)."""

    onnx_base64: str = Field(min_length=4, max_length=96 * 2**20)


class ModelOut(BaseModel):
    """A registered model and its calibrated manifest."""

    id: str
    model_sha256: str
    manifest_sha256: str
    manifest: dict[str, Any]
    created_at: datetime
    #: The registration report (per segment: operators, state sizes, τ, logrows, estimated
    #: proving memory and time, fit to the proving budget); returned when the model is
    #: registered, not stored.
    report: dict[str, Any] | None = None


class SignedResultMessage(BaseModel):
    """The EIP-712 ``Result`` message the provider signed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    network: str = Field(pattern=HEX32)
    model: str = Field(pattern=HEX32)
    input: str = Field(pattern=HEX32)
    output: str = Field(pattern=HEX32)
    traceRoot: str = Field(pattern=HEX32)  # noqa: N815 - the EIP-712 field name
    stake: int = Field(ge=0, lt=2**256)
    nonce: int = Field(ge=0, lt=2**256)
    deadline: int = Field(ge=0, lt=2**64)


class DomainIn(BaseModel):
    """The EIP-712 domain the provider signed under."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = "refute"
    version: str = "1"
    chainId: int = Field(ge=1, lt=2**256)  # noqa: N815
    verifyingContract: Address  # noqa: N815


class ResultSubmit(BaseModel):
    """A provider's signed result."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model_id: str = Field(min_length=1, max_length=40)
    provider: Address
    message: SignedResultMessage
    domain: DomainIn
    signature: str = Field(pattern=r"^(0x)?[0-9a-fA-F]{130}$")
    leaves: list[Hex32] = Field(min_length=2, max_length=4097)


#: Most results one batch submission carries.
MAX_BATCH = 500


class ResultBatch(BaseModel):
    """Signed results submitted together (``POST /v1/results/batch``), each accepted or refused
    on its own."""

    model_config = ConfigDict(extra="forbid", strict=True)
    results: list[ResultSubmit] = Field(min_length=1, max_length=MAX_BATCH)


class BatchItem(BaseModel):
    """What became of one result of a batch: ``status`` is the answer it would have had alone
    (202 accepted, 200 already accepted, 4xx refused with ``error``)."""

    index: int
    status: int
    id: str | None = None
    challenge_deadline: UtcDatetime | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    """Each result of a batch, in order, and how many were accepted."""

    items: list[BatchItem]
    accepted: int
    refused: int


class DisclosureRequest(BaseModel):
    """States a sampled provider must disclose (``PUT /v1/results/{id}/states``)."""

    states: list[int]
    deadline: UtcDatetime


class ResultOut(BaseModel):
    """A result as the service holds it."""

    id: str
    model_id: str
    provider: str
    status: str
    trace_root: str
    accepted_at: UtcDatetime
    challenge_deadline: UtcDatetime
    finalized_at: UtcDatetime | None
    trace_uploaded: bool
    spot_checks: list[dict[str, Any]] = Field(default_factory=list)
    #: Sampled segments whose check is not recorded yet (the result cannot finalize before).
    owed_checks: list[int] = Field(default_factory=list)
    #: The states the service needs disclosed for its owed checks, and until when.
    disclosure: DisclosureRequest | None = None


class ResultPage(BaseModel):
    """One page of results (newest first) and the cursor of the next page."""

    items: list[ResultOut]
    next_cursor: str | None


class Health(BaseModel):
    """Liveness / readiness answer."""

    status: str = Field(examples=["ok"])
    checks: dict[str, str] = Field(default_factory=dict)


#: The event names, for the schema of a subscription (documented, so clients and fuzzers know).
_EVENT_NAMES = list[JsonValue](sorted(EVENTS))


class WebhookCreate(BaseModel):
    """An endpoint to receive signed event deliveries."""

    model_config = ConfigDict(extra="forbid", strict=True)
    url: str = Field(min_length=8, max_length=2000, examples=["https://hooks.example.com/refute"])
    events: list[str] = Field(min_length=1, max_length=16,
                              examples=[["result.finalized", "result.disputed"]],
                              json_schema_extra={"items": {"type": "string",
                                                           "enum": _EVENT_NAMES}})


class WebhookCreated(BaseModel):
    """The endpoint and its signing secret (shown once)."""

    id: str
    url: str
    events: list[str]
    secret: str


class DeliveryOut(BaseModel):
    """One delivery of the outbox."""

    id: int
    endpoint_id: str
    event: str
    event_id: str
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    delivered_at: datetime | None


# --- the dispute explorer (GET /v1/disputes/{id}/record) ---------------------------------------


class TimelineEntry(BaseModel):
    """One event of a dispute, in transcript order, with the bisection interval after it."""

    seq: int = Field(description="the event's position in the result's transcript")
    kind: str = Field(examples=["answer"])
    at: float = Field(description="when the event was recorded (unix seconds)")
    move_at: float | None = Field(default=None, description="the move's own time")
    actor: str | None = Field(default=None, examples=["challenger"])
    phase: str | None = Field(default=None, description="the phase the move led to")
    round: int = Field(description="bisection rounds completed after this event")
    lo: int = Field(description="the highest state agreed on after this event")
    hi: int = Field(description="the lowest state disputed after this event")
    state: int | None = None
    leaf: str | None = Field(default=None, description="the committed leaf of ``state``")
    choice: str | None = None
    step: int | None = None
    tile: int | None = None
    verdict: str | None = None
    reason: str | None = None


class ChainCheck(BaseModel):
    """The transaction that verified a proof on chain (``REFUTE_CHAIN_RPC_URL``)."""

    contract: str | None = None
    tx: str | None = None
    gas: int | None = None


class ProofRecord(BaseModel):
    """A proof a dispute was settled by, as its transcript event records it (the game records
    only proofs the prover verified with the verifying key named here)."""

    seq: int
    kind: str = Field(examples=["step"], description="``step`` or ``range``")
    step: int | None = None
    state: int | None = None
    tile: int | None = None
    maxdiff_units: str | None = Field(default=None, description="exact, ``a`` or ``a/b``")
    tolerance: int | None = Field(default=None, description="τ of the step, in units")
    max_abs_units: str | None = None
    bound: int | None = None
    circuit: str | None = None
    vk_sha256: str | None = None
    settings_sha256: str | None = None
    proof_bytes: int = Field(description="size of the proof as recorded (JSON bytes)")
    chain: ChainCheck | None = Field(default=None, description="``null``: not checked on chain")


class PostingOut(BaseModel):
    """One leg of a ledger entry."""

    account: str
    amount: int


class LedgerEntryOut(BaseModel):
    """One entry of the result's bonds journal."""

    seq: int
    kind: str = Field(examples=["post_bond"])
    reference: str
    memo: str
    postings: list[PostingOut]
    this_dispute: bool = Field(description="whether the entry is about this dispute")


class TranscriptCheckLine(BaseModel):
    """One check of the transcript (as ``refute replay`` prints it)."""

    name: str = Field(examples=["chain"])
    ok: bool
    detail: str
    seq: int | None = None


class TranscriptCheck(BaseModel):
    """The result's transcript checked by the service: its hash chain recomputed, its head
    signed with the service's BLS key and the signature verified (FastAggregateVerify)."""

    ok: bool
    head: str
    length: int
    public_key: str = Field(description="the service's BLS public key (48 bytes, hex)")
    signature: str | None = Field(default=None, description="its signature over the head")
    checks: list[TranscriptCheckLine]


class ClocksOut(BaseModel):
    """A dispute's time control and what is left of it."""

    provider_s: float
    challenger_s: float
    proof_timeout_s: float
    provider_left_s: float
    challenger_left_s: float
    turn: str | None = Field(default=None, description="whose clock runs; ``null``: nobody's")
    turn_started: float
    deadline: float | None = Field(default=None, description="when the running clock expires")
