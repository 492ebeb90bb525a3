"""Deletion and insertion curves: the target score as features are removed or added in order of importance."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from efmap._checks import check_batch_size, check_finite, check_floating, check_value_range
from efmap._model import OutputFn, evaluation_mode, model_device_dtype, read_scores
from efmap._progress import Progress
from efmap._typing import Model, ProgressType, TargetType, ValueRange
from efmap.evaluate.fills import EvalFill, Filler, describe_fill
from efmap.scoring import _resolve_target

__all__ = ["PerturbationCurves", "curve_area", "feature_ranks", "perturbation_curves"]


@dataclass(frozen=True)
class PerturbationCurves:
    """Deletion and insertion curves of ``N`` inputs, for one map order and for random orders.

    Attributes
    ----------
    fractions
        Fraction of features removed (deletion) or inserted (insertion) at each step,
        float64, shape ``(steps + 1,)``, from 0 to 1.
    deletion
        Target score after each deletion step, shape ``(N, steps + 1)``: the most important
        features are removed first, so a faithful map gives a curve that falls fast.
    insertion
        Target score after each insertion step, shape ``(N, steps + 1)``: starting from a fully
        filled input, the most important features come back first, so a faithful map gives a
        curve that rises fast.
    random_deletion, random_insertion
        The same curves for seeded random orders, shape ``(num_random, N, steps + 1)``.
    target
        Class whose score is read, per input, shape ``(N,)``.
    fill
        Short name of the fill of removed features.
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    random_deletion: torch.Tensor
    random_insertion: torch.Tensor
    target: torch.Tensor
    fill: str

    @property
    def deletion_area(self) -> torch.Tensor:
        """Area under each deletion curve, shape ``(N,)``; lower is better."""
        return curve_area(self.fractions, self.deletion)

    @property
    def insertion_area(self) -> torch.Tensor:
        """Area under each insertion curve, shape ``(N,)``; higher is better."""
        return curve_area(self.fractions, self.insertion)

    @property
    def random_deletion_area(self) -> torch.Tensor:
        """Area under each random-order deletion curve, shape ``(num_random, N)``."""
        return curve_area(self.fractions, self.random_deletion)

    @property
    def random_insertion_area(self) -> torch.Tensor:
        """Area under each random-order insertion curve, shape ``(num_random, N)``."""
        return curve_area(self.fractions, self.random_insertion)

    def summary(self) -> dict[str, float]:
        """Return mean areas over the inputs; for random orders also the spread over draws.

        Keys: ``deletion``, ``insertion``, ``random_deletion``, ``random_deletion_std``,
        ``random_insertion`` and ``random_insertion_std``. The spread is the sample standard
        deviation of the per-draw means: 0 for one draw, NaN without random draws.
        """
        result = {"deletion": float(self.deletion_area.mean()), "insertion": float(self.insertion_area.mean())}
        for name, areas in (
            ("random_deletion", self.random_deletion_area),
            ("random_insertion", self.random_insertion_area),
        ):
            per_draw = areas.mean(dim=1)
            draws = per_draw.numel()
            result[name] = float(per_draw.mean()) if draws else math.nan
            if draws > 1:
                result[f"{name}_std"] = float(per_draw.std())
            else:
                result[f"{name}_std"] = 0.0 if draws else math.nan
        return result


