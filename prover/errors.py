"""Errors of the prover, in refute's one hierarchy."""

from __future__ import annotations

from refute.errors import ServerFault


class ProverError(ServerFault):
    """Circuit building, setup, proving or verification failed (the service's own work: a 5xx
    if it reaches the API; a model EZKL cannot prove is refused at registration)."""

    code = "prover_error"


class CircuitUnsupported(ProverError):
    """EZKL cannot compile a segment's circuit (unsupported op, too large, out of range)."""

    code = "circuit_unsupported"


class SrsError(ProverError):
    """No usable KZG parameters (SRS) for the requested size."""

    code = "srs_error"


class ProofRejected(ProverError):
    """A proof does not verify, or its instances are not bound to the claimed states."""

    code = "proof_rejected"
