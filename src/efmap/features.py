"""Splitting of inputs into features: pixels, square patches or an integer feature mask.

A feature is the set of input elements that are reversed together. The layout
assigns every element a dense feature index ``0 .. F - 1``; elements with the
same index form one feature. Maps come back in the layout's per-sample shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["FeatureLayout", "pixel_layout", "patch_layout", "mask_layout", "perturb_chunk"]


@dataclass(frozen=True)
class FeatureLayout:
    """Assignment of input elements to features.

    Attributes
    ----------
    index
        Dense feature indices, int64, shape ``(M, *S)`` where ``M`` is 1 (one
        layout for every input) or ``N`` (one per input), and ``S`` is the
        per-sample input shape with leading singleton dimensions where the
        mask is broadcast, for example ``(1, 1, H, W)`` for pixels of a
        ``(N, C, H, W)`` batch.
    map_shape
        Per-sample shape of the maps, for example ``(H, W)``.
    feature_ids
        The original id of every dense index, int64, shape ``(F,)``, sorted.
    """

    index: torch.Tensor
    map_shape: tuple[int, ...]
    feature_ids: torch.Tensor

    @property
    def num_features(self) -> int:
        """Number of features ``F``."""
        return int(self.feature_ids.numel())

    def to_map(self, values: torch.Tensor) -> torch.Tensor:
        """Spread per-feature values ``(N, ..., F)`` onto maps ``(N, ..., *map_shape)``."""
        # Singleton dimensions add no elements, so the flattened index has exactly one entry per map element.
        flat_index = self.index.reshape(self.index.shape[0], -1)
        map_size = flat_index.shape[1]
        batch = values.shape[0]
        middle = values.shape[1:-1]
        if flat_index.shape[0] == 1:
            gathered = values[..., flat_index[0]]
        else:
            expanded = flat_index.reshape(batch, *([1] * len(middle)), map_size).expand(batch, *middle, map_size)
            gathered = torch.gather(values, -1, expanded)
        return gathered.reshape(batch, *middle, *self.map_shape)


def pixel_layout(height: int, width: int, ndim: int, device: torch.device | None = None) -> FeatureLayout:
    """Build one feature per spatial position, all channels reversed together.

    ``ndim`` is the number of per-sample dimensions of the input (3 for ``(C, H, W)``).

    Examples
    --------
    >>> from efmap.features import pixel_layout
    >>> layout = pixel_layout(2, 3, ndim=3)
    >>> layout.num_features, layout.map_shape, tuple(layout.index.shape)
    (6, (2, 3), (1, 1, 2, 3))
    """
    ids = torch.arange(height * width, device=device, dtype=torch.int64).reshape(height, width)
    return _from_dense(ids, ndim)


def patch_layout(
    height: int, width: int, patch_size: int, ndim: int, device: torch.device | None = None
) -> FeatureLayout:
    """Build one feature per square patch of ``patch_size`` pixels a side.

    Patches are laid out row by row from the top left corner; where the size
    does not divide the image, the last row and column of patches are smaller.

    Raises
    ------
    ValueError
        If ``patch_size`` is not a positive integer or exceeds the image size.

    Examples
    --------
    >>> from efmap.features import patch_layout
    >>> patch_layout(3, 4, patch_size=2, ndim=3).index[0, 0]
    tensor([[0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 3, 3]])
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"Expected `patch_size` to be a positive integer, but got {patch_size!r}.")
    if patch_size > max(height, width):
        raise ValueError(
            f"Expected `patch_size` to be at most the image size {height}x{width}, but got {patch_size}."
        )
    columns = -(-width // patch_size)
    rows = torch.arange(height, device=device) // patch_size
    cols = torch.arange(width, device=device) // patch_size
    ids = rows[:, None] * columns + cols[None, :]
    return _from_dense(ids.to(torch.int64), ndim)


def mask_layout(feature_mask: torch.Tensor, input_shape: tuple[int, ...]) -> FeatureLayout:
    """Build a layout from an integer mask in which equal ids form one feature.

    The mask either has the input's number of dimensions, with a batch size
    of 1 or ``N``, or fewer dimensions and then applies to every input. Its
    per-sample part must broadcast to the per-sample input shape, aligned on
    the right as in NumPy.

    Raises
    ------
    TypeError
        If ``feature_mask`` is not an integer tensor.
    ValueError
        If its batch size or per-sample shape does not fit ``input_shape``.

    Examples
    --------
    >>> import torch
    >>> from efmap.features import mask_layout
    >>> layout = mask_layout(torch.tensor([7, 7, 3, 9]), input_shape=(5, 4))
    >>> layout.num_features, layout.map_shape, layout.feature_ids
    (3, (4,), tensor([3, 7, 9]))
    """
    if isinstance(feature_mask, np.ndarray):
        feature_mask = torch.from_numpy(feature_mask)
    if not isinstance(feature_mask, torch.Tensor):
        raise TypeError(
            f"Expected `feature_mask` to be an integer torch.Tensor, but got {type(feature_mask).__name__}."
        )
    if feature_mask.is_floating_point() or feature_mask.is_complex() or feature_mask.dtype == torch.bool:
        raise TypeError(
            f"Expected `feature_mask` to have an integer dtype, but got {feature_mask.dtype}. "
            "Use feature_mask.long() if it holds whole numbers."
        )

    batch = input_shape[0]
    sample_shape = input_shape[1:]
    if feature_mask.dim() == len(input_shape):
        if feature_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"Expected `feature_mask` with a batch dimension to have batch size 1 or {batch}, "
                f"but got shape {tuple(feature_mask.shape)} for inputs of shape {tuple(input_shape)}."
            )
        mask = feature_mask
    elif feature_mask.dim() < len(input_shape):
        mask = feature_mask.unsqueeze(0)
    else:
        raise ValueError(
            f"Expected `feature_mask` to have at most {len(input_shape)} dimensions, but got shape "
            f"{tuple(feature_mask.shape)} for inputs of shape {tuple(input_shape)}."
        )

    per_sample = tuple(mask.shape[1:])
    aligned = sample_shape[len(sample_shape) - len(per_sample) :]
    if any(size not in (1, full) for size, full in zip(per_sample, aligned)):
        raise ValueError(
            f"Expected `feature_mask` to broadcast to the per-sample input shape {tuple(sample_shape)}, "
            f"but got shape {tuple(feature_mask.shape)}. Give it shape {tuple(sample_shape)}, a suffix of it, "
            "or size 1 where all elements along a dimension form one feature."
        )

    feature_ids, inverse = torch.unique(mask, sorted=True, return_inverse=True)
    padded = inverse.reshape(mask.shape[0], *([1] * (len(sample_shape) - len(per_sample))), *per_sample)
    return FeatureLayout(index=padded.to(torch.int64), map_shape=per_sample, feature_ids=feature_ids.to(torch.int64))


