"""One exception hierarchy for everything refute raises.

Every error carries a one-line ``reason`` meant for people (the CLI prints it, the API returns
it in its error body). Errors from ONNX, ONNX Runtime, EZKL and the file system are translated at
the boundary with ``raise SomeRefuteError(...) from exc`` so callers only ever catch
:class:`RefuteError`.

Each class says what the API answers with ``http_status``, chosen by what the error means, never
by its text: a refusal of what the caller sent is a 4xx (the default, 400, unless the class
names a closer one: 404, 409, 422…); a failure of the service itself belongs to
:class:`ServerFault` (500), or :class:`Unavailable` (503) when a dependency cannot be reached.
"""

from __future__ import annotations


class RefuteError(Exception):
    """Base class of every error refute raises on purpose."""

    #: A short, stable machine-readable code (used in API error bodies).
    code: str = "refute_error"
    #: The HTTP status the API answers with: the caller's fault (4xx) unless a subclass says the
    #: service failed (:class:`ServerFault`).
    http_status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


# --- model loading -------------------------------------------------------------------------


class ModelRejected(RefuteError):
    """The model cannot be accepted; ``reason`` says why in one line."""

    code = "model_rejected"
    http_status = 422


class ModelTooLarge(ModelRejected):
    """The file, the graph or one of its tensors exceeds a configured limit."""

    code = "model_too_large"


class ModelDecodeError(ModelRejected):
    """The bytes are not a well-formed ONNX protobuf (truncated, garbage, wrong type)."""

    code = "model_decode_error"


class ExternalDataRefused(ModelRejected):
    """The model refers to data outside itself (external-data files or any path)."""

    code = "external_data_refused"


class UnprovableModel(ModelRejected):
    """A segment of the model cannot be compiled into a circuit (found at registration, so it
    is never discovered in a dispute)."""

    code = "model_unprovable"


class UnsupportedOperator(ModelRejected):
    """The model uses an operator, domain or construct outside the allowlist."""

    code = "unsupported_operator"


class UnsupportedOpset(ModelRejected):
    """The model's opset (or IR version) is outside the supported range."""

    code = "unsupported_opset"


class ShapeError(ModelRejected):
    """Shapes are not static (and were not pinned) or cannot be inferred consistently."""

    code = "shape_error"


class InvalidGraph(ModelRejected):
    """The graph is structurally broken: dangling names, cycles, duplicate outputs."""

    code = "invalid_graph"


# --- the service's own failures ------------------------------------------------------------


class ServerFault(RefuteError):
    """The service failed, not the caller (an execution, a proof, the books, the storage): the
    API answers 5xx, logs the traceback and gives the request id."""

    code = "server_fault"
    http_status = 500


class Misconfigured(ServerFault):
    """The service is not configured to do this (a required secret is missing or malformed):
    the operator must set it; ``GET /v1/ready`` names it."""

    code = "misconfigured"
    http_status = 503


class Unavailable(ServerFault):
    """A dependency (database, broker, blob store, chain) cannot be reached or used right now;
    the same request may succeed later."""

    code = "unavailable"
    http_status = 503


# --- segmentation and execution ------------------------------------------------------------


class SegmentationError(RefuteError):
    """Cuts are invalid, or the segments do not reproduce the whole model."""

    code = "segmentation_error"
    http_status = 422


class ExecutionError(ServerFault):
    """ONNX Runtime failed to build a session or to run it on the given state (a model that
    cannot run is refused at registration, so later this is the service's failure)."""

    code = "execution_error"


class InputError(RefuteError):
    """Model inputs supplied by a caller do not match the model (names, shapes, dtypes)."""

    code = "input_error"


# --- commitments, traces, manifests --------------------------------------------------------


class CommitmentError(RefuteError):
    """A value cannot be committed (NaN, infinity, out of range) or a proof does not verify."""

    code = "commitment_error"


class BundleError(RefuteError):
    """A trace bundle or manifest is malformed or inconsistent with its own commitment."""

    code = "bundle_error"


class BindingError(RefuteError):
    """A proof is not bound to the result: a revealed state does not reproduce its committed
    leaf, or the proof's hash instances are not Poseidon of the revealed states."""

    code = "binding_error"


class Conflict(InputError):
    """The request contradicts an existing object (a replayed nonce, a lost race on a write)."""

    code = "conflict"
    http_status = 409


class NotFound(RefuteError):
    """The object does not exist (or belongs to another network)."""

    code = "not_found"
    http_status = 404
