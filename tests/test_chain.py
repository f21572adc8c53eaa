"""The chain port's web3 adapter (:class:`prover.chain.RpcChain`) on a real local chain.

A dispute over a lying result is settled by a real EZKL proof, which the orchestrator hands to
the context's chain: the step circuit's Solidity verifier is deployed on anvil and the proof
verified by a transaction, whose hash and gas the transcript records. Two results lying at the
same step share one verifier contract; a proof that does not verify is refused.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_typing import HexStr
from web3 import Web3

import prover.evm
from challenge.orchestrator import load_transcript, open_dispute, prove_pending
from challenge.records import Result, ResultStatus
from prover.chain import RpcChain
from prover.evm import Anvil, ChainError
from tests.dispute_world import World, add_result, make_world

pytestmark = [pytest.mark.slow, pytest.mark.ezkl, pytest.mark.chain]

#: The step both cheats lie at (the middle segment of the zoo MLP's three).
LIE_AT = 2


@dataclasses.dataclass
class Settled:
    """Two results lying at the same step, each convicted by a proof verified on chain."""

    world: World
    chain: RpcChain
    rpc_url: str
    result_ids: list[str]
    #: The ``proofoutcome`` event body of each result, in ``result_ids`` order.
    outcomes: list[dict[str, Any]]
    #: The verifier contracts deployed while proving (address of each deployment).
    deployments: list[str]


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settled]:
    workdir = tmp_path_factory.mktemp("chain")
    deployments: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> str:
        address = prover.evm.deploy(*args, **kwargs)
        deployments.append(address)
        return address

    with Anvil() as node, pytest.MonkeyPatch.context() as patch:
        patch.setattr("prover.chain.deploy", counted)  # the name RpcChain deploys with
        chain = RpcChain(node.rpc_url, workdir / "chain")
        world = make_world(workdir, network_id="net_chain", model_id="mdl_chain", ezkl=True,
                           chain=chain)
        result_ids = [add_result(world, seed=seed, lie_at=LIE_AT) for seed in (41, 42)]
        for rid in result_ids:
            open_dispute(world.disputes, rid, challenger="service", lo=0, hi=3, bond=10,
                         now=datetime.now(UTC))
        proved = world.tasks.drain_proofs(
            lambda d: prove_pending(world.disputes, d, datetime.now(UTC)))
        assert proved == 2
        outcomes = []
        with world.ctx.sessions() as session:
            for rid in result_ids:
                row = session.get(Result, rid)
                assert row is not None and row.status is ResultStatus.PROVIDER_FAULT
                transcript = load_transcript(session, rid)
                transcript.verify_chain()
                bodies = [e.body for e in transcript.events if e.kind == "proofoutcome"]
                assert len(bodies) == 1
                outcomes.append(dict(bodies[0]))
        yield Settled(world, chain, node.rpc_url, result_ids, outcomes, deployments)


def test_each_proof_is_verified_by_a_transaction(settled: Settled) -> None:
    w3 = Web3(Web3.HTTPProvider(settled.rpc_url))
    hashes = set()
    for outcome in settled.outcomes:
        assert outcome["step"] == LIE_AT
        recorded = outcome["chain"]
        assert isinstance(recorded, dict)
        tx, gas = recorded["tx"], recorded["gas"]
        assert isinstance(tx, str) and tx.startswith("0x") and len(tx) == 66
        assert isinstance(gas, int) and gas > 0
        # The transaction is on the chain, mined, and used the recorded gas.
        receipt = w3.eth.get_transaction_receipt(HexStr(tx))
        assert receipt["status"] == 1 and receipt["gasUsed"] == gas
        assert receipt["to"] == recorded["contract"]
        hashes.add(tx)
        print(f"step {LIE_AT} proof verified on anvil: gas {gas:,} ({tx})")
    assert len(hashes) == 2  # one transaction per proof


def test_the_verifier_is_deployed_once_per_circuit(settled: Settled) -> None:
    assert len(settled.deployments) == 1
    assert {o["chain"]["contract"] for o in settled.outcomes} == set(settled.deployments)
    assert len({o["vk_sha256"] for o in settled.outcomes}) == 1  # the same step circuit


def _artifacts(settled: Settled, outcome: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    blobs = settled.world.ctx.blobs
    vk, settings, srs = (blobs.get(str(outcome[f"{what}_sha256"]))
                         for what in ("vk", "settings", "srs"))
    return vk, settings, srs


def _flip_proof_byte(proof: dict[str, Any], index: int) -> None:
    """Flip one byte of the proof, in both of the forms EZKL's proof file holds it."""
    raw = bytearray.fromhex(str(proof["hex_proof"]).removeprefix("0x"))
    raw[index] ^= 0x01
    proof["hex_proof"] = "0x" + raw.hex()
    if isinstance(proof.get("proof"), list):
        proof["proof"][index] ^= 0x01


def _bump_output(proof: dict[str, Any]) -> None:
    """Change the last public instance (little-endian hex field element) by one."""
    felt = str(proof["instances"][0][-1])
    proof["instances"][0][-1] = f"{(int(felt[:2], 16) + 1) % 256:02x}" + felt[2:]


@pytest.mark.parametrize("tamper", [lambda p: _flip_proof_byte(p, 100), _bump_output],
                         ids=["proof-byte", "public-instance"])
def test_a_proof_that_does_not_verify_is_refused(
        settled: Settled, tamper: Callable[[dict[str, Any]], None]) -> None:
    outcome = settled.outcomes[0]
    vk, settings, srs = _artifacts(settled, outcome)
    # The untouched proof still verifies (a new transaction on the same contract).
    again = settled.chain.verify(vk, settings, srs, outcome["proof"])
    assert again["contract"] == outcome["chain"]["contract"] and again["gas"] > 0
    bad = copy.deepcopy(outcome["proof"])
    tamper(bad)
    assert bad != outcome["proof"]
    with pytest.raises(ChainError, match="does not verify on chain"):
        settled.chain.verify(vk, settings, srs, bad)
    assert len(settled.deployments) == 1  # refused by the deployed verifier, nothing redeployed
