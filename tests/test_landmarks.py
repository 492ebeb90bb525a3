import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import efmap


def test_keep_fraction_takes_largest():
    heatmap = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    marks = efmap.select_landmarks(heatmap, keep_fraction=0.5)
    assert marks.mask.tolist() == [[False, True, False], [True, False, True]]
    assert marks.count == 3
    assert marks.fraction == 0.5


def test_ties_broken_in_row_major_order():
    marks = efmap.select_landmarks(torch.ones(2, 3), keep_fraction=0.5)
    assert marks.mask.tolist() == [[True, True, True], [False, False, False]]


@given(arrays("float64", (5, 7), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0])), st.floats(0, 1))
def test_keep_fraction_count_and_order(values, fraction):
    heatmap = torch.from_numpy(values)
    marks = efmap.select_landmarks(heatmap, keep_fraction=fraction)
    assert marks.count == int(fraction * 35 + 0.5)
    if 0 < marks.count < 35:
        assert float(heatmap[marks.mask].min()) >= float(heatmap[~marks.mask].max())


def test_threshold_is_strict():
    heatmap = torch.tensor([[0.0, 0.5], [0.6, 1.0]])
    assert efmap.select_landmarks(heatmap, threshold=0.5).mask.tolist() == [[False, False], [True, True]]


def test_threshold_on_zero_map_selects_nothing():
    assert efmap.select_landmarks(torch.zeros(4, 4), threshold=0.0).count == 0


def test_paper_proportion():
    heatmap = torch.rand(128, 128)
    marks = efmap.select_landmarks(heatmap, keep_fraction=10810 / 16384)
    assert marks.count == 10810


def test_apply_fills_removed_features():
    inputs = torch.full((2, 3, 2, 2), 0.5)
    mask = torch.tensor([[True, False], [False, True]])
    marks = efmap.Landmarks(mask=mask)
    filled = marks.apply(inputs, fill=-1.0)
    assert filled[:, :, 0, 1].eq(-1.0).all()
    assert filled[:, :, 0, 0].eq(0.5).all()
    reversed_fill = marks.apply(inputs, fill="reverse")
    assert reversed_fill[:, :, 1, 0].eq(-0.5).all()
    tensor_fill = marks.apply(inputs, fill=torch.tensor([0.1, 0.2, 0.3]).reshape(3, 1, 1))
    torch.testing.assert_close(tensor_fill[0, :, 1, 0], torch.tensor([0.1, 0.2, 0.3]))
    assert inputs.eq(0.5).all()


def test_crop_to_bounding_box():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[1, 2] = True
    mask[3, 4] = True
    inputs = torch.arange(2 * 30, dtype=torch.float32).reshape(2, 5, 6)
    cropped = efmap.Landmarks(mask=mask).crop(inputs)
    assert cropped.shape == (2, 3, 3)
    torch.testing.assert_close(cropped, inputs[:, 1:4, 2:5])


def test_crop_empty_mask_rejected():
    with pytest.raises(ValueError, match="empty landmark mask"):
        efmap.Landmarks(mask=torch.zeros(2, 2, dtype=torch.bool)).crop(torch.zeros(1, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"keep_fraction": 0.5, "threshold": 0.1}, "exactly one"),
        ({"keep_fraction": 1.5}, r"\[0, 1\], but got 1.5"),
    ],
)
def test_select_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        efmap.select_landmarks(torch.rand(3, 3), **kwargs)


def test_mask_shape_mismatch_names_both():
    with pytest.raises(ValueError, match=r"mask shape \(3, 3\).*inputs of shape \(1, 1, 4, 4\)"):
        efmap.apply_mask(torch.zeros(1, 1, 4, 4), torch.ones(3, 3, dtype=torch.bool))


def test_bad_fill_rejected():
    with pytest.raises(ValueError, match="'reverse'"):
        efmap.apply_mask(torch.zeros(1, 2, 2), torch.ones(2, 2, dtype=torch.bool), fill="blur-ish")


@pytest.mark.parametrize("threshold", [float("nan"), float("inf")])
def test_non_finite_threshold_rejected(threshold):
    with pytest.raises(ValueError, match="finite number"):
        efmap.select_landmarks(torch.rand(3, 3), threshold=threshold)
