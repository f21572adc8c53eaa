"""Shared fixtures: the public models in ../shared/models and the deterministic executor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from refute.errors import ModelRejected
from refute.executor import DeterministicExecutor
from refute.loading import LoadedModel, load_model
from refute.provider import input_sizes

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("REFUTE_SHARED", REPO.parent / "shared")) / "models"


@dataclass(frozen=True)
class SharedModel:
    """One model of ../shared/models with its EZKL-style input."""

    name: str
    path: Path
    input_json: Path

    def inputs(self, loaded: LoadedModel) -> dict[str, np.ndarray]:
        """The model's input.json reshaped to the loaded model's input shapes (seeded random
        inputs for a model that comes without one, as ``doodles`` does)."""
        if not self.input_json.is_file():
            from refute.provider import random_inputs

            return random_inputs(loaded, seed=0)
        doc = json.loads(self.input_json.read_text())
        return {
            spec.name: np.asarray(values, dtype=np.float32).reshape(spec.shape)
            for spec, values in zip(loaded.input_specs, doc["input_data"], strict=True)
        }


def shared_models() -> list[SharedModel]:
    """Every shared model; fails loudly if the folder is missing (CI must have it)."""
    if not SHARED_MODELS.is_dir():
        raise RuntimeError(f"shared models not found at {SHARED_MODELS} (set REFUTE_SHARED)")
    return [
        SharedModel(d.name, d / "network.onnx", d / "input.json")
        for d in sorted(SHARED_MODELS.iterdir())
        if (d / "network.onnx").is_file()
    ]


#: How many models of ../shared/models load today (94 of 99: arange has no input, bitwise_ops
#: an input file that does not fit it; three fail the full ONNX check on int8 MatMul).
#: A change that loads fewer is a regression.
SHARED_MODELS_LOADING = 94


def load_shared(path: Path) -> LoadedModel | None:
    """Load a shared model as a user would (its input file pins the symbolic dimensions), or
    ``None`` when it is refused; a refusal must be a :class:`ModelRejected` with a one-line
    reason (the README of ../shared/models: a model the project cannot handle is refused, never
    crashes)."""
    sample = path.parent / "input.json"
    try:
        return load_model(path, input_sizes=input_sizes(sample) if sample.is_file() else None)
    except ModelRejected as exc:
        assert exc.reason and "\n" not in exc.reason and len(exc.reason) < 500, exc.reason
        return None


@pytest.fixture(scope="session")
def executor() -> DeterministicExecutor:
    """One executor (and session cache) for the whole test run."""
    return DeterministicExecutor()
