"""Model-randomization sanity check: whether the maps change when the learned weights are destroyed."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from efmap._checks import check_floating

__all__ = ["RandomizationCheck", "randomization_check", "spearman"]

#: A function from a model and inputs ``(N, ...)`` to maps ``(N, *map_shape)``.
Attribute = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def spearman(first: torch.Tensor, second: torch.Tensor, *, absolute: bool = False) -> torch.Tensor:
    """Compute the Spearman rank correlation between matching maps, one value per map.

    Ties get the mean of the ranks they span, as in ``scipy.stats.spearmanr``.
    A constant map has no ranking, so its correlation is NaN.

    Parameters
    ----------
    first, second
        Floating tensors of the same shape ``(N, *map_shape)``.
    absolute
        Rank absolute values, so that the sign of an attribution does not count. Default False.

    Returns
    -------
    torch.Tensor
        Correlations in ``[-1, 1]`` (or NaN), float64, shape ``(N,)``.

    Raises
    ------
    ValueError
        If the two shapes differ or there is no map dimension.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import spearman
    >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 15.0]]))
    tensor([0.5000], dtype=torch.float64)
    """
    check_floating(first, "first")
    check_floating(second, "second")
    if first.shape != second.shape or first.dim() < 2:
        raise ValueError(
            f"Expected two maps of the same shape (N, *map_shape), but got {tuple(first.shape)} "
            f"and {tuple(second.shape)}."
        )

    ranks = [_average_ranks(m.abs() if absolute else m) for m in (first, second)]
    centered = [rank - rank.mean(dim=1, keepdim=True) for rank in ranks]
    covariance = (centered[0] * centered[1]).sum(dim=1)
    scale = centered[0].pow(2).sum(dim=1).sqrt() * centered[1].pow(2).sum(dim=1).sqrt()
    nan = torch.full_like(covariance, math.nan)

    return torch.where(scale > 0, covariance / torch.where(scale > 0, scale, torch.ones_like(scale)), nan)


def _average_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank the features of each map from 1 upwards, giving ties the mean of their ranks."""
    flat = maps.detach().reshape(maps.shape[0], -1).to(torch.float64)
    ordered = torch.sort(flat, dim=1).values
    below = torch.searchsorted(ordered, flat, right=False)
    through = torch.searchsorted(ordered, flat, right=True)
    return (below + through + 1).to(torch.float64) / 2


@dataclass(frozen=True)
class RandomizationCheck:
    """Rank correlation between maps of the trained model and of progressively randomized copies.

    Attributes
    ----------
    layers
        Label of each step. With cascading randomization, step ``i`` randomizes every layer
        up to and including ``layers[i]``, counted from the output. Without it, one step
        randomizes all layers at once.
    correlation
        Spearman correlation of the maps per step and input, float64, shape ``(steps, N)``.
        NaN where a map is constant.
    absolute_correlation
        The same for the absolute values of the maps, which ignores a flip of sign (a
        randomized output layer can swap which class a pixel supports).
    """

    layers: tuple[str, ...]
    correlation: torch.Tensor
    absolute_correlation: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """Mean correlation per step over the inputs with a defined correlation, shape ``(steps,)``."""
        return self.correlation.nanmean(dim=1)

    @property
    def std(self) -> torch.Tensor:
        """Sample standard deviation per step over the inputs with a defined correlation, shape ``(steps,)``."""
        return _nanstd(self.correlation)

    @property
    def absolute_mean(self) -> torch.Tensor:
        """Mean correlation of the absolute maps per step, shape ``(steps,)``."""
        return self.absolute_correlation.nanmean(dim=1)

    def table(self) -> str:
        """Return the correlation per step as a plain-text table."""
        undefined = self.correlation.isnan().sum(dim=1)
        header = ("randomized up to", "spearman mean", "std", "spearman of |maps|", "undefined")
        rows = [
            (name, f"{float(mean):+.3f}", f"{float(std):.3f}", f"{float(absolute):+.3f}", str(int(bad)))
            for name, mean, std, absolute, bad in zip(
                self.layers, self.mean, self.std, self.absolute_mean, undefined, strict=True
            )
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)


def _nanstd(values: torch.Tensor) -> torch.Tensor:
    result = []
    for row in values:
        defined = row[~row.isnan()]
        result.append(float(defined.std()) if defined.numel() > 1 else math.nan)
    return torch.tensor(result, dtype=torch.float64)


