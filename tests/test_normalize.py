import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import efmap
from efmap import EfmapWarning

maps_strategy = arrays(
    "float64",
    array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6),
    elements=st.floats(-1e6, 1e6, allow_nan=False),
)


@given(maps_strategy)
def test_minmax_in_unit_interval_and_idempotent(maps):
    x = torch.from_numpy(maps)
    flat = x.reshape(*x.shape[:-2], -1)
    if bool((flat.amax(-1) == flat.amin(-1)).any()):
        with pytest.warns(EfmapWarning):
            once = efmap.minmax(x)
        with pytest.warns(EfmapWarning):
            twice = efmap.minmax(once)
    else:
        once = efmap.minmax(x)
        twice = efmap.minmax(once)
    assert once.shape == x.shape
    assert float(once.min()) >= 0.0
    assert float(once.max()) <= 1.0
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-12)


def test_minmax_values():
    maps = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[-2.0, 0.0], [0.0, 2.0]]])
    expected = torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.5], [0.5, 1.0]]])
    torch.testing.assert_close(efmap.minmax(maps), expected)


def test_minmax_constant_map_is_zero_with_warning():
    maps = torch.stack([torch.full((3, 3), 7.0), torch.arange(9.0).reshape(3, 3)])
    with pytest.warns(EfmapWarning, match="1 of 2 map"):
        result = efmap.minmax(maps)
    assert not bool(torch.isnan(result).any())
    torch.testing.assert_close(result[0], torch.zeros(3, 3))
    torch.testing.assert_close(result[1], torch.arange(9.0).reshape(3, 3) / 8)


def test_minmax_one_dimensional_maps():
    result = efmap.minmax(torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.5, 2.0]]), dims=1)
    torch.testing.assert_close(result, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]))


@pytest.mark.parametrize(
    ("maps", "kwargs", "error", "match"),
    [
        (torch.tensor([[float("nan"), 1.0]]), {}, ValueError, "NaN"),
        (torch.ones(2, 2, dtype=torch.int64), {}, TypeError, "floating"),
        (torch.ones(2), {}, ValueError, r"`dims` between 1 and .* \(1\), but got 2"),
    ],
)
def test_minmax_rejects_bad_input(maps, kwargs, error, match):
    with pytest.raises(error, match=match):
        efmap.minmax(maps, **kwargs)


def test_quantize_levels():
    maps = torch.tensor([0.0, 0.2, 0.5, 1.0])
    assert efmap.quantize(maps).tolist() == [0, 51, 128, 255]
    assert efmap.quantize(maps).dtype == torch.uint8
    assert efmap.quantize(maps, levels=2).tolist() == [0, 0, 0, 1]
    assert efmap.quantize(maps, levels=1024).dtype == torch.int64


@given(arrays("float64", st.integers(1, 50), elements=st.floats(0, 1)), st.integers(2, 300))
def test_quantize_within_levels_and_monotone(values, levels):
    x = torch.from_numpy(values)
    q = efmap.quantize(x, levels=levels).long()
    assert int(q.min()) >= 0
    assert int(q.max()) <= levels - 1
    order = torch.argsort(x)
    assert bool((q[order].diff() >= 0).all())


@pytest.mark.parametrize(
    ("maps", "levels", "match"),
    [(torch.tensor([1.5]), 256, r"in \[0, 1\].*1\.5.*minmax"), (torch.tensor([0.5]), 1, "at least 2")],
)
def test_quantize_rejects_bad_input(maps, levels, match):
    with pytest.raises(ValueError, match=match):
        efmap.quantize(maps, levels=levels)
