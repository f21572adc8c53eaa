"""The reference whistleblower: challenge a result through the API and play the bisection.

It knows the job's input, executes the model itself (the deterministic executor), and answers
each revealed state honestly: AGREE when the committed leaf of state m equals the leaf of its
own state m, or else when the revealed state (fetched from the service, checked against its
leaf) is within τ_m of its own everywhere (:func:`refute.verdict.agrees`: a provider's
optimized run differs from the deterministic one by float rounding); DISAGREE otherwise. It
signs the challenge and every move with its own key (EIP-712).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from challenge.messages import (
    MOVE_AGREE,
    MOVE_DISAGREE,
    MOVE_TILE,
    Challenge,
    Domain,
    Move,
    network_word,
    sign_typed,
)
from refute.disclosure import read_states
from refute.errors import RefuteError
from refute.executor import DeterministicExecutor
from refute.manifest import Manifest
from refute.provider import PreparedModel, validate_inputs
from refute.segmentation import Segment, run_segments
from refute.tiling import segment_tiling, worst_tile
from refute.trace import leaf_of_state
from refute.verdict import agrees, state_tolerance

Report = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


@dataclass(frozen=True)
class OwnExecution:
    """The whistleblower's own execution of the job: every state and its leaf."""

    manifest: Manifest
    states: list[list[np.ndarray]]
    leaves: list[str]
    segments: tuple[Segment, ...] = ()
    """The model's segments (to name a tile of a tiled step)."""

    def agrees(self, k: int, theirs: list[np.ndarray] | tuple[np.ndarray, ...]) -> bool:
        """Whether a revealed state k is within τ_k of this execution's state k."""
        return agrees(self.states[k], theirs, scale=self.manifest.scale,
                      tolerance=state_tolerance(self.manifest.tolerances, k))

    def worst_tile(self, step: int, theirs: list[np.ndarray]) -> int:
        """The tile of tiled segment ``step`` where the revealed state ``step`` differs most
        from this execution (:func:`refute.tiling.worst_tile`)."""
        tiling = segment_tiling(self.manifest.circuits, self.segments[step - 1])
        if tiling is None:
            raise RefuteError(f"segment {step} is not tiled in the manifest")
        return worst_tile(tiling, self.states[step], theirs).index


