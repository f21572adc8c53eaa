"""A service for in-process dispute tests: a SQLite database, a blob store, the small zoo MLP
registered for one network, and results with lying or out-of-range traces.

Two kinds of world: ``ezkl=True`` calibrates the model's circuits and proves with EZKL (slow,
real proofs that ``refute replay`` verifies); ``ezkl=False`` calibrates only what the game needs
(tolerances and the range bound) and plugs in the fakes of :mod:`challenge.fakes`, so a whole
dispute takes milliseconds. Both queue background work in a :class:`FakeTasks` the test drains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from challenge.context import Chain, DisputeContext
from challenge.fakes import FakeProver, FakeTasks
from challenge.records import Network, RegisteredModel, Result, ResultStatus, new_id
from challenge.result_lifecycle import accept
from prover.adapter import EzklProofs
from prover.calibration import calibrate_model
from prover.config import make_prover
from refute import zoo
from refute.executor import DeterministicExecutor
from refute.provider import PreparedModel, prepare_model, random_inputs, run_trace
from refute.segmentation import run_segments
from refute.settings import Settings
from refute.tiling import make_tiling
from refute.trace import Trace
from verifier.db import migrate
from verifier.service import ServiceContext

#: The tolerance (quantized units) of every step in a fake world: an honest re-execution
#: differs by 0, a lie of 0.5 by 64 units at scale 7.
FAKE_TOLERANCE = 4


@dataclasses.dataclass
class World:
    """The service, the registered model (as the prover prepares it) and a working folder."""

    ctx: ServiceContext
    prepared: PreparedModel
    workdir: Path
    network_id: str
    model_id: str
    tasks: FakeTasks
    model: zoo.ZooModel = dataclasses.field(default_factory=zoo.mlp)
    """The registered model (its ``sample_input`` makes each result's input)."""

    @property
    def disputes(self) -> DisputeContext:
        """The dispute logic's context (the orchestrator's argument)."""
        return self.ctx.disputes


def tiled_conv() -> zoo.ZooModel:
    """Two segments: a 3×3 convolution (3 → 4 channels on 8×8) with its Relu, then a 1×1
    convolution to 2 channels: small enough for real proofs, with a first segment to tile."""
    rng = np.random.default_rng(7)
    w1 = numpy_helper.from_array(rng.uniform(-0.5, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.uniform(-0.1, 0.1, 4).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.uniform(-0.5, 0.5, (2, 4, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(
        nodes, "tiled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], [w1, b1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return zoo.ZooModel("tiled_conv", model.SerializeToString(), "conv 3→4 + relu, conv 1×1")


def _fake_calibration(prepared: PreparedModel,
                      tilings: Mapping[int, Sequence[int]] | None = None) -> PreparedModel:
    """Tolerances and a range bound without circuits: what the game and the fake prover use;
    with ``tilings`` (segment → block sizes), step entries recording them (and placeholder
    settings: the fake prover builds no circuit)."""
    executor = DeterministicExecutor()
    runs = [run_segments(executor, prepared.segmentation, random_inputs(prepared.loaded, seed=s))
            for s in range(3)]
    top = max(float(abs(t).max()) for run in runs for state in run for t in state)
    manifest = dataclasses.replace(
        prepared.manifest, scale_source="calibrated",
        tolerances=(FAKE_TOLERANCE,) * prepared.segmentation.num_segments,
        range=float(4 * top), circuits=_fake_circuits(prepared, tilings or {}))
    return dataclasses.replace(prepared, manifest=manifest)


def _fake_circuits(prepared: PreparedModel,
                   tilings: Mapping[int, Sequence[int]]) -> tuple[dict[str, Any], ...]:
    if not tilings:
        return ()
    entries: list[dict[str, Any]] = []
    for segment in prepared.segmentation.segments:
        entry: dict[str, Any] = {"kind": "step", "segment": segment.index,
                                 "settings": {"fake": True}}
        if segment.index in tilings:
            tiling = make_tiling(segment, tilings[segment.index])
            entry["tiling"] = tiling.to_json()
        entries.append(entry)
    return tuple(entries)


def make_world(workdir: Path, *, network_id: str, model_id: str, ezkl: bool = True,
               database_url: str | None = None, chain: Chain | None = None,
               model: zoo.ZooModel | None = None,
               tilings: Mapping[int, Sequence[int]] | None = None) -> World:
    """Migrate a fresh database under ``workdir`` and register ``model`` (the zoo MLP by
    default), calibrated (``tilings``: segments proven on tiles of those block sizes); with
    ``chain``, every proof is verified again on it (the context's chain port)."""
    settings = Settings(database_url=database_url or f"sqlite:///{workdir / 'd.db'}",
                        blob_dir=workdir / "blobs", spot_key="ab" * 16, home=workdir / "home")
    migrate(settings.database_url)
    tasks = FakeTasks()
    model = model or zoo.mlp()
    prepared = prepare_model(model.onnx_bytes)
    if ezkl:
        ctx = ServiceContext.create(settings, tasks=tasks, chain=chain,
                                    prover=EzklProofs(lambda: make_prover(settings)))
        manifest, _ = calibrate_model(prepared, [random_inputs(prepared.loaded, seed=s)
                                                 for s in range(3)], tilings=tilings)
        prepared = dataclasses.replace(prepared, manifest=manifest)
    else:
        ctx = ServiceContext.create(settings, tasks=tasks, prover=FakeProver(), chain=chain)
        prepared = _fake_calibration(prepared, tilings)
    manifest = prepared.manifest
    now = datetime.now(UTC)
    with ctx.sessions() as s, s.begin():
        s.add(Network(id=network_id, name=network_id, created_at=now))
        s.add(RegisteredModel(id=model_id, network_id=network_id,
                              model_sha256=manifest.model_sha256,
                              manifest_sha256=manifest.sha256, manifest=manifest.to_json(),
                              model_blob=ctx.blobs.put(model.onnx_bytes), created_at=now))
    return World(ctx, prepared, workdir, network_id, model_id, tasks, model)


def add_result(world: World, *, seed: int, lie_at: int | None = None,
               out_of_range_at: int | None = None, upload: bool = True,
               rounded: bool = False, lie_element: tuple[int, ...] | None = None) -> str:
    """Accept a result of the world's model on ``sample_input(seed)``; a cheat moves state
    ``lie_at`` by 0.5 (far beyond τ; only its element ``lie_element`` when given), or puts one
    value of state ``out_of_range_at`` at 3·R (committed, but an
    upload would refuse it). With ``rounded``, every value of states 1..N is moved by one ulp,
    as a provider's optimized run differs from the deterministic one: honest, but no leaf past
    the input equals a checker's. The trace is kept as ``<id>.rtrace`` in the working folder, and
    stored as uploaded unless ``upload`` is false. The provider's stake (1000) is locked in the
    result's journal, as at acceptance. Returns the result id."""
    manifest = world.prepared.manifest
    trace = run_trace(world.prepared, world.model.sample_input(seed))
    states = [list(x) for x in trace.states]
    if rounded:
        states[1:] = [[np.nextafter(t, np.float32(np.inf)) for t in s] for s in states[1:]]
    if lie_at is not None and lie_element is not None:
        states[lie_at][0] = states[lie_at][0].copy()
        states[lie_at][0][lie_element] += 0.5
    elif lie_at is not None:
        states[lie_at][0] = states[lie_at][0] + 0.5
    if out_of_range_at is not None:
        assert manifest.range is not None
        states[out_of_range_at][0] = states[out_of_range_at][0].copy()
        states[out_of_range_at][0].flat[0] = 3 * manifest.range
    if lie_at is not None or out_of_range_at is not None or rounded:
        trace = Trace.from_states(manifest, states, check_range=False)
    rid = new_id("res")
    now = datetime.now(UTC)
    blob = world.ctx.blobs.put(trace.write(world.workdir / f"{rid}.rtrace").read_bytes())
    with world.ctx.sessions() as s, s.begin():
        accept(s, Result(id=rid, network_id=world.network_id, model_id=world.model_id,
                         message_hash=rid.ljust(64, "0"), provider="0x" + "aa" * 20, nonce=rid,
                         deadline=0, stake="1000", input_hash="0x" + "00" * 32,
                         output_hash="0x" + "00" * 32,
                         trace_root="0x" + trace.commitment.root.hex(),
                         leaves=["0x" + x.hex() for x in trace.commitment.leaves],
                         signature="0x", status=ResultStatus.ACCEPTED, accepted_at=now,
                         challenge_deadline=now + timedelta(hours=1),
                         trace_blob=blob if upload else None))
    return rid