def perturb_chunk(
    inputs: torch.Tensor,
    reversed_inputs: torch.Tensor,
    layout: FeatureLayout,
    start: int,
    stop: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Build perturbed copies ``start`` to ``stop - 1`` of the flattened (input, feature) grid.

    Copy ``g`` is input ``g // F`` with feature ``g % F`` taken from
    ``reversed_inputs`` and every other element from ``inputs``. Only these
    ``stop - start`` copies are ever materialised. ``out`` may supply a buffer
    of at least that many rows to write into.

    Examples
    --------
    >>> import torch
    >>> from efmap.features import perturb_chunk, pixel_layout
    >>> inputs = torch.zeros(1, 1, 2, 2)
    >>> copies = perturb_chunk(inputs, inputs - 1, pixel_layout(2, 2, ndim=3), start=0, stop=2)
    >>> copies[:, 0]
    tensor([[[-1.,  0.],
             [ 0.,  0.]],
    <BLANKLINE>
            [[ 0., -1.],
             [ 0.,  0.]]])
    """
    num_features = layout.num_features
    flat = torch.arange(start, stop, device=inputs.device)
    sample = flat // num_features
    feature = flat % num_features
    index = layout.index[sample] if layout.index.shape[0] > 1 else layout.index
    selected = index == feature.view(-1, *([1] * (layout.index.dim() - 1)))
    target = None if out is None else out[: stop - start]
    if target is None:
        return torch.where(selected, reversed_inputs[sample], inputs[sample])
    return torch.where(selected, reversed_inputs[sample], inputs[sample], out=target)


def _from_dense(ids: torch.Tensor, ndim: int) -> FeatureLayout:
    height, width = ids.shape
    index = ids.reshape(1, *([1] * (ndim - 2)), height, width)
    count = int(ids.max()) + 1
    return FeatureLayout(index=index, map_shape=(height, width), feature_ids=torch.arange(count, device=ids.device))
