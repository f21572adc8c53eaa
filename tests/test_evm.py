"""Tests of :mod:`prover.evm`: EZKL's Solidity verifier compiled, deployed and called on anvil.

The slow tests build one real circuit (a Gemm 4→3 with a hashed input, fixed parameters and a
public output) with a locally generated, insecure development SRS, prove it once, and check the
proof on a local anvil chain: accepted as is, rejected when a proof byte or an instance changes.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prover import evm
from prover.circuit import run_args
from refute.errors import RefuteError
from refute.settings import get_settings


@pytest.fixture(autouse=True)
def _settings_read_per_test() -> Iterator[None]:
    """REFUTE_ANVIL is set per test: read the settings again in each."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()

# --- units (no EZKL circuit) -------------------------------------------------------------------


def test_chain_error_is_a_refute_error() -> None:
    err = evm.ChainError("boom")
    assert isinstance(err, RefuteError)
    assert err.code == "chain_error"
    assert str(err) == "boom"


def test_missing_anvil_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-anvil"
    monkeypatch.setenv("REFUTE_ANVIL", str(missing))
    with pytest.raises(evm.ChainError, match="anvil not found") as info:
        evm.Anvil()
    assert str(missing) in str(info.value)


def test_anvil_dying_at_start_reports_its_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "anvil"
    fake.write_text("#!/bin/sh\necho 'fake anvil: cannot bind' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("REFUTE_ANVIL", str(fake))
    with pytest.raises(evm.ChainError, match=r"exited with code 3.*fake anvil: cannot bind"):
        evm.Anvil(start_timeout=10).start()


def test_anvil_retries_a_port_lost_to_a_race(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    attempts = tmp_path / "attempts"
    fake = tmp_path / "anvil"
    fake.write_text(
        f"#!/bin/sh\necho x >> '{attempts}'\n"
        "echo 'Error: Address already in use (os error 98)' >&2\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("REFUTE_ANVIL", str(fake))
    with pytest.raises(evm.ChainError, match="in use"):
        evm.Anvil(start_timeout=10).start()
    assert len(attempts.read_text().splitlines()) == 3


def test_write_verifier_sol_needs_its_inputs(tmp_path: Path) -> None:
    with pytest.raises(evm.ChainError, match="does not exist"):
        evm.write_verifier_sol(
            tmp_path / "vk.key", tmp_path / "settings.json", tmp_path / "V.sol", tmp_path / "srs"
        )


@pytest.mark.chain
def test_compile_broken_solidity_reports_first_error(tmp_path: Path) -> None:
    broken = tmp_path / "Broken.sol"
    broken.write_text(
        "// SPDX-License-Identifier: MIT\npragma solidity ^0.8.0;\n"
        "contract Broken {\n    function f() public pure returns (uint256) { return 1 }\n}\n"
    )
    with pytest.raises(evm.ChainError, match=r"ParserError: Expected ';'.*Broken\.sol:4"):
        evm.compile_solidity(broken)


@pytest.mark.chain
def test_compile_picks_the_named_contract(tmp_path: Path) -> None:
    source = tmp_path / "Two.sol"
    source.write_text(
        "// SPDX-License-Identifier: MIT\npragma solidity ^0.8.0;\n"
        "contract A { function a() external pure returns (uint256) { return 1; } }\n"
        "contract B { function b() external pure returns (uint256) { return 2; } }\n"
    )
    with pytest.raises(evm.ChainError, match="name the one"):
        evm.compile_solidity(source)
    compiled = evm.compile_solidity(source, "B")
    assert compiled.name == "B"
    assert [entry["name"] for entry in compiled.abi] == ["b"]
    assert compiled.bytecode and 0 < compiled.deployed_size < len(compiled.bytecode)
    assert compiled.solc_version.startswith("0.8.20+")
    with pytest.raises(evm.ChainError, match="no deployable contract 'C'"):
        evm.compile_solidity(source, "C")


# --- one real circuit, proved once -------------------------------------------------------------


@dataclass(frozen=True)
class Circuit:
    """The artifacts of the test circuit and its proof."""

    folder: Path
    settings: Path
    vk: Path
    srs: Path
    proof: Path


def _gemm_model(path: Path) -> None:
    rng = np.random.default_rng(7)
    weight = rng.uniform(-1, 1, (3, 4)).astype(np.float32)
    bias = rng.uniform(-1, 1, (3,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def circuit(tmp_path_factory: pytest.TempPathFactory) -> Circuit:
    """A Gemm 4→3 circuit, set up with a development SRS and proved once (≈20 s)."""
    import ezkl

    folder = tmp_path_factory.mktemp("evm-circuit")
    model, data = folder / "model.onnx", folder / "input.json"
    settings, compiled = folder / "settings.json", folder / "model.compiled"
    witness, vk, pk = folder / "witness.json", folder / "vk.key", folder / "pk.key"
    srs, proof = folder / "kzg.srs", folder / "proof.json"
    _gemm_model(model)
    data.write_text(json.dumps({"input_data": [[0.25, -0.5, 0.75, -1.0]]}))

    args = run_args(7)  # hashed input, fixed params, public output, scale 7
    assert ezkl.gen_settings(str(model), str(settings), py_run_args=args)
    ezkl.calibrate_settings(str(data), str(model), str(settings), "resources", scales=[7])
    assert ezkl.compile_circuit(str(model), str(compiled), str(settings))
    ezkl.gen_witness(str(data), str(compiled), str(witness))
    logrows = json.loads(settings.read_text())["run_args"]["logrows"]
    ezkl.gen_srs(str(srs), logrows)  # insecure development SRS: fine for tests, never for use
    assert ezkl.setup(str(compiled), str(vk), str(pk), srs_path=str(srs))
    ezkl.prove(str(witness), str(compiled), str(pk), str(proof), srs_path=str(srs))
    assert ezkl.verify(str(proof), str(settings), str(vk), srs_path=str(srs))
    pk.unlink()  # hundreds of MB, not needed any more
    return Circuit(folder=folder, settings=settings, vk=vk, srs=srs, proof=proof)


@pytest.fixture(scope="module")
def verifier(circuit: Circuit) -> evm.CompiledContract:
    """EZKL's Solidity verifier of the circuit, compiled with the pinned solc."""
    sol = evm.write_verifier_sol(
        circuit.vk, circuit.settings, circuit.folder / "sol" / "Verifier.sol", circuit.srs
    )
    return evm.compile_solidity(sol)


@pytest.fixture(scope="module")
def anvil() -> Iterator[evm.Anvil]:
    """One local chain for the module."""
    with evm.Anvil() as node:
        yield node


@pytest.fixture(scope="module")
def deployed(anvil: evm.Anvil, verifier: evm.CompiledContract) -> str:
    """The verifier's address on the local chain."""
    address = evm.deploy(anvil.rpc_url, verifier)
    print(f"verifier deployed at {address}: {verifier.deployed_size} bytes of runtime code")
    return address


def _tampered(circuit: Circuit, name: str, *, proof_byte: int | None = None) -> Path:
    """A copy of the proof with one proof byte flipped, or else its last instance changed."""
    doc = json.loads(circuit.proof.read_text())
    if proof_byte is not None:
        doc["proof"][proof_byte] ^= 0x01
        raw = bytearray.fromhex(doc["hex_proof"].removeprefix("0x"))
        raw[proof_byte] ^= 0x01
        doc["hex_proof"] = "0x" + raw.hex()
    else:
        # Instances are little-endian hex field elements: bump the lowest byte of the output.
        felt = doc["instances"][0][-1]
        doc["instances"][0][-1] = f"{(int(felt[:2], 16) + 1) % 256:02x}" + felt[2:]
    path = circuit.folder / name
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.slow
@pytest.mark.chain
def test_verifier_compiles(verifier: evm.CompiledContract) -> None:
    assert verifier.name == "Halo2Verifier"
    functions = [entry for entry in verifier.abi if entry.get("type") == "function"]
    assert [f["name"] for f in functions] == ["verifyProof"]
    assert [i["type"] for i in functions[0]["inputs"]] == ["bytes", "uint256[]"]
    assert 0 < verifier.deployed_size < len(verifier.bytecode)
    print(
        f"verifier: {verifier.deployed_size} bytes deployed, fits EIP-170: {verifier.fits_eip170}"
    )


@pytest.mark.slow
@pytest.mark.chain
def test_anvil_answers(anvil: evm.Anvil) -> None:
    assert anvil.chain_id == evm.ANVIL_CHAIN_ID
    assert anvil.rpc_url.startswith("http://127.0.0.1:")


@pytest.mark.slow
@pytest.mark.chain
def test_real_proof_verifies_by_call(circuit: Circuit, anvil: evm.Anvil, deployed: str) -> None:
    assert evm.verify_call(anvil.rpc_url, deployed, circuit.proof) is True


@pytest.mark.slow
@pytest.mark.chain
def test_real_proof_verifies_by_transaction(
    circuit: Circuit, anvil: evm.Anvil, deployed: str
) -> None:
    result = evm.verify_transaction(anvil.rpc_url, deployed, circuit.proof)
    print(f"verifyProof transaction: {result.gas_used} gas ({result.tx_hash})")
    assert result.success and result.dry_run_ok and not result.reverted
    assert result.gas_used > 0
    assert result.tx_hash is not None and len(result.tx_hash) == 66


@pytest.mark.slow
@pytest.mark.chain
def test_tampered_proof_bytes_are_rejected(
    circuit: Circuit, anvil: evm.Anvil, deployed: str
) -> None:
    bad = _tampered(circuit, "bad-bytes.json", proof_byte=100)
    assert evm.verify_call(anvil.rpc_url, deployed, bad) is False
    skipped = evm.verify_transaction(anvil.rpc_url, deployed, bad)
    assert skipped == evm.TxResult(success=False, gas_used=0, tx_hash=None, dry_run_ok=False)
    sent = evm.verify_transaction(anvil.rpc_url, deployed, bad, send_if_rejected=True)
    print(f"reverted verifyProof transaction: {sent.gas_used} gas")
    assert not sent.success and sent.reverted and not sent.dry_run_ok
    assert sent.tx_hash is not None and sent.gas_used > 0


@pytest.mark.slow
@pytest.mark.chain
def test_changed_instance_is_rejected(circuit: Circuit, anvil: evm.Anvil, deployed: str) -> None:
    bad = _tampered(circuit, "bad-instance.json")
    assert evm.verify_call(anvil.rpc_url, deployed, bad) is False
    sent = evm.verify_transaction(anvil.rpc_url, deployed, bad, send_if_rejected=True)
    assert not sent.success and sent.reverted


@pytest.mark.slow
@pytest.mark.chain
def test_anvil_stops_on_exit() -> None:
    with evm.Anvil() as node:
        process = node._process
        assert process is not None and process.poll() is None
    assert process.poll() is not None
    with pytest.raises(evm.ChainError, match="not running"):
        _ = node.rpc_url


@pytest.mark.slow
@pytest.mark.chain
def test_no_contract_at_address_is_an_error(circuit: Circuit, anvil: evm.Anvil) -> None:
    empty = "0x000000000000000000000000000000000000dEaD"
    with pytest.raises(evm.ChainError, match="no contract"):
        evm.verify_call(anvil.rpc_url, empty, circuit.proof)


@pytest.mark.slow
@pytest.mark.chain
def test_unreachable_rpc_is_a_chain_error(circuit: Circuit) -> None:
    closed = f"http://127.0.0.1:{evm._free_port()}"  # nothing listens there
    with pytest.raises(evm.ChainError, match="cannot call the verifier"):
        evm.verify_call(closed, "0x" + "00" * 20, circuit.proof)
