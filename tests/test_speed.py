"""The dense scoring engine, batch_size="auto" and coarse-to-fine scoring.

No test here asserts a time: the probe's choice depends on the machine, so the
tests check that every choice gives the same maps and respects the memory bound.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import efmap
from efmap import _dense
from efmap._dense import FeatureElements, PerturbationBuffer, dense_outputs
from efmap.features import FeatureLayout, mask_layout, patch_layout, perturb_chunk, pixel_layout


def explain_dense(*args, **kwargs):
    """Call efmap.explain on the dense engine, whose batching these tests are about."""
    return efmap.explain(*args, engine="dense", **kwargs)

TIGHT = {"rtol": 1e-12, "atol": 1e-12}


class Recorder(nn.Module):
    """Wrap a model and record the batch size and data pointer of every input it receives."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []
        self.pointers: list[int] = []
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        self.pointers.append(x.data_ptr())
        return self.model(x)


class InPlaceScale(nn.Module):
    """Halve the input in place before the wrapped model, as some preprocessing layers do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0.5)
        return self.model(x)


class ViewFlatten(nn.Module):
    """Flatten with .view(), which fails on channels-last tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1)


class OutOfMemoryAbove(nn.Module):
    """Raise torch.OutOfMemoryError for batches larger than ``limit``, as a full GPU would."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model = model
        self.limit = limit
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"test: batch of {x.shape[0]} does not fit")
        return self.model(x)


def conv_net(channels: int = 3, height: int = 10, width: int = 12, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Flatten(),
            nn.Linear(4 * height * width, classes),
        )
        .double()
        .eval()
    )


def images(count: int = 3, channels: int = 3, height: int = 10, width: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, channels, height, width, generator=generator, dtype=torch.float64) * 2 - 1


def naive_outputs(model: nn.Module, inputs: torch.Tensor, layout: FeatureLayout) -> torch.Tensor:
    """One forward pass per (input, feature), built with the reference perturb_chunk."""
    reversed_inputs = efmap.reverse(inputs)
    total = inputs.shape[0] * layout.num_features
    with torch.inference_mode():
        rows = [model(perturb_chunk(inputs, reversed_inputs, layout, g, g + 1)) for g in range(total)]
    return torch.cat(rows).reshape(inputs.shape[0], layout.num_features, -1)


def test_batch_sizes_give_equal_maps():
    model, x = conv_net(height=6, width=8), images(count=2, height=6, width=8)
    results = [explain_dense(model, x, batch_size=size) for size in (1, 7, 64)]
    for other in results[1:]:
        torch.testing.assert_close(other.positive, results[0].positive, **TIGHT)
        torch.testing.assert_close(other.negative, results[0].negative, **TIGHT)
        torch.testing.assert_close(other.output_change, results[0].output_change, **TIGHT)


def test_auto_equals_fixed_batch_size(caplog):
    model, x = conv_net(), images()
    with caplog.at_level(logging.INFO, logger="efmap"):
        auto = explain_dense(model, x)
    fixed = explain_dense(model, x, batch_size=16)
    assert "measured by a probe" in caplog.text, "360 copies should be enough for the probe to run"
    torch.testing.assert_close(auto.positive, fixed.positive, **TIGHT)
    torch.testing.assert_close(auto.output_change, fixed.output_change, **TIGHT)


def test_auto_small_work_skips_probe(caplog):
    model, x = conv_net(height=4, width=5), images(count=1, height=4, width=5)
    with caplog.at_level(logging.INFO, logger="efmap"):
        auto = explain_dense(model, x)
    assert "probe" not in caplog.text
    assert "20 forward passes in batches of 20" in caplog.text
    torch.testing.assert_close(auto.positive, explain_dense(model, x, batch_size=3).positive, **TIGHT)


def test_log_reports_passes_and_estimate(caplog):
    model, x = conv_net(), images()
    with caplog.at_level(logging.INFO, logger="efmap"):
        explain_dense(model, x)
    message = next(r.getMessage() for r in caplog.records if "forward passes" in r.getMessage())
    assert "120 feature(s) of 3 input(s): 360 forward passes" in message
    assert "estimated" in message


def test_buffer_reused_across_chunks():
    recorder = Recorder(conv_net())
    explain_dense(recorder, images(), batch_size=7)
    # The first two calls score the clean inputs; every later call is a chunk of perturbed copies.
    sizes, pointers = recorder.sizes[2:], recorder.pointers[2:]
    assert sum(sizes) == 360
    assert max(sizes) == 7
    assert len(set(pointers)) == 1, "every chunk should be built in the same buffer"


def test_auto_respects_largest_probe_batch():
    recorder = Recorder(conv_net())
    x = images()
    explain_dense(recorder, x)
    sizes = recorder.sizes[2:]
    assert sum(sizes) == 360
    assert max(sizes) <= _dense._largest_batch(x, 360)


def test_chunks_match_reference_builder():
    x = images(count=2)
    layout = patch_layout(10, 12, 3, 3)
    reversed_inputs = efmap.reverse(x)
    elements = FeatureElements(layout, tuple(x.shape[1:]))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        buffer = PerturbationBuffer(x, reversed_inputs, elements, 5, memory_format)
        total = 2 * layout.num_features
        for start in range(0, total, 5):
            stop = min(start + 5, total)
            chunk = buffer.fill(start, stop)
            assert chunk.is_contiguous(memory_format=memory_format)
            assert torch.equal(chunk, perturb_chunk(x, reversed_inputs, layout, start, stop))


def test_channels_last_inputs_equal_contiguous():
    model, x = conv_net(), images()
    contiguous = explain_dense(model, x, batch_size=8)
    channels_last = explain_dense(model, x.contiguous(memory_format=torch.channels_last), batch_size=8)
    torch.testing.assert_close(channels_last.positive, contiguous.positive, **TIGHT)


def test_model_writing_into_input(caplog):
    inner, x = conv_net(), images()
    original = x.clone()
    with caplog.at_level(logging.DEBUG, logger="efmap"):
        in_place = explain_dense(InPlaceScale(inner), x, batch_size=7)
    assert "modified its input in place" in caplog.text
    assert torch.equal(x, original), "the caller's inputs must not change"
    copying = explain_dense(nn.Sequential(ScaleCopy(), inner).eval(), x, batch_size=7)
    torch.testing.assert_close(in_place.positive, copying.positive, **TIGHT)
    torch.testing.assert_close(in_place.output_change, copying.output_change, **TIGHT)


class ScaleCopy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def test_probe_drops_rejected_channels_last(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), ViewFlatten(), nn.Linear(2 * 10 * 12, 4)).double().eval()
    x = images()
    with caplog.at_level(logging.INFO, logger="efmap"):
        auto = explain_dense(model, x)
    assert "failed on channels_last inputs" in caplog.text
    torch.testing.assert_close(auto.positive, explain_dense(model, x, batch_size=5).positive, **TIGHT)


def test_out_of_memory_halves_auto_batch():
    inner, x = conv_net(), images()
    recorder = Recorder(inner)
    auto = explain_dense(OutOfMemoryAbove(recorder, 5), x)
    # The recorder sits behind the limit, so it receives only the batches that fit.
    assert sum(recorder.sizes[2:]) == 360
    assert max(recorder.sizes[2:]) <= 5
    torch.testing.assert_close(auto.positive, explain_dense(inner, x, batch_size=5).positive, **TIGHT)


def test_out_of_memory_halves_in_main_loop(caplog):
    inner, x = conv_net(), images()
    # The probe is skipped for small work, so the first chunk of the main loop meets the limit.
    small = x[:1, :, :4, :5]
    with caplog.at_level(logging.INFO, logger="efmap"):
        auto = explain_dense(OutOfMemoryAbove(conv_net(height=4, width=5), 6), small)
    assert "Out of memory at batch size 20; retrying with 10." in caplog.text
    assert "Out of memory at batch size 10; retrying with 5." in caplog.text
    expected = explain_dense(conv_net(height=4, width=5), small, batch_size=5)
    torch.testing.assert_close(auto.positive, expected.positive, **TIGHT)
    del inner


def test_out_of_memory_with_fixed_batch_raises():
    with pytest.raises(torch.OutOfMemoryError, match="batch of 8 does not fit"):
        explain_dense(OutOfMemoryAbove(conv_net(), 5), images(), batch_size=8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "fast", None])
def test_invalid_batch_size(bad):
    with pytest.raises(ValueError, match="Expected `batch_size` to be a positive integer or 'auto'"):
        explain_dense(conv_net(), images(), batch_size=bad)


def test_per_input_mask_with_uneven_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.rand(4, 6, dtype=torch.float64) * 2 - 1
    mask = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 1, 1, 1, 1, 2], [2, 2, 1, 0, 0, 0], [0, 1, 2, 0, 1, 2]])
    layout = mask_layout(mask, tuple(x.shape))
    expected = naive_outputs(model, x, layout)
    for batch_size in (1, 5, 64, "auto"):
        with torch.inference_mode():
            outputs = dense_outputs(model, None, x, efmap.reverse(x), layout, batch_size, False)
        torch.testing.assert_close(outputs, expected, **TIGHT)


def test_negative_index_is_never_reversed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2)).double().eval()
    x = torch.full((1, 5), -0.5, dtype=torch.float64)
    layout = FeatureLayout(index=torch.tensor([[0, -1, 1, -1, -1]]), map_shape=(5,), feature_ids=torch.arange(2))
    with torch.inference_mode():
        outputs = dense_outputs(model, None, x, efmap.reverse(x), layout, 2, False)
        expected = model(torch.tensor([[0.5, -0.5, -0.5, -0.5, -0.5], [-0.5, -0.5, 0.5, -0.5, -0.5]]).double())
    torch.testing.assert_close(outputs[0], expected, **TIGHT)


def test_progress_reaches_total():
    seen: list[tuple[int, int]] = []
    explain_dense(conv_net(), images(), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (360, 360)
    assert all(b[0] > a[0] for a, b in zip(seen, seen[1:], strict=False))


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(1, 3),
    ids=st.lists(st.integers(0, 4), min_size=7, max_size=7),
    batch_size=st.integers(1, 9),
)
def test_dense_matches_one_pass_per_feature(count, ids, batch_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    x = torch.linspace(-1, 0.9, 7 * count, dtype=torch.float64).reshape(count, 7)
    layout = mask_layout(torch.tensor(ids), tuple(x.shape))
    with torch.inference_mode():
        outputs = dense_outputs(model, None, x, efmap.reverse(x), layout, batch_size, False)
    torch.testing.assert_close(outputs, naive_outputs(model, x, layout), **TIGHT)


def test_pixel_layout_rows_move_between_inputs():
    """A batch larger than the feature count makes buffer rows switch inputs every chunk."""
    model, x = conv_net(height=3, width=3), images(count=5, height=3, width=3)
    layout = pixel_layout(3, 3, 3)
    with torch.inference_mode():
        outputs = dense_outputs(model, None, x, efmap.reverse(x), layout, 20, False)
    torch.testing.assert_close(outputs, naive_outputs(model, x, layout), **TIGHT)


def test_coarse_to_fine_keep_all_equals_exact():
    model, x = conv_net(), images(count=2)
    exact = explain_dense(model, x, batch_size=8)
    refined = efmap.explain_coarse_to_fine(model, x, patch_size=4, keep_fraction=1.0, batch_size=8)
    assert bool(refined.refined.all())
    assert torch.equal(refined.positive, exact.positive)
    assert torch.equal(refined.negative, exact.negative)
    assert torch.equal(refined.output_change, exact.output_change)
    assert refined.forward_passes == 2 * (9 + 120)


def test_coarse_to_fine_auto_keep_all():
    model, x = conv_net(), images(count=2)
    exact = explain_dense(model, x, batch_size=8)
    refined = efmap.explain_coarse_to_fine(model, x, patch_size=4, keep_fraction=1.0)
    torch.testing.assert_close(refined.positive, exact.positive, **TIGHT)


def test_coarse_to_fine_refines_top_patches():
    model, x = conv_net(), images(count=2)
    exact = explain_dense(model, x, batch_size=8, score="target", target=[1, 3])
    result = efmap.explain_coarse_to_fine(
        model, x, patch_size=5, keep_fraction=0.5, batch_size=8, score="target", target=[1, 3]
    )
    coarse = result.coarse
    # Patches of 5x5 on 10x12: a 2x3 grid whose last column is 2 pixels wide; half of 6 patches is 3.
    patches = patch_layout(10, 12, 5, 2).index[0]
    area = torch.bincount(patches.reshape(-1)).double()[patches]
    for n in range(2):
        importance = (coarse.positive[n] + coarse.negative[n]).reshape(-1)
        refined_patches = torch.unique(patches[result.refined[n]])
        assert refined_patches.numel() == 3
        threshold = importance[result.refined[n].reshape(-1)].min()
        assert bool((importance[~result.refined[n].reshape(-1)] <= threshold).all())
    refined = result.refined
    torch.testing.assert_close(result.positive[refined], exact.positive[refined], **TIGHT)
    torch.testing.assert_close(result.negative[refined], exact.negative[refined], **TIGHT)
    torch.testing.assert_close(result.positive[~refined], (coarse.positive / area)[~refined], **TIGHT)
    change = result.output_change.transpose(0, 1)
    torch.testing.assert_close(change[:, refined], exact.output_change.transpose(0, 1)[:, refined], **TIGHT)
    assert result.forward_passes == 2 * (6 + int(refined[0].sum().clamp(min=refined[1].sum())))
    assert torch.equal(result.target, torch.tensor([1, 3]))


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5])
def test_coarse_to_fine_keep_fraction_range(bad):
    with pytest.raises(ValueError, match=r"Expected `keep_fraction` to be in \(0, 1\]"):
        efmap.explain_coarse_to_fine(conv_net(), images(), keep_fraction=bad)


@pytest.mark.parametrize("bad", ["half", None, True])
def test_coarse_to_fine_keep_fraction_type(bad):
    with pytest.raises(TypeError, match=r"Expected `keep_fraction` to be a number in \(0, 1\]"):
        efmap.explain_coarse_to_fine(conv_net(), images(), keep_fraction=bad)


def test_coarse_to_fine_patch_size_one():
    with pytest.raises(ValueError, match="Expected `patch_size` to be at least 2, but got 1"):
        efmap.explain_coarse_to_fine(conv_net(), images(), patch_size=1)
