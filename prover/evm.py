"""EVM verification of EZKL proofs: Solidity verifier, compilation, a local chain, calls.

A dispute is settled when an EZKL proof verifies on an EVM chain. This module covers the whole
path on one machine, with no network access:

* :func:`write_verifier_sol` has EZKL write the Halo2 verifier contract for a verifying key.
  EZKL then tries to download solc 0.8.20 (into ``~/.svm``) to compile it; that known failure is
  tolerated once the ``.sol`` file is complete, because refute compiles it itself.
* :func:`compile_solidity` compiles with the pinned npm ``solc`` (``package.json``) through node,
  with standard JSON in and out, so builds do not depend on anything in the user's home.
* :class:`Anvil` runs the pinned anvil binary (``node_modules``) on a free loopback port.
* :func:`deploy`, :func:`verify_call` and :func:`verify_transaction` deploy the verifier and ask
  it about a proof, with ``eth_call`` or with a real transaction whose gas is reported.

Every failure is raised as :class:`ChainError`; a proof that does not verify is not a failure:
the calls answer ``False``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self, cast

import ezkl
from eth_account import Account
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import ContractLogicError, Web3Exception
from web3.types import TxParams, TxReceipt, Wei

from refute.errors import ServerFault
from refute.settings import get_settings

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
NODE_MODULES: Final = REPO_ROOT / "node_modules"
ANVIL_RELATIVE: Final = Path("@foundry-rs/anvil-linux-amd64/bin/anvil")
SOLC_MODULE: Final = NODE_MODULES / "solc"
#: The Solidity compiler release EZKL's verifier template is written for (pinned in package.json).
SOLC_VERSION: Final = "0.8.20"

#: Chain id of the local anvil chain (anvil's own default, fixed explicitly).
ANVIL_CHAIN_ID: Final = 31337
#: Private key of anvil's first pre-funded account (the well-known mnemonic "test test ... junk").
#: DEVELOPMENT ONLY: the key is public, anything it holds on a real chain is stolen at once.
ANVIL_DEV_KEY: Final = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
#: EIP-170: the largest runtime bytecode mainnet-like chains accept for one contract.
EIP170_LIMIT: Final = 24_576

#: Seconds to wait for anvil's RPC to answer after it starts.
ANVIL_START_TIMEOUT: Final = 30.0
#: Seconds to wait for a transaction receipt.
RECEIPT_TIMEOUT: Final = 120.0
#: Seconds for one JSON-RPC request.
RPC_TIMEOUT: Final = 60.0
#: Multiplier applied to gas estimates, and the gas limit used to send a call known to revert.
GAS_MARGIN: Final = 1.2
REVERT_GAS_LIMIT: Final = 10_000_000

# Runs solc's standard-JSON interface of the npm package: argv = solc module dir, input, output.
_SOLC_SCRIPT: Final = """\
const fs = require('fs');
const solc = require(process.argv[2]);
const input = fs.readFileSync(process.argv[3], 'utf8');
const output = JSON.parse(solc.compile(input));
output.solcVersion = solc.version();
fs.writeFileSync(process.argv[4], JSON.stringify(output));
"""


class ChainError(ServerFault):
    """Building, compiling, deploying or calling an EVM verifier failed, or the chain did."""

    code = "chain_error"


# --- Solidity verifier -------------------------------------------------------------------------


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run an EZKL coroutine to completion, also from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _is_solc_download_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is EZKL failing to fetch solc through svm (expected offline)."""
    text = str(exc).lower()
    return "svm" in text or "solc" in text


def _check_verifier_source(sol_path: Path) -> None:
    """Raise unless ``sol_path`` holds a complete Solidity verifier contract."""
    try:
        text = sol_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainError(f"EZKL wrote no readable verifier at {sol_path}: {exc}") from exc
    complete = (
        "contract" in text
        and "function verifyProof" in text
        and text.rstrip().endswith("}")
        and text.count("{") == text.count("}")
    )
    if not complete:
        raise ChainError(f"the verifier EZKL wrote at {sol_path} is incomplete")


