"""The incremental engine gives the dense engine's maps, and falls back to it where it cannot."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import efmap
from efmap.features import mask_layout, pixel_layout
from efmap.incremental import _Engine, incremental_outputs
from efmap.reference import AgeResNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Run single-threaded: these tests run many tiny operations, which OpenMP threads slow down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Float64 maps of the two engines agree to rounding. The bound leaves room for sums taken in another order.
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
            kernel, stride = draw(st.integers(1, 4)), draw(st.integers(1, 2))
            padding: int | str = draw(st.sampled_from([0, 1, 2, "same"] if stride == 1 else [0, 1, 2]))
            dilation = draw(st.integers(1, 2))
            out_channels = draw(st.integers(1, 4))
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0 and out_channels % g == 0]))
            new_size = size if padding == "same" else _output_size(size, kernel, stride, int(padding), dilation)
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


# PyTorch warns that "same" padding with an even kernel copies the input. That costs time only, so it is not an error.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_nets())
def test_random_nets_match_dense(case: tuple[nn.Module, torch.Tensor]) -> None:
    """Every feature of random conv nets gets the dense engine's scores, in both score modes."""
    model, inputs = case
    _assert_same_maps(model, inputs, TOLERANCE, batch_size=32)


# ----------------------------------------------------------------------------- reference network and features


def _age_resnet(size: int, dtype: torch.dtype = torch.float64, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = AgeResNet(in_channels=in_channels, num_classes=3, input_size=size).to(dtype)
    return _randomise_batch_norm(model, torch.Generator().manual_seed(0)).eval()


def test_age_resnet_matches_dense() -> None:
    """AgeResNet at 16x16 gets the dense maps for every pixel of two images."""
    _assert_same_maps(_age_resnet(16), _images(2, 3, 16, seed=1), TOLERANCE, batch_size=48)


def test_age_resnet_float32_matches_dense() -> None:
    """In float32 the engines differ by rounding only: summation order differs in windows and global means."""
    model = _age_resnet(16, torch.float32)
    inputs = _images(1, 3, 16, seed=2, dtype=torch.float32)
    _assert_same_maps(model, inputs, {"rtol": 1e-4, "atol": 1e-5})


def test_age_resnet_runs_early_layers_on_windows() -> None:
    """The stem and first stage run on windows, and the last stage, which a pixel fully reaches, on whole maps."""
    model = _age_resnet(32)
    inputs = _images(1, 3, 32, seed=3)
    engine = _Engine.from_model(model, None, inputs, pixel_layout(32, 32, 3))
    with torch.inference_mode():
        engine.load(inputs, -inputs, pixel_layout(32, 32, 3).index)
    (group,) = engine.plan(32 * 32)
    windowed = {str(node.target) for node in group.windows}
    assert "stem.0" in windowed
    assert "stages.0.1.conv2" in windowed
    assert "stages.4.1.conv2" not in windowed


def test_patches_match_dense() -> None:
    """Square patches, with smaller patches at the right and bottom edges, match the dense engine."""
    _assert_same_maps(_age_resnet(16), _images(1, 3, 16, seed=4), TOLERANCE, patch_size=3)


def test_scattered_feature_mask_matches_dense() -> None:
    """Features made of scattered pixels, so that their boxes differ in size, match the dense engine."""
    mask = torch.randint(0, 7, (12, 12), generator=torch.Generator().manual_seed(5))
    _assert_same_maps(_age_resnet(12), _images(2, 3, 12, seed=5), TOLERANCE, feature_mask=mask)


def test_per_sample_and_per_channel_masks_match_dense() -> None:
    """Masks with one layout per sample and masks that split channels match the dense engine."""
    generator = torch.Generator().manual_seed(6)
    per_sample = torch.randint(0, 5, (2, 1, 10, 10), generator=generator)
    per_sample[1][per_sample[1] == 4] = 3  # feature 4 is absent from the second image
    per_channel = torch.arange(3).view(3, 1, 1) * 100 + torch.arange(10).view(1, 10, 1) // 4
    inputs = _images(2, 3, 10, seed=6)
    _assert_same_maps(_age_resnet(10), inputs, TOLERANCE, feature_mask=per_sample)
    _assert_same_maps(_age_resnet(10), inputs, TOLERANCE, feature_mask=per_channel.expand(3, 10, 10))


def test_absent_feature_leaves_output_unchanged() -> None:
    """A feature that a per-sample mask leaves out of an image changes nothing for that image."""
    model, inputs = _age_resnet(8), _images(2, 3, 8, seed=7)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.int64)
    mask[0, :, :4] = 1
    layout = mask_layout(mask, tuple(inputs.shape))
    with torch.inference_mode():
        outputs = incremental_outputs(model, None, inputs, -inputs, layout, 16, False, strict=True)
        clean = model(inputs)
    torch.testing.assert_close(outputs[1, 1], clean[1], **TOLERANCE)
    assert not torch.allclose(outputs[0, 1], clean[0])


