"""Disputes that end at a tiled segment (issue 13): the dispute opens with the manifest's tile
counts, the bisection ends in phase TILE, the challenger names a tile (the service's watcher
names the one where its own execution differs most), and the proof is of that tile, shared by
the disputes that name the same tile and only by them. The fake prover measures each tile by
re-execution (:mod:`challenge.fakes`); real tile proofs are in ``test_tiled_step.py``."""

from __future__ import annotations

import zipfile
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_account import Account
from fastapi.testclient import TestClient

from challenge.codec import state_from_json
from challenge.game import Actor, NameTile, Phase, Verdict
from challenge.messages import MOVE_TILE
from challenge.orchestrator import (
    SERVICE,
    drive,
    export_dispute,
    load_transcript,
    move,
    open_dispute,
    service_signing_key,
)
from challenge.orchestrator import prove_pending as prove
from challenge.records import Dispute, SharedProof
from challenge.replay import archive_bytes, replay
from challenge.whistleblower import Whistleblower
from tests.dispute_world import World, add_result, make_world, tiled_conv
from verifier.api.app import create_app

#: Segment 1 on tiles of 2 channels × 4 rows × 8 columns: tiles 0..3, the tile of output
#: element (0, c, h, w) is 2·(c // 2) + h // 4.
BLOCKS = [1, 2, 4, 8]
#: An element of tile 3 (channels 2-3, rows 4-7).
IN_TILE_3 = (0, 3, 6, 5)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("tiled"), network_id="net_t", model_id="mdl_t",
                      ezkl=False, model=tiled_conv(), tilings={1: BLOCKS})


def _events(world: World, rid: str, dispute_id: str) -> list[tuple[str, dict[str, Any]]]:
    with world.ctx.sessions() as s:
        transcript = load_transcript(s, rid)
    transcript.verify_chain()
    return [(e.kind, e.body) for e in transcript.events if e.body.get("dispute_id") == dispute_id]


def test_the_watcher_names_the_tile_of_the_lie_and_convicts_on_it(world: World) -> None:
    rid = add_result(world, seed=1, lie_at=1, lie_element=IN_TILE_3)
    world.tasks.proofs.clear()
    dispute_id = open_dispute(world.disputes, rid, challenger=SERVICE, lo=0, hi=2, bond=10,
                              now=datetime.now(UTC))
    assert world.tasks.proofs == [dispute_id]  # bisected, tile named, the tile's proof queued
    state = prove(world.disputes, dispute_id, datetime.now(UTC))
    assert state is not None and state.verdict is Verdict.PROVIDER_FAULT
    assert (state.hi, state.tile, state.tiles) == (1, 3, (4, 1))
    recorded = _events(world, rid, dispute_id)
    [named] = [body for kind, body in recorded if kind == "tile"]
    assert (named["actor"], named["phase"], named["step"], named["tile"]) == (
        "challenger", "step_proof", 1, 3)
    [proof] = [body for kind, body in recorded if kind == "proofoutcome"]
    assert proof["tile"] == 3 and proof["step"] == 1
    [opening] = [body for kind, body in recorded if kind == "challenge"]
    assert opening["tiles"] == [4, 1]


def test_disputes_naming_other_tiles_get_proofs_of_their_own(world: World) -> None:
    """A whistleblower names tile 0, which holds no lie: its own proof upholds the provider;
    the watcher's dispute of the same step names tile 3 and convicts. Two shared proofs."""
    rid = add_result(world, seed=2, lie_at=1, lie_element=IN_TILE_3)
    now = datetime.now(UTC)
    whistle = open_dispute(world.disputes, rid, challenger="0x" + "be" * 20, lo=0, hi=1,
                           bond=10, now=now)
    with world.ctx.sessions() as s:
        row = s.get(Dispute, whistle)
        assert row is not None
        waiting = state_from_json(row.state)
    assert waiting.phase is Phase.TILE and waiting.turn is Actor.CHALLENGER
    new_state, effects = move(world.disputes, whistle,
                              NameTile(actor=Actor.CHALLENGER, at=now.timestamp(), step=1,
                                       tile=0), now, {"step": 1, "tile": 0})
    drive(world.disputes, whistle, effects, now)
    assert new_state.tile == 0
    upheld = prove(world.disputes, whistle, now)
    assert upheld is not None and upheld.verdict is Verdict.CHALLENGER_FAULT
    watcher = open_dispute(world.disputes, rid, challenger=SERVICE, lo=0, hi=1, bond=10,
                           now=now)
    convicted = prove(world.disputes, watcher, now)
    assert convicted is not None and convicted.verdict is Verdict.PROVIDER_FAULT
    assert convicted.tile == 3
    with world.ctx.sessions() as s:
        proofs = {(p.index, p.tile) for p in s.query(SharedProof).filter_by(result_id=rid)}
    assert proofs == {(1, 0), (1, 3)}