def write_verifier_sol(vk_path: Path, settings_path: Path, sol_path: Path, srs_path: Path) -> Path:
    """Have EZKL write the Solidity verifier of ``vk_path`` to ``sol_path`` and return it.

    EZKL compiles the contract itself right after writing it, with a solc it downloads; offline
    that step fails, which is tolerated only once the file is written and complete (refute
    compiles it with :func:`compile_solidity`). Any other failure raises :class:`ChainError`.
    """
    sol_path = Path(sol_path)
    for needed in (vk_path, settings_path, srs_path):
        if not Path(needed).is_file():
            raise ChainError(f"cannot write a verifier: {needed} does not exist")
    sol_path.parent.mkdir(parents=True, exist_ok=True)
    sol_path.unlink(missing_ok=True)  # a stale file must not pass for EZKL's output
    abi_path = sol_path.with_name(sol_path.stem + ".abi.json")

    async def call() -> Any:
        # EZKL's binding needs a running event loop when it is called, not only when awaited.
        return await ezkl.create_evm_verifier(
            str(vk_path),
            str(settings_path),
            str(sol_path),
            str(abi_path),
            srs_path=str(srs_path),
        )

    try:
        result = _run_coroutine(call)
    except Exception as exc:  # EZKL raises bare RuntimeErrors
        if not (_is_solc_download_failure(exc) and sol_path.is_file()):
            raise ChainError(f"EZKL could not create the EVM verifier: {exc}") from exc
    else:
        if result is False:
            raise ChainError("EZKL could not create the EVM verifier")
    _check_verifier_source(sol_path)
    return sol_path


# --- compilation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledContract:
    """One compiled contract: what deploying and calling it needs."""

    name: str
    abi: list[dict[str, Any]]
    #: Creation bytecode (constructor included): the data of the deployment transaction.
    bytecode: bytes
    #: Size in bytes of the runtime code stored on chain (EIP-170 caps it at 24,576 bytes).
    deployed_size: int
    solc_version: str = SOLC_VERSION

    @property
    def fits_eip170(self) -> bool:
        """Whether chains enforcing EIP-170 (mainnet and most L2s) accept this contract."""
        return self.deployed_size <= EIP170_LIMIT


def _node() -> str:
    """The node executable (``REFUTE_NODE`` or the one on PATH)."""
    configured = get_settings().node
    node = str(configured) if configured is not None else shutil.which("node")
    if node is None:
        raise ChainError("node is not installed: it is needed to run the pinned solc (npm ci)")
    return node