def test_batch_size_does_not_change_scores() -> None:
    """Batches of 1, 7 and 500 perturbations give the same scores."""
    model, inputs = _age_resnet(12), _images(1, 3, 12, seed=8)
    layout = pixel_layout(12, 12, 3)
    with torch.inference_mode():
        runs = [
            incremental_outputs(model, None, inputs, -inputs, layout, size, False, strict=True) for size in (1, 7, 500)
        ]
    torch.testing.assert_close(runs[0], runs[1], **TOLERANCE)
    torch.testing.assert_close(runs[0], runs[2], **TOLERANCE)


def test_tuple_output_with_output_fn() -> None:
    """A model returning a tuple is read through output_fn as with the dense engine."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _age_resnet(8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = self.body(x)
            return scores, scores * 2

    _assert_same_maps(TwoHeads().eval(), _images(1, 3, 8, seed=9), TOLERANCE, output_fn=lambda out: out[1])


# ----------------------------------------------------------------------------- fallback and errors


class Upsampling(nn.Module):
    """A net with a layer that the incremental engine does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(self.conv(x))))


class Branching(nn.Module):
    """A net whose forward depends on the input's values, so that torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return self.linear(x.flatten(1))


class SharedThroughIdentity(nn.Module):
    """A net whose in-place activation overwrites, through an identity, a value that the shortcut reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.identity = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(self.relu(self.identity(y)) + y)


class SharedInPlace(nn.Module):
    """A net whose in-place activation overwrites a value that the shortcut also reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(torch.relu_(y) + y)


def test_unsupported_layer_falls_back_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    """engine='auto' logs the unsupported layer at INFO and returns the dense maps."""
    model, inputs = Upsampling().double().eval(), _images(1, 3, 6, seed=10)
    caplog.set_level(logging.INFO, logger="efmap.incremental")
    auto = efmap.explain(model, inputs)
    dense = efmap.explain(model, inputs, engine="dense")
    assert "module Upsample at 'up' is not supported" in caplog.text
    assert any(record.levelno == logging.INFO for record in caplog.records)
    torch.testing.assert_close(auto.output_change, dense.output_change, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Upsampling(), "module Upsample at 'up' is not supported"),
        (Branching(), "torch.fx could not trace the model"),
        (SharedInPlace(), "in-place function torch.relu_ overwrites a value that another layer reads"),
        (SharedThroughIdentity(), "in-place module ReLU at 'relu' overwrites a value that another layer reads"),
        (
            nn.Sequential(
                nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.Linear(32, 2)
            ),
            "module BatchNorm2d at '1' normalises with batch statistics",
        ),
    ],
)
def test_incremental_engine_rejects_unsupported(model: nn.Module, message: str) -> None:
    """engine='incremental' raises a ValueError naming what is not supported, and engine='auto' still works."""
    model = model.double().eval()
    inputs = _images(1, 3, 6, seed=11)
    with pytest.raises(ValueError, match=f"Expected a model that the incremental engine supports, but {message}"):
        efmap.explain(model, inputs, engine="incremental")
    auto = efmap.explain(model, inputs)
    dense = efmap.explain(model, inputs, engine="dense")
    torch.testing.assert_close(auto.output_change, dense.output_change, rtol=0, atol=0)


def test_hooked_module_rejected() -> None:
    """A forward hook could change a layer's output, and windows skip hooks, so hooked models run dense."""
    model = _age_resnet(8)
    handle = model.stem[0].register_forward_hook(lambda module, args, output: output * 2)
    try:
        with pytest.raises(ValueError, match="module 'stem.0' has forward hooks"):
            efmap.explain(model, _images(1, 3, 8, seed=15), engine="incremental")
    finally:
        handle.remove()


