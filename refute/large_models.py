"""Real-size reference models: MobileNet v1 at 224×224 and a GPT-2-small-shaped transformer.

Both are built in torch with seeded random weights (``torch.manual_seed(seed)``: the weights do
not matter to a demo or a timing), exported with the legacy TorchScript exporter (opset 17,
static shapes, constant folding, eval mode so BatchNormalization folds into the convolutions)
and cached as ``<cache>/<name>-seed<seed>-v<VERSION>.onnx``, by default under the settings'
home (``REFUTE_HOME/models``): exporting the transformer (≈ 340 MB of weights) takes about a
minute and needs torch, reading the cache needs neither. Delete the file to rebuild it.

* :func:`mobilenet_v1`: input ``image`` 1×3×224×224; conv 3×3 stride 2 to 32 channels, then the
  13 depthwise-separable blocks (depthwise 3×3 + pointwise 1×1, each with BatchNorm and ReLU) up
  to 1024 channels, global average pool, fully connected to 1000 logits (≈ 17 MB; 29 segments
  under the default cuts).
* :func:`gpt2_small`: input ``embeddings`` 1×128×768 (token + position embeddings already
  added: no token-id lookup), 12 pre-LayerNorm blocks of causal self-attention (12 heads, fused
  QKV projection, additive constant mask) and an MLP 768→3072→768 with GPT-2's tanh-approximated
  GELU, final LayerNorm; output ``hidden`` 1×128×768, the final hidden states (no LM head)
  (≈ 340 MB; 73 segments under the default cuts; over the default load limits).

Unlike :mod:`refute.zoo`'s models these are not canonicalised: the bytes are the exporter's,
the same as ``bench/bench_models.py`` has always cached.
"""

# torch is imported inside functions: reading a cached model must not load it.

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from refute.errors import RefuteError
from refute.settings import get_settings
from refute.zoo import ZooModel

if TYPE_CHECKING:
    import torch

__all__ = ["NAMES", "OPSET", "VERSION", "cached_path", "default_cache", "gpt2_small",
           "gpt2_small_module", "large_model", "mobilenet_v1", "mobilenet_v1_module"]

#: Default-domain opset of every export.
OPSET = 17
#: Bump when a model's definition changes, so that stale cached files are not reused.
VERSION = 1


def mobilenet_v1_module() -> torch.nn.Module:
    """MobileNet v1 (224×224, 1000 classes) as a torch module, weights from torch's current
    random state."""
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                          bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    # (output channels, stride of the depthwise convolution) of the 13 separable blocks.
    blocks = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
              (1024, 2), (1024, 1)]
    layers = conv_bn(3, 32, 3, 2, 1)
    channels = 32
    for out, stride in blocks:
        layers += conv_bn(channels, channels, 3, stride, channels)  # depthwise
        layers += conv_bn(channels, out, 1, 1, 1)  # pointwise
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1000)]
    return nn.Sequential(*layers)


