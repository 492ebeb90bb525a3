"""Window arithmetic for incremental inference: geometry, gathering and pasting of spatial windows.

A window is a rectangle of a ``(C, H, W)`` map, the same size for every perturbation
of a batch, given by its top row and left column per perturbation. Cached maps are
stored channels-last, ``(N, H, W, C)``, so that a window of every channel is one
contiguous run of memory per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Geometry:
    """Windows of one map for a group of perturbations.

    Attributes
    ----------
    rows, cols
        Top row and left column of every perturbation's window, int64, shape ``(P,)``.
    height, width
        Window size, the same for every perturbation and at most the map size.
    """

    rows: np.ndarray
    cols: np.ndarray
    height: int
    width: int

    def same_as(self, other: Geometry) -> bool:
        """Return whether both describe the same windows."""
        return (
            self.height == other.height
            and self.width == other.width
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        )


@dataclass(frozen=True)
class Sliding:
    """Geometry of a sliding-window layer (convolution or pooling) along one spatial dimension."""

    kernel: int
    stride: int
    padding: int  # Padding before the first element. The end may be padded differently.
    dilation: int

    @property
    def span(self) -> int:
        """Distance from the first to the last input element that one output reads."""
        return (self.kernel - 1) * self.dilation

    def output_window(self, starts: np.ndarray, size: int, out_extent: int) -> tuple[np.ndarray, int]:
        """Map input windows ``[start, start + size)`` to the output windows that contain every changed output.

        Output ``o`` reads inputs ``o * stride - padding + j * dilation`` for ``j < kernel``,
        so it can change only if ``o`` lies in
        ``[ceil((start + padding - span) / stride), floor((start + size - 1 + padding) / stride)]``.
        That range contains at most ``(size - 1 + span) // stride + 1`` outputs whatever the
        alignment, which gives one window size for all perturbations. Windows that would
        cross the map border are shifted inside it.
        """
        out_size = min((size - 1 + self.span) // self.stride + 1, out_extent)
        first = -((self.span - self.padding - starts) // self.stride)  # ceil division
        return np.clip(first, 0, out_extent - out_size), out_size

    def input_region(self, out_size: int) -> int:
        """Return the input size that ``out_size`` outputs read."""
        return (out_size - 1) * self.stride + self.span + 1

    def margins(self, in_extent: int, out_extent: int) -> tuple[int, int]:
        """Return the padding before and after the map that any output's input region needs."""
        after = (out_extent - 1) * self.stride - self.padding + self.span + 1 - in_extent
        return self.padding, max(0, after)


def union(geometries: list[Geometry], map_height: int, map_width: int) -> Geometry:
    """Return the smallest equal-size windows that contain every given window of each perturbation."""
    rows, height = _union_1d([(g.rows, g.height) for g in geometries], map_height)
    cols, width = _union_1d([(g.cols, g.width) for g in geometries], map_width)
    return Geometry(rows, cols, height, width)


def _union_1d(windows: list[tuple[np.ndarray, int]], extent: int) -> tuple[np.ndarray, int]:
    low = np.minimum.reduce([starts for starts, _ in windows])
    high = np.maximum.reduce([starts + size for starts, size in windows])
    size = min(int((high - low).max()), extent)
    return np.clip(low, 0, extent - size), size


def gather(
    cache: torch.Tensor, samples: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Copy windows out of a channels-last map.

    Parameters
    ----------
    cache
        Maps ``(N, H, W, C)``, contiguous.
    samples, rows, cols
        Sample, top row and left column of each window, int64, shape ``(B,)``.
    height, width
        Window size. Every window must lie inside the map.

    Returns
    -------
    torch.Tensor
        Contiguous windows ``(B, height, width, C)``.
    """
    _, map_height, map_width, channels = cache.shape
    row_index = rows[:, None] + torch.arange(height, device=rows.device)
    col_index = cols[:, None] + torch.arange(width, device=cols.device)
    flat = (samples[:, None, None] * map_height + row_index[:, :, None]) * map_width + col_index[:, None, :]
    picked = cache.reshape(-1, channels).index_select(0, flat.reshape(-1))
    return picked.reshape(samples.shape[0], height, width, channels)


def paste(target: torch.Tensor, window: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Write windows into a batch of channels-last maps, in place.

    Parameters
    ----------
    target
        Contiguous maps ``(B, R, S, C)`` that receive the windows.
    window
        Windows ``(B, h, w, C)``.
    rows, cols
        Position of each window's top left element in its target map, int64, shape ``(B,)``.
        Parts of a window that fall outside the target are dropped.
    """
    batch, target_height, target_width, channels = target.shape
    height, width = window.shape[1:3]
    row_index = rows[:, None] + torch.arange(height, device=rows.device)
    col_index = cols[:, None] + torch.arange(width, device=cols.device)
    flat = (torch.arange(batch, device=rows.device)[:, None, None] * target_height + row_index[:, :, None]) * (
        target_width
    ) + col_index[:, None, :]
    values = window.reshape(-1, channels)
    row_inside = (row_index >= 0) & (row_index < target_height)
    col_inside = (col_index >= 0) & (col_index < target_width)
    if bool(row_inside.all()) and bool(col_inside.all()):
        target.view(-1, channels).index_copy_(0, flat.reshape(-1), values)
        return
    inside = (row_inside[:, :, None] & col_inside[:, None, :]).reshape(-1)
    target.view(-1, channels).index_copy_(0, flat.reshape(-1)[inside], values[inside])


def pad_map(cache: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], value: float) -> torch.Tensor:
    """Pad channels-last maps ``(N, H, W, C)`` around the spatial dimensions with ``value``."""
    if rows == (0, 0) and cols == (0, 0):
        return cache
    padded = cache.new_full(
        (cache.shape[0], cache.shape[1] + sum(rows), cache.shape[2] + sum(cols), cache.shape[3]), value
    )
    padded[:, rows[0] : rows[0] + cache.shape[1], cols[0] : cols[0] + cache.shape[2]] = cache
    return padded
