"""Landmark selection: the features of a merged map that matter, as a boolean mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from efmap._checks import check_finite, check_floating, check_value_range
from efmap._typing import ValueRange
from efmap.reversal import reverse

__all__ = ["Landmarks", "apply_mask", "select_landmarks"]

#: A fill for removed features: a constant, ``"reverse"`` for the reversed value, or a tensor.
Fill = float | str | torch.Tensor


@dataclass(frozen=True)
class Landmarks:
    """A boolean mask of kept features (``True``) in the shape of a heat map.

    Attributes
    ----------
    mask
        Boolean tensor of the heat map's shape, for example ``(H, W)``.
    """

    mask: torch.Tensor

    @property
    def count(self) -> int:
        """Number of kept features."""
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        """Kept features as a fraction of all features."""
        return self.count / self.mask.numel()

    def apply(self, inputs: torch.Tensor, fill: Fill = 0.0, *, value_range: ValueRange = (-1.0, 1.0)) -> torch.Tensor:
        """Return a copy of ``inputs`` with every feature outside the landmarks replaced by ``fill``.

        See :func:`apply_mask` for the accepted shapes and fills.
        """
        return apply_mask(inputs, self.mask, fill, value_range=value_range)

    def crop(self, inputs: torch.Tensor) -> torch.Tensor:
        """Crop the trailing dimensions of ``inputs`` to the bounding box of the landmarks.

        Raises
        ------
        ValueError
            If the mask is empty or its shape does not match the trailing dimensions of ``inputs``.
        """
        _check_mask_shape(inputs, self.mask)
        if self.count == 0:
            raise ValueError("Cannot crop to an empty landmark mask: it selects no feature.")
        slices: list[slice] = []
        for axis in range(self.mask.dim()):
            others = tuple(d for d in range(self.mask.dim()) if d != axis)
            present = self.mask.any(dim=others) if others else self.mask
            positions = torch.nonzero(present).flatten()
            slices.append(slice(int(positions[0]), int(positions[-1]) + 1))
        index: tuple[Any, ...] = (Ellipsis, *slices)
        return inputs[index]


def select_landmarks(
    heatmap: torch.Tensor, *, keep_fraction: float | None = None, threshold: float | None = None
) -> Landmarks:
    """Select the landmark features of a heat map, by kept fraction or by threshold.

    Parameters
    ----------
    heatmap
        Floating tensor of any shape, usually a merged ``(H, W)`` map.
    keep_fraction
        Keep the ``floor(keep_fraction * numel + 0.5)`` features with the largest values
        (halves round up).
        Ties are broken in favour of the feature that comes first in row-major order,
        so the result is deterministic. A quantile ``q`` of the map is ``keep_fraction = 1 - q``.
    threshold
        Keep every feature whose value is strictly greater than ``threshold``, so an
        all-zero map selects nothing for any ``threshold >= 0``.

    Returns
    -------
    Landmarks
        The mask of kept features, with its count and fraction.

    Raises
    ------
    ValueError
        If not exactly one of ``keep_fraction`` and ``threshold`` is given, if
        ``keep_fraction`` is outside ``[0, 1]``, if ``threshold`` is NaN or infinite, or if
        the map contains NaN or infinity.

    Examples
    --------
    >>> import torch, efmap
    >>> marks = efmap.select_landmarks(torch.tensor([[0.1, 0.9], [0.5, 0.5]]), keep_fraction=0.5)
    >>> marks.mask
    tensor([[False,  True],
            [ True, False]])
    """
    check_floating(heatmap, "heatmap")
    check_finite(heatmap, "heatmap")
    if (keep_fraction is None) == (threshold is None):
        raise ValueError("Pass exactly one of `keep_fraction` and `threshold`.")

    if threshold is not None:
        if not math.isfinite(float(threshold)):
            raise ValueError(f"Expected `threshold` to be a finite number, but got {threshold}.")
        return Landmarks(mask=heatmap > threshold)

    if not 0.0 <= float(keep_fraction) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"Expected `keep_fraction` in [0, 1], but got {keep_fraction}.")
    flat = heatmap.flatten()
    keep = math.floor(float(keep_fraction) * flat.numel() + 0.5)  # type: ignore[arg-type]
    # A stable descending sort keeps equal values in row-major order, which decides ties.
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=heatmap.device)
    mask[order] = True
    return Landmarks(mask=mask.reshape(heatmap.shape))


def apply_mask(
    inputs: torch.Tensor, mask: torch.Tensor, fill: Fill = 0.0, *, value_range: ValueRange = (-1.0, 1.0)
) -> torch.Tensor:
    """Keep the features where ``mask`` is True and fill the others.

    Parameters
    ----------
    inputs
        Floating tensor whose trailing dimensions equal the mask's shape, for example
        ``(N, C, H, W)`` with an ``(H, W)`` mask (channels are kept or filled together).
    mask
        Boolean tensor of kept features.
    fill
        Replacement for removed features: a number (default 0.0, the middle of ``[-1, 1]``),
        ``"reverse"`` for the reversed input value, or a tensor broadcastable to ``inputs``.
    value_range
        Input range, used by ``fill="reverse"``.

    Returns
    -------
    torch.Tensor
        A new tensor of the same shape and dtype as ``inputs``.

    Raises
    ------
    TypeError
        If ``inputs`` is not a floating-point tensor or ``mask`` is not a boolean tensor.
    ValueError
        If the mask shape differs from the trailing dimensions of ``inputs``, or ``fill`` is an unknown string.

    Examples
    --------
    >>> import torch, efmap
    >>> images = torch.full((1, 1, 2, 2), 0.5)
    >>> keep = torch.tensor([[True, False], [False, True]])
    >>> efmap.apply_mask(images, keep)[0, 0]
    tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]])
    >>> efmap.apply_mask(images, keep, fill="reverse")[0, 0]
    tensor([[ 0.5000, -0.5000],
            [-0.5000,  0.5000]])
    """
    check_floating(inputs, "inputs")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"Expected `mask` to be a boolean tensor, but got {getattr(mask, 'dtype', type(mask))}.")
    _check_mask_shape(inputs, mask)
    mask = mask.to(inputs.device)

    if isinstance(fill, str):
        if fill != "reverse":
            raise ValueError(f"Expected `fill` to be a number, a tensor or 'reverse', but got {fill!r}.")
        replacement = reverse(inputs, check_value_range(value_range))
    elif isinstance(fill, torch.Tensor):
        replacement = fill.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
    else:
        replacement = torch.full_like(inputs, float(fill))
    return torch.where(mask, inputs, replacement)


def _check_mask_shape(inputs: torch.Tensor, mask: torch.Tensor) -> None:
    trailing = tuple(inputs.shape[inputs.dim() - mask.dim() :]) if mask.dim() <= inputs.dim() else None
    if trailing != tuple(mask.shape):
        raise ValueError(
            f"Expected the mask shape {tuple(mask.shape)} to equal the trailing dimensions of the inputs, "
            f"but got inputs of shape {tuple(inputs.shape)}."
        )