def curve_area(fractions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Integrate curves over the fraction of features with the trapezoidal rule.

    The horizontal axis runs from 0 to 1, so the area is the mean height of the curve,
    in the units of the score (a probability with ``softmax=True``).

    Parameters
    ----------
    fractions
        Increasing positions in ``[0, 1]``, shape ``(S,)``.
    values
        Curve heights, shape ``(..., S)``.

    Returns
    -------
    torch.Tensor
        Areas, shape ``(...)``, float64.

    Raises
    ------
    ValueError
        If the last dimension of ``values`` does not match ``fractions``.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import curve_area
    >>> curve_area(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0]))
    tensor(0.5000, dtype=torch.float64)
    """
    if values.shape[-1] != fractions.shape[-1]:
        raise ValueError(
            f"Expected `values` with {fractions.shape[-1]} points in the last dimension to match `fractions`, "
            f"but got shape {tuple(values.shape)}."
        )
    return torch.trapezoid(values.to(torch.float64), fractions.to(torch.float64), dim=-1)


def feature_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank the features of each map from the most important (0) to the least.

    Ties keep row-major order, so the ranking is deterministic.

    Parameters
    ----------
    maps
        Floating tensor ``(N, *map_shape)``.

    Returns
    -------
    torch.Tensor
        Ranks, int64, shape ``(N, F)`` with ``F = prod(map_shape)``.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import feature_ranks
    >>> feature_ranks(torch.tensor([[0.2, 0.9, 0.2, 0.5]]))
    tensor([[2, 0, 3, 1]])
    """
    flat = maps.reshape(maps.shape[0], -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def perturbation_curves(
    model: Model,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    *,
    target: TargetType = None,
    steps: int = 20,
    fill: EvalFill = 0.0,
    num_random: int = 0,
    seed: int = 0,
    softmax: bool = True,
    batch_size: int = 64,
    value_range: ValueRange = (-1.0, 1.0),
    output_fn: OutputFn | None = None,
    progress: ProgressType = False,
) -> PerturbationCurves:
    """Compute deletion and insertion curves of attribution maps, and the same curves for random orders.

    Features are ranked by their map value, highest first. At step ``s`` of ``steps``,
    the top ``round(s / steps * F)`` features are removed (deletion: the rest stays) or
    are the only ones present (insertion: the rest is filled), and the model's score
    for the target class is read. A map that orders features by what the model uses
    gives a deletion curve that falls fast (small area) and an insertion curve that
    rises fast (large area). Random orders are the reference a map has to beat.

    Parameters
    ----------
    model
        Classifier from ``(N, ...)`` to class scores ``(N, K)``.
    inputs
        Floating tensor ``(N, ..., *map_shape)``, for example ``(N, C, H, W)``.
    maps
        Importance of every feature, ``(N, *map_shape)``, for example ``(N, H, W)``; higher
        means more important. For one shared map use ``map.expand(N, *map.shape)``.
    target
        Class whose score is read: an int, or one per input. Default: the class predicted on
        each clean input.
    steps
        Number of steps from 0 to all features. Default 20.
    fill
        How removed features are filled, as in :func:`~efmap.evaluate.fills.fill_removed`: a number
        (default 0.0), ``"reverse"``, ``"blur"``, ``"road"`` for noisy linear imputation, or a tensor.
    num_random
        Number of random orders, each a seeded uniform permutation per input. Default 0.
    seed
        Seed of the random orders.
    softmax
        Read class probabilities (softmax over the classes) rather than raw scores. Default True.
    batch_size
        Modified copies per forward pass; at most this many exist at once, as in :func:`~efmap.scoring.explain`.
    value_range
        Input range, used by ``fill="reverse"`` and the imputation.
    output_fn
        Picks the class scores from a model that returns a tuple or dict.
    progress
        ``True`` shows a tqdm bar; a callable receives ``(done, total)`` after every batch.

    Returns
    -------
    PerturbationCurves
        Curves of shape ``(N, steps + 1)``, random ones ``(num_random, N, steps + 1)``, and their areas.

    Raises
    ------
    TypeError
        If ``inputs`` or ``maps`` are not floating point, or ``fill`` has an unknown type.
    ValueError
        If ``maps`` does not have the shape ``(N, *map_shape)`` of the inputs, or ``target`` does not
        have one entry per input. Also if ``steps`` is not between 1 and the number of features, the
        model has a single output with ``softmax=True``, or another option is invalid.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import perturbation_curves
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> inputs = torch.rand(3, 1, 2, 2) * 2 - 1
    >>> curves = perturbation_curves(model, inputs, torch.rand(3, 2, 2), steps=4, num_random=2)
    >>> curves.deletion.shape, curves.random_deletion.shape
    (torch.Size([3, 5]), torch.Size([2, 3, 5]))
    """
    check_floating(inputs, "inputs")
    check_floating(maps, "maps")
    check_maps_shape(inputs, maps)
    check_finite(maps, "maps")
    batch_size = check_batch_size(batch_size)
    value_range = check_value_range(value_range)
    num_features = math.prod(maps.shape[1:])
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max(num_features, 1):
        raise ValueError(f"Expected `steps` between 1 and the number of features ({num_features}), but got {steps!r}.")
    if isinstance(num_random, bool) or not isinstance(num_random, int) or num_random < 0:
        raise ValueError(f"Expected `num_random` to be a non-negative integer, but got {num_random!r}.")

    device, dtype = model_device_dtype(model)
    inputs = inputs.to(device=device or inputs.device, dtype=dtype or inputs.dtype)
    filler = Filler(inputs, fill, value_range=value_range, map_dims=maps.dim() - 1)
    count = inputs.shape[0]
    ranks = [feature_ranks(maps.to(inputs.device))]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_random):
        ranks.append(torch.stack([torch.randperm(num_features, generator=generator) for _ in range(count)]))
    all_ranks = torch.stack([rank.to(inputs.device) for rank in ranks])
    counts = torch.tensor([math.floor(s * num_features / steps + 0.5) for s in range(steps + 1)], device=inputs.device)

    with evaluation_mode(model), torch.inference_mode():
        clean = torch.cat(
            [
                read_scores(
                    model(inputs[start : start + batch_size]), output_fn, min(batch_size, count - start), check=True
                )
                for start in range(0, count, batch_size)
            ]
        )
        if softmax and clean.shape[1] < 2:
            raise ValueError(
                "Expected a model with at least two class scores for softmax=True, but it returns one. "
                "Pass softmax=False to read the raw score."
            )
        targets = _resolve_target(target, clean)
        scores = _run_curves(model, output_fn, filler, all_ranks, counts, targets, softmax, batch_size, progress)

    # Layout of `scores`: (kind: deletion then insertion, order: map then random draws, input, step).
    scores = scores.reshape(2, num_random + 1, count, steps + 1).cpu()
    return PerturbationCurves(
        fractions=counts.cpu().to(torch.float64) / max(num_features, 1),
        deletion=scores[0, 0],
        insertion=scores[1, 0],
        random_deletion=scores[0, 1:],
        random_insertion=scores[1, 1:],
        target=targets.cpu(),
        fill=describe_fill(fill),
    )


