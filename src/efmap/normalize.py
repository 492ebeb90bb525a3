"""Normalisation of maps: min-max scaling to [0, 1] and quantisation to brightness levels."""

from __future__ import annotations

import warnings

import torch

from efmap._checks import check_finite, check_floating
from efmap._warnings import EfmapWarning

__all__ = ["minmax", "quantize"]


def minmax(maps: torch.Tensor, *, dims: int = 2) -> torch.Tensor:
    """Scale each map linearly so that its minimum becomes 0 and its maximum 1.

    Parameters
    ----------
    maps
        Floating tensor ``(..., *map_shape)``; the last ``dims`` dimensions form one map
        and any leading dimensions index maps, for example ``(N, H, W)``.
    dims
        Number of trailing dimensions that make up one map. Default 2 (images);
        use 1 for tabular or sequence maps.

    Returns
    -------
    torch.Tensor
        Maps of the same shape and dtype with values in ``[0, 1]``. A constant map
        becomes all zeros.

    Raises
    ------
    TypeError
        If ``maps`` is not a floating-point tensor.
    ValueError
        If ``maps`` contains NaN or infinity, or has fewer than ``dims`` dimensions.

    Warns
    -----
    EfmapWarning
        If any map is constant, since it carries no ranking of its features.

    Examples
    --------
    >>> import torch, efmap
    >>> efmap.minmax(torch.tensor([[1.0, 3.0], [2.0, 5.0]]))
    tensor([[0.0000, 0.5000],
            [0.2500, 1.0000]])
    """
    check_floating(maps, "maps")
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= maps.dim():
        raise ValueError(
            f"Expected `dims` between 1 and the number of dimensions of `maps` ({maps.dim()}), but got {dims!r}."
        )
    check_finite(maps, "maps")

    flat = maps.reshape(*maps.shape[: maps.dim() - dims], -1)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    spread = high - low
    constant = spread == 0
    if bool(constant.any()):
        warnings.warn(
            f"{int(constant.sum())} of {constant.numel()} map(s) are constant; they are returned as zeros.",
            EfmapWarning,
            stacklevel=2,
        )
    scaled = (flat - low) / torch.where(constant, torch.ones_like(spread), spread)

    return scaled.clamp_(0.0, 1.0).reshape(maps.shape)


def quantize(maps: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """Round maps in ``[0, 1]`` to ``levels`` evenly spaced integer brightness levels, ``0`` to ``levels - 1``.

    Parameters
    ----------
    maps
        Floating tensor of any shape with values in ``[0, 1]``, such as the output of :func:`minmax`.
    levels
        Number of levels, at least 2. Default 256, as for 8-bit display.

    Returns
    -------
    torch.Tensor
        Integer levels, same shape: ``torch.uint8`` when ``levels <= 256``, else ``torch.int64``.

    Raises
    ------
    TypeError
        If ``maps`` is not a floating-point tensor.
    ValueError
        If ``levels < 2`` or a value lies outside ``[0, 1]`` or is NaN.

    Examples
    --------
    >>> import torch, efmap
    >>> efmap.quantize(torch.tensor([0.0, 0.5, 1.0]), levels=256)
    tensor([  0, 128, 255], dtype=torch.uint8)
    """
    check_floating(maps, "maps")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"Expected `levels` to be an integer of at least 2, but got {levels!r}.")
    check_finite(maps, "maps")
    if maps.numel() and (float(maps.min()) < 0.0 or float(maps.max()) > 1.0):
        raise ValueError(
            f"Expected `maps` in [0, 1], but got values from {float(maps.min()):.6g} to {float(maps.max()):.6g}. "
            "Apply efmap.minmax first."
        )

    rounded = torch.round(maps.double() * (levels - 1))
    return rounded.to(torch.uint8 if levels <= 256 else torch.int64)
