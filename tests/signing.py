"""Signed result bodies for API tests: a provider's EIP-712 claim over a real trace."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from eth_account import Account

from challenge.messages import Domain, network_word, sign_typed
from challenge.messages import Result as SignedResult
from refute import zoo
from refute.manifest import Manifest
from refute.provider import prepare_model, run_trace
from refute.trace import Trace

PROVIDER = Account.from_key(b"\x01" * 32)


def signed_result(network_id: str, model_body: dict[str, Any], *, nonce: int, seed: int = 0,
                  key: Any = PROVIDER, chain_id: int = 31337, deadline: int | None = None,
                  provider: str | None = None,
                  trace: Trace | None = None) -> tuple[dict[str, Any], Trace]:
    """A signed result body for ``POST /v1/results`` over an honest trace of the small zoo MLP
    (``zoo.mlp()``) registered as ``model_body`` (or over ``trace``, a lie), and that trace."""
    if trace is None:
        manifest = Manifest.from_json(model_body["manifest"])
        model = zoo.mlp()
        prepared = dataclasses.replace(prepare_model(model.onnx_bytes), manifest=manifest)
        trace = run_trace(prepared, model.sample_input(seed))
    claim = SignedResult(
        network=network_word(network_id), model=bytes.fromhex(model_body["model_sha256"]),
        input=b"\x11" * 32, output=b"\x22" * 32, trace_root=trace.commitment.root, stake=10,
        nonce=nonce, deadline=deadline if deadline is not None else int(time.time()) + 600)
    domain = Domain(chain_id=chain_id)
    signature = sign_typed(claim, domain, key.key)
    body = {
        "model_id": model_body["id"], "provider": provider or PROVIDER.address,
        "message": {"network": "0x" + claim.network.hex(), "model": "0x" + claim.model.hex(),
                    "input": "0x" + claim.input.hex(), "output": "0x" + claim.output.hex(),
                    "traceRoot": "0x" + claim.trace_root.hex(), "stake": claim.stake,
                    "nonce": claim.nonce, "deadline": claim.deadline},
        "domain": {"name": "refute", "version": "1", "chainId": chain_id,
                   "verifyingContract": "0x" + "00" * 20},
        "signature": "0x" + signature.hex(),
        "leaves": ["0x" + leaf.hex() for leaf in trace.commitment.leaves],
    }
    return body, trace
