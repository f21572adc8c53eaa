"""The chain port's web3 adapter: a settled proof verified again by its Solidity verifier.

It satisfies :class:`challenge.context.Chain` structurally and is plugged in by the composition
root when ``REFUTE_CHAIN_RPC_URL`` is set. Each circuit's verifier contract is compiled with the
pinned solc and deployed once per verifying key (cached for the adapter's life); every proof is
then verified by a transaction whose hash and gas are recorded in the transcript.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from prover.evm import (
    ANVIL_DEV_KEY,
    ChainError,
    compile_solidity,
    deploy,
    verify_transaction,
    write_verifier_sol,
)


class RpcChain:
    """Verifies proofs on the EVM chain at ``rpc_url``, sending from ``private_key``."""

    def __init__(self, rpc_url: str, workdir: Path, private_key: str = ANVIL_DEV_KEY) -> None:
        self.rpc_url = rpc_url
        self.workdir = workdir
        self.private_key = private_key
        self._contracts: dict[str, str] = {}
        self._lock = threading.Lock()

    def _contract(self, vk: bytes, settings: bytes, srs: bytes) -> tuple[str, Path]:
        key = hashlib.sha256(vk).hexdigest()
        folder = self.workdir / key
        with self._lock:
            if key not in self._contracts:
                folder.mkdir(parents=True, exist_ok=True)
                paths = {name: folder / name for name in ("vk.key", "settings.json", "kzg.srs")}
                for path, data in zip(paths.values(), (vk, settings, srs), strict=True):
                    path.write_bytes(data)
                sol = write_verifier_sol(paths["vk.key"], paths["settings.json"],
                                         folder / "Verifier.sol", paths["kzg.srs"])
                self._contracts[key] = deploy(self.rpc_url, compile_solidity(sol),
                                              self.private_key)
            return self._contracts[key], folder

    def verify(self, vk: bytes, settings: bytes, srs: bytes, proof: Any) -> dict[str, Any]:
        """Verify ``proof`` (an EZKL proof JSON object) by a transaction; what to record."""
        address, folder = self._contract(vk, settings, srs)
        path = folder / f"proof-{hashlib.sha256(json.dumps(proof).encode()).hexdigest()}.json"
        path.write_text(json.dumps(proof))
        tx = verify_transaction(self.rpc_url, address, path, private_key=self.private_key)
        if not tx.success:
            raise ChainError(f"the proof does not verify on chain (contract {address}, "
                             f"transaction {tx.tx_hash or 'not sent: the dry run failed'})")
        return {"contract": address, "tx": tx.tx_hash, "gas": tx.gas_used}