def randomization_check(
    model: nn.Module,
    inputs: torch.Tensor,
    attribute: Attribute,
    *,
    layers: Sequence[str] | None = None,
    cascade: bool = True,
    seed: int = 0,
) -> RandomizationCheck:
    """Compare maps of a trained model with maps of the same architecture whose weights are randomized.

    The model is deep-copied and never modified. The layers are randomized from the
    output towards the input: cumulatively, one more at each step (cascading), or all
    at once. After each step the copy is explained with ``attribute`` and every map is
    compared with the trained model's map by Spearman rank correlation, of the maps and of
    their absolute values. Maps that depend on what the model learned give correlations
    that fall towards zero. Maps that stay correlated explain the input, not the model.

    Randomizing a module calls its ``reset_parameters()`` (the default initialization of
    PyTorch layers, which for batch normalisation also resets the running statistics);
    modules without it get every parameter redrawn from a normal distribution with the
    parameter's own mean and standard deviation. Draws are seeded and leave the global
    random state untouched.

    Parameters
    ----------
    model
        Trained ``nn.Module``.
    inputs
        Inputs ``(N, ...)`` to explain.
    attribute
        Function ``(model, inputs) -> maps (N, *map_shape)``, for example
        ``lambda m, x: efmap.explain(m, x).positive``.
    layers
        Names of submodules (as in ``model.named_modules()``), ordered from the output
        towards the input; each step randomizes every parameter inside one of them.
        Default: the direct children that contain parameters, last child first, or the model
        itself (the name ``""``) when only it contains parameters.
    cascade
        Randomize cumulatively, one step per entry of ``layers`` (default), or all of them at once in one step.
    seed
        Seed of the random weights; step ``i`` draws with ``seed + i``.

    Returns
    -------
    RandomizationCheck
        Correlations of shape ``(steps, N)`` with their step labels.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If a name in ``layers`` is not a submodule or holds no parameter, if ``layers`` is empty,
        or if ``attribute`` returns maps whose shape does not match the trained model's maps
        or the ``N`` inputs.

    References
    ----------
    J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt and B. Kim,
    "Sanity Checks for Saliency Maps", NeurIPS 2018.

    Examples
    --------
    A map that ignores the model (here the input's magnitude) keeps a correlation of 1,
    so it fails the check:

    >>> import torch
    >>> from efmap.evaluate import randomization_check
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> check = randomization_check(model, torch.rand(3, 1, 2, 2), lambda m, x: x[:, 0].abs())
    >>> check.layers, [round(value, 6) for value in check.mean.tolist()]
    (('1',), [1.0])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    check_floating(inputs, "inputs")
    names = _resolve_layers(model, layers)

    reference = _attribute(attribute, model, inputs, None)
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    steps = [[name] for name in names] if cascade else [names]
    labels = tuple(names) if cascade else ("all: " + ", ".join(names),)

    signed, absolute = [], []
    for index, step in enumerate(steps):
        _randomize([modules[name] for name in step], seed + index)
        maps = _attribute(attribute, copied, inputs, reference)
        signed.append(spearman(reference, maps))
        absolute.append(spearman(reference, maps, absolute=True))

    return RandomizationCheck(
        layers=labels, correlation=torch.stack(signed).cpu(), absolute_correlation=torch.stack(absolute).cpu()
    )


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    modules = dict(model.named_modules())
    if layers is None:
        names = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
        names.reverse()
        if not names and any(True for _ in model.parameters(recurse=False)):
            # The parameters live on the model itself, so the only layer is the model (named "").
            names = [""]
    else:
        if isinstance(layers, str):
            raise TypeError(f"Expected `layers` to be a sequence of module names, but got the string {layers!r}.")
        names = list(layers)
    if not names:
        raise ValueError("Expected at least one layer to randomize, but the model has no submodule with parameters.")
    for name in names:
        if name not in modules:
            available = ", ".join(repr(key) for key in list(modules)[1:12])
            raise ValueError(
                f"Expected `layers` to name submodules of the model, but got {name!r}; some names: {available}."
            )
        if not any(True for _ in modules[name].parameters()):
            raise ValueError(f"Expected every layer in `layers` to contain parameters, but {name!r} contains none.")
    return names


def _attribute(
    attribute: Attribute, model: nn.Module, inputs: torch.Tensor, reference: torch.Tensor | None
) -> torch.Tensor:
    maps = attribute(model, inputs)
    if not isinstance(maps, torch.Tensor) or not maps.is_floating_point():
        raise TypeError(f"Expected `attribute` to return a floating tensor of maps, but got {type(maps).__name__}.")
    maps = maps.detach()
    if maps.dim() < 2 or maps.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"Expected `attribute` to return maps (N, *map_shape) with N = {inputs.shape[0]} for inputs of shape "
            f"{tuple(inputs.shape)}, but got maps of shape {tuple(maps.shape)}."
        )
    if reference is not None and maps.shape != reference.shape:
        raise ValueError(
            f"Expected the randomized model's maps to have the trained model's shape {tuple(reference.shape)}, "
            f"but got {tuple(maps.shape)}."
        )
    return maps


def _randomize(modules: list[nn.Module], seed: int) -> None:
    """Redraw every parameter inside ``modules`` with a seeded generator, leaving the global random state as it was."""
    # NOTE: only CPU models are tested; the CUDA generator handling below has not been run on a GPU.
    devices = sorted({p.device.index for m in modules for p in m.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=[d for d in devices if d is not None]), torch.no_grad():
        torch.manual_seed(seed)
        for module in modules:
            for submodule in module.modules():
                own = list(submodule.parameters(recurse=False))
                if not own:
                    continue
                reset = getattr(submodule, "reset_parameters", None)
                if callable(reset):
                    reset()
                    continue
                for parameter in own:
                    spread = float(parameter.std()) if parameter.numel() > 1 else 1.0
                    parameter.normal_(float(parameter.mean()), spread)
