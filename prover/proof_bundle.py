"""The proof bundle ``refute.proof/1``: one adjudicated step (or range), checkable offline.

An uncompressed ZIP holding ``manifest.json`` (calibrated), ``commitment.json`` (the provider's
leaves and root), ``step.json`` (:class:`~prover.step.StepProof` JSON plus ``kind``: ``step`` or
``range``), and the circuit's ``settings.json`` and ``vk.key``. Verification needs only this
bundle and the KZG parameters (SRS) for the circuit's logrows.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prover.circuit import Circuit
from prover.errors import ProofRejected
from prover.step import StepProof
from refute import safejson
from refute.commitment import TraceCommitment
from refute.errors import InputError
from refute.manifest import Manifest, canonical_json

FORMAT = "refute.proof/1"
_MEMBERS = ("manifest.json", "commitment.json", "step.json", "settings.json", "vk.key")
_MAX_MEMBER = 64 * 2**20


@dataclass(frozen=True)
class ProofBundle:
    """Everything needed to re-check one adjudication offline."""

    kind: str
    manifest: Manifest
    commitment: TraceCommitment
    step: StepProof
    settings: dict[str, Any]
    vk: bytes

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
        tmp.replace(target)
        return target

    @classmethod
    def of(cls, kind: str, manifest: Manifest, commitment: TraceCommitment, step: StepProof,
           circuit: Circuit) -> ProofBundle:
        """Assemble a bundle from a proof and the circuit that made it."""
        return cls(kind, manifest, commitment, step,
                   json.loads(circuit.settings_path.read_text()), circuit.vk_path.read_bytes())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ProofBundle:
        """Read a bundle; raises ProofRejected on anything malformed."""
        try:
            with zipfile.ZipFile(path) as archive:
                infos = {i.filename: i for i in archive.infolist()}
                if set(infos) != set(_MEMBERS):
                    raise ProofRejected(f"proof bundle members must be exactly {list(_MEMBERS)}")
                if any(i.file_size > _MAX_MEMBER for i in infos.values()):
                    raise ProofRejected("proof bundle member too large")
                data = {name: archive.read(infos[name]) for name in _MEMBERS}
        except (zipfile.BadZipFile, OSError) as exc:
            raise ProofRejected(f"not a readable proof bundle: {exc}") from exc
        try:
            manifest = Manifest.from_json(safejson.loads(data["manifest.json"],
                                                         what="manifest.json"))
            commitment = TraceCommitment.from_json(safejson.loads(data["commitment.json"],
                                                                  what="commitment.json"))
            step_doc = safejson.loads(data["step.json"], what="step.json")
            kind = str(step_doc["kind"])
            if step_doc.get("bundle") != FORMAT or kind not in ("step", "range"):
                raise ProofRejected("step.json is not a refute.proof/1 step or range")
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
        return cls(kind, manifest, commitment, step, settings, data["vk.key"])