def _solc_standard_json(sources: dict[str, str], *, via_ir: bool) -> dict[str, Any]:
    """Run the npm solc on ``sources`` (name → text) and return its standard-JSON output."""
    if not (SOLC_MODULE / "package.json").is_file():
        raise ChainError(f"the pinned solc is missing at {SOLC_MODULE}: run `npm ci`")
    settings: dict[str, Any] = {
        "optimizer": {"enabled": True, "runs": 1},
        "viaIR": via_ir,
        "outputSelection": {
            "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}
        },
    }
    standard_input = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sources.items()},
        "settings": settings,
    }
    with tempfile.TemporaryDirectory(prefix="refute-solc-") as tmp:
        folder = Path(tmp)
        script, in_path, out_path = folder / "solc.js", folder / "in.json", folder / "out.json"
        script.write_text(_SOLC_SCRIPT, encoding="utf-8")
        in_path.write_text(json.dumps(standard_input), encoding="utf-8")
        try:
            proc = subprocess.run(
                [_node(), str(script), str(SOLC_MODULE), str(in_path), str(out_path)],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ChainError(f"cannot run solc through node: {exc}") from exc
        if proc.returncode != 0 or not out_path.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise ChainError(f"solc failed: {detail[-1] if detail else f'exit {proc.returncode}'}")
        try:
            output = json.loads(out_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ChainError(f"solc wrote unreadable output: {exc}") from exc
    if not isinstance(output, dict):
        raise ChainError("solc wrote unexpected output")
    version = str(output.get("solcVersion", ""))
    if not version.startswith(SOLC_VERSION + "+"):
        raise ChainError(f"expected solc {SOLC_VERSION}, node_modules has {version!r}: npm ci")
    return output


def _first_error(output: dict[str, Any]) -> str | None:
    """The first error solc reported, as one line with its location, or None."""
    for entry in output.get("errors", []):
        if entry.get("severity") != "error":
            continue
        formatted = str(entry.get("formattedMessage") or entry.get("message") or "")
        lines = [line.strip() for line in formatted.splitlines() if line.strip()]
        if not lines:
            return str(entry.get("type", "error"))
        location = next((line for line in lines[1:] if line.startswith("-->")), "")
        return f"{lines[0]} {location}".strip()
    return None


def compile_solidity(sol_path: Path, contract_name: str | None = None) -> CompiledContract:
    """Compile ``sol_path`` with the pinned solc (optimizer on, runs=1) and return one contract.

    ``contract_name`` picks the contract; without it the file must define exactly one contract
    with code. The legacy pipeline is used; only a "stack too deep" failure retries via IR.
    Compile errors raise :class:`ChainError` carrying solc's first error message.
    """
    sol_path = Path(sol_path)
    try:
        source = sol_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChainError(f"cannot read Solidity source {sol_path}: {exc}") from exc
    unit = sol_path.name
    output = _solc_standard_json({unit: source}, via_ir=False)
    error = _first_error(output)
    if error is not None and "stack too deep" in error.lower():
        output = _solc_standard_json({unit: source}, via_ir=True)
        error = _first_error(output)
    if error is not None:
        raise ChainError(f"solc rejected {sol_path.name}: {error}")

    contracts: dict[str, Any] = output.get("contracts", {}).get(unit, {})
    deployable = {name: c for name, c in contracts.items() if c["evm"]["bytecode"]["object"]}
    if contract_name is None:
        if len(deployable) != 1:
            raise ChainError(
                f"{sol_path.name} defines {sorted(deployable) or 'no'} deployable contracts: "
                "name the one to compile"
            )
        contract_name = next(iter(deployable))
    if contract_name not in deployable:
        raise ChainError(f"no deployable contract {contract_name!r} in {sol_path.name}")
    contract = deployable[contract_name]
    return CompiledContract(
        name=contract_name,
        abi=list(contract["abi"]),
        bytecode=bytes.fromhex(contract["evm"]["bytecode"]["object"]),
        deployed_size=len(contract["evm"]["deployedBytecode"]["object"]) // 2,
        solc_version=str(output["solcVersion"]),
    )


# --- a local chain -----------------------------------------------------------------------------


def anvil_binary() -> Path:
    """The anvil executable: ``REFUTE_ANVIL`` if set, else the pinned one in node_modules."""
    override = get_settings().anvil
    path = override if override is not None else NODE_MODULES / ANVIL_RELATIVE
    if not path.is_file() or not os.access(path, os.X_OK):
        hint = "check REFUTE_ANVIL" if override else "run `npm ci` in the repository root"
        raise ChainError(f"anvil not found at {path}: {hint}")
    return path


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rpc(url: str, method: str, params: list[Any], timeout: float) -> Any:
    """One raw JSON-RPC request to a local node, bypassing any configured HTTP proxy."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())["result"]


class Anvil:
    """A local anvil chain on a free 127.0.0.1 port, for as long as the ``with`` block runs.

    ``code_size_limit`` is the largest runtime code accepted (``None``: no limit at all, since
    EZKL verifiers can exceed EIP-170's 24 KB; compare :attr:`CompiledContract.deployed_size`
    with :data:`EIP170_LIMIT` to know whether a real chain would accept the contract).
    """

    def __init__(
        self,
        *,
        chain_id: int = ANVIL_CHAIN_ID,
        code_size_limit: int | None = None,
        start_timeout: float = ANVIL_START_TIMEOUT,
    ) -> None:
        self._binary = anvil_binary()
        self._chain_id = chain_id
        self._code_size_limit = code_size_limit
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def rpc_url(self) -> str:
        """The HTTP JSON-RPC endpoint of the running chain."""
        if self._port is None or self._process is None:
            raise ChainError("anvil is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def chain_id(self) -> int:
        """The chain id anvil was started with."""
        return self._chain_id

    def args(self, port: int) -> list[str]:
        """The command line anvil is started with."""
        size = (
            ["--disable-code-size-limit"]
            if self._code_size_limit is None
            else ["--code-size-limit", str(self._code_size_limit)]
        )
        return [
            str(self._binary),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--chain-id",
            str(self._chain_id),
            "--silent",  # no per-request logging; startup errors still reach stderr
            *size,
        ]

    def _stderr_tail(self) -> str:
        """The last lines anvil printed (stdout and stderr share one temporary log file)."""
        if self._log is None:
            return ""
        self._log.flush()
        text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        return " | ".join(text.strip().splitlines()[-5:])

    def start(self) -> Self:
        """Start anvil and wait until its RPC answers with the expected chain id."""
        if self._process is not None:
            raise ChainError("anvil is already running")
        # The port may be taken between probing and binding: a few attempts with fresh ports.
        last_error = "anvil did not start"
        for _ in range(3):
            self._port = _free_port()
            # Closed (and deleted) by stop().
            self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
                prefix="refute-anvil-", suffix=".log"
            )
            try:
                self._process = subprocess.Popen(
                    self.args(self._port),
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                self.stop()
                raise ChainError(f"cannot start anvil at {self._binary}: {exc}") from exc
            try:
                self._wait_ready()
                return self
            except ChainError as exc:
                last_error = str(exc)
                self.stop()
                if "in use" not in last_error:
                    break  # only a lost port race is worth another port
        raise ChainError(last_error)

    def _wait_ready(self) -> None:
        """Poll ``eth_chainId`` until anvil answers, dies, or the start timeout passes."""
        assert self._process is not None
        url = self.rpc_url
        deadline = time.monotonic() + self._start_timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise ChainError(f"anvil exited with code {code}: {self._stderr_tail()}")
            try:
                answer = _rpc(url, "eth_chainId", [], timeout=2.0)
            except (OSError, ValueError, KeyError):
                answer = None
            if answer is not None:
                if int(str(answer), 16) != self._chain_id:
                    raise ChainError(f"anvil answers chain id {answer}, not {self._chain_id}")
                return
            if time.monotonic() > deadline:
                raise ChainError(
                    f"anvil did not answer on {url} within {self._start_timeout:.0f} s: "
                    f"{self._stderr_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop anvil (terminate, then kill after 5 s) and drop its log."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- deployment and verification -----------------------------------------------------------

#: Errors of web3 and of the HTTP transport, translated to ChainError at this boundary.
_WEB3_ERRORS: Final = (Web3Exception, OSError, ValueError, TypeError, KeyError)


@dataclass(frozen=True)
class TxResult:
    """The outcome of verifying a proof with a transaction."""

    #: The transaction was mined, did not revert, and the verifier answered true.
    success: bool
    #: Gas used by the mined transaction (0 when nothing was sent).
    gas_used: int
    #: Hash of the sent transaction (0x-hex), or None when the dry run failed and none was sent.
    tx_hash: str | None
    #: Whether the ``eth_call`` dry run before sending verified the proof.
    dry_run_ok: bool
    #: Whether a transaction was mined and reverted (status 0).
    reverted: bool = False


def _web3(rpc_url: str) -> Web3:
    """A web3 client on ``rpc_url`` (HTTP)."""
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": RPC_TIMEOUT}))


def _fee_fields(w3: Web3) -> TxParams:
    """EIP-1559 fee fields when the chain has a base fee, a legacy gas price otherwise."""
    block = w3.eth.get_block("latest")
    base_fee = block.get("baseFeePerGas")
    if base_fee is None:
        return {"gasPrice": w3.eth.gas_price}
    tip = w3.eth.max_priority_fee
    return {"maxFeePerGas": Wei(2 * int(base_fee) + tip), "maxPriorityFeePerGas": tip}


def build_transaction(
    w3: Web3, sender: str, *, data: bytes, to: str | None = None, gas: int | None = None
) -> TxParams:
    """An unsigned transaction from ``sender`` (nonce, chain id, fees, gas estimate filled)."""
    tx: TxParams = {
        "from": Web3.to_checksum_address(sender),
        "data": HexBytes(data),
        "value": Wei(0),
        "chainId": w3.eth.chain_id,
        "nonce": w3.eth.get_transaction_count(Web3.to_checksum_address(sender), "pending"),
        **_fee_fields(w3),
    }
    if to is not None:
        tx["to"] = Web3.to_checksum_address(to)
    tx["gas"] = gas if gas is not None else int(w3.eth.estimate_gas(tx) * GAS_MARGIN)
    return tx


def send_transaction(w3: Web3, tx: TxParams, private_key: str) -> TxReceipt:
    """Sign ``tx`` locally with ``private_key``, send it and wait for its receipt."""
    signed = Account.sign_transaction(cast("dict[str, Any]", tx), private_key)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    return w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT)


def deploy(rpc_url: str, compiled: CompiledContract, private_key: str = ANVIL_DEV_KEY) -> str:
    """Deploy ``compiled`` (no constructor arguments) and return its checksummed address.

    The default key is anvil's public development key (:data:`ANVIL_DEV_KEY`): pass a real one
    for any other chain.
    """
    try:
        w3 = _web3(rpc_url)
        sender = Account.from_key(private_key).address
        tx = build_transaction(w3, sender, data=compiled.bytecode)
        receipt = send_transaction(w3, tx, private_key)
    except _WEB3_ERRORS as exc:
        raise ChainError(
            f"cannot deploy {compiled.name} ({compiled.deployed_size} bytes of code): {exc}"
        ) from exc
    address = receipt.get("contractAddress")
    if receipt["status"] != 1 or address is None:
        raise ChainError(
            f"deployment of {compiled.name} reverted ({compiled.deployed_size} bytes of code; "
            f"EIP-170 allows {EIP170_LIMIT})"
        )
    return str(address)


def proof_calldata(proof_path: Path) -> bytes:
    """The ``verifyProof(bytes,uint256[])`` calldata of an EZKL proof file."""
    with tempfile.TemporaryDirectory(prefix="refute-calldata-") as tmp:
        try:
            data = ezkl.encode_evm_calldata(str(proof_path), str(Path(tmp) / "calldata.bin"))
        except Exception as exc:  # EZKL raises bare RuntimeErrors
            raise ChainError(f"cannot encode EVM calldata for {proof_path}: {exc}") from exc
    return bytes(data)


def _call_verifier(w3: Web3, address: str, calldata: bytes) -> bool:
    """``eth_call`` the verifier; True only for a returned true, a revert is False."""
    target = Web3.to_checksum_address(address)
    if not w3.eth.get_code(target):
        raise ChainError(f"no contract at {target}")
    try:
        answer = w3.eth.call({"to": target, "data": HexBytes(calldata)})
    except ContractLogicError:
        return False
    return len(answer) == 32 and int.from_bytes(answer, "big") == 1


def verify_call(rpc_url: str, address: str, proof_path: Path) -> bool:
    """Whether the verifier at ``address`` accepts the proof (``eth_call``, nothing is sent)."""
    calldata = proof_calldata(proof_path)
    try:
        return _call_verifier(_web3(rpc_url), address, calldata)
    except _WEB3_ERRORS as exc:
        raise ChainError(f"cannot call the verifier at {address}: {exc}") from exc


def verify_transaction(
    rpc_url: str,
    address: str,
    proof_path: Path,
    *,
    private_key: str = ANVIL_DEV_KEY,
    send_if_rejected: bool = False,
) -> TxResult:
    """Verify the proof with a mined transaction and report its gas.

    An ``eth_call`` dry run comes first. When it rejects the proof nothing is sent (and
    ``success`` is False) unless ``send_if_rejected`` asks for a transaction anyway, which is
    then sent with a fixed gas limit and, reverting, reports ``success`` False with its gas.
    """
    calldata = proof_calldata(proof_path)
    try:
        w3 = _web3(rpc_url)
        dry_run_ok = _call_verifier(w3, address, calldata)
        if not dry_run_ok and not send_if_rejected:
            return TxResult(success=False, gas_used=0, tx_hash=None, dry_run_ok=False)
        sender = Account.from_key(private_key).address
        tx = build_transaction(
            w3,
            sender,
            data=calldata,
            to=address,
            gas=None if dry_run_ok else REVERT_GAS_LIMIT,
        )
        receipt = send_transaction(w3, tx, private_key)
    except _WEB3_ERRORS as exc:
        raise ChainError(f"cannot verify with a transaction at {address}: {exc}") from exc
    return TxResult(
        success=dry_run_ok and receipt["status"] == 1,
        gas_used=int(receipt["gasUsed"]),
        tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
        dry_run_ok=dry_run_ok,
        reverted=receipt["status"] != 1,
    )
