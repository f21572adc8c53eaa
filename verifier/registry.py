"""Model registration: safe loading, segmentation and calibration, off the API's threads.

Calibration runs EZKL, which holds the GIL, so it runs in a separate process
(:func:`register_in_subprocess`); the API only awaits it and stores the result.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import multiprocessing
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from prover.calibration import calibrate_model
from refute.errors import InputError, RefuteError
from refute.provider import prepare_model, random_inputs
from verifier.blobs import BlobStore
from verifier.models import RegisteredModel
from verifier.service import new_id

_POOL: concurrent.futures.ProcessPoolExecutor | None = None


def decode_model(onnx_base64: str) -> bytes:
    """The model bytes from base64; InputError if not base64."""
    try:
        return base64.b64decode(onnx_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("onnx_base64 is not valid base64") from exc


def build_manifest(data: bytes, options: dict[str, Any]) -> dict[str, Any]:
    """Load, segment and calibrate; return the calibrated manifest's JSON (or raise)."""
    prepared = prepare_model(data, dims=options.get("dims") or None,
                             shapes=options.get("shapes") or None, cuts=options.get("cuts"),
                             max_segments=options.get("max_segments"),
                             scale=int(options.get("scale", 7)))
    samples = [random_inputs(prepared.loaded, seed=s)
               for s in range(int(options.get("calibration_samples", 4)))]
    manifest, _report = calibrate_model(prepared, samples)
    return manifest.to_json()


def _build_safely(data: bytes, options: dict[str, Any]) -> dict[str, Any] | tuple[str, str]:
    try:
        return build_manifest(data, options)
    except RefuteError as exc:
        return (exc.code, exc.reason)


def register_in_subprocess(data: bytes, options: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`build_manifest` in the registration process; re-raise its refusals."""
    global _POOL  # noqa: PLW0603 - one lazily created pool per API process
    if _POOL is None:
        _POOL = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    outcome = _POOL.submit(_build_safely, data, options).result()
    if isinstance(outcome, tuple):
        code, reason = outcome
        error = RefuteError(reason)
        error.code = code
        raise error
    return outcome


def store_model(session: Session, blobs: BlobStore, *, network_id: str, data: bytes,
                manifest: dict[str, Any], manifest_sha256: str, now: datetime) -> RegisteredModel:
    """Record a registered model (idempotent per network and manifest)."""
    existing = session.scalars(select(RegisteredModel).where(
        RegisteredModel.network_id == network_id,
        RegisteredModel.manifest_sha256 == manifest_sha256)).first()
    if existing is not None:
        return existing
    row = RegisteredModel(id=new_id("mdl"), network_id=network_id,
                          model_sha256=str(manifest["model"]["sha256"]),
                          manifest_sha256=manifest_sha256, manifest=manifest,
                          model_blob=blobs.put(data), created_at=now)
    session.add(row)
    return row
