"""Compiled EZKL circuits, one folder per circuit, cached by content hash.

A circuit folder holds EZKL's usual files (``network.onnx``, ``settings.json``,
``model.compiled``, ``pk.key``, ``vk.key``) and ``circuit.json`` (our metadata). It is named by
sha256 over (graph bytes, scale, EZKL version, calibrated settings), so the same circuit is
built once and reused by every later proof. Builders take an exclusive lock per key and build
into a temporary folder that is renamed into place when complete, so concurrent builders never
see or leave a half-built circuit.

EZKL's ``setup``/``prove`` hold the GIL for their whole run: call this module from worker
processes, never from threads of an API process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ezkl
import numpy as np

from prover.errors import CircuitUnsupported, ProverError
from prover.isolated import ChildFailed, run_child
from prover.srs import SrsStore, file_lock
from refute.manifest import EZKL_VERSION, canonical_json
from refute.settings import get_settings

#: ``progress(stage)``: called before each long EZKL step.
StageFn = Callable[[str], None]

GRAPH = "network.onnx"
SETTINGS = "settings.json"
COMPILED = "model.compiled"
PK = "pk.key"
VK = "vk.key"
META = "circuit.json"


def _quiet(stage: str) -> None:
    del stage


@dataclass(frozen=True)
class Circuit:
    """A built circuit: its folder and what a verifier needs to know about it."""

    folder: Path
    key: str
    logrows: int
    input_scale: int
    output_scale: int
    srs_path: Path
    unsafe_srs: bool
    vk_sha256: str
    settings_sha256: str

    @property
    def settings_path(self) -> Path:
        """``settings.json``."""
        return self.folder / SETTINGS

    @property
    def compiled_path(self) -> Path:
        """``model.compiled``."""
        return self.folder / COMPILED

    @property
    def pk_path(self) -> Path:
        """``pk.key``."""
        return self.folder / PK

    @property
    def vk_path(self) -> Path:
        """``vk.key``."""
        return self.folder / VK

    def to_json(self) -> dict[str, Any]:
        """What the manifest records about this circuit."""
        return {
            "key": self.key,
            "logrows": self.logrows,
            "input_scale": self.input_scale,
            "output_scale": self.output_scale,
            "vk_sha256": self.vk_sha256,
            "settings_sha256": self.settings_sha256,
            "ezkl_version": EZKL_VERSION,
            "unsafe_srs": self.unsafe_srs,
        }

    @classmethod
    def load(cls, folder: Path) -> Circuit:
        """Open a built circuit folder (raises ProverError if it is not complete)."""
        try:
            meta = json.loads((folder / META).read_text())
            return cls(
                folder=folder,
                key=str(meta["key"]),
                logrows=int(meta["logrows"]),
                input_scale=int(meta["input_scale"]),
                output_scale=int(meta["output_scale"]),
                srs_path=Path(meta["srs_path"]),
                unsafe_srs=bool(meta["unsafe_srs"]),
                vk_sha256=str(meta["vk_sha256"]),
                settings_sha256=str(meta["settings_sha256"]),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ProverError(f"circuit folder {folder} is incomplete: {exc}") from exc


@dataclass(frozen=True)
class Layout:
    """The EZKL run arguments that shape a circuit without changing what it proves.

    ``num_inner_cols`` packs more (or fewer) values side by side in each advice column: more
    columns make fewer rows (a smaller ``logrows``) but a wider proving key. ``decomp_base`` and
    ``decomp_legs`` set EZKL's range checks: each checked value is split into ``decomp_legs``
    digits below ``decomp_base`` (a lookup table of ``decomp_base`` rows), so values up to
    ``±decomp_base^decomp_legs`` are representable. Either way every value is still fully
    constrained: a layout that cannot hold a calibration sample fails calibration, it does not
    prove something weaker.
    """

    num_inner_cols: int = 2
    decomp_base: int = 16384
    decomp_legs: int = 2

    def describe(self) -> str:
        """``cols=2 decomp=16384x2``."""
        return f"cols={self.num_inner_cols} decomp={self.decomp_base}x{self.decomp_legs}"


#: EZKL 23's defaults, the first layout tried.
DEFAULT_LAYOUT = Layout()


def run_args(scale: int, layout: Layout = DEFAULT_LAYOUT) -> Any:
    """EZKL run arguments of every refute circuit: hashed inputs, fixed params, public output,
    check mode SAFE (EZKL re-checks every op's layout against its plain evaluation while
    generating witnesses: a prover-side assertion, the constraints are the same)."""
    args = ezkl.PyRunArgs()
    args.input_visibility = "hashed"
    args.param_visibility = "fixed"
    args.output_visibility = "public"
    args.input_scale = scale
    args.param_scale = scale
    args.check_mode = "safe"
    args.num_inner_cols = layout.num_inner_cols
    args.decomp_base = layout.decomp_base
    args.decomp_legs = layout.decomp_legs
    return args


def write_input_json(path: Path, tensors: Sequence[np.ndarray]) -> Path:
    """EZKL input file: one flat list per graph input, in order."""
    path.write_text(
        json.dumps({"input_data": [np.asarray(t, dtype=np.float64).ravel().tolist()
                                   for t in tensors]})
    )
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ezkl(step: str, fn: Callable[[], Any]) -> Any:
    try:
        result = fn()
    except Exception as exc:  # EZKL raises bare RuntimeErrors with long messages
        text = str(exc).strip().splitlines()
        raise CircuitUnsupported(f"EZKL {step} failed: {text[0] if text else exc}") from exc
    if result is False:
        raise CircuitUnsupported(f"EZKL {step} failed")
    return result


def _calibrate_layout(
    graph_path: Path, data: Path, scale: int, layout: Layout, *, workdir: Path,
    max_logrows: int | None,
) -> dict[str, Any]:
    settings_path = workdir / (f"settings-{layout.num_inner_cols}-{layout.decomp_base}"
                               f"x{layout.decomp_legs}.json")
    _ezkl("gen_settings", lambda: ezkl.gen_settings(
        str(graph_path), str(settings_path), py_run_args=run_args(scale, layout)))
    _ezkl("calibrate_settings", lambda: ezkl.calibrate_settings(
        str(data), str(graph_path), str(settings_path), "resources", scales=[scale],
        max_logrows=max_logrows))
    settings: dict[str, Any] = json.loads(settings_path.read_text())
    if max_logrows is not None and int(settings["run_args"]["logrows"]) > max_logrows:
        raise CircuitUnsupported(
            f"EZKL calibrate_settings needs logrows {settings['run_args']['logrows']}, above "
            f"the cap of {max_logrows}")
    return settings


def _cost(settings: dict[str, Any]) -> tuple[int, int]:
    """Smaller is better: logrows first, then the estimated proving key."""
    from prover.budget import estimate

    cost = estimate(settings)
    return cost.logrows, cost.pk_bytes


def calibrated_settings(
    graph: bytes,
    scale: int,
    calibration: Sequence[Sequence[np.ndarray]],
    workdir: Path,
    *,
    max_logrows: int | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """EZKL settings for ``graph`` at ``scale``, calibrated (``resources``) on the first sample,
    with the smallest circuit of a few layouts (:class:`Layout`).

    The search, cheapest first by (logrows, estimated proving key): EZKL's default layout
    (2 inner columns); 4 then 8 inner columns for as long as each lowers logrows (a row-bound
    circuit, such as a convolution, gets shorter); a range-check table half as tall when the
    table is what holds logrows up (``decomp_base`` halved once, ``decomp_legs`` unchanged,
    with the same or twice the columns); then fewer inner columns for as long as logrows holds
    (a narrower proving key). In these small circuits the floor is usually the Poseidon hashing
    of the inputs (about 41 rows per element, whatever the layout). Every candidate is
    calibrated on the same sample, so the layout chosen represents it.

    ``max_logrows`` caps EZKL's own search; past ``deadline`` (``time.monotonic()``) no
    further layout is tried and the best so far is returned. Raises
    :class:`CircuitUnsupported` with EZKL's reason when the default layout fails and no other
    succeeds."""
    workdir.mkdir(parents=True, exist_ok=True)
    graph_path = workdir / GRAPH
    graph_path.write_bytes(graph)
    data = write_input_json(workdir / "calibration.json", calibration[0])
    errors: list[CircuitUnsupported] = []
    tried: dict[Layout, dict[str, Any] | None] = {}
    best: dict[str, Any] | None = None
    best_layout = DEFAULT_LAYOUT

    def attempt(layout: Layout) -> bool:
        """Calibrate ``layout`` (once) and keep it if it beats the best; whether it did."""
        nonlocal best, best_layout
        if layout not in tried:
            if deadline is not None and time.monotonic() > deadline:
                return False
            try:
                tried[layout] = _calibrate_layout(graph_path, data, scale, layout,
                                                  workdir=workdir, max_logrows=max_logrows)
            except CircuitUnsupported as exc:
                errors.append(exc)
                tried[layout] = None
        candidate = tried[layout]
        if candidate is None or (best is not None and _cost(candidate) >= _cost(best)):
            return False
        best, best_layout = candidate, layout
        return True

    attempt(DEFAULT_LAYOUT)
    # Wider, while it lowers logrows (a default layout that failed may only be too tall).
    for cols in (4, 8):
        if not attempt(replace(best_layout, num_inner_cols=cols)):
            break
    # More range-check digits, when two cannot hold the sample's values (EZKL: "decomposition
    # error: integer … is too large to be represented by base 16384 and n 2", e.g. the
    # rescaled intermediates of an InstanceNormalization).
    for legs in (3, 4):
        if best is None:
            attempt(replace(DEFAULT_LAYOUT, decomp_legs=legs))
    # A range-check table half as tall, when the table holds logrows up.
    if best is not None and best_layout.decomp_base >= 2 ** (int(best["run_args"]["logrows"]) - 1):
        narrow = replace(best_layout, decomp_base=best_layout.decomp_base // 2)
        if not attempt(narrow):
            attempt(replace(narrow, num_inner_cols=2 * narrow.num_inner_cols))
    # Narrower, while logrows holds (a smaller proving key).
    cols = best_layout.num_inner_cols // 2
    while best is not None and cols >= 1 and attempt(replace(best_layout, num_inner_cols=cols)):
        cols //= 2
    if best is None:
        raise errors[0] if errors else CircuitUnsupported(
            "EZKL calibration ran out of time before trying a layout")
    (workdir / SETTINGS).write_text(json.dumps(best))
    return best


def circuit_key(graph: bytes, scale: int, settings: dict[str, Any]) -> str:
    """The content hash naming a circuit folder."""
    digest = hashlib.sha256()
    digest.update(hashlib.sha256(graph).digest())
    digest.update(f"scale={scale};ezkl={EZKL_VERSION};".encode())
    digest.update(canonical_json(settings))
    return digest.hexdigest()


class CircuitCache:
    """Circuit folders under ``root``, built at most once per key."""

    def __init__(self, root: Path, srs: SrsStore) -> None:
        self.root = root
        self.srs = srs

    def build(
        self,
        graph: bytes,
        scale: int,
        settings: dict[str, Any],
        *,
        progress: StageFn = _quiet,
    ) -> Circuit:
        """Return the circuit for (graph, scale, settings), compiling and setting it up if new."""
        key = circuit_key(graph, scale, settings)
        folder = self.root / key
        if (folder / META).exists():
            return Circuit.load(folder)
        with file_lock(self.root / f"{key}.lock"):
            if (folder / META).exists():
                return Circuit.load(folder)
            tmp = self.root / f".{key}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                self._build_into(
                    tmp, key=key, graph=graph, scale=scale, settings=settings, progress=progress
                )
                tmp.replace(folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return Circuit.load(folder)

    def _build_into(
        self,
        tmp: Path,
        *,
        key: str,
        graph: bytes,
        scale: int,
        settings: dict[str, Any],
        progress: StageFn,
    ) -> None:
        (tmp / GRAPH).write_bytes(graph)
        (tmp / SETTINGS).write_text(json.dumps(settings))
        progress("compile")
        _ezkl("compile_circuit", lambda: ezkl.compile_circuit(
            str(tmp / GRAPH), str(tmp / COMPILED), str(tmp / SETTINGS)))
        logrows = int(settings["run_args"]["logrows"])
        srs = self.srs.for_logrows(logrows)
        progress("setup")
        try:
            done = run_child("prover.circuit:setup_job",
                             (str(tmp / COMPILED), str(tmp / VK), str(tmp / PK), str(srs.path)),
                             timeout_s=get_settings().dispute_proof_timeout_s,
                             what="EZKL setup", hint="REFUTE_DISPUTE_PROOF_TIMEOUT_S")
        except ChildFailed as exc:
            raise CircuitUnsupported(exc.reason) from exc
        scales = settings.get("model_output_scales") or [scale]
        meta = {
            "key": key,
            "logrows": logrows,
            "input_scale": scale,
            "output_scale": int(scales[0]),
            "srs_path": str(srs.path),
            "unsafe_srs": srs.unsafe,
            "vk_sha256": _sha256_file(tmp / VK),
            "settings_sha256": hashlib.sha256(canonical_json(settings)).hexdigest(),
            "ezkl_version": EZKL_VERSION,
            "setup_seconds": round(done.seconds, 1),
            "setup_peak_bytes": done.peak_bytes,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def setup_job(job: tuple[str, str, str, str]) -> None:
    """EZKL's setup, in a child process of its own (:mod:`prover.isolated`): ``job`` is the
    compiled circuit, verifying key, proving key and SRS paths."""
    compiled, vk, pk, srs = job
    _ezkl("setup", lambda: ezkl.setup(compiled, vk, pk, srs_path=srs))


def witness(circuit: Circuit, tensors: Sequence[np.ndarray], workdir: Path) -> dict[str, Any]:
    """EZKL witness of ``circuit`` on ``tensors`` (its inputs in order)."""
    data = write_input_json(workdir / "input.json", tensors)
    out = workdir / "witness.json"
    result: dict[str, Any] = _ezkl("gen_witness", lambda: ezkl.gen_witness(
        str(data), str(circuit.compiled_path), str(out)))
    return result


def felt_to_int(felt: str) -> int:
    """A felt (EZKL little-endian hex) as a signed integer, centered on zero."""
    from refute.poseidon import FIELD_MODULUS

    value = int.from_bytes(bytes.fromhex(felt), "little")
    return value - FIELD_MODULUS if value > FIELD_MODULUS // 2 else value
