"""The proof bundle ``refute.proof/2``: one adjudicated step (or range), checkable offline.

An uncompressed ZIP holding ``manifest.json`` (calibrated), ``commitment.json`` (the provider's
leaves and root), ``step.json`` (:class:`~prover.step.StepProof` JSON plus ``kind``: ``step`` or
``range``), the circuit's ``settings.json`` and ``vk.key``, and the states the proof was made on
(states i-1 and i of a step, state k of a range) as ``states/<k>/<j>.f32``: tensor j of state k,
raw little-endian float32 in C order. Those states bind the proof to the commitment: they must
reproduce their leaves, and the proof's hash instances must be Poseidon of their quantized
tensors. Verification needs only this bundle and the KZG parameters (SRS) for the circuit's
logrows.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prover.circuit import Circuit
from prover.errors import ProofRejected
from prover.step import StepProof
from refute import safejson
from refute.commitment import TraceCommitment
from refute.errors import InputError
from refute.manifest import Manifest, canonical_json

FORMAT = "refute.proof/2"
_MEMBERS = ("manifest.json", "commitment.json", "step.json", "settings.json", "vk.key")
_MAX_MEMBER = 64 * 2**20
#: Largest state member (a state the proof was made on).
_MAX_STATE_MEMBER = 2**31

State = tuple[np.ndarray, ...]


def _member(k: int, j: int) -> str:
    return f"states/{k}/{j}.f32"


def proof_states(kind: str, index: int) -> tuple[int, ...]:
    """The states a proof of ``kind`` at ``index`` is made on: i-1 and i, or k."""
    return (index - 1, index) if kind == "step" else (index,)


@dataclass(frozen=True)
class ProofBundle:
    """Everything needed to re-check one adjudication offline."""

    kind: str
    manifest: Manifest
    commitment: TraceCommitment
    step: StepProof
    settings: dict[str, Any]
    vk: bytes
    states: dict[int, State]

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle (settings and vk included) atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr("manifest.json", canonical_json(self.manifest.to_json()))
            archive.writestr("commitment.json", canonical_json(self.commitment.to_json()))
            archive.writestr(
                "step.json", canonical_json({**self.step.to_json(), "kind": self.kind,
                                             "bundle": FORMAT})
            )
            archive.writestr("settings.json", json.dumps(self.settings))
            archive.writestr("vk.key", self.vk)
            for k in sorted(self.states):
                for j, tensor in enumerate(self.states[k]):
                    archive.writestr(_member(k, j),
                                     np.ascontiguousarray(tensor, dtype="<f4").tobytes())
        tmp.replace(target)
        return target

    @classmethod
    def of(cls, kind: str, manifest: Manifest, commitment: TraceCommitment, step: StepProof,
           circuit: Circuit, *, states: dict[int, State]) -> ProofBundle:
        """Assemble a bundle from a proof, the circuit that made it and the states it was made
        on (at least those; others are left out)."""
        wanted = proof_states(kind, step.segment)
        return cls(kind, manifest, commitment, step,
                   json.loads(circuit.settings_path.read_text()), circuit.vk_path.read_bytes(),
                   {k: tuple(states[k]) for k in wanted})

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ProofBundle:
        """Read a bundle; raises ProofRejected on anything malformed."""
        try:
            with zipfile.ZipFile(path) as archive:
                infos = {i.filename: i for i in archive.infolist()}
                if not set(_MEMBERS) <= set(infos):
                    raise ProofRejected(f"a proof bundle holds {list(_MEMBERS)} and the states "
                                        "the proof was made on")
                if any(infos[name].file_size > _MAX_MEMBER for name in _MEMBERS):
                    raise ProofRejected("proof bundle member too large")
                data = {name: archive.read(infos[name]) for name in _MEMBERS}
                bundle = cls._parse(data)
                bundle.states.update(_read_states(archive, infos, bundle))
        except (zipfile.BadZipFile, OSError) as exc:
            raise ProofRejected(f"not a readable proof bundle: {exc}") from exc
        return bundle

    @classmethod
    def _parse(cls, data: dict[str, bytes]) -> ProofBundle:
        try:
            manifest = Manifest.from_json(safejson.loads(data["manifest.json"],
                                                         what="manifest.json"))
            commitment = TraceCommitment.from_json(safejson.loads(data["commitment.json"],
                                                                  what="commitment.json"))
            step_doc = safejson.loads(data["step.json"], what="step.json")
            kind = str(step_doc["kind"])
            if step_doc.get("bundle") == "refute.proof/1":
                raise ProofRejected("this is a refute.proof/1 bundle (Poseidon leaves, no "
                                    f"states), which refute no longer accepts; {FORMAT} is")
            if step_doc.get("bundle") != FORMAT or kind not in ("step", "range"):
                raise ProofRejected(f"step.json is not a {FORMAT} step or range")
            index = int(step_doc["segment"])
            specs = manifest.states
            if kind == "step" and not 1 <= index < len(specs):
                raise ProofRejected(f"step {index} is outside the manifest")
            if kind == "range" and not 0 <= index < len(specs):
                raise ProofRejected(f"state {index} is outside the manifest")
            n_inputs = len(specs[index - 1] if kind == "step" else specs[index])
            step = StepProof.from_json(step_doc, n_inputs=n_inputs)
            settings = safejson.loads(data["settings.json"], what="settings.json")
        except InputError as exc:
            raise ProofRejected(f"malformed proof bundle: {exc.reason}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ProofRejected(f"malformed proof bundle: {exc}") from exc
        return cls(kind, manifest, commitment, step, settings, data["vk.key"], {})


def _read_states(archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo],
                 bundle: ProofBundle) -> dict[int, State]:
    """The states the proof was made on, each tensor's size checked before it is read."""
    wanted = proof_states(bundle.kind, bundle.step.segment)
    specs = bundle.manifest.states
    expected = {_member(k, j) for k in wanted for j in range(len(specs[k]))}
    present = set(infos) - set(_MEMBERS)
    if present != expected:
        extra, missing = sorted(present - expected)[:3], sorted(expected - present)[:3]
        raise ProofRejected(f"the bundle's states differ from those the proof was made on "
                            f"(states {list(wanted)}): unexpected {extra}, missing {missing}")
    states: dict[int, State] = {}
    for k in wanted:
        tensors = []
        for j, spec in enumerate(specs[k]):
            info = infos[_member(k, j)]
            if info.file_size != 4 * spec.size or info.file_size > _MAX_STATE_MEMBER:
                raise ProofRejected(f"state {k} tensor {spec.name!r} has {info.file_size} "
                                    f"bytes, its shape {list(spec.shape)} needs {4 * spec.size}")
            raw = archive.read(info)
            tensors.append(np.frombuffer(raw, dtype="<f4").reshape(spec.shape).copy())
        states[k] = tuple(tensors)
    return states
