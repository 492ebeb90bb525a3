"""explain_dataset in one process: results, options, data sources, progress and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import efmap
from efmap.dataset import _grid_normalize


def make_model() -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def make_data(count: int = 7, labels: bool = True) -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(count, 1, 4, 4, generator=generator) * 2 - 1
    if not labels:
        return TensorDataset(images)
    return TensorDataset(images, torch.arange(count) % 3)


class InputsOnly(torch.utils.data.Dataset):
    """Items are bare input tensors."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def expected_class_maps(model, images, keys) -> dict[int, torch.Tensor]:
    positive = efmap.explain(model, images).positive
    normalized = efmap.minmax(positive.double())
    return {int(k): normalized[keys == k].mean(dim=0) for k in torch.unique(keys)}


def test_class_maps_match_per_image_explain():
    model, data = make_model(), make_data()
    result = efmap.explain_dataset(model, data, labels_from="dataset", chunk_size=3)

    expected = expected_class_maps(model, data.tensors[0], data.tensors[1])
    assert sorted(result.class_maps()) == sorted(expected)
    for label, heatmap in result.class_maps().items():
        torch.testing.assert_close(heatmap, expected[label], rtol=0, atol=1e-6)


def test_labels_from_target_keys_by_prediction():
    model, data = make_model(), make_data()
    result = efmap.explain_dataset(model, data, chunk_size=4)

    predicted = model(data.tensors[0]).argmax(dim=1)
    assert np.array_equal(result.targets, predicted.numpy())
    assert result.accumulator.counts == {int(k): int((predicted == k).sum()) for k in torch.unique(predicted)}
    assert np.array_equal(result.labels, np.arange(7) % 3), "dataset labels are stored whatever keys the maps"


def test_target_label_explains_dataset_class():
    model, data = make_model(), make_data()
    result = efmap.explain_dataset(model, data, score="target", target="label", chunk_size=2)

    assert np.array_equal(result.targets, np.arange(7) % 3)
    direct = efmap.explain(model, data.tensors[0], score="target", target=data.tensors[1])
    expected = efmap.minmax(direct.positive.double())
    mean_class_0 = expected[data.tensors[1] == 0].mean(dim=0)
    torch.testing.assert_close(result.class_maps()[0], mean_class_0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "one-tuple"])
def test_inputs_without_labels(wrapped):
    model = make_model()
    images = make_data().tensors[0]
    data = TensorDataset(images) if wrapped else InputsOnly(images)
    result = efmap.explain_dataset(model, data, chunk_size=3)
    assert (result.labels == -1).all()
    assert sum(result.accumulator.counts.values()) == 7


def test_dataloader_uses_collate_fn():
    model, data = make_model(), make_data()
    seen = []

    def collate(items):
        seen.append(len(items))
        return torch.utils.data.default_collate(items)

    loader = DataLoader(data, batch_size=100, collate_fn=collate)
    result = efmap.explain_dataset(model, loader, labels_from="dataset", chunk_size=3)

    assert seen == [1, 3, 3, 1], "the probe reads one item, then chunks of chunk_size"
    reference = efmap.explain_dataset(model, data, labels_from="dataset", chunk_size=3)
    expected = reference.accumulator.state_dict()
    actual = result.accumulator.state_dict()
    for key in ("labels", "counts", "sums", "maxima"):
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


def test_chunk_size_changes_results_at_most_by_rounding():
    model, data = make_model(), make_data()
    small = efmap.explain_dataset(model, data, chunk_size=1).overall()
    large = efmap.explain_dataset(model, data, chunk_size=7).overall()
    torch.testing.assert_close(small, large, rtol=0, atol=1e-6)


def test_patch_size_gives_blocky_maps():
    model, data = make_model(), make_data()
    result = efmap.explain_dataset(model, data, patch_size=2, store_maps=False)
    overall = result.overall()
    assert result.num_features == 4
    assert torch.equal(overall[0, 0], overall[1, 1])


