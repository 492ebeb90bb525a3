"""The reversal: a cyclic shift of every value by half of its range."""

from __future__ import annotations

import torch

from efmap._checks import check_floating, check_value_range
from efmap._typing import ValueRange


def reverse(x: torch.Tensor, value_range: ValueRange = (-1.0, 1.0)) -> torch.Tensor:
    r"""Reverse values by a cyclic shift of half the value range.

    For a range ``[lo, hi]`` of width ``w = hi - lo`` the reversal is
    ``lo + ((x - lo + w / 2) mod w)``. Every value in ``[lo, hi)`` moves by
    exactly ``w / 2``, the largest distance that can be applied to all values
    alike, and reversing twice returns the input. The upper end ``hi`` maps
    to the midpoint, as ``lo`` does. Values outside the range are first
    wrapped into it by the modular formula.

    Parameters
    ----------
    x
        Input of any shape, with a floating dtype.
    value_range
        The closed interval ``(lo, hi)`` the inputs live in. Default ``(-1.0, 1.0)``.

    Returns
    -------
    torch.Tensor
        Reversed values, same shape, dtype and device as ``x``, in ``[lo, hi)``.

    Raises
    ------
    TypeError
        If ``x`` is not a tensor or has an integer or boolean dtype.
    ValueError
        If ``value_range`` is not a finite interval with ``lo < hi``.

    Notes
    -----
    On ``[-1, 1]`` the formula is ``(x + 2) mod 2 - 1``: ``-0.5 -> 0.5``,
    ``0 -> -1``, ``0.7 -> -0.3``, ``-1 -> 0`` and ``1 -> 0``. It is the feature
    reversal of the Explainable Feature Map (H. Yoo, S. Han and K. Chung,
    IEEE Access, 2021).

    Examples
    --------
    >>> import torch, efmap
    >>> efmap.reverse(torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    tensor([ 0.0000,  0.5000, -1.0000, -0.5000,  0.0000])
    >>> efmap.reverse(torch.tensor([0.0, 0.25, 0.5, 0.75]), value_range=(0.0, 1.0))
    tensor([0.5000, 0.7500, 0.0000, 0.2500])
    """
    check_floating(x, "x")
    lo, hi = check_value_range(value_range)
    width = hi - lo

    half = width / 2
    middle = lo + half

    # Inside [lo, hi] the shift is a plain addition or subtraction of half the width: the modular form
    # would round values just below hi up to a whole period and jump by the full width.
    # Rounding can push a result an ulp below lo, or turn a value just below the middle into hi, which is lo
    # on the cycle.
    reversed_values = torch.where(x < middle, x + half, x - half).clamp(min=lo)
    reversed_values = torch.where(reversed_values >= hi, torch.full_like(reversed_values, lo), reversed_values)
    outside = (x < lo) | (x > hi)
    if bool(outside.any()):
        reversed_values = torch.where(outside, lo + torch.remainder(x - lo + half, width), reversed_values)
    return reversed_values
