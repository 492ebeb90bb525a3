"""Streaming, mergeable accumulation of heat maps per class and overall."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from efmap._checks import check_finite, check_floating, check_labels
from efmap._typing import Reduction
from efmap._warnings import EfmapWarning
from efmap.normalize import minmax

__all__ = ["HeatMapAccumulator"]

# Normalised maps are rounded to multiples of 2**-24 so that their float64 sums are exact and order-independent.
_GRID_STEPS = float(2**24)


class HeatMapAccumulator:
    """Merge heat maps per class as they stream in, without keeping the maps.

    Each incoming map is first min-max normalised (unless ``normalize=None``)
    and then added to the running state of its class: a count, a float64 sum
    and an elementwise maximum. Class maps are the mean (sum divided by count),
    the maximum or the sum of their maps; the overall map combines the class
    maps the same way, so every class weighs the same however many maps it has.

    Two accumulators that saw disjoint parts of a data set combine with
    :meth:`merge` into one that equals an accumulator that saw all of it. With
    ``normalize="minmax"`` this holds bit for bit, whatever the order: every
    normalised map is rounded to a multiple of ``2**-24`` (finer than float32
    resolution near 1), and float64 sums of fewer than ``2**29`` such values
    are exact. Raw maps (``normalize=None``) merge exactly in count and
    maximum, and in sum and mean up to float64 rounding.

    Parameters
    ----------
    reduction
        ``"mean"`` (default), ``"max"`` or ``"sum"``.
    normalize
        ``"minmax"`` (default) scales every map to ``[0, 1]`` before it is merged, so that
        each input weighs the same; ``None`` merges raw maps.
    dims
        Number of trailing dimensions of one map. Default 2 (images).

    Examples
    --------
    >>> import torch, efmap
    >>> acc = efmap.HeatMapAccumulator()
    >>> acc.update(torch.tensor([[[0.0, 2.0]], [[4.0, 0.0]]]), labels=[0, 1])
    >>> acc.class_maps()[0]
    tensor([[0., 1.]], dtype=torch.float64)
    >>> acc.overall()
    tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """

    def __init__(
        self, reduction: Reduction = "mean", *, normalize: Literal["minmax"] | None = "minmax", dims: int = 2
    ) -> None:
        if reduction not in ("mean", "max", "sum"):
            raise ValueError(f"Expected `reduction` to be 'mean', 'max' or 'sum', but got {reduction!r}.")
        if normalize not in ("minmax", None):
            raise ValueError(f"Expected `normalize` to be 'minmax' or None, but got {normalize!r}.")
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise ValueError(f"Expected `dims` to be a positive integer, but got {dims!r}.")
        self.reduction: Reduction = reduction
        self.normalize = normalize
        self.dims = dims
        self._count: dict[int, int] = {}
        self._sum: dict[int, torch.Tensor] = {}
        self._max: dict[int, torch.Tensor] = {}
        self._shape: tuple[int, ...] | None = None

    @property
    def counts(self) -> dict[int, int]:
        """Number of maps merged per class."""
        return dict(sorted(self._count.items()))

    def update(self, maps: torch.Tensor, labels: int | Sequence[int] | torch.Tensor) -> None:
        """Add a batch of maps ``(N, *map_shape)`` with one class label per map.

        A tensor with exactly ``dims`` dimensions is read as one map with one label.

        Raises
        ------
        ValueError
            If the map shape differs from earlier maps, or ``labels`` does not have one
            non-negative integer per map.
        """
        check_floating(maps, "maps")
        if maps.dim() == self.dims:
            count = 1 if isinstance(labels, int) else int(torch.as_tensor(labels).numel())
            if count != 1:
                hint = (
                    f" For a batch of {self.dims - 1}-dimensional maps, such as tabular maps (N, F), create the "
                    f"accumulator with dims={self.dims - 1}."
                    if self.dims > 1
                    else ""
                )
                raise ValueError(
                    f"Expected one label for a single map of shape {tuple(maps.shape)}, but got {count}: a tensor "
                    f"with exactly dims={self.dims} dimensions is read as one map.{hint}"
                )
            maps = maps.unsqueeze(0)
        if maps.dim() != self.dims + 1:
            raise ValueError(
                f"Expected `maps` of shape (N, *map_shape) with {self.dims} map dimension(s), "
                f"but got shape {tuple(maps.shape)}."
            )
        check_finite(maps, "maps")
        label_tensor = _as_labels(labels, maps.shape[0])
        shape = tuple(maps.shape[1:])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"Expected maps of shape {self._shape} like the earlier ones, but got {shape}.")
        self._shape = shape

        if self.normalize == "minmax":
            with warnings.catch_warnings():
                # A constant map becomes zeros; when merging that is a valid contribution, not a mistake.
                warnings.simplefilter("ignore", EfmapWarning)
                maps = minmax(maps.detach().to(device="cpu", dtype=torch.float64), dims=self.dims)
            maps = torch.round(maps * _GRID_STEPS) / _GRID_STEPS
        maps = maps.detach().to(device="cpu", dtype=torch.float64)
        for label in torch.unique(label_tensor).tolist():
            selected = maps[label_tensor == label]
            self._add(int(label), selected.shape[0], selected.sum(dim=0), selected.amax(dim=0))

    def merge(self, other: HeatMapAccumulator) -> HeatMapAccumulator:
        """Add the state of ``other`` to this accumulator and return this accumulator.

        Raises
        ------
        ValueError
            If the two differ in reduction, normalisation or map shape.
        """
        if not isinstance(other, HeatMapAccumulator):
            raise TypeError(f"Expected a HeatMapAccumulator to merge, but got {type(other).__name__}.")
        settings = (self.reduction, self.normalize, self.dims)
        other_settings = (other.reduction, other.normalize, other.dims)
        if settings != other_settings:
            raise ValueError(
                f"Cannot merge accumulators with different settings (reduction, normalize, dims): "
                f"{settings} and {other_settings}."
            )
        if self._shape is not None and other._shape is not None and self._shape != other._shape:
            raise ValueError(f"Cannot merge accumulators of map shapes {self._shape} and {other._shape}.")
        self._shape = self._shape or other._shape
        for label in other._count:
            self._add(label, other._count[label], other._sum[label], other._max[label])
        return self

    def class_maps(self) -> dict[int, torch.Tensor]:
        """Return the merged map of every class seen, keyed by class label, as float64."""
        return {label: self._reduce(label) for label in sorted(self._count)}

    def overall(self, over: Literal["classes", "inputs"] = "classes") -> torch.Tensor:
        """Return one map merged over everything seen.

        ``over="classes"`` (default) combines the class maps with the reduction, so each class
        weighs the same; ``over="inputs"`` combines all maps directly, so each input weighs the same.

        Raises
        ------
        ValueError
            If no map has been added yet.
        """
        if not self._count:
            raise ValueError("No maps have been added yet; call update() first.")
        if over not in ("classes", "inputs"):
            raise ValueError(f"Expected `over` to be 'classes' or 'inputs', but got {over!r}.")
        if over == "classes":
            stacked = torch.stack(list(self.class_maps().values()))
            if self.reduction == "max":
                return stacked.amax(dim=0)
            return stacked.sum(dim=0) if self.reduction == "sum" else stacked.mean(dim=0)
        if self.reduction == "max":
            return torch.stack(list(self._max.values())).amax(dim=0)
        total = torch.stack(list(self._sum.values())).sum(dim=0)
        return total if self.reduction == "sum" else total / sum(self._count.values())

    def state_dict(self) -> dict[str, Any]:
        """Return the full state as tensors and plain values, loadable with ``torch.load(weights_only=True)``."""
        labels = sorted(self._count)
        empty = torch.zeros((0, *(self._shape or ())), dtype=torch.float64)
        return {
            "reduction": self.reduction,
            "normalize": self.normalize,
            "dims": self.dims,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "counts": torch.tensor([self._count[k] for k in labels], dtype=torch.int64),
            "sums": torch.stack([self._sum[k] for k in labels]) if labels else empty,
            "maxima": torch.stack([self._max[k] for k in labels]) if labels else empty,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state with one from :meth:`state_dict`, checking that the settings match."""
        settings = (state.get("reduction"), state.get("normalize"), state.get("dims"))
        if settings != (self.reduction, self.normalize, self.dims):
            raise ValueError(
                f"Expected a state with settings (reduction, normalize, dims) = "
                f"{(self.reduction, self.normalize, self.dims)}, but got {settings}."
            )
        self._count, self._sum, self._max = {}, {}, {}
        sums = state["sums"]
        self._shape = tuple(sums.shape[1:]) if sums.shape[0] else None
        for i, label in enumerate(state["labels"].tolist()):
            self._count[label] = int(state["counts"][i])
            self._sum[label] = state["sums"][i].clone().to(torch.float64)
            self._max[label] = state["maxima"][i].clone().to(torch.float64)

    def _add(self, label: int, count: int, total: torch.Tensor, maximum: torch.Tensor) -> None:
        if label in self._count:
            self._count[label] += count
            self._sum[label] = self._sum[label] + total
            self._max[label] = torch.maximum(self._max[label], maximum)
        else:
            self._count[label] = count
            self._sum[label] = total.clone()
            self._max[label] = maximum.clone()

    def _reduce(self, label: int) -> torch.Tensor:
        if self.reduction == "max":
            return self._max[label].clone()
        if self.reduction == "sum":
            return self._sum[label].clone()
        return self._sum[label] / self._count[label]


def _as_labels(labels: int | Sequence[int] | torch.Tensor, count: int) -> torch.Tensor:
    if isinstance(labels, bool):
        raise TypeError(f"Expected `labels` to be integer class labels, but got {labels!r}.")
    tensor = check_labels(torch.full((count,), labels) if isinstance(labels, int) else labels, count, "map")
    if count and int(tensor.min()) < 0:
        raise ValueError(f"Expected non-negative class labels, but got {int(tensor.min())}.")
    return tensor
