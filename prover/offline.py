"""Checking a proof bundle offline, and optionally on a local EVM chain."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from prover.circuit import META, SETTINGS, VK, Circuit
from prover.errors import ProofRejected
from prover.proof_bundle import ProofBundle, proof_states
from prover.srs import SrsStore
from prover.step import bind, maxdiff_units, verify_proof_file
from refute.verdict import (
    Verdict,
    VerdictError,
    range_bound_units,
    range_verdict,
    step_verdict,
)


@dataclass(frozen=True)
class BundleOutcome:
    """The result of checking a proof bundle: the proven value and its threshold (τ, or R in
    units), both in quantized units, and the verdict :mod:`refute.verdict` gives them."""

    kind: str
    index: int
    value_units: Fraction
    threshold: int
    verdict: Verdict
    unsafe_srs: bool


def materialize(bundle: ProofBundle, srs: SrsStore, folder: Path) -> Circuit:
    """Write the bundle's settings and vk into ``folder`` as a verify-only circuit."""
    settings = bundle.settings
    logrows = int(settings["run_args"]["logrows"])
    srs_file = srs.for_logrows(logrows)
    (folder / SETTINGS).write_text(json.dumps(settings))
    (folder / VK).write_bytes(bundle.vk)
    scales = settings.get("model_output_scales") or [bundle.manifest.scale]
    meta = {
        "key": bundle.step.circuit_key, "logrows": logrows, "input_scale": bundle.manifest.scale,
        "output_scale": int(scales[0]), "srs_path": str(srs_file.path),
        "unsafe_srs": srs_file.unsafe, "vk_sha256": bundle.step.vk_sha256,
        "settings_sha256": "",
    }
    (folder / META).write_text(json.dumps(meta))
    return Circuit.load(folder)


def materialize_files(folder: Path, settings: bytes, vk: bytes, srs: bytes,
                      input_scale: int) -> Circuit:
    """A verify-only circuit from raw settings, vk and SRS bytes (e.g. from a dispute bundle)."""
    data = json.loads(settings)
    (folder / SETTINGS).write_bytes(settings)
    (folder / VK).write_bytes(vk)
    (folder / "srs.bin").write_bytes(srs)
    scales = data.get("model_output_scales") or [input_scale]
    (folder / META).write_text(json.dumps({
        "key": "", "logrows": int(data["run_args"]["logrows"]), "input_scale": input_scale,
        "output_scale": int(scales[0]), "srs_path": str(folder / "srs.bin"),
        "unsafe_srs": True, "vk_sha256": "", "settings_sha256": ""}))
    return Circuit.load(folder)


def check_bundle(bundle: ProofBundle, srs: SrsStore) -> BundleOutcome:
    """Verify the proof, its binding to the commitment's leaves through the bundle's states,
    and apply the verdict rule."""
    manifest, step = bundle.manifest, bundle.step
    if bundle.commitment.num_states != len(manifest.states):
        raise ProofRejected("commitment does not fit the manifest")
    if manifest.tolerances is None or manifest.range is None:
        raise ProofRejected("the bundle's manifest is not calibrated")
    with tempfile.TemporaryDirectory(prefix="refute-check-") as tmp:
        circuit = materialize(bundle, srs, Path(tmp))
        if not verify_proof_file(circuit, step.proof):
            raise ProofRejected("proof does not verify with the bundle's verifying key")
    units = maxdiff_units(step.maxdiff_raw, output_scale=circuit.output_scale,
                          scale=manifest.scale)
    i = step.segment
    bind(step, manifest, bundle.commitment.leaves,
         [bundle.states[k] for k in proof_states(bundle.kind, i)], kind=bundle.kind)
    try:
        if bundle.kind == "step":
            threshold = manifest.tolerances[i - 1]
            verdict = step_verdict(units, threshold)
        else:
            threshold = range_bound_units(manifest.range, manifest.scale)
            verdict = range_verdict(units, threshold)
    except VerdictError as exc:
        raise ProofRejected(f"the bundle's numbers: {exc.reason}") from exc
    return BundleOutcome(bundle.kind, step.segment, units, threshold, verdict, circuit.unsafe_srs)


@dataclass(frozen=True)
class ChainOutcome:
    """On-chain verification of a bundle's proof on a fresh local anvil."""

    call_ok: bool
    tx_ok: bool
    gas_used: int
    deployed_size: int


def check_on_chain(bundle: ProofBundle, srs: SrsStore) -> ChainOutcome:
    """Generate, compile and deploy the bundle's Solidity verifier on anvil; verify the proof."""
    from prover.evm import (
        Anvil,
        compile_solidity,
        deploy,
        verify_call,
        verify_transaction,
        write_verifier_sol,
    )

    with tempfile.TemporaryDirectory(prefix="refute-chain-") as tmp:
        folder = Path(tmp)
        circuit = materialize(bundle, srs, folder)
        proof_path = folder / "proof.json"
        proof_path.write_text(json.dumps(bundle.step.proof))
        sol = write_verifier_sol(circuit.vk_path, circuit.settings_path, folder / "Verifier.sol",
                                 circuit.srs_path)
        compiled = compile_solidity(sol)
        with Anvil() as chain:
            address = deploy(chain.rpc_url, compiled)
            call_ok = verify_call(chain.rpc_url, address, proof_path)
            tx = verify_transaction(chain.rpc_url, address, proof_path)
    return ChainOutcome(call_ok, tx.success, tx.gas_used, compiled.deployed_size)
