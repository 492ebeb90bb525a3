"""The incremental engine gives the dense engine's maps, and falls back to it where it cannot."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import efmap
from efmap.features import pixel_layout
from efmap.incremental import _Engine, incremental_outputs
from efmap.reference import AgeResNet

# Float64 maps of the two engines agree to rounding; the bound leaves room for sums taken in another order.
TOLERANCE = {"rtol": 1e-9, "atol": 1e-10}


def _randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give batch normalisation layers non-trivial statistics, so that they matter in the comparison."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator))
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(size, generator=generator))
            module.bias.data.copy_(torch.randn(size, generator=generator))
    return model


def _images(count: int, channels: int, size: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, channels, size, size, generator=generator, dtype=dtype) * 2 - 1


def _assert_same_maps(model: nn.Module, inputs: torch.Tensor, tolerance: dict[str, float], **options: object) -> None:
    """Explain with both engines in both score modes and compare every map."""
    for score, target in (("max", None), ("target", 0)):
        dense = efmap.explain(model, inputs, score=score, target=target, engine="dense", **options)
        fast = efmap.explain(model, inputs, score=score, target=target, engine="incremental", **options)
        torch.testing.assert_close(fast.output_change, dense.output_change, **tolerance)
        torch.testing.assert_close(fast.positive, dense.positive, **tolerance)
        torch.testing.assert_close(fast.negative, dense.negative, **tolerance)
        torch.testing.assert_close(fast.clean_output, dense.clean_output, **tolerance)


# ----------------------------------------------------------------------------- random networks


class Residual(nn.Module):
    """A residual block: a convolution branch plus a shortcut, then an activation."""

    def __init__(self, body: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Scale(nn.Module):
    """Elementwise arithmetic with scalars."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 - 0.25


class SpatialMean(nn.Module):
    """Global average pooling written as a tensor method."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Classifier(nn.Module):
    """A random feature extractor followed by a pooling head."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil: bool = False) -> int:
    span = dilation * (kernel - 1) + 1
    steps = size + 2 * padding - span
    if ceil:
        out = -(-steps // stride) + 1
        return out - 1 if (out - 1) * stride >= size + padding else out
    return steps // stride + 1


@st.composite
def conv_nets(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """Draw a small float64 conv net in eval mode and a batch of images for it."""
    image_size = size = draw(st.integers(8, 12))
    image_channels = channels = draw(st.integers(1, 3))
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "residual", "pool", "activation"]))
        if kind == "conv":
            kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            padding, dilation = draw(st.integers(0, 2)), draw(st.integers(1, 2))
            out_channels = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0 and out_channels % g == 0]))
            new_size = _output_size(size, kernel, stride, padding, dilation)
            if new_size < 1:
                continue
            conv = nn.Conv2d(channels, out_channels, kernel, stride, padding, dilation, groups)
            layers += [conv, nn.BatchNorm2d(out_channels)]
            channels, size = out_channels, new_size
        elif kind == "residual":
            stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
            out_channels = draw(st.integers(1, 4))
            body = nn.Sequential(
                nn.Conv2d(channels, out_channels, 3, stride, dilation, dilation, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=draw(st.booleans())),
                nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            )
            shortcut: nn.Module = nn.Identity()
            if stride != 1 or out_channels != channels:
                shortcut = nn.Conv2d(channels, out_channels, 1, stride)
            layers.append(Residual(body, shortcut))
            channels, size = out_channels, _output_size(size, 3, stride, dilation, dilation)
        elif kind == "pool":
            kernel, stride = draw(st.integers(2, 3)), draw(st.integers(1, 2))
            padding = draw(st.integers(0, kernel // 2))
            if draw(st.booleans()):
                ceil = draw(st.booleans())
                pool: nn.Module = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil)
                new_size = _output_size(size, kernel, stride, padding, 1, ceil)
            else:
                pool = nn.AvgPool2d(kernel, stride, padding, count_include_pad=draw(st.booleans()))
                new_size = _output_size(size, kernel, stride, padding, 1)
            if new_size < 1:
                continue
            layers.append(pool)
            size = new_size
        else:
            layers.append(draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1), nn.GELU(), nn.Tanh(), Scale()])))

    classes = draw(st.integers(1, 3))
    head_kind = draw(st.sampled_from(["pool", "mean", "flatten"]))
    if head_kind == "pool":
        head: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    elif head_kind == "mean":
        head = nn.Sequential(SpatialMean(), nn.Linear(channels, classes))
    else:
        head = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))

    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = Classifier(nn.Sequential(*layers), head).double()
    _randomise_batch_norm(model, torch.Generator().manual_seed(seed))
    inputs = _images(draw(st.integers(1, 2)), image_channels, image_size, seed)
    return model.eval(), inputs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_nets())
def test_random_nets_match_dense(case: tuple[nn.Module, torch.Tensor]) -> None:
    """Every feature of random conv nets gets the dense engine's scores, in both score modes."""
    model, inputs = case
    _assert_same_maps(model, inputs, TOLERANCE, batch_size=32)
