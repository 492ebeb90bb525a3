import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import efmap


def test_reverse_paper_values():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 0.7], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5, -1.0, -0.5, 0.0, -0.3], dtype=torch.float64)
    torch.testing.assert_close(efmap.reverse(x), expected, rtol=0, atol=1e-12)


def test_reverse_unit_range_values():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75])
    expected = torch.tensor([0.5, 0.75, 0.0, 0.25])
    torch.testing.assert_close(efmap.reverse(x, value_range=(0, 1)), expected, rtol=0, atol=0)


def test_reverse_keeps_dtype_device_shape():
    x = torch.rand(2, 3, 4, dtype=torch.float16) * 2 - 1
    y = efmap.reverse(x)
    assert y.dtype == torch.float16
    assert y.shape == x.shape
    assert y.device == x.device


values = arrays("float64", st.integers(1, 64), elements=st.floats(-1.0, 1.0, exclude_max=True))


@given(values)
def test_reverse_moves_every_value_by_one(x):
    x = torch.from_numpy(x)
    y = efmap.reverse(x)
    torch.testing.assert_close((y - x).abs(), torch.ones_like(x), rtol=0, atol=1e-12)


@given(values)
@example(np.array([1 - 2**-53, -1e-20, -0.0, 0.5 - 2**-54]))
def test_reverse_is_involution(x):
    x = torch.from_numpy(x)
    torch.testing.assert_close(efmap.reverse(efmap.reverse(x)), x, rtol=0, atol=1e-12)


@given(values)
@example(np.array([1 - 2**-53, -1e-20]))
def test_reverse_stays_in_range(x):
    y = efmap.reverse(torch.from_numpy(x))
    assert float(y.min()) >= -1.0
    assert float(y.max()) < 1.0


@given(
    st.floats(-100, 100),
    st.floats(0.01, 100),
    arrays("float64", st.integers(1, 32), elements=st.floats(0, 1, exclude_max=True)),
)
@example(0.4599725427489952, 1.0, np.array([0.5]))
def test_reverse_general_range(lo, width, unit):
    hi = lo + width
    x = torch.from_numpy(lo + unit * width)
    x = x.clamp(max=torch.nextafter(torch.tensor(hi, dtype=torch.float64), torch.tensor(lo, dtype=torch.float64)))
    y = efmap.reverse(x, value_range=(lo, hi))
    tolerance = 1e-9 * (abs(lo) + width)
    torch.testing.assert_close((y - x).abs(), torch.full_like(x, width / 2), rtol=0, atol=tolerance)
    # Where the width is not a binary fraction, a value at lo may come back just below hi: the same point
    # on the cycle, so the round trip is compared by cyclic distance.
    offset = torch.remainder(efmap.reverse(y, value_range=(lo, hi)) - x, width)
    cyclic = torch.minimum(offset, width - offset)
    torch.testing.assert_close(cyclic, torch.zeros_like(x), rtol=0, atol=tolerance)
    assert float(y.min()) >= lo
    assert float(y.max()) < hi


def test_reverse_upper_end_maps_to_middle():
    assert float(efmap.reverse(torch.tensor([3.0]), value_range=(1.0, 3.0))) == 2.0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_reverse_rejects_integer_dtypes(dtype):
    with pytest.raises(TypeError, match="floating dtype"):
        efmap.reverse(torch.zeros(3, dtype=dtype))


def test_reverse_uint8_message_gives_conversion():
    with pytest.raises(TypeError, match=r"127\.5 - 1"):
        efmap.reverse(torch.zeros(3, dtype=torch.uint8))


def test_reverse_rejects_non_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        efmap.reverse([0.0, 0.5])


@pytest.mark.parametrize("value_range", [(1.0, 1.0), (2.0, 1.0), (0.0, float("inf")), (0.0,)])
def test_reverse_rejects_bad_range(value_range):
    with pytest.raises(ValueError, match="value_range"):
        efmap.reverse(torch.zeros(2), value_range=value_range)