def _run_curves(
    model: Model,
    output_fn: OutputFn | None,
    filler: Filler,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    targets: torch.Tensor,
    softmax: bool,
    batch_size: int,
    progress: ProgressType,
) -> torch.Tensor:
    """Score every (kind, order, input, step) copy, ``batch_size`` copies at a time; returns a flat tensor."""
    orders, count, _ = ranks.shape
    points = counts.shape[0]
    total = 2 * orders * count * points
    results = []
    bar = Progress(progress, total, "curves")
    try:
        for start in range(0, total, batch_size):
            index = torch.arange(start, min(start + batch_size, total), device=ranks.device)
            step = index % points
            row = (index // points) % count
            order = (index // (points * count)) % orders
            insertion = index // (points * count * orders) == 1
            # Deletion keeps the features ranked at or after the step's count; insertion keeps those before it.
            ahead = ranks[order, row] < counts[step, None]
            keep = torch.where(insertion[:, None], ahead, ~ahead).reshape(index.shape[0], *filler.map_shape)
            output = read_scores(model(filler(row, keep)), output_fn, index.shape[0], check=False)
            if softmax:
                output = torch.softmax(output, dim=1)
            results.append(output.gather(1, targets[row][:, None])[:, 0].clone())
            bar.advance(index.shape[0])
    finally:
        bar.close()
    return torch.cat(results)


def check_maps_shape(inputs: torch.Tensor, maps: torch.Tensor) -> None:
    """Reject maps that are not ``(N, *map_shape)`` with ``map_shape`` the trailing dimensions of ``inputs``."""
    map_dims = maps.dim() - 1
    expected = (inputs.shape[0], *inputs.shape[inputs.dim() - map_dims :]) if 1 <= map_dims < inputs.dim() else None
    if expected is None or tuple(maps.shape) != tuple(expected):
        raise ValueError(
            f"Expected `maps` of shape (N, *map_shape) with N = {inputs.shape[0]} inputs and map_shape the trailing "
            f"dimensions of `inputs` of shape {tuple(inputs.shape)}, but got `maps` of shape {tuple(maps.shape)}."
        )