class Whistleblower:
    """A challenger with its own key, its own execution, and an HTTP client."""

    def __init__(self, api_url: str, private_key: bytes | str, address: str, *,
                 chain_id: int = 31337, client: httpx.Client | None = None,
                 retry_for: float = 60.0) -> None:
        self.http = client or httpx.Client(base_url=api_url, timeout=120)
        self.key = private_key
        self.address = address
        self.domain = Domain(chain_id=chain_id)
        self.retry_for = retry_for

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self._request(method, path, **kwargs)
        if answer.status_code >= 400:
            try:
                reason = answer.json()["error"]["reason"]
            except (ValueError, KeyError, TypeError):
                reason = answer.text[:200]
            raise RefuteError(f"{method} {path}: HTTP {answer.status_code}: {reason}")
        return answer.json()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; a refused connection (the API restarting) is retried for a while.

        Only connection failures are retried: the request never reached the API, so sending it
        again cannot apply a move twice.
        """
        delay, waited = 0.25, 0.0
        while True:
            try:
                return self.http.request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                if waited >= self.retry_for:
                    raise RefuteError(f"{method} {path}: the API is unreachable: {exc}") from exc
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)

    def _domain_json(self) -> dict[str, Any]:
        return {"name": self.domain.name, "version": self.domain.version,
                "chainId": self.domain.chain_id,
                "verifyingContract": self.domain.verifying_contract}

    def own_execution(self, prepared: PreparedModel,
                      inputs: Mapping[str, np.ndarray]) -> OwnExecution:
        """This whistleblower's own execution of the job (states 0..N and their leaves)."""
        own = run_segments(DeterministicExecutor(), prepared.segmentation,
                           validate_inputs(prepared.loaded, inputs))
        return OwnExecution(prepared.manifest, own, [
            "0x" + leaf_of_state(prepared.manifest, k, s).hex() for k, s in enumerate(own)],
            prepared.segmentation.segments)

    def challenge(
        self,
        result_id: str,
        prepared: PreparedModel,
        inputs: Mapping[str, np.ndarray],
        *,
        bond: int,
        lo: int = 0,
        hi: int | None = None,
        poll: float = 0.5,
        timeout: float = 900.0,
        report: Report = _quiet,
    ) -> dict[str, Any]:
        """Open a dispute and play it to its verdict; returns the final dispute view."""
        dispute = self.open(result_id, bond=bond, lo=lo, hi=hi, report=report)
        return self.play(dispute["id"], self.own_execution(prepared, inputs), poll=poll,
                         timeout=timeout, report=report)

    def open(self, result_id: str, *, bond: int, lo: int = 0, hi: int | None = None,
             report: Report = _quiet) -> dict[str, Any]:
        """Open a bonded dispute over states (lo, hi] (the whole trace by default)."""
        public = self._call("GET", f"/v1/public/results/{result_id}")
        n = len(public["leaves"]) - 1
        hi = n if hi is None else hi
        body = self.challenge_body(public["network_id"], result_id, lo=lo, hi=hi, bond=bond,
                                   nonce=time.time_ns())
        dispute: dict[str, Any] = self._call("POST", f"/v1/results/{result_id}/challenges",
                                             json=body)
        report(f"opened dispute {dispute['id']} over states {lo}..{hi}")
        return dispute

    def play(self, dispute_id: str, own: OwnExecution, *, poll: float = 0.5,
             timeout: float = 900.0, report: Report = _quiet) -> dict[str, Any]:
        """Play an open dispute to its verdict, answering each revealed state honestly.

        Safe to call again after a crash of this client or of the API: it reads the dispute's
        state and answers only what is pending; the API refuses an answer for a past round.
        """
        dispute = self._call("GET", f"/v1/disputes/{dispute_id}")
        public = self._call("GET", f"/v1/public/results/{dispute['result_id']}")
        if len(own.leaves) != len(public["leaves"]):
            raise RefuteError(f"my execution has {len(own.leaves)} states, the result "
                              f"commits {len(public['leaves'])}")
        answered: set[int] = set()
        named = False
        stop = time.monotonic() + timeout
        while dispute["status"] == "OPEN":
            if dispute["phase"] == "answer" and dispute["rounds"] not in answered:
                m = dispute["pending"]
                same = own.leaves[m] == dispute["pending_leaf"]
                agree = same or own.agrees(m, self.revealed(dispute_id, m, own.manifest,
                                                            public["leaves"]))
                how = ("matches" if same else "is within τ of" if agree
                       else "differs beyond τ from")
                report(f"round {dispute['rounds'] + 1}: state {m} {how} my execution → "
                       f"{'AGREE' if agree else 'DISAGREE'}")
                self._answer(public["network_id"], dispute, agree=agree)
                answered.add(dispute["rounds"])
            elif dispute["phase"] == "tile" and not named:
                step = dispute["hi"]
                tile = own.worst_tile(step, self.revealed(dispute_id, step, own.manifest,
                                                          public["leaves"]))
                report(f"step {step} is tiled ({dispute['tiles']} tiles): naming tile {tile}, "
                       f"where state {step} differs most from my execution")
                self._move(public["network_id"], dispute, kind=MOVE_TILE,
                           payload=tile.to_bytes(32, "big"))
                named = True
            elif time.monotonic() > stop:
                raise RefuteError(f"dispute {dispute_id} undecided after {timeout:.0f} s")
            else:
                time.sleep(poll)
            dispute = self._call("GET", f"/v1/disputes/{dispute_id}")
        report(f"verdict {dispute['verdict']}")
        return dict(dispute)

    def revealed(self, dispute_id: str, k: int, manifest: Manifest,
                 leaves: list[str]) -> list[np.ndarray]:
        """State k of a dispute, fetched from the service and checked against its committed
        leaf (a state that does not match is refused, never compared)."""
        answer = self._request("GET", f"/v1/disputes/{dispute_id}/states/{k}")
        if answer.status_code >= 400:
            raise RefuteError(f"GET state {k} of dispute {dispute_id}: HTTP "
                              f"{answer.status_code}: {answer.text[:200]}")
        return list(read_states(manifest, answer.content, leaves)[k])

    def challenge_body(self, network_id: str, result_id: str, *, lo: int, hi: int, bond: int,
                       nonce: int) -> dict[str, Any]:
        """The signed request body that opens a dispute over states (lo, hi]."""
        deadline = int(time.time()) + 3600
        claim = Challenge(network=network_word(network_id), result=network_word(result_id),
                          lo=lo, hi=hi, bond=bond, nonce=nonce, deadline=deadline)
        return {"challenger": self.address, "domain": self._domain_json(),
                "signature": "0x" + sign_typed(claim, self.domain, self.key).hex(),
                "message": {"network": "0x" + claim.network.hex(),
                            "result": "0x" + claim.result.hex(), "lo": lo, "hi": hi,
                            "bond": bond, "nonce": nonce, "deadline": deadline}}

    def move_body(self, network_id: str, dispute: dict[str, Any], *, agree: bool,
                  nonce: int) -> dict[str, Any]:
        """The signed request body answering the dispute's pending state in its current round."""
        return self.signed_move(network_id, dispute,
                                kind=MOVE_AGREE if agree else MOVE_DISAGREE,
                                payload=bytes.fromhex(dispute["pending_leaf"][2:]), nonce=nonce)

    def signed_move(self, network_id: str, dispute: dict[str, Any], *, kind: int,
                    payload: bytes, nonce: int) -> dict[str, Any]:
        """The signed request body of a move of ``kind`` (``challenge.messages.MOVE_*``) in
        the dispute's current round."""
        deadline = int(time.time()) + 600
        signed = Move(network=network_word(network_id), dispute=network_word(dispute["id"]),
                      round=dispute["rounds"], kind=kind, payload=payload, nonce=nonce,
                      deadline=deadline)
        return {"player": self.address, "domain": self._domain_json(),
                "signature": "0x" + sign_typed(signed, self.domain, self.key).hex(),
                "message": {"network": "0x" + signed.network.hex(),
                            "dispute": "0x" + signed.dispute.hex(), "round": signed.round,
                            "kind": signed.kind, "payload": "0x" + signed.payload.hex(),
                            "nonce": nonce, "deadline": deadline}}

    def _answer(self, network_id: str, dispute: dict[str, Any], *, agree: bool) -> None:
        body = self.move_body(network_id, dispute, agree=agree, nonce=time.time_ns())
        self._call("POST", f"/v1/disputes/{dispute['id']}/moves", json=body)

    def _move(self, network_id: str, dispute: dict[str, Any], *, kind: int,
              payload: bytes) -> None:
        body = self.signed_move(network_id, dispute, kind=kind, payload=payload,
                                nonce=time.time_ns())
        self._call("POST", f"/v1/disputes/{dispute['id']}/moves", json=body)
