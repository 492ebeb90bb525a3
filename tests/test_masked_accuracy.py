import pytest
import torch

import efmap


class PixelSign(torch.nn.Module):
    """Class 1 when pixel (0, 0) is positive, else class 0: only that pixel matters."""

    def forward(self, x):
        value = x[:, 0, 0, 0]
        return torch.stack([-value, value], dim=1)


def test_landmarks_keep_accuracy_random_masks_do_not():
    inputs = torch.rand(40, 1, 4, 4) * 2 - 1
    labels = (inputs[:, 0, 0, 0] > 0).long()
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    result = efmap.masked_accuracy(PixelSign().eval(), inputs, labels, mask, fill=0.0, num_random=32, seed=1)
    assert result.full == 1.0
    assert result.landmarks == 1.0
    assert result.kept == 1
    assert result.total == 16
    # A random one-pixel mask keeps pixel (0, 0) with probability 1/16; otherwise every prediction is class 0.
    assert result.random_mean < 0.8
    assert result.random.shape == (32,)
    assert "landmarks only" in result.table()


def test_random_masks_are_seeded():
    inputs = torch.rand(10, 1, 4, 4) * 2 - 1
    labels = (inputs[:, 0, 0, 0] > 0).long()
    mask = torch.rand(4, 4) > 0.5
    first = efmap.masked_accuracy(PixelSign().eval(), inputs, labels, mask, num_random=5, seed=3)
    second = efmap.masked_accuracy(PixelSign().eval(), inputs, labels, mask, num_random=5, seed=3)
    torch.testing.assert_close(first.random, second.random)


def test_accuracy_counts_matches():
    inputs = torch.tensor([[[[0.5]]], [[[-0.5]]], [[[0.2]]]])
    assert efmap.accuracy(PixelSign().eval(), inputs, [1, 0, 0]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("labels", "mask", "match"),
    [
        ([0, 1], torch.ones(4, 4, dtype=torch.bool), r"one entry per input \(3\), but got shape \(2,\)"),
        ([0, 1, 1], torch.ones(5, 5, dtype=torch.bool), r"mask shape \(5, 5\).*\(1, 1, 4, 4\)"),
    ],
)
def test_masked_accuracy_rejects_mismatch(labels, mask, match):
    with pytest.raises(ValueError, match=match):
        efmap.masked_accuracy(PixelSign().eval(), torch.zeros(3, 1, 4, 4), labels, mask)


@pytest.mark.parametrize(
    ("inputs", "labels", "match"),
    [
        (torch.full((3, 1, 4, 4), 200.0), [0, 1, 1], r"value_range \[-1.0, 1.0\].*200"),
        (torch.full((3, 1, 4, 4), float("nan")), [0, 1, 1], r"NaN"),
        (torch.zeros(3, 1, 4, 4), [0, 1, 5], r"labels.*\[0, 1\].*but got 5"),
    ],
)
def test_masked_accuracy_rejects_bad_values(inputs, labels, match):
    with pytest.raises(ValueError, match=match):
        efmap.masked_accuracy(PixelSign().eval(), inputs, labels, torch.ones(4, 4, dtype=torch.bool))


def test_table_without_random_masks():
    inputs = torch.rand(4, 1, 4, 4) * 2 - 1
    labels = (inputs[:, 0, 0, 0] > 0).long()
    result = efmap.masked_accuracy(PixelSign().eval(), inputs, labels, torch.ones(4, 4, dtype=torch.bool), num_random=0)
    assert "not measured" in result.table()