def test_reduction_max_equals_elementwise_maximum():
    model, data = make_model(), make_data()
    result = efmap.explain_dataset(model, data, reduction="max", labels_from="dataset")
    expected = efmap.minmax(efmap.explain(model, data.tensors[0]).positive.double())
    torch.testing.assert_close(result.overall(over="inputs"), expected.amax(dim=0), rtol=0, atol=1e-6)


def test_progress_callback_reports_images_rate_and_time_left():
    reports: list[efmap.RunProgress] = []
    efmap.explain_dataset(make_model(), make_data(), chunk_size=3, batch_size=8, progress=reports.append)

    assert {r.images_done for r in reports} == {0, 3, 6, 7}
    assert reports[-1].images_done == 7
    assert reports[-1].images_total == 7
    assert reports[-1].passes_done == reports[-1].passes_total == 7 * 16
    assert all(later.passes_done >= earlier.passes_done for earlier, later in zip(reports, reports[1:], strict=False))
    assert reports[-1].passes_per_second > 0
    assert reports[-1].seconds_left == 0
    assert reports[0].rank == 0


def test_progress_bar_runs(capsys):
    efmap.explain_dataset(make_model(), make_data(), progress=True)
    assert "fwd" in capsys.readouterr().err


def test_training_model_is_restored():
    model = make_model().train()
    with pytest.warns(efmap.EfmapWarning, match="training mode"):
        efmap.explain_dataset(model, make_data())
    assert model.training


@settings(max_examples=50, deadline=None)
@given(
    maps=st.lists(
        st.lists(st.floats(0, 1e3, allow_nan=False, width=32), min_size=6, max_size=6), min_size=2, max_size=12
    ),
    seed=st.integers(0, 2**16),
)
def test_grid_sums_do_not_depend_on_order(maps, seed):
    grid = _grid_normalize(torch.tensor(maps, dtype=torch.float32).reshape(-1, 2, 3))
    order = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(seed))

    forward = torch.zeros(2, 3, dtype=torch.float64)
    for heatmap in grid:
        forward = forward + heatmap
    shuffled = torch.zeros(2, 3, dtype=torch.float64)
    for heatmap in grid[order]:
        shuffled = shuffled + heatmap

    assert torch.equal(forward, shuffled)
    assert torch.equal(grid.sum(dim=0), forward)


@settings(max_examples=50, deadline=None)
@given(maps=st.lists(st.floats(-10, 10, allow_nan=False), min_size=4, max_size=4))
def test_grid_maps_pass_accumulator_normalization_unchanged(maps):
    grid = _grid_normalize(torch.tensor(maps, dtype=torch.float64).reshape(1, 2, 2))
    accumulator = efmap.HeatMapAccumulator("sum")
    accumulator.update(grid, [0])
    assert torch.equal(accumulator.class_maps()[0], grid[0])
    assert torch.equal(grid * 2**24, torch.round(grid * 2**24)), "values lie on the 2**-24 grid"
    assert float(grid.min()) == 0.0
    assert float(grid.max()) in (0.0, 1.0)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"score": "min"}, ValueError, r"Expected `score` to be 'max' or 'target', but got 'min'"),
        ({"target": 1}, ValueError, r"Expected `target` to be None with score='max', but got 1"),
        ({"score": "target", "target": 1.5}, TypeError, r"Expected `target` to be None, an int class index"),
        ({"score": "target", "target": -1}, ValueError, r"non-negative class index, but got -1"),
        ({"labels_from": "label"}, ValueError, r"Expected `labels_from` to be 'target' or 'dataset'"),
        ({"reduction": "median"}, ValueError, r"Expected `reduction` to be 'mean', 'max' or 'sum'"),
        ({"chunk_size": 0}, ValueError, r"Expected `chunk_size` to be a positive integer, but got 0"),
        ({"batch_size": 0}, ValueError, r"Expected `batch_size` to be a positive integer"),
        ({"store_maps": True}, ValueError, r"Expected `out_dir` with store_maps=True, but got None"),
        ({"value_range": (1, -1)}, ValueError, r"Expected `value_range` to be finite with lo < hi"),
        ({"feature_mask": [[0, 1]]}, TypeError, r"Expected `feature_mask` to be an integer torch.Tensor"),
        ({"patch_size": 9}, ValueError, r"Expected `patch_size` to be at most the image size 4x4"),
        ({"progress": "yes"}, TypeError, r"Expected `progress` to be a bool or a callable"),
    ],
)
def test_invalid_option_raises_before_forward_pass(options, error, message):
    model = make_model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(error, match=message):
        efmap.explain_dataset(model, make_data(), **options)
    assert calls == []