def test_an_honest_provider_is_upheld_on_the_tile_the_watcher_names(world: World) -> None:
    rid = add_result(world, seed=3)
    now = datetime.now(UTC)
    dispute_id = open_dispute(world.disputes, rid, challenger=SERVICE, lo=0, hi=1, bond=10,
                              now=now)
    state = prove(world.disputes, dispute_id, now)
    assert state is not None and state.verdict is Verdict.CHALLENGER_FAULT
    assert state.tile is not None and 0 <= state.tile < 4


def test_a_whistleblower_names_the_tile_through_the_api_and_convicts(world: World) -> None:
    """The whistleblower client plays the whole dispute over HTTP: it answers the bisection,
    then signs the tile where the revealed state differs most from its own execution
    (``Move`` kind 3, the tile index as payload)."""
    world.tasks.inline["proofs"] = lambda d: prove(world.disputes, d, datetime.now(UTC))
    try:
        rid = add_result(world, seed=4, lie_at=1, lie_element=IN_TILE_3)
        client = TestClient(create_app(world.ctx), raise_server_exceptions=True)
        account = Account.from_key(b"\x31" * 32)
        blower = Whistleblower("http://testserver", account.key, account.address,
                               client=client)
        log: list[str] = []
        final = blower.challenge(rid, world.prepared, world.model.sample_input(4), bond=20,
                                 report=log.append)
    finally:
        world.tasks.inline.clear()
    assert final["verdict"] == "PROVIDER_FAULT" and (final["hi"], final["tile"]) == (1, 3)
    assert any("naming tile 3" in line for line in log), log
    dispute = client.get(f"/v1/disputes/{final['id']}").json()
    assert dispute["tile"] == 3 and dispute["tiles"] is None  # named: no longer asked


def test_a_tile_move_out_of_turn_or_out_of_range_is_refused(world: World) -> None:
    rid = add_result(world, seed=6, lie_at=1, lie_element=IN_TILE_3)
    client = TestClient(create_app(world.ctx), raise_server_exceptions=True)
    account = Account.from_key(b"\x41" * 32)
    blower = Whistleblower("http://testserver", account.key, account.address, client=client)
    opened = blower.open(rid, bond=20, lo=0, hi=1)
    dispute = client.get(f"/v1/disputes/{opened['id']}").json()
    assert (dispute["phase"], dispute["tiles"]) == ("tile", 4)
    network = client.get(f"/v1/public/results/{rid}").json()["network_id"]
    for tile in (4, 2**64):
        body = blower.signed_move(network, dispute, kind=MOVE_TILE,
                                  payload=tile.to_bytes(32, "big"), nonce=tile)
        refused = client.post(f"/v1/disputes/{opened['id']}/moves", json=body)
        assert refused.status_code in (401, 403) and "tiles 0..3" in refused.text
    answer = blower.move_body(network, {**dispute, "pending_leaf": "0x" + "00" * 32},
                              agree=True, nonce=7)
    refused = client.post(f"/v1/disputes/{opened['id']}/moves", json=answer)
    assert refused.status_code in (401, 403) and "not waiting for an answer" in refused.text


@pytest.mark.slow
@pytest.mark.ezkl
def test_a_tiled_dispute_with_real_proofs_replays_and_a_swapped_graph_is_caught(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With EZKL: the watcher's tile proof convicts, the exported bundle carries the segment's
    graph, replay cuts the tile's slices with it and passes every check; a bundle whose graph
    is swapped for another segment's is refused by the manifest's segment hash."""
    real = make_world(tmp_path_factory.mktemp("tiled-ezkl"), network_id="net_e",
                      model_id="mdl_e", ezkl=True, model=tiled_conv(), tilings={1: BLOCKS})
    real.tasks.inline["proofs"] = lambda d: prove(real.disputes, d, datetime.now(UTC))
    rid = add_result(real, seed=5, lie_at=1, lie_element=IN_TILE_3)
    dispute_id = open_dispute(real.disputes, rid, challenger=SERVICE, lo=0, hi=2, bond=10,
                              now=datetime.now(UTC))
    with real.ctx.sessions() as s:
        row = s.get(Dispute, dispute_id)
        assert row is not None and row.verdict == "PROVIDER_FAULT"
    workdir = tmp_path_factory.mktemp("bundles")
    bundle = export_dispute(real.disputes, dispute_id, workdir / "t.rdispute")
    key = "0x" + service_signing_key(real.disputes).public_key.hex()
    report = replay(bundle, [key])
    assert report.ok, report.lines
    binding = next(d for n, _ok, d in report.lines if n == "binding")
    assert "tile 3's slices of states [0, 1]" in binding
    with zipfile.ZipFile(bundle) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist()}
    assert "segments/1.onnx" in members
    members["segments/1.onnx"] = real.prepared.segmentation.segments[1].onnx_bytes
    swapped = workdir / "swapped.rdispute"
    swapped.write_bytes(archive_bytes(members))
    failed = {line.name: line.text() for line in replay(swapped, [key]).failures}
    assert "hashes differently from segment 1" in " ".join(failed.values()), failed
