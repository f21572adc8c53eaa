"""A typed Python client for networks and providers.

::

    client = RefuteClient("http://127.0.0.1:8000", api_key)
    model = client.register_model(onnx_bytes, dims={"batch_size": 1})
    result = client.submit_result(signed_body)
    client.upload_trace(result.id, trace_bundle_bytes)
    final = client.wait(result.id, until={"FINALIZED", "PROVIDER_FAULT"})

Every refusal raises :class:`ApiError` with the server's ``code`` and one-line ``reason``.
A provider signs results with :func:`sign_result` (EIP-712, see :mod:`verifier.auth`).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np

from challenge.messages import Domain, network_word, sign_typed
from challenge.messages import Result as SignedResult
from refute.disclosure import state_pieces
from refute.errors import RefuteError
from refute.trace import Trace

TERMINAL = frozenset({"FINALIZED", "PROVIDER_FAULT"})


class ApiError(RefuteError):
    """The service refused a request."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Disclosure:
    """The committed states a sampled result's owed spot-checks need from its provider (when
    no trace is stored), and until when they may be disclosed."""

    states: tuple[int, ...]
    deadline: datetime

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> Disclosure | None:
        """Parse the API's JSON (``null`` when nothing is requested)."""
        if not data:
            return None
        return cls(tuple(int(k) for k in data["states"]),
                   datetime.fromisoformat(str(data["deadline"])))


@dataclass(frozen=True)
class ResultView:
    """A result as the service reports it."""

    id: str
    model_id: str
    provider: str
    status: str
    challenge_deadline: datetime
    trace_uploaded: bool
    spot_checks: tuple[dict[str, Any], ...]
    #: Sampled segments whose check is not recorded yet.
    owed_checks: tuple[int, ...] = ()
    #: What the provider is asked to disclose (``None``: nothing, or the trace is stored).
    disclosure: Disclosure | None = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> ResultView:
        """Parse the API's JSON."""
        return cls(str(data["id"]), str(data["model_id"]), str(data["provider"]),
                   str(data["status"]), datetime.fromisoformat(data["challenge_deadline"]),
                   bool(data["trace_uploaded"]), tuple(data.get("spot_checks", ())),
                   tuple(int(i) for i in data.get("owed_checks", ())),
                   Disclosure.of(data.get("disclosure")))


@dataclass(frozen=True)
class BatchItem:
    """What became of one result of a batch: ``status`` is the answer it would have had alone
    (202 accepted, 200 already accepted, 4xx refused: ``code`` and ``reason`` say why)."""

    index: int
    status: int
    id: str | None
    challenge_deadline: datetime | None
    code: str | None = None
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        """Whether the result stands (newly accepted or accepted before)."""
        return self.status in (200, 202)

    @classmethod
    def of(cls, data: dict[str, Any]) -> BatchItem:
        """Parse one item of the API's JSON."""
        error = data.get("error") or {}
        deadline = data.get("challenge_deadline")
        return cls(int(data["index"]), int(data["status"]), data.get("id"),
                   datetime.fromisoformat(deadline) if deadline else None,
                   error.get("code"), error.get("reason"))