def gpt2_small_module(layers: int = 12, dim: int = 768, heads: int = 12, tokens: int = 128,
                      hidden: int = 3072) -> torch.nn.Module:
    """A GPT-2-small-shaped transformer (defaults) or a smaller one of the same structure, as a
    torch module taking the embeddings 1×``tokens``×``dim``; weights from torch's current
    random state."""
    import torch
    from torch import nn

    head_dim = dim // heads

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.ln2 = nn.LayerNorm(dim)
            self.fc = nn.Linear(dim, hidden)
            self.gelu = nn.GELU(approximate="tanh")
            self.out = nn.Linear(hidden, dim)
            upper = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), diagonal=1)
            mask = torch.zeros(1, 1, tokens, tokens).masked_fill(upper, -1e4)
            self.register_buffer("mask", mask)

        def split_heads(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(1, tokens, heads, head_dim).transpose(1, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(self.ln1(x)).split(dim, dim=-1)
            scores = self.split_heads(q) @ self.split_heads(k).transpose(2, 3)
            scores = scores * (1.0 / math.sqrt(head_dim)) + self.get_buffer("mask")
            attn = torch.softmax(scores, dim=-1) @ self.split_heads(v)
            x = x + self.proj(attn.transpose(1, 2).reshape(1, tokens, dim))
            result: torch.Tensor = x + self.out(self.gelu(self.fc(self.ln2(x))))
            return result

    return nn.Sequential(*[Block() for _ in range(layers)], nn.LayerNorm(dim))


@dataclass(frozen=True)
class _Spec:
    title: str
    description: str
    factory: Callable[[], torch.nn.Module]
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    #: What building it costs, shown while it is exported.
    cost: str


_SPECS: dict[str, _Spec] = {
    "mobilenet_v1": _Spec(
        "MobileNet v1", "MobileNet v1 224×224 (BatchNorm folded), 1000 logits",
        mobilenet_v1_module, "image", (1, 3, 224, 224), "logits", "≈ 17 MB, a few seconds"),
    "gpt2_small": _Spec(
        "GPT-2 small",
        "GPT-2-small-shaped transformer: 12 layers, d 768, 12 heads, MLP 3072, 128 tokens, "
        "causal, tanh-GELU; input = embeddings, output = final hidden states (no LM head)",
        gpt2_small_module, "embeddings", (1, 128, 768), "hidden", "≈ 340 MB, about a minute"),
}

#: The names :func:`large_model` accepts.
NAMES: tuple[str, ...] = tuple(_SPECS)


def default_cache() -> Path:
    """Where models are cached unless told otherwise: ``models`` under the settings' home."""
    return get_settings().home / "models"


def cached_path(name: str, *, seed: int = 0, cache: Path | None = None) -> Path:
    """The file model ``name`` (seeded ``seed``) is cached in (it may not exist yet)."""
    _spec(name)
    return (cache if cache is not None else default_cache()) / f"{name}-seed{seed}-v{VERSION}.onnx"


def large_model(name: str, *, seed: int = 0, cache: Path | None = None,
                console: Console | None = None) -> ZooModel:
    """Model ``name`` (one of :data:`NAMES`), exported on first use (with a status line on
    ``console``, stderr by default) and read from the cache afterwards.

    Refused with :class:`~refute.errors.RefuteError` for an unknown name, or when the model must
    be built and torch is missing or the export fails."""
    spec = _spec(name)
    path = cached_path(name, seed=seed, cache=cache)
    if not path.is_file():
        _build(spec, path, seed, console or Console(stderr=True))
    return ZooModel(name=name, onnx_bytes=path.read_bytes(), description=spec.description,
                    torch_factory=functools.partial(_seeded, spec.factory, seed))


def mobilenet_v1(seed: int = 0, *, cache: Path | None = None,
                 console: Console | None = None) -> ZooModel:
    """MobileNet v1 224×224 with seeded random weights (see the module docstring)."""
    return large_model("mobilenet_v1", seed=seed, cache=cache, console=console)


def gpt2_small(seed: int = 0, *, cache: Path | None = None,
               console: Console | None = None) -> ZooModel:
    """The GPT-2-small-shaped transformer with seeded random weights (see the module
    docstring)."""
    return large_model("gpt2_small", seed=seed, cache=cache, console=console)


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise RefuteError(f"unknown model {name!r}: choose from {', '.join(NAMES)}") from None


def _seeded(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """The module ``factory`` builds after ``torch.manual_seed(seed)``, in eval mode."""
    import torch

    torch.manual_seed(seed)
    return factory().eval()


def _build(spec: _Spec, target: Path, seed: int, console: Console) -> None:
    """Export the model to ``target`` (atomically), showing a live status line meanwhile."""
    try:
        import torch
    except ImportError as exc:
        raise RefuteError(f"building {spec.title} needs torch: pip install torch==2.13.0") \
            from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            bar.add_task(f"building {spec.title} with random weights (seed {seed}) and "
                         f"exporting it to ONNX ({spec.cost}, once: cached in {target.parent})",
                         total=None)
            module = _seeded(spec.factory, seed)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
                torch.onnx.export(module, (torch.zeros(spec.input_shape),), str(partial),
                                  dynamo=False, opset_version=OPSET, do_constant_folding=True,
                                  input_names=[spec.input_name], output_names=[spec.output_name])
        partial.replace(target)
    except RefuteError:
        raise
    except Exception as exc:
        raise RefuteError(f"exporting {spec.title} failed: {type(exc).__name__}: {exc}"[:300]) \
            from exc
    finally:
        partial.unlink(missing_ok=True)
    console.print(f"built {spec.title} ({target.stat().st_size / 1e6:.0f} MB) in "
                  f"{time.monotonic() - start:.0f} s: {target}", highlight=False, soft_wrap=True)
