"""Comparison of efmap with other attribution methods (Captum) on the same deletion and insertion curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from efmap._checks import check_batch_size, check_floating, check_value_range
from efmap._model import OutputFn, evaluation_mode, model_device_dtype, read_scores
from efmap._typing import Model, ProgressType, TargetType, ValueRange
from efmap.evaluate.curves import PerturbationCurves, check_maps_shape, perturbation_curves
from efmap.evaluate.fills import EvalFill
from efmap.scoring import _resolve_target, explain

__all__ = ["CAPTUM_METHODS", "EFMAP_METHODS", "MethodComparison", "attribution_maps", "compare_methods"]

#: Names of the maps computed by efmap itself, the positive factor read from the new maximum or from the target class.
EFMAP_METHODS = ("efmap-max", "efmap-target")
#: Names of the maps computed with Captum, which are occlusion of 1-pixel windows with a zero baseline,
#: absolute gradients, and integrated gradients from a zero baseline.
CAPTUM_METHODS = ("occlusion", "saliency", "integrated-gradients")


@dataclass(frozen=True)
class MethodComparison:
    """Maps and deletion/insertion curves of several attribution methods on the same inputs.

    Attributes
    ----------
    maps
        Map per method name, shape ``(N, H, W)``.
    curves
        Curves per method name; the random orders are in ``random``.
    random
        Curves holding the random-order draws (the same for every method), or None without draws.
    """

    maps: dict[str, torch.Tensor]
    curves: dict[str, PerturbationCurves]
    random: PerturbationCurves | None

    def table(self) -> str:
        """Return mean areas per method as a plain-text table (spread: std over inputs, or over draws)."""
        header = ("method", "deletion area (lower is better)", "insertion area (higher is better)")
        rows = []
        for name, curves in self.curves.items():
            deletion, insertion = curves.deletion_area, curves.insertion_area
            rows.append((name, _mean_std(deletion), _mean_std(insertion)))
        if self.random is not None and self.random.random_deletion.shape[0]:
            summary = self.random.summary()
            draws = self.random.random_deletion.shape[0]
            rows.append(
                (
                    f"random order (n={draws})",
                    f"{summary['random_deletion']:.4f} +/- {summary['random_deletion_std']:.4f}",
                    f"{summary['random_insertion']:.4f} +/- {summary['random_insertion_std']:.4f}",
                )
            )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


def _mean_std(values: torch.Tensor) -> str:
    spread = float(values.std()) if values.numel() > 1 else 0.0
    return f"{float(values.mean()):.4f} +/- {spread:.4f}"


def attribution_maps(
    model: Model,
    inputs: torch.Tensor,
    *,
    methods: Sequence[str] = EFMAP_METHODS + CAPTUM_METHODS,
    target: TargetType = None,
    batch_size: int = 64,
    value_range: ValueRange = (-1.0, 1.0),
    ig_steps: int = 32,
    output_fn: OutputFn | None = None,
) -> dict[str, torch.Tensor]:
    """Compute one map per pixel and input with efmap and, where Captum is installed, with Captum methods.

    Methods: ``"efmap-max"`` (positive factor, new maximum over all classes),
    ``"efmap-target"`` (positive factor, score of the target class; both from one call
    of :func:`~efmap.scoring.explain`), ``"occlusion"`` (Captum ``Occlusion`` with a zero baseline
    and a window of one pixel across all channels), ``"saliency"`` (Captum ``Saliency``,
    absolute gradients summed over channels) and ``"integrated-gradients"`` (Captum
    ``IntegratedGradients`` from a zero baseline with ``ig_steps`` steps, summed over channels).
    The efmap maps are computed with ``check_range=False``: inputs outside ``value_range`` are
    still rejected, but inputs that use only its upper half are accepted.

    Parameters
    ----------
    model
        Classifier from images ``(N, C, H, W)`` to class scores ``(N, K)``.
    inputs
        Images ``(N, C, H, W)`` in ``value_range``.
    methods
        Names of the methods to run. Default: all five.
    target
        Class to explain: an int, or one per input. Default: the class predicted on each clean input.
    batch_size
        Perturbed copies (efmap, occlusion) or interpolation points (integrated gradients) per forward pass.
    value_range
        Input range for the efmap reversal.
    ig_steps
        Steps of the integrated-gradients path. Default 32.
    output_fn
        Picks the class scores from a model that returns a tuple or dict.

    Returns
    -------
    dict
        Map ``(N, H, W)`` per method name, in the order of ``methods``; higher means more important.

    Raises
    ------
    ImportError
        If a Captum method is requested and Captum is not installed.
    ValueError
        If a method name is unknown, the inputs are not ``(N, C, H, W)``, or ``target`` does not
        have one entry per input.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import attribution_maps
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> maps = attribution_maps(model, torch.rand(2, 1, 2, 2) * 2 - 1, methods=["efmap-max", "efmap-target"])
    >>> {name: tuple(m.shape) for name, m in maps.items()}
    {'efmap-max': (2, 2, 2), 'efmap-target': (2, 2, 2)}
    """
    known = EFMAP_METHODS + CAPTUM_METHODS
    unknown = [name for name in methods if name not in known]
    if unknown or not methods:
        raise ValueError(f"Expected `methods` to be a non-empty selection of {known}, but got {list(methods)!r}.")
    check_floating(inputs, "inputs")
    if inputs.dim() != 4:
        raise ValueError(f"Expected images `inputs` of shape (N, C, H, W), but got {tuple(inputs.shape)}.")
    batch_size = check_batch_size(batch_size)
    value_range = check_value_range(value_range)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"Expected `ig_steps` to be a positive integer, but got {ig_steps!r}.")
    captum = _import_captum() if any(name in CAPTUM_METHODS for name in methods) else None

    device, dtype = model_device_dtype(model)
    inputs = inputs.to(device=device or inputs.device, dtype=dtype or inputs.dtype)
    with evaluation_mode(model), torch.inference_mode():
        clean = read_scores(model(inputs[:batch_size]), output_fn, min(batch_size, inputs.shape[0]), check=True)
        if inputs.shape[0] > batch_size:
            rest = [
                model(inputs[start : start + batch_size]) for start in range(batch_size, inputs.shape[0], batch_size)
            ]
            clean = torch.cat([clean, *(read_scores(out, output_fn, out.shape[0], check=False) for out in rest)])
    targets = _resolve_target(target, clean)

    maps: dict[str, torch.Tensor] = {}
    if any(name in EFMAP_METHODS for name in methods):
        explanation = explain(
            model, inputs, batch_size=batch_size, value_range=value_range, output_fn=output_fn, check_range=False
        )
        change = explanation.output_change.gather(1, targets[:, None, None, None].expand(-1, 1, *inputs.shape[-2:]))
        efmap_maps = {"efmap-max": explanation.positive, "efmap-target": torch.relu(-change[:, 0])}
    for name in methods:
        if name in EFMAP_METHODS:
            maps[name] = efmap_maps[name].detach().cpu()
        else:
            maps[name] = _captum_map(captum, name, model, output_fn, inputs, targets, batch_size, ig_steps).cpu()
    return maps


def _import_captum() -> Any:
    try:
        import captum.attr
    except ImportError as error:
        raise ImportError(
            "Comparing with Occlusion, Saliency and IntegratedGradients needs Captum, which is not installed. "
            "Install it with `pip install efmap[compare]`, or pass methods=('efmap-max', 'efmap-target')."
        ) from error
    return captum.attr


def _captum_map(
    captum: Any,
    name: str,
    model: Model,
    output_fn: OutputFn | None,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    ig_steps: int,
) -> torch.Tensor:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return read_scores(model(x), output_fn, x.shape[0], check=False)

    channels = inputs.shape[1]
    with evaluation_mode(model):
        if name == "occlusion":
            with torch.no_grad():
                attributions = captum.Occlusion(forward).attribute(
                    inputs,
                    sliding_window_shapes=(channels, 1, 1),
                    baselines=0.0,
                    target=targets,
                    perturbations_per_eval=batch_size,
                )
            # Every channel of a window receives the same score change, so the mean is that change.
            # Captum 0.9 returns float32 here even for float64 inputs, so the dtype is restored.
            occlusion: torch.Tensor = attributions.detach().mean(dim=1).to(inputs.dtype)
            return occlusion

        chunks = []
        for start in range(0, inputs.shape[0], batch_size):
            # Gradient methods need an input that requires gradients; the clone keeps the caller's tensor untouched.
            chunk = inputs[start : start + batch_size].detach().clone().requires_grad_(True)
            chunk_targets = targets[start : start + batch_size]
            if name == "saliency":
                attributions = captum.Saliency(forward).attribute(chunk, target=chunk_targets, abs=True)
            else:
                attributions = captum.IntegratedGradients(forward).attribute(
                    chunk,
                    baselines=0.0,
                    target=chunk_targets,
                    n_steps=ig_steps,
                    internal_batch_size=batch_size,
                )
            chunks.append(attributions.detach().sum(dim=1))
        return torch.cat(chunks)


def compare_methods(
    model: Model,
    inputs: torch.Tensor,
    *,
    methods: Sequence[str] = EFMAP_METHODS + CAPTUM_METHODS,
    maps: Mapping[str, torch.Tensor] | None = None,
    target: TargetType = None,
    steps: int = 20,
    fill: EvalFill = 0.0,
    num_random: int = 3,
    seed: int = 0,
    softmax: bool = True,
    batch_size: int = 64,
    value_range: ValueRange = (-1.0, 1.0),
    output_fn: OutputFn | None = None,
    progress: ProgressType = False,
) -> MethodComparison:
    """Compute deletion and insertion curves for several attribution methods, plus random orders, on the same inputs.

    Parameters
    ----------
    model
        Classifier from images ``(N, C, H, W)`` to class scores ``(N, K)``.
    inputs
        Images ``(N, C, H, W)``.
    methods
        Methods to compute with :func:`attribution_maps`; skipped when ``maps`` is given.
    maps
        Precomputed maps ``(N, H, W)`` by method name, for example from :func:`attribution_maps`
        (so that several fills reuse them). Default: computed here.
    target
        Class whose score is read (and explained): an int, or one per input. Default: the predicted class.
    steps, fill, num_random, seed, softmax, batch_size, value_range, output_fn, progress
        As in :func:`~efmap.evaluate.curves.perturbation_curves`. The ``num_random`` random orders are
        drawn once and shared by every method.

    Returns
    -------
    MethodComparison
        Maps, curves per method and the random-order curves; ``table()`` formats the areas.

    Raises
    ------
    ImportError
        If a Captum method is requested and Captum is not installed.
    ValueError
        If a map's shape does not match the inputs, or an option is invalid.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import compare_methods
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> result = compare_methods(model, torch.rand(2, 1, 2, 2) * 2 - 1, methods=["efmap-max"], steps=2, num_random=1)
    >>> sorted(result.curves), result.random.random_deletion.shape
    (['efmap-max'], torch.Size([1, 2, 3]))
    """
    if maps is None:
        maps = attribution_maps(
            model,
            inputs,
            methods=methods,
            target=target,
            batch_size=batch_size,
            value_range=value_range,
            output_fn=output_fn,
        )
    if not maps:
        raise ValueError("Expected at least one map to compare, but got none.")
    for name, method_maps in maps.items():
        try:
            check_maps_shape(inputs, method_maps)
        except ValueError as error:
            raise ValueError(f"Maps of method {name!r}: {error}") from None

    curves = {}
    random = None
    for index, (name, method_maps) in enumerate(maps.items()):
        # The random orders do not depend on the map, so they are drawn once, with the first method.
        curves[name] = perturbation_curves(
            model,
            inputs,
            method_maps,
            target=target,
            steps=steps,
            fill=fill,
            num_random=num_random if index == 0 else 0,
            seed=seed,
            softmax=softmax,
            batch_size=batch_size,
            value_range=value_range,
            output_fn=output_fn,
            progress=progress,
        )
        if index == 0 and num_random:
            random = curves[name]
    return MethodComparison(maps=dict(maps), curves=curves, random=random)