class Recording(nn.Module):
    """A net whose forward keeps Python state: it records every batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _age_resnet(8)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.body(x)


def test_stateful_forward_runs_dense() -> None:
    """A forward with Python side effects runs on the dense engine, and tracing leaves the model's state alone."""
    model = Recording().eval()
    efmap.explain(model, _images(1, 3, 8, seed=16), batch_size=16)
    assert all(isinstance(size, int) for size in model.batches)
    assert sum(model.batches) == 1 + 1 + 64  # the clean pass, its repetition and one pass per pixel


def test_stateful_forward_rejected() -> None:
    """engine='incremental' names the attribute that forward changes."""
    with pytest.raises(ValueError, match="forward changes the attribute 'batches' of module 'Recording'"):
        efmap.explain(Recording().eval(), _images(1, 3, 8, seed=16), engine="incremental")


def test_plain_function_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """A model that is a plain function runs on the dense engine, and engine='incremental' rejects it."""
    linear = nn.Linear(16, 2).double().eval()

    def model(x: torch.Tensor) -> torch.Tensor:
        return linear(x.flatten(1))

    caplog.set_level(logging.INFO, logger="efmap.incremental")
    result = efmap.explain(model, _images(1, 1, 4, seed=12)[0])
    assert result.positive.shape == (1, 4, 4)
    assert "the model is a function, not a torch.nn.Module" in caplog.text
    dense = efmap.explain(model, _images(1, 1, 4, seed=12)[0], engine="dense")
    torch.testing.assert_close(result.positive, dense.positive, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the model is a function, not a torch.nn.Module"):
        efmap.explain(model, _images(1, 1, 4, seed=12)[0], engine="incremental")


def test_non_image_inputs_rejected() -> None:
    """Tabular inputs explained with a feature mask are not images, so only the dense engine runs them."""
    model = nn.Linear(5, 2).double().eval()
    inputs = torch.linspace(-0.9, 0.9, 10, dtype=torch.float64).reshape(2, 5)
    with pytest.raises(ValueError, match=r"the inputs of shape \(2, 5\) are not images"):
        efmap.explain(model, inputs, feature_mask=torch.arange(5), engine="incremental")
    result = efmap.explain(model, inputs, feature_mask=torch.arange(5))
    assert result.positive.shape == (2, 5)


def test_features_spanning_the_image_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    """When every feature covers the whole image no layer can run on windows, so auto uses the dense engine."""
    caplog.set_level(logging.INFO, logger="efmap.incremental")
    channel_mask = torch.arange(3).view(3, 1, 1)
    efmap.explain(_age_resnet(8), _images(1, 3, 8, seed=13), feature_mask=channel_mask)
    assert "No layer of this model would run on windows" in caplog.text


def test_invalid_engine_rejected() -> None:
    """An unknown engine name raises before any work."""
    with pytest.raises(ValueError, match="Expected `engine` to be 'auto', 'dense' or 'incremental', but got 'fast'"):
        efmap.explain(_age_resnet(8), _images(1, 3, 8, seed=14), engine="fast")  # type: ignore[arg-type]
