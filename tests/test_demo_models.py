"""`refute demo --model mobilenet|gpt2`: the real-size models in the package, the limits the
demo raises, the cheat it plants; and (slow, large) the MobileNet demo end to end."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from refute.executor import DeterministicExecutor
from refute.provider import PreparedModel
from refute.segmentation import step_difference_units
from refute.settings import Settings
from verifier.main import app


def test_unknown_model_is_refused_in_one_line() -> None:
    done = CliRunner().invoke(app, ["demo", "--model", "nosuch"])
    assert done.exit_code == 2
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1, done.output
    assert "nosuch" in lines[0] and "mlp, mobilenet, gpt2" in lines[0]


def test_large_model_env_raises_exactly_the_named_limits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from verifier.demo import demo_env

    assert demo_env("mlp") == {}
    env = demo_env("gpt2")
    assert env == demo_env("mobilenet")
    named = {"REFUTE_MAX_MODEL_BYTES", "REFUTE_MAX_INITIALIZER_BYTES", "REFUTE_MAX_MODEL_WORK",
             "REFUTE_MAX_UPLOAD_BYTES", "REFUTE_REGISTRATION_TIMEOUT_S",
             "REFUTE_REGISTRATION_MEMORY_MB", "REFUTE_TASK_TIME_LIMIT_S"}
    assert set(env) == named
    for name in named:
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    raised = Settings()
    for name in named:
        field = name.removeprefix("REFUTE_").lower()
        assert getattr(raised, field) > getattr(defaults, field), name
    # GPT-2-small: ≈ 340 MB of file and weights, ≈ 2^34 MACs, hours of registration in ≤ 16 GB;
    # a task's limit stays below the broker's visibility timeout.
    assert raised.max_model_bytes >= 400 * 2**20 and raised.max_initializer_bytes >= 400 * 2**20
    assert raised.max_model_work >= 2**35 and raised.max_upload_bytes >= 128 * 2**20
    assert raised.registration_timeout_s >= 3 * 3600
    assert 12 * 1024 <= raised.registration_memory_mb <= 20 * 1024
    assert raised.task_time_limit_s < raised.visibility_timeout_s


def test_settings_env_is_applied_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    from refute.settings import get_settings
    from verifier.demo import _settings_env
    from verifier.demo_models import LARGE_MODEL_ENV

    monkeypatch.delenv("REFUTE_MAX_MODEL_BYTES", raising=False)
    get_settings.cache_clear()
    before = get_settings().max_model_bytes
    with _settings_env(LARGE_MODEL_ENV):
        assert get_settings().max_model_bytes == int(LARGE_MODEL_ENV["REFUTE_MAX_MODEL_BYTES"])
    assert get_settings().max_model_bytes == before


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """MobileNet v1 built into a fresh cache: (its cached file, the build's seconds)."""
    pytest.importorskip("torch")
    from refute import large_models

    cache = tmp_path_factory.mktemp("models")
    start = time.monotonic()
    model = large_models.mobilenet_v1(cache=cache, console=Console(quiet=True))
    seconds = time.monotonic() - start
    path = large_models.cached_path("mobilenet_v1", cache=cache)
    assert path.read_bytes() == model.onnx_bytes
    return path, seconds


@pytest.fixture(scope="module")
def prepared_mobilenet(mobilenet: tuple[Path, float]) -> PreparedModel:
    from refute.provider import prepare_model

    return prepare_model(mobilenet[0].read_bytes())


def test_mobilenet_builds_with_its_shapes_and_29_segments(
        mobilenet: tuple[Path, float], prepared_mobilenet: PreparedModel) -> None:
    from refute import large_models

    path, _ = mobilenet
    model = large_models.mobilenet_v1(cache=path.parent)
    assert model.input_shapes == {"image": (1, 3, 224, 224)}
    assert model.output_shapes == {"logits": (1, 1000)}
    assert model.sample_input(3)["image"].shape == (1, 3, 224, 224)
    assert prepared_mobilenet.segmentation.num_segments == 29


def test_mobilenet_is_read_from_the_cache_the_second_time(mobilenet: tuple[Path, float]) -> None:
    from refute import large_models

    path, build_s = mobilenet
    mtime, data = path.stat().st_mtime_ns, path.read_bytes()
    start = time.monotonic()
    again = large_models.mobilenet_v1(cache=path.parent, console=Console(quiet=True))
    assert time.monotonic() - start < max(1.0, build_s / 2)
    assert again.onnx_bytes == data and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no leftover export


def test_unknown_large_model_is_refused() -> None:
    from refute import large_models
    from refute.errors import RefuteError

    with pytest.raises(RefuteError, match="unknown model 'resnet'"):
        large_models.large_model("resnet")


def test_bench_models_wraps_the_package() -> None:
    from bench import bench_models
    from refute import large_models

    assert bench_models._gpt2_small is large_models.gpt2_small_module
    assert bench_models._mobilenet_v1 is large_models.mobilenet_v1_module
    assert bench_models.CACHE.parts[-2:] == ("out", "bench_models")
    with pytest.raises(ValueError, match="unknown model"):
        bench_models.bench_model("resnet")


def test_the_mobilenet_cheat_is_one_faulty_middle_convolution(
        prepared_mobilenet: PreparedModel) -> None:
    """The demo lies at a middle convolution and runs the rest honestly from the lie: a
    spot-check finds that step (beyond 2·τ) and no other."""
    from refute.provider import random_inputs
    from refute.segmentation import run_segments
    from verifier.demo import cheat_step
    from verifier.demo_models import lying_states

    segmentation = prepared_mobilenet.segmentation
    step, what = cheat_step("mobilenet", segmentation)
    assert step == 14 and "Conv" in segmentation.segments[step - 1].op_types, what
    n = segmentation.num_segments
    tau = 3
    prepared = dataclasses.replace(prepared_mobilenet, manifest=dataclasses.replace(
        prepared_mobilenet.manifest, tolerances=(tau,) * n, range=64.0))
    executor = DeterministicExecutor()
    states = run_segments(executor, segmentation, random_inputs(segmentation.model, seed=2))
    lied, where = lying_states(prepared, states, step, executor)
    assert "off by" in where and len(lied) == n + 1
    scale = prepared.manifest.scale
    faulty = [i for i in range(1, n + 1)
              if step_difference_units(executor, segmentation.segments[i - 1], lied[i - 1],
                                       lied[i], scale) > 2 * tau]
    assert faulty == [step]
    changed = np.argwhere(np.asarray(lied[step][0]) != np.asarray(states[step][0]))
    assert len(changed) == 1


def test_the_gpt2_cheat_is_the_middle_blocks_attention_scores() -> None:
    """Found by op types on a two-block GPT-2 of the same structure (the full one: segment 38,
    block 6 of 0–11)."""
    torch = pytest.importorskip("torch")
    import io
    import warnings

    from refute import large_models
    from refute.loading import load_model
    from refute.segmentation import segment_model
    from verifier.demo import cheat_step

    torch.manual_seed(0)
    module = large_models.gpt2_small_module(layers=3, dim=16, heads=2, tokens=8, hidden=64).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 8, 16),), buffer, dynamo=False,
                          opset_version=17, do_constant_folding=True,
                          input_names=["embeddings"], output_names=["hidden"])
    segmentation = segment_model(load_model(buffer.getvalue()))
    step, what = cheat_step("gpt2", segmentation)
    segment = segmentation.segments[step - 1]
    assert segment.op_types == ("MatMul", "Mul", "Add"), segment.op_types
    assert "block 1 (of 0–2)" in what
    assert any(o.shape[-2:] == (8, 8) for o in segment.outputs)


