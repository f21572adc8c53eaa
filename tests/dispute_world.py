"""A calibrated service for in-process dispute tests: a SQLite database, a blob store, the small
zoo MLP registered for one network, and results with lying or out-of-range traces."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

from challenge.records import Network, RegisteredModel, Result, ResultStatus
from prover.calibration import calibrate_model
from refute import zoo
from refute.provider import PreparedModel, prepare_model, random_inputs, run_trace
from refute.trace import Trace
from verifier.db import migrate
from verifier.service import ServiceContext, new_id
from verifier.settings import ServiceSettings


@dataclasses.dataclass
class World:
    """The service, the registered model (as the prover prepares it) and a working folder."""

    ctx: ServiceContext
    prepared: PreparedModel
    workdir: Path
    network_id: str
    model_id: str


def make_world(workdir: Path, *, network_id: str, model_id: str) -> World:
    """Migrate a fresh database under ``workdir`` and register the calibrated zoo MLP."""
    settings = ServiceSettings(database_url=f"sqlite:///{workdir / 'd.db'}",
                               blob_dir=workdir / "blobs", spot_key="ab" * 16)
    migrate(settings.database_url)
    ctx = ServiceContext.create(settings)
    model = zoo.mlp()
    prepared = prepare_model(model.onnx_bytes)
    manifest, _ = calibrate_model(prepared, [random_inputs(prepared.loaded, seed=s)
                                             for s in range(3)])
    prepared = dataclasses.replace(prepared, manifest=manifest)
    now = datetime.now(UTC)
    with ctx.sessions() as s, s.begin():
        s.add(Network(id=network_id, name=network_id, created_at=now))
        s.add(RegisteredModel(id=model_id, network_id=network_id,
                              model_sha256=manifest.model_sha256,
                              manifest_sha256=manifest.sha256, manifest=manifest.to_json(),
                              model_blob=ctx.blobs.put(model.onnx_bytes), created_at=now))
    return World(ctx, prepared, workdir, network_id, model_id)


def add_result(world: World, *, seed: int, lie_at: int | None = None,
               out_of_range_at: int | None = None, upload: bool = True) -> str:
    """Accept a result of the MLP on ``sample_input(seed)``; a cheat moves state ``lie_at`` by
    0.5 (far beyond τ), or puts one value of state ``out_of_range_at`` at 3·R (committed, but an
    upload would refuse it). The trace is kept as ``<id>.rtrace`` in the working folder, and
    stored as uploaded unless ``upload`` is false. Returns the result id."""
    manifest = world.prepared.manifest
    trace = run_trace(world.prepared, zoo.mlp().sample_input(seed))
    states = [list(x) for x in trace.states]
    if lie_at is not None:
        states[lie_at][0] = states[lie_at][0] + 0.5
    if out_of_range_at is not None:
        assert manifest.range is not None
        states[out_of_range_at][0] = states[out_of_range_at][0].copy()
        states[out_of_range_at][0].flat[0] = 3 * manifest.range
    if lie_at is not None or out_of_range_at is not None:
        trace = Trace.from_states(manifest, states, check_range=False)
    rid = new_id("res")
    now = datetime.now(UTC)
    blob = world.ctx.blobs.put(trace.write(world.workdir / f"{rid}.rtrace").read_bytes())
    with world.ctx.sessions() as s, s.begin():
        s.add(Result(id=rid, network_id=world.network_id, model_id=world.model_id,
                     message_hash=rid.ljust(64, "0"), provider="0x" + "aa" * 20, nonce=rid,
                     deadline=0, stake="1000", input_hash="0x" + "00" * 32,
                     output_hash="0x" + "00" * 32,
                     trace_root="0x" + trace.commitment.root.hex(),
                     leaves=["0x" + x.hex() for x in trace.commitment.leaves],
                     signature="0x", status=ResultStatus.ACCEPTED, accepted_at=now,
                     challenge_deadline=now + timedelta(hours=1),
                     trace_blob=blob if upload else None))
    return rid