def sign_result(
    *,
    network_id: str,
    model_id: str,
    model_sha256: str,
    trace: Trace,
    input_hash: bytes,
    output_hash: bytes,
    stake: int,
    nonce: int,
    deadline: int,
    private_key: bytes | str,
    provider: str,
    chain_id: int = 31337,
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/results`` for a trace, signed by the provider's key."""
    claim = SignedResult(network=network_word(network_id), model=bytes.fromhex(model_sha256),
                         input=input_hash, output=output_hash, trace_root=trace.commitment.root,
                         stake=stake, nonce=nonce, deadline=deadline)
    domain = Domain(chain_id=chain_id)
    signature = sign_typed(claim, domain, private_key)

    def hex32(value: bytes) -> str:
        return "0x" + value.hex()

    return {
        "model_id": model_id,
        "provider": provider,
        "message": {"network": hex32(claim.network), "model": hex32(claim.model),
                    "input": hex32(input_hash), "output": hex32(output_hash),
                    "traceRoot": hex32(claim.trace_root), "stake": stake, "nonce": nonce,
                    "deadline": deadline},
        "domain": {"name": domain.name, "version": domain.version, "chainId": chain_id,
                   "verifyingContract": domain.verifying_contract},
        "signature": "0x" + signature.hex(),
        "leaves": [hex32(leaf) for leaf in trace.commitment.leaves],
    }


#: Bytes per chunk when a trace is streamed from a file.
_UPLOAD_CHUNK = 1 << 20


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    """A file's bytes in chunks of :data:`_UPLOAD_CHUNK`."""
    while chunk := source.read(_UPLOAD_CHUNK):
        yield chunk


class RefuteClient:
    """HTTP client of the refute API for one network (identified by its API key)."""

    def __init__(self, base_url: str, api_key: str | None = None, *,
                 timeout: float = 120.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RefuteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            answer = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, "unreachable", f"cannot reach the service: {exc}") from exc
        if answer.status_code >= 400:
            try:
                error = answer.json()["error"]
                raise ApiError(answer.status_code, str(error["code"]), str(error["reason"]))
            except (ValueError, KeyError, TypeError):
                raise ApiError(answer.status_code, "http_error",
                               f"HTTP {answer.status_code}: {answer.text[:200]}") from None
        return answer.json()

    def create_network(self, name: str, *, admin_token: str | None = None,
                       spot_probability: float = 0.1, spot_count: int = 1,
                       challenge_window_s: int = 3600,
                       disclosure_window_s: int | None = None) -> tuple[str, str]:
        """Create a network; returns (network id, API key). Use the key for a new client.
        ``disclosure_window_s`` (the service's default when None) is how long a sampled
        provider without an uploaded trace has to disclose the states its checks need."""
        headers = {"X-Admin-Token": admin_token} if admin_token else {}
        fields: dict[str, Any] = {
            "name": name, "spot_probability": spot_probability, "spot_count": spot_count,
            "challenge_window_s": challenge_window_s}
        if disclosure_window_s is not None:
            fields["disclosure_window_s"] = disclosure_window_s
        body = self._call("POST", "/v1/networks", headers=headers, json=fields)
        return str(body["id"]), str(body["api_key"])

    def register_model(self, onnx: bytes | Path, *, dims: dict[str, int] | None = None,
                       shapes: dict[str, list[int]] | None = None,
                       cuts: Sequence[int] | None = None, calibration_samples: int = 4,
                       sample_input: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register a model (loads, segments, calibrates); returns id, hashes, manifest and
        the registration report. ``onnx`` is the model's bytes (sent in one JSON body), or the
        path of its file (streamed as a multipart file, never held in memory: the way to send a
        large model). ``sample_input`` (EZKL's ``input.json`` form) pins symbolic dimensions
        and is calibrated on."""
        options = {"dims": dims or {}, "shapes": shapes or {},
                   "cuts": list(cuts) if cuts is not None else None,
                   "calibration_samples": calibration_samples, "sample_input": sample_input}
        if isinstance(onnx, Path):
            with onnx.open("rb") as source:
                body: dict[str, Any] = self._call(
                    "POST", "/v1/model-files",
                    files={"model": (onnx.name, source, "application/octet-stream")},
                    data={"options": json.dumps(options)})
            return body
        body = self._call("POST", "/v1/models", json={
            "onnx_base64": base64.b64encode(onnx).decode(), **options})
        return body

    def submit_result(self, signed_body: dict[str, Any]) -> ResultView:
        """Submit a signed result (see :func:`sign_result`); accepted at once."""
        return ResultView.of(self._call("POST", "/v1/results", json=signed_body))

    def submit_results(self, signed_bodies: Sequence[dict[str, Any]]) -> list[BatchItem]:
        """Submit up to 500 signed results in one request; each is accepted or refused on its
        own (:class:`BatchItem`, in order)."""
        body = self._call("POST", "/v1/result-batches", json={"results": list(signed_bodies)})
        return [BatchItem.of(item) for item in body["items"]]

    def upload_trace(self, result_id: str, bundle: bytes | Path) -> ResultView:
        """Upload the trace bundle of a result: its bytes, or a path to stream it from (a large
        trace is sent in chunks, never held in memory here)."""
        if isinstance(bundle, Path):
            with bundle.open("rb") as source:
                return ResultView.of(self._call(
                    "PUT", f"/v1/results/{result_id}/trace", content=_chunks(source),
                    headers={"Content-Type": "application/zip",
                             "Content-Length": str(bundle.stat().st_size)}))
        return ResultView.of(self._call("PUT", f"/v1/results/{result_id}/trace", content=bundle,
                                        headers={"Content-Type": "application/zip"}))

    def disclose_states(self, result_id: str, bundle: bytes) -> ResultView:
        """Disclose committed states of a result (a ``refute.states/2`` bundle made by
        :func:`refute.disclosure.write_states`): the alternative to uploading the whole trace
        when the result's ``disclosure`` asks for them. Each must reproduce its leaf."""
        return ResultView.of(self._call("PUT", f"/v1/results/{result_id}/states",
                                        content=bundle,
                                        headers={"Content-Type": "application/zip"}))

    def disclose_state(self, result_id: str, k: int,
                       state: Sequence[np.ndarray]) -> ResultView:
        """Disclose state ``k`` of a result alone, streamed as its canonical bytes (the bytes
        its leaf hashes, sent in pieces of at most 1 MiB: no copy of the state is made here);
        the service verifies it against leaf ``k`` as it arrives."""
        length = sum(len(piece) for piece in state_pieces(state))
        return ResultView.of(self._call(
            "PUT", f"/v1/results/{result_id}/states/{k}",
            content=(bytes(piece) for piece in state_pieces(state)),
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(length)}))

    def result(self, result_id: str) -> ResultView:
        """One result."""
        return ResultView.of(self._call("GET", f"/v1/results/{result_id}"))

    def results(self, *, status: str | None = None, model_id: str | None = None,
                page_size: int = 100) -> Iterator[ResultView]:
        """Every result of the network (newest first), following pagination."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            for key, value in (("status", status), ("model_id", model_id), ("cursor", cursor)):
                if value is not None:
                    params[key] = value
            page = self._call("GET", "/v1/results", params=params)
            yield from (ResultView.of(item) for item in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def register_webhook(self, url: str, events: Sequence[str]) -> dict[str, Any]:
        """Register an event endpoint; the answer holds its signing secret (shown once)."""
        body: dict[str, Any] = self._call("POST", "/v1/webhooks",
                                          json={"url": url, "events": list(events)})
        return body

    def deliveries(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """The network's webhook deliveries, newest first."""
        params = {"status": status} if status else {}
        body: list[dict[str, Any]] = self._call("GET", "/v1/webhooks/deliveries", params=params)
        return body

    def wait(self, result_id: str, *, until: frozenset[str] = TERMINAL,
             timeout: float = 600.0, poll: float = 1.0) -> ResultView:
        """Poll a result until its status is in ``until``; ApiError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.result(result_id)
            if view.status in until:
                return view
            if time.monotonic() > deadline:
                raise ApiError(0, "timeout", f"result {result_id} still {view.status} after "
                                             f"{timeout:.0f} s")
            time.sleep(poll)
