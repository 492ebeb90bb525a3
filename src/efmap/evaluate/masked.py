"""Masked accuracy: landmarks kept, landmarks removed, random masks of the same size, and a centered box."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from efmap._checks import (
    check_batch_size,
    check_finite,
    check_floating,
    check_in_range,
    check_labels,
    check_value_range,
)
from efmap._model import OutputFn, evaluation_mode, model_device_dtype, read_scores
from efmap._typing import Model, ValueRange
from efmap.evaluate.fills import EvalFill, Filler, describe_fill
from efmap.landmarks import Landmarks, _check_mask_shape

__all__ = ["MaskedAccuracy", "accuracy", "centered_box", "masked_accuracy"]


@dataclass(frozen=True)
class MaskedAccuracy:
    """Accuracy of a model on full inputs and on inputs with features removed by a mask.

    Attributes
    ----------
    full
        Accuracy on the unmodified inputs.
    landmarks
        Accuracy with every feature outside the landmarks filled (landmarks kept).
    random
        Accuracy for each seeded random mask that keeps as many features, shape ``(num_random,)``.
    kept
        Number of kept features.
    total
        Number of features in the mask.
    removed
        Accuracy with the landmarks themselves filled and every other feature kept (the inverse mask).
    box
        Accuracy with only a centered box of ``kept`` features kept (see :func:`centered_box`).
    fill
        Short name of the fill used for every removed feature.
    """

    full: float
    landmarks: float
    random: torch.Tensor
    kept: int
    total: int
    removed: float = math.nan
    box: float = math.nan
    fill: str = "constant(0)"

    @property
    def fraction(self) -> float:
        """Kept features as a fraction of all features."""
        return self.kept / self.total

    @property
    def random_mean(self) -> float:
        """Mean accuracy over the random masks."""
        return float(self.random.mean()) if self.random.numel() else math.nan

    @property
    def random_std(self) -> float:
        """Sample standard deviation of the accuracy over the random masks (0 for a single mask)."""
        return float(self.random.std()) if self.random.numel() > 1 else 0.0

    def table(self) -> str:
        """Return the results as a plain-text table."""
        removed_fraction = (self.total - self.kept) / self.total
        rows = [
            ("full input", f"{self.full:.4f}", f"{self.total}", "1.0000"),
            ("landmarks only", f"{self.landmarks:.4f}", f"{self.kept}", f"{self.fraction:.4f}"),
            (
                f"random masks (n={self.random.numel()})",
                f"{self.random_mean:.4f} +/- {self.random_std:.4f}" if self.random.numel() else "not measured",
                f"{self.kept}",
                f"{self.fraction:.4f}",
            ),
            ("centered box", f"{self.box:.4f}", f"{self.kept}", f"{self.fraction:.4f}"),
            ("landmarks removed", f"{self.removed:.4f}", f"{self.total - self.kept}", f"{removed_fraction:.4f}"),
        ]
        header = ("input", "accuracy", "kept features", "kept fraction")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append(f"removed features filled with {self.fill}")
        return "\n".join(lines)


def accuracy(
    model: Model,
    inputs: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 256,
    output_fn: OutputFn | None = None,
) -> float:
    """Return the fraction of ``inputs`` whose predicted class (the arg max of the scores) equals ``labels``.

    Parameters
    ----------
    model
        Classifier from ``(N, ...)`` to class scores ``(N, K)``; put in eval mode for the call.
    inputs
        Floating tensor ``(N, ...)``, moved to the model's device and dtype batch by batch.
    labels
        True class per input, ``N`` integers.
    batch_size
        Inputs per forward pass. Default 256.
    output_fn
        Picks the class scores from a model that returns a tuple or dict.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``; 0.0 for an empty batch.

    Raises
    ------
    TypeError
        If ``inputs`` is not floating point, ``labels`` are not integers, or the model output is not a tensor.
    ValueError
        If ``inputs`` contains NaN or infinity, ``labels`` does not have one entry per input or
        names a class the model does not have, or ``batch_size`` is not a positive integer.

    Examples
    --------
    >>> import torch, efmap
    >>> model = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
    >>> efmap.accuracy(model.eval(), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [0, 1, 1])
    0.6666666666666666
    """
    check_floating(inputs, "inputs")
    check_finite(inputs, "inputs")
    label_tensor = check_labels(labels, inputs.shape[0], "input")
    batch_size = check_batch_size(batch_size)
    device, dtype = model_device_dtype(model)

    correct = 0
    with evaluation_mode(model), torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size].to(device=device or inputs.device, dtype=dtype or inputs.dtype)
            scores = read_scores(model(chunk), output_fn, chunk.shape[0], check=start == 0)
            if start == 0:
                _check_label_range(label_tensor, scores.shape[1])
            predicted = scores.argmax(dim=1).cpu()
            correct += int((predicted == label_tensor[start : start + chunk.shape[0]]).sum())
    return correct / max(inputs.shape[0], 1)


def centered_box(shape: Sequence[int], count: int) -> torch.Tensor:
    """Build a mask that keeps the ``count`` features nearest to the center, in a box of the map's aspect ratio.

    Features are ranked by their largest per-axis distance from the center, each axis
    scaled by its length, so the kept region is a box with the proportions of the map.
    When ``count`` does not fill a whole box, the outermost ring is filled from the
    features nearest to the center (Euclidean distance), then in row-major order. The
    mask keeps exactly ``count`` features.

    Parameters
    ----------
    shape
        Map shape, for example ``(H, W)``.
    count
        Number of kept features, between 0 and the number of features.

    Returns
    -------
    torch.Tensor
        Boolean mask of ``shape``.

    Raises
    ------
    ValueError
        If ``count`` is outside ``[0, prod(shape)]`` or ``shape`` has a non-positive size.

    Examples
    --------
    >>> from efmap.evaluate import centered_box
    >>> centered_box((4, 4), 4).int()
    tensor([[0, 0, 0, 0],
            [0, 1, 1, 0],
            [0, 1, 1, 0],
            [0, 0, 0, 0]], dtype=torch.int32)
    """
    sizes = tuple(int(size) for size in shape)
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"Expected `shape` to hold positive sizes, but got {tuple(shape)}.")
    total = math.prod(sizes)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= total:
        raise ValueError(f"Expected `count` between 0 and {total} for shape {sizes}, but got {count!r}.")

    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in sizes), indexing="ij")
    scaled = [(axis - (size - 1) / 2).abs() / size for axis, size in zip(axes, sizes, strict=True)]
    chebyshev = torch.stack(scaled).amax(dim=0).flatten()
    euclidean = torch.stack(scaled).pow(2).sum(dim=0).flatten()
    # Two stable sorts: the second key (Euclidean) first, then the primary key (per-axis maximum).
    order = torch.sort(euclidean, stable=True).indices
    order = order[torch.sort(chebyshev[order], stable=True).indices]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[order[:count]] = True

    return mask.reshape(sizes)


def masked_accuracy(
    model: Model,
    inputs: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    landmarks: Landmarks | torch.Tensor,
    *,
    fill: EvalFill = 0.0,
    num_random: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    value_range: ValueRange = (-1.0, 1.0),
    output_fn: OutputFn | None = None,
) -> MaskedAccuracy:
    """Measure how much accuracy the landmarks keep, against controls that keep or remove as many features.

    Five accuracies are measured, with the same ``fill`` for every removed feature. They
    are the accuracy on the full inputs, with only the landmarks kept, with the landmarks
    removed (the inverse mask), with ``num_random`` random masks that keep as many
    features, and with a centered box that keeps as many features. The random masks are
    the honest control: if they keep as much accuracy as the landmarks, the landmarks
    carry no special information. The box shows whether "the middle of the image" alone
    would do as well.

    Parameters
    ----------
    model
        Classifier from ``(N, ...)`` to class scores ``(N, K)``.
    inputs
        Floating tensor ``(N, ..., *mask_shape)``, for example ``(N, C, H, W)``.
    labels
        True class per input, ``N`` integers.
    landmarks
        :class:`~efmap.landmarks.Landmarks` or a boolean mask of kept features, for example ``(H, W)``.
    fill
        Value of removed features: a number (default 0.0), ``"reverse"``, ``"blur"`` or
        :class:`~efmap.evaluate.fills.Blur`, ``"road"`` or :class:`~efmap.evaluate.fills.NoisyImputation`,
        or a tensor; see :func:`~efmap.evaluate.fills.fill_removed`.
    num_random
        Number of random masks, each drawn uniformly among masks that keep the same number
        of features. Default 10.
    seed
        Seed of the random masks; draw ``i`` uses ``seed + i``.
    batch_size
        Inputs per forward pass.
    value_range
        Input range, used by ``fill="reverse"`` and the imputation.
    output_fn
        Picks the class scores from a model that returns a tuple or dict.

    Returns
    -------
    MaskedAccuracy
        The accuracies, the kept count and fraction; ``table()`` formats them.

    Raises
    ------
    TypeError
        If ``inputs`` is not floating point, the mask is not boolean or ``fill`` has an unknown type.
    ValueError
        If ``labels`` does not have one entry per input, the mask shape does not match the
        inputs, ``fill`` is invalid for these inputs, or ``num_random`` is negative.

    Examples
    --------
    >>> import torch, efmap
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> inputs = torch.rand(6, 1, 2, 2) * 2 - 1
    >>> mask = torch.tensor([[True, False], [False, False]])
    >>> result = efmap.masked_accuracy(model, inputs, [0, 1, 0, 1, 0, 1], mask, num_random=3)
    >>> result.kept, result.total, result.random.shape
    (1, 4, torch.Size([3]))
    """
    mask = landmarks.mask if isinstance(landmarks, Landmarks) else landmarks
    check_floating(inputs, "inputs")
    check_finite(inputs, "inputs")
    check_in_range(inputs, "inputs", check_value_range(value_range), strict=False)
    check_labels(labels, inputs.shape[0], "input")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"Expected `mask` to be a boolean tensor, but got {getattr(mask, 'dtype', type(mask))}.")
    _check_mask_shape(inputs[:1], mask)
    if isinstance(num_random, bool) or not isinstance(num_random, int) or num_random < 0:
        raise ValueError(f"Expected `num_random` to be a non-negative integer, but got {num_random!r}.")
    # Building the filler validates the fill and computes the blurred or reversed inputs once.
    filler = Filler(inputs, fill, value_range=value_range, map_dims=mask.dim())
    rows = torch.arange(inputs.shape[0])

    def score(kept: torch.Tensor) -> float:
        return accuracy(model, filler(rows, kept.to(inputs.device)), labels, batch_size=batch_size, output_fn=output_fn)

    kept = int(mask.sum())
    random_scores = []
    for draw in range(num_random):
        generator = torch.Generator().manual_seed(seed + draw)
        order = torch.randperm(mask.numel(), generator=generator)
        random_mask = torch.zeros(mask.numel(), dtype=torch.bool)
        random_mask[order[:kept]] = True
        random_scores.append(score(random_mask.reshape(mask.shape)))

    return MaskedAccuracy(
        full=accuracy(model, inputs, labels, batch_size=batch_size, output_fn=output_fn),
        landmarks=score(mask),
        random=torch.tensor(random_scores, dtype=torch.float64),
        kept=kept,
        total=mask.numel(),
        removed=score(~mask),
        box=score(centered_box(tuple(mask.shape), kept)),
        fill=describe_fill(fill),
    )


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(
            f"Expected `labels` in [0, {num_classes - 1}] for a model with {num_classes} outputs, but got {bad}."
        )