def test_shuffled_loader_rejected():
    loader = DataLoader(make_data(), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match=r"reads the data set in order, but got one with a RandomSampler"):
        efmap.explain_dataset(make_model(), loader)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 4, 4)


def test_iterable_dataset_rejected():
    with pytest.raises(TypeError, match=r"map-style data set with __len__ and __getitem__, but got an IterableDataset"):
        efmap.explain_dataset(make_model(), Stream())
    with pytest.raises(TypeError, match=r"DataLoader over a map-style data set, but got one over an IterableDataset"):
        efmap.explain_dataset(make_model(), DataLoader(Stream()))


def test_non_dataset_rejected():
    with pytest.raises(TypeError, match=r"`data` to be a map-style torch Dataset or a DataLoader, but got int"):
        efmap.explain_dataset(make_model(), 5)


def test_empty_dataset_rejected():
    with pytest.raises(ValueError, match="at least one input, but got an empty one"):
        efmap.explain_dataset(make_model(), TensorDataset(torch.zeros(0, 1, 4, 4)))


def test_dataset_labels_required_for_labels_from_dataset():
    images = make_data().tensors[0]
    with pytest.raises(ValueError, match=r"items \(input, label\) with labels_from='dataset'"):
        efmap.explain_dataset(make_model(), InputsOnly(images), labels_from="dataset")
    with pytest.raises(ValueError, match=r"items \(input, label\) with target='label'"):
        efmap.explain_dataset(make_model(), InputsOnly(images), score="target", target="label")


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_item_of_three_rejected():
    data = Items([(torch.zeros(1, 4, 4), 0, "a")])
    message = r"input tensor, a 1-tuple \(input,\) or a pair \(input, label\), but got tuple of length 3"
    with pytest.raises(TypeError, match=message):
        efmap.explain_dataset(make_model(), data)


@pytest.mark.parametrize(
    ("label", "error", "message"),
    [
        (0.5, TypeError, r"labels to be integer class indices, but got torch.float64"),
        (torch.tensor([0, 1]), ValueError, r"class index per input, shape \(1,\), but got labels of shape \(1, 2\)"),
        (-2, ValueError, r"non-negative class indices as labels, but got -2"),
        ("cat", TypeError, r"labels to be integer class indices, but got (tuple|list)"),
    ],
)
def test_invalid_labels_rejected(label, error, message):
    data = Items([(torch.zeros(1, 4, 4), label)])
    with pytest.raises(error, match=message):
        efmap.explain_dataset(make_model(), data, labels_from="dataset", check_range=False)


def test_unused_text_labels_are_not_stored():
    data = Items([(torch.rand(1, 4, 4) * 2 - 1, "cat"), (torch.rand(1, 4, 4) * 2 - 1, "dog")])
    result = efmap.explain_dataset(make_model(), data)
    assert (result.labels == -1).all()


def test_uint8_inputs_rejected_with_conversion():
    data = TensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"floating dtype, but got torch.uint8"):
        efmap.explain_dataset(make_model(), data)


def test_inputs_in_upper_half_rejected():
    data = TensorDataset(torch.rand(2, 1, 4, 4) * 0.5 + 0.5)
    with pytest.raises(ValueError, match=r"all values lie in its upper half"):
        efmap.explain_dataset(make_model(), data)
    result = efmap.explain_dataset(make_model(), data, check_range=False)
    assert not math.isnan(float(result.overall().sum()))


def test_out_of_range_chunk_rejected():
    images = torch.rand(4, 1, 4, 4) * 2 - 1
    images[3, 0, 0, 0] = 3.0
    with pytest.raises(ValueError, match=r"lie in value_range \[-1.0, 1.0\], but got values from"):
        efmap.explain_dataset(make_model(), TensorDataset(images), chunk_size=2)
