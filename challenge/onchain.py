"""Settle a dispute's proof on chain: deploy its circuit's Solidity verifier on a local anvil and
verify the proof recorded in the transcript by a transaction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prover.evm import TxResult


def verify_outcome_on_chain(outcome: dict[str, Any], folder: Path) -> TxResult:
    """Verify the proof of a ``proofoutcome`` transcript event's body on a fresh anvil.

    The circuit is read from the prover's cache (``REFUTE_HOME``) by the key the event names;
    the verifier contract is compiled with the pinned solc, deployed, and called by a
    transaction, whose result (success, gas) is returned.
    """
    from prover.circuit import Circuit
    from prover.evm import Anvil, compile_solidity, deploy, verify_transaction, write_verifier_sol
    from refute.settings import get_settings

    folder.mkdir(parents=True, exist_ok=True)
    circuit = Circuit.load(get_settings().home / "circuits" / str(outcome["circuit"]))
    sol = write_verifier_sol(circuit.vk_path, circuit.settings_path, folder / "Verifier.sol",
                             circuit.srs_path)
    proof = folder / "proof.json"
    proof.write_text(json.dumps(outcome["proof"]))
    with Anvil() as chain:
        address = deploy(chain.rpc_url, compile_solidity(sol))
        return verify_transaction(chain.rpc_url, address, proof)