def test_the_registration_probe_names_the_segment_and_the_processes(
        tmp_path: Path, prepared_mobilenet: PreparedModel) -> None:
    from verifier.demo_models import _RegistrationProbe

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        probe = _RegistrationProbe(os.getpid(), tmp_path, prepared_mobilenet.segmentation)
        assert probe().startswith("loading")
        (tmp_path / "refute-child-x1").mkdir()
        (tmp_path / "refute-cal14-x2").mkdir()
        line = probe()
        assert line.startswith("calibrating segment 14/29 (Conv Relu); "), line
        assert "under the API" in line and "GiB resident" in line
        (tmp_path / "refute-cal14-x2").rmdir()  # between two folders: the last stage stays
        assert probe().startswith("calibrating segment 14/29")
        (tmp_path / "refute-range-x3").mkdir()
        assert probe().startswith("calibrating the states' range circuits")
    finally:
        child.kill()
        child.wait()


def test_the_report_summary_names_tiles_and_logrows() -> None:
    from verifier.demo_models import _print_report

    console = Console(record=True, width=200)
    _print_report(console, {"scale": 7, "scales_tried": [7], "range": 32.0, "segments": [
        {"segment": 1, "tiles": 152, "logrows": 18, "calibration_seconds": 60},
        {"segment": 2, "tiles": None, "logrows": 17, "calibration_seconds": 5},
        {"segment": 3, "tiles": 57, "logrows": 18, "calibration_seconds": 70}]})
    text = console.export_text()
    assert "3 segments, 2 tiled" in text and "1: 152, 3: 57" in text
    assert "17: 1 segment, 18: 2 segments" in text


# --- the real thing ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.large
@pytest.mark.ezkl
@pytest.mark.chain
def test_demo_mobilenet(tmp_path: Path) -> None:
    """The MobileNet demo end to end: registration (≈ half an hour, both cores), a cheat at a
    middle convolution convicted on its tile and verified on anvil, the honest result
    finalized, the bundle replayed."""
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, "-m", "verifier", "demo", "--model", "mobilenet",
                           "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=4 * 3600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    out = done.stdout
    assert "refute demo: summary" in out and "FINALIZED" in out and "PROVIDER_FAULT" in out
    assert "registration report: 29 segments" in out
    assert out.count("verified on anvil") == 1
    bundles = sorted(tmp_path.glob("*.rdispute"))
    assert len(bundles) == 1
    key = re.search(r"refute replay <bundle> --key (0x[0-9a-f]+)", out)
    assert key is not None, out[-2000:]
    replay = subprocess.run([sys.executable, "-m", "verifier", "replay", str(bundles[0]),
                             "--key", key.group(1)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert replay.returncode == 0 and "FAIL" not in replay.stdout
