"""A representative sample of ../shared/models, end to end, in CI (issue 11).

The whole corpus runs in ``bench/bench_corpus.py``; here every operator family appears at least
once:

* **registered** through the service's own registration path (pins from the sample input,
  folding, calibration, the report), for operator families that are one model each;
* **disputed**: registered, traced, every step proven and verified on anvil and decided for the
  provider, and (for a model of several segments) a cheat convicted, for models that combine
  families: shape folding with recurrence, trees, boolean and integer boundaries, conv with
  matmul.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from bench.bench_corpus import run_model
from prover.evm import Anvil
from tests.conftest import SHARED_MODELS
from verifier.registry import build_registration

#: One model per family: trigonometry and its kin; transposed convolution; resize; instance
#: normalization (three range-check digits); L2 and log-sum-exp reductions; an Lp-pool
#: decomposition (Sign, Gather folded); hard and smooth activations; Pow on positive inputs;
#: ArgMax to a one-hot (a scalar shape folded); a ReduceMean to a scalar, refused by the τ rule
#: at scale 7 and registered at a finer scale; a padded MaxPool (padded with its border).
REGISTERED = ["trig", "1l_conv_transpose", "1l_upsample", "1l_instance_norm", "reducel2",
              "logsumexp", "1l_lppool", "hard_swish", "celu", "1l_powf", "hard_max", "1l_mean",
              "1l_max_pool"]

#: A model whose one-step circuit is over the proving budget (an Identity on a 64×64 image:
#: hashing its input and output alone needs logrows 19, about 11 GiB to prove): registered on
#: tiles whose circuits fit (issue 13; it used to be refused). (rounding_ops, a discontinuity,
#: is refused only when the calibration samples cross a rounding boundary: left to the bench.)
TILED = ["doodles"]

#: Models disputed end to end: LSTM behind a folded shape sub-graph; a gradient-boosted tree
#: ensemble (Gather, Less, ArgMax, Softmax, integer output); boolean and integer inputs cast at
#: the boundary (Cast, Less, Not, Where); Conv, MatMul, Pow and Sigmoid in two segments, with a
#: cheat convicted; indices given as inputs (committed and proven at scale 0); a top-k of
#: integers; integer division (truncated in the circuit as in ONNX).
DISPUTED = ["lstm", "xgboost", "1l_where", "large_op_graph", "gather_elements", "1l_topk",
            "integer_div"]


@pytest.fixture(scope="module")
def chain() -> Iterator[str]:
    with Anvil() as anvil:
        yield anvil.rpc_url


@pytest.mark.slow
@pytest.mark.parametrize("name", REGISTERED)
def test_shared_model_registers(name: str) -> None:
    folder = SHARED_MODELS / name
    built = build_registration((folder / "network.onnx").read_bytes(), {
        "sample_input": json.loads((folder / "input.json").read_text()),
        "calibration_samples": 2,
    })
    report = built["report"]
    assert report["registrable"], report["refusals"]
    assert report["pins"], "the sample input pins the symbolic batch"
    for segment in report["segments"]:
        assert segment["tolerance"] >= 1 and segment["logrows"] > 0 and segment["fits_budget"]
    assert built["manifest"]["tolerances"] == [s["tolerance"] for s in report["segments"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", TILED)
def test_shared_model_over_the_budget_registers_on_tiles(name: str) -> None:
    folder = SHARED_MODELS / name
    sample = folder / "input.json"  # doodles has none
    options: dict[str, Any] = {"calibration_samples": 1}
    if sample.is_file():
        options["sample_input"] = json.loads(sample.read_text())
    built = build_registration((folder / "network.onnx").read_bytes(), options)
    report = built["report"]
    assert report["registrable"], report["refusals"]
    [segment] = report["segments"]
    assert segment["tiles"] > 1 and segment["fits_budget"], segment
    assert segment["estimated_peak_bytes"] <= report["budget_bytes"]
    [entry] = [c for c in built["manifest"]["circuits"] if c["kind"] == "step"]
    assert entry["tiling"]["tiles"] == segment["tiles"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DISPUTED)
def test_shared_model_disputed_on_anvil(name: str, chain: str) -> None:
    row: dict[str, Any] = {}
    run_model(name, chain, row)
    assert row["bit_exact"]
    assert row["honest_steps"] == row["segments"] >= 1
    assert all(gas and gas > 0 for gas in row["gas"])
    if row["segments"] >= 2:
        assert 1 <= row["cheat_step"] <= row["segments"]
