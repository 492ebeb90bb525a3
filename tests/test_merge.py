import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import efmap


@st.composite
def map_batches(draw):
    count = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(count, 3, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=count, max_size=count)))
    cuts = sorted(draw(st.lists(st.integers(0, count), max_size=4)))
    return maps, labels, cuts


@pytest.mark.parametrize("reduction", ["mean", "max", "sum"])
@given(batch=map_batches())
def test_merge_in_parts_equals_at_once(reduction, batch):
    maps, labels, cuts = batch
    whole = efmap.HeatMapAccumulator(reduction)
    whole.update(maps, labels)

    bounds = [0, *cuts, maps.shape[0]]
    parts = []
    for start, stop in zip(bounds, bounds[1:]):
        part = efmap.HeatMapAccumulator(reduction)
        if stop > start:
            part.update(maps[start:stop], labels[start:stop])
        parts.append(part)
    merged = efmap.HeatMapAccumulator(reduction)
    for part in reversed(parts):
        merged.merge(part)

    # Normalised maps merge bit for bit, whatever the split and order.
    assert merged.counts == whole.counts
    for label, class_map in whole.class_maps().items():
        torch.testing.assert_close(merged.class_maps()[label], class_map, rtol=0, atol=0)
    for over in ("classes", "inputs"):
        torch.testing.assert_close(merged.overall(over), whole.overall(over), rtol=0, atol=0)


@given(batch=map_batches())
def test_raw_merge_in_parts_close_to_at_once(batch):
    maps, labels, cuts = batch
    whole = efmap.HeatMapAccumulator(normalize=None)
    whole.update(maps, labels)
    merged = efmap.HeatMapAccumulator(normalize=None)
    bounds = [0, *cuts, maps.shape[0]]
    for start, stop in zip(bounds, bounds[1:]):
        part = efmap.HeatMapAccumulator(normalize=None)
        if stop > start:
            part.update(maps[start:stop], labels[start:stop])
            merged.merge(part)
    for label, class_map in whole.class_maps().items():
        torch.testing.assert_close(merged.class_maps()[label], class_map, rtol=1e-12, atol=1e-12)


def test_class_maps_are_means_of_normalized_maps():
    maps = torch.rand(6, 2, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    acc = efmap.HeatMapAccumulator()
    acc.update(maps, labels)
    normalized = efmap.minmax(maps)
    for label in (0, 1, 2):
        torch.testing.assert_close(acc.class_maps()[label], normalized[labels == label].mean(0))
    class_mean = torch.stack([normalized[labels == k].mean(0) for k in range(3)]).mean(0)
    torch.testing.assert_close(acc.overall(), class_mean)
    torch.testing.assert_close(acc.overall("inputs"), normalized.mean(0))
    assert acc.counts == {0: 3, 1: 2, 2: 1}


def test_raw_maps_with_max_and_sum():
    maps = torch.tensor([[[1.0, 5.0]], [[3.0, 2.0]], [[10.0, 0.0]]])
    labels = [0, 0, 1]
    maximum = efmap.HeatMapAccumulator("max", normalize=None)
    maximum.update(maps, labels)
    assert maximum.class_maps()[0].tolist() == [[3.0, 5.0]]
    assert maximum.overall().tolist() == [[10.0, 5.0]]
    total = efmap.HeatMapAccumulator("sum", normalize=None)
    total.update(maps, labels)
    assert total.class_maps()[0].tolist() == [[4.0, 7.0]]
    assert total.overall().tolist() == [[14.0, 7.0]]


def test_constant_map_merges_as_zero_without_warning():
    acc = efmap.HeatMapAccumulator()
    acc.update(torch.ones(1, 2, 2), [0])
    torch.testing.assert_close(acc.class_maps()[0], torch.zeros(2, 2, dtype=torch.float64))


def test_state_dict_round_trip(tmp_path):
    acc = efmap.HeatMapAccumulator("mean")
    acc.update(torch.rand(5, 4, 4), [0, 1, 1, 2, 0])
    path = tmp_path / "state.pt"
    torch.save(acc.state_dict(), path)
    restored = efmap.HeatMapAccumulator("mean")
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.counts == acc.counts
    for label, class_map in acc.class_maps().items():
        torch.testing.assert_close(restored.class_maps()[label], class_map, rtol=0, atol=0)
    restored.update(torch.rand(1, 4, 4), [3])
    assert restored.counts[3] == 1


def test_empty_state_round_trip():
    restored = efmap.HeatMapAccumulator()
    restored.load_state_dict(efmap.HeatMapAccumulator().state_dict())
    assert restored.counts == {}


def test_single_map_without_batch_dimension():
    acc = efmap.HeatMapAccumulator(normalize=None)
    acc.update(torch.tensor([[1.0, 2.0]]), 4)
    assert acc.counts == {4: 1}


@pytest.mark.parametrize(
    ("maps", "labels", "error", "match"),
    [
        (torch.rand(3, 2, 2), [0, 1], ValueError, r"one entry per map \(3\), but got shape \(2,\)"),
        (torch.rand(2, 2, 2), [0, -1], ValueError, r"non-negative class labels, but got -1"),
        (torch.rand(2, 2, 2), torch.tensor([0.0, 1.0]), TypeError, r"integer class labels"),
        (torch.rand(2, 2, 2, 2), [0, 1], ValueError, r"\(N, \*map_shape\) with 2 map dimension"),
        (torch.ones(2, 2, 2, dtype=torch.int64), [0, 1], TypeError, r"floating"),
    ],
)
def test_update_rejects_bad_input(maps, labels, error, match):
    with pytest.raises(error, match=match):
        efmap.HeatMapAccumulator().update(maps, labels)


def test_shape_change_rejected():
    acc = efmap.HeatMapAccumulator()
    acc.update(torch.rand(1, 2, 2), [0])
    with pytest.raises(ValueError, match=r"shape \(2, 2\) like the earlier ones, but got \(3, 3\)"):
        acc.update(torch.rand(1, 3, 3), [0])


def test_merge_rejects_different_settings():
    with pytest.raises(ValueError, match="different settings"):
        efmap.HeatMapAccumulator("mean").merge(efmap.HeatMapAccumulator("max"))
    with pytest.raises(ValueError, match="settings"):
        efmap.HeatMapAccumulator("mean").load_state_dict(efmap.HeatMapAccumulator("sum").state_dict())


def test_overall_before_update_rejected():
    with pytest.raises(ValueError, match="update"):
        efmap.HeatMapAccumulator().overall()


def test_bad_reduction_rejected():
    with pytest.raises(ValueError, match="'mean', 'max' or 'sum'"):
        efmap.HeatMapAccumulator("median")


def test_single_map_with_many_labels_names_dims():
    with pytest.raises(ValueError, match=r"create the accumulator with dims=1"):
        efmap.HeatMapAccumulator().update(torch.rand(10, 6), torch.zeros(10, dtype=torch.int64))
    tabular = efmap.HeatMapAccumulator(dims=1)
    tabular.update(torch.rand(10, 6), torch.zeros(10, dtype=torch.int64))
    assert tabular.counts == {0: 10}
