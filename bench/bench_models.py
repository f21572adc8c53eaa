"""Full-size models for benchmarks: MobileNet v1 at 224×224 and a GPT-2-small-shaped transformer.

Both are built in torch with seeded random weights (``torch.manual_seed``; the weights do not
matter to a timing), exported with the legacy TorchScript exporter (opset 17, static shapes,
constant folding, eval mode so BatchNormalization folds into the convolutions) and cached as
``out/bench_models/<name>.onnx``: exporting the transformer (≈ 340 MB of weights) takes a while
and needs torch, reading the cache needs neither. Delete the file to rebuild it.

* ``mobilenet_v1``: input ``image`` 1×3×224×224; conv 3×3 stride 2 to 32 channels, then the 13
  depthwise-separable blocks (depthwise 3×3 + pointwise 1×1, each with BatchNorm and ReLU) up to
  1024 channels, global average pool, fully connected to 1000 logits.
* ``gpt2_small``: input ``embeddings`` 1×128×768 (token + position embeddings already added:
  no token-id lookup), 12 pre-LayerNorm blocks of causal self-attention (12 heads, fused QKV
  projection, additive constant mask) and an MLP 768→3072→768 with GPT-2's tanh-approximated
  GELU, final LayerNorm; output ``hidden`` 1×128×768, the final hidden states (no LM head).
"""

# torch is imported inside functions: reading a cached model must not load it.

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Where exported models are cached (``out/`` is gitignored).
CACHE = Path(__file__).resolve().parents[1] / "out" / "bench_models"
#: Default-domain opset of every export.
OPSET = 17
#: Bump when a model's definition changes, so that stale cached files are not reused.
VERSION = 1


@dataclass(frozen=True)
class BenchModel:
    """One exported model: cache name, what it is, its ONNX bytes."""

    name: str
    description: str
    onnx_bytes: bytes


@dataclass(frozen=True)
class _Spec:
    description: str
    factory: Callable[[], torch.nn.Module]
    input_name: str
    input_shape: tuple[int, ...]
    output_name: str


def _mobilenet_v1() -> torch.nn.Module:
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


def _gpt2_small(layers: int = 12, dim: int = 768, heads: int = 12, tokens: int = 128,
                hidden: int = 3072) -> torch.nn.Module:
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


_SPECS: dict[str, _Spec] = {
    "mobilenet_v1": _Spec(
        "MobileNet v1 224×224 (BatchNorm folded), 1000 logits", _mobilenet_v1, "image",
        (1, 3, 224, 224), "logits"),
    "gpt2_small": _Spec(
        "GPT-2-small-shaped transformer: 12 layers, d 768, 12 heads, MLP 3072, 128 tokens, "
        "causal, tanh-GELU; input = embeddings, output = final hidden states (no LM head)",
        _gpt2_small, "embeddings", (1, 128, 768), "hidden"),
}

#: The names :func:`bench_model` accepts.
NAMES: tuple[str, ...] = tuple(_SPECS)


def _export(spec: _Spec, target: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    module = spec.factory().eval()
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
            torch.onnx.export(module, (torch.zeros(spec.input_shape),), str(partial),
                              dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              input_names=[spec.input_name], output_names=[spec.output_name])
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def bench_model(name: str, *, seed: int = 0, cache: Path = CACHE) -> BenchModel:
    """The model called ``name`` (one of :data:`NAMES`), exported on first use and then read
    from ``cache``."""
    try:
        spec = _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(NAMES)}") from None
    path = cache / f"{name}-seed{seed}-v{VERSION}.onnx"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        _export(spec, path, seed)
    return BenchModel(name, spec.description, path.read_bytes())
