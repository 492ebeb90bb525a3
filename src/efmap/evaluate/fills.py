"""Fills for removed features: a constant, the reversed value, a Gaussian blur, or noisy linear imputation.

A fill decides what a "removed" feature looks like to the model. Every
evaluation in :mod:`efmap.evaluate` takes one ``fill`` and applies it to all
the masks it compares, so that the landmarks, the random masks and the
centered box are removed in the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from efmap._checks import check_floating, check_value_range
from efmap._typing import ValueRange
from efmap.evaluate.image_fills import gaussian_blur, noisy_linear_imputation
from efmap.reversal import reverse

__all__ = ["Blur", "EvalFill", "NoisyImputation", "fill_removed"]


@dataclass(frozen=True)
class Blur:
    """Fill removed features with a Gaussian blur of the same input.

    Attributes
    ----------
    sigma
        Standard deviation of the Gaussian kernel in pixels. Default 2.0.
    """

    sigma: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not self.sigma > 0:
            raise ValueError(f"Expected `sigma` to be a positive number of pixels, but got {self.sigma!r}.")
        if not math.isfinite(self.sigma):
            raise ValueError(f"Expected `sigma` to be finite, but got {self.sigma!r}.")


@dataclass(frozen=True)
class NoisyImputation:
    """Fill removed pixels by noisy linear imputation from their neighbours, as in ROAD.

    Each removed pixel is set to the weighted mean of its 8 neighbours: weight 1/6 for
    the 4 direct neighbours and 1/12 for the diagonal ones, renormalised at the image
    border. Together these equations form a sparse linear system over all removed
    pixels, which is solved by conjugate gradients. Gaussian noise is then added to the imputed pixels,
    and the result is clipped to the value range.

    Attributes
    ----------
    noise
        Standard deviation of the added noise, as a fraction of the value-range width
        (0.01 gives 0.02 on ``[-1, 1]``). Default 0.01.
    seed
        Seed of the noise. The noise of input ``i`` is the same at every call with the same
        inputs, so curves and masked accuracies do not depend on the batch size.
    tolerance
        Stop when the residual norm of every image has fallen below ``tolerance`` times the
        norm of its right-hand side. Default 1e-6.
    max_iterations
        Upper bound on conjugate-gradient iterations. Default 2000.

    Notes
    -----
    Each image whose pixels are not all removed gives a system with a unique solution,
    because the pixel grid is connected. When every pixel of an image is removed nothing
    fixes the level, so those images are imputed as the middle of the value range plus
    the noise.

    References
    ----------
    Y. Rong, T. Leemann, V. Borisov, G. Kasneci and E. Kasneci, "A Consistent and Efficient
    Evaluation Strategy for Attribution Methods", ICML 2022.
    """

    noise: float = 0.01
    seed: int = 0
    tolerance: float = 1e-6
    max_iterations: int = 2000

    def __post_init__(self) -> None:
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise < math.inf:
            raise ValueError(
                f"Expected `noise` to be a non-negative fraction of the value range, but got {self.noise!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Expected `seed` to be an integer, but got {self.seed!r}.")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"Expected `tolerance` in (0, 1), but got {self.tolerance!r}.")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(f"Expected `max_iterations` to be a positive integer, but got {self.max_iterations!r}.")


#: Type of the fill of removed features, which is a number, ``"reverse"``, ``"blur"``, ``"road"``,
#: a :class:`~efmap.evaluate.fills.Blur`, a :class:`~efmap.evaluate.fills.NoisyImputation`,
#: or a tensor broadcastable to the inputs.
EvalFill = float | str | torch.Tensor | Blur | NoisyImputation


def fill_removed(
    inputs: torch.Tensor, keep: torch.Tensor, fill: EvalFill = 0.0, *, value_range: ValueRange = (-1.0, 1.0)
) -> torch.Tensor:
    """Keep the features where ``keep`` is True and fill the others with ``fill``.

    Parameters
    ----------
    inputs
        Floating tensor ``(N, ..., *map_shape)``, for example ``(N, C, H, W)`` with ``(H, W)`` masks.
    keep
        Boolean mask of kept features: ``map_shape`` for every input, or ``(N, *map_shape)`` per input.
    fill
        A number (default 0.0, the middle of ``[-1, 1]``); ``"reverse"`` for the reversed value;
        ``"blur"`` or :class:`Blur` for a Gaussian blur of the input; ``"road"`` or
        :class:`NoisyImputation` for noisy linear imputation from neighbouring pixels;
        or a tensor broadcastable to ``inputs``. Blur and imputation need images
        ``(N, C, H, W)`` with ``(H, W)`` masks.
    value_range
        Input range, used by ``"reverse"`` and by the imputation.

    Returns
    -------
    torch.Tensor
        A new tensor of the shape and dtype of ``inputs``.

    Raises
    ------
    TypeError
        If ``inputs`` is not floating point, ``keep`` is not boolean, or ``fill`` has an unknown type.
    ValueError
        If the mask shape does not match the inputs, or ``fill`` names an unknown method.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import fill_removed
    >>> keep = torch.tensor([[True, False], [False, True]])
    >>> fill_removed(torch.full((1, 1, 2, 2), 0.5), keep, fill=-1.0)
    tensor([[[[ 0.5000, -1.0000],
              [-1.0000,  0.5000]]]])
    """
    filler = Filler(inputs, fill, value_range=value_range, map_dims=_map_dims(inputs, keep))
    return filler(torch.arange(inputs.shape[0]), keep)


def resolve_fill(fill: EvalFill) -> float | str | torch.Tensor | Blur | NoisyImputation:
    """Return ``fill`` with the names ``"blur"`` and ``"road"`` replaced by their default objects."""
    if isinstance(fill, str):
        if fill == "reverse":
            return fill
        if fill == "blur":
            return Blur()
        if fill == "road":
            return NoisyImputation()
        raise ValueError(
            f"Expected `fill` to be a number, a tensor, Blur, NoisyImputation or one of 'reverse', 'blur', 'road', "
            f"but got {fill!r}."
        )
    if isinstance(fill, bool) or not isinstance(fill, (int, float, torch.Tensor, Blur, NoisyImputation)):
        raise TypeError(
            f"Expected `fill` to be a number, a tensor, Blur, NoisyImputation or a method name, "
            f"but got {type(fill).__name__}."
        )
    return fill


def describe_fill(fill: EvalFill) -> str:
    """Return a short name of ``fill`` for tables."""
    fill = resolve_fill(fill)
    if isinstance(fill, Blur):
        return f"blur(sigma={fill.sigma:g})"
    if isinstance(fill, NoisyImputation):
        return f"road(noise={fill.noise:g})"
    if isinstance(fill, torch.Tensor):
        return "tensor"
    if isinstance(fill, str):
        return fill
    return f"constant({float(fill):g})"


class Filler:
    """Fill removed features of selected rows of a fixed batch of inputs, one mask per row.

    Everything that does not depend on the mask (the reversed or blurred inputs, the
    imputation noise) is computed once, for all ``N`` inputs.
    """

    def __init__(self, inputs: torch.Tensor, fill: EvalFill, *, value_range: ValueRange, map_dims: int) -> None:
        check_floating(inputs, "inputs")
        self.inputs = inputs
        self.value_range = check_value_range(value_range)
        self.fill = resolve_fill(fill)
        self.map_shape = tuple(inputs.shape[inputs.dim() - map_dims :])
        self.replacement: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None

        if isinstance(self.fill, (Blur, NoisyImputation)) and (inputs.dim() != 4 or map_dims != 2):
            raise ValueError(
                f"Expected images (N, C, H, W) with (H, W) masks for fill {describe_fill(self.fill)}, but got inputs "
                f"of shape {tuple(inputs.shape)} with masks of shape {self.map_shape}. Use a constant or 'reverse'."
            )
        if isinstance(self.fill, str):
            self.replacement = reverse(inputs, self.value_range)
        elif isinstance(self.fill, Blur):
            self.replacement = gaussian_blur(inputs, self.fill.sigma)
        elif isinstance(self.fill, torch.Tensor):
            try:
                self.replacement = self.fill.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
            except RuntimeError:
                raise ValueError(
                    f"Expected a `fill` tensor broadcastable to the inputs {tuple(inputs.shape)}, "
                    f"but got shape {tuple(self.fill.shape)}."
                ) from None
        elif isinstance(self.fill, NoisyImputation):
            generator = torch.Generator().manual_seed(self.fill.seed)
            width = self.value_range[1] - self.value_range[0]
            noise = torch.randn(inputs.shape, generator=generator, dtype=torch.float64) * (self.fill.noise * width)
            self.noise = noise.to(device=inputs.device, dtype=inputs.dtype)

    def __call__(self, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Return ``inputs[rows]`` with the features outside ``keep`` filled.

        ``keep`` is boolean, of shape ``map_shape`` (shared) or ``(len(rows), *map_shape)``.
        """
        _check_keep(self.inputs, keep, self.map_shape, len(rows))
        rows = rows.to(self.inputs.device)
        selected = self.inputs[rows]
        keep = keep.to(self.inputs.device)

        if isinstance(self.fill, NoisyImputation):
            noise = self.noise[rows] if self.noise is not None else None
            return noisy_linear_imputation(
                selected,
                keep,
                noise=noise,
                value_range=self.value_range,
                tolerance=self.fill.tolerance,
                max_iterations=self.fill.max_iterations,
            )
        if keep.dim() > len(self.map_shape):
            # Per-row masks get singleton dimensions between the batch and the map, e.g. (B, 1, H, W).
            middle = selected.dim() - 1 - len(self.map_shape)
            keep = keep.reshape(keep.shape[0], *([1] * middle), *self.map_shape)
        if self.replacement is not None:
            return torch.where(keep, selected, self.replacement[rows])
        return torch.where(keep, selected, torch.full_like(selected, float(self.fill)))  # type: ignore[arg-type]


def _map_dims(inputs: torch.Tensor, keep: torch.Tensor) -> int:
    """Return the number of map dimensions of ``keep``: all of them, or all but a leading batch dimension."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"Expected `keep` to be a boolean tensor, but got {getattr(keep, 'dtype', type(keep))}.")
    if keep.dim() < inputs.dim() and tuple(keep.shape) == tuple(inputs.shape[inputs.dim() - keep.dim() :]):
        return keep.dim()
    return keep.dim() - 1


def _check_keep(inputs: torch.Tensor, keep: torch.Tensor, map_shape: tuple[int, ...], rows: int) -> None:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"Expected `keep` to be a boolean tensor, but got {getattr(keep, 'dtype', type(keep))}.")
    if tuple(keep.shape) not in (map_shape, (rows, *map_shape)):
        raise ValueError(
            f"Expected the mask shape {tuple(keep.shape)} to equal the trailing dimensions {map_shape} of the inputs "
            f"of shape {tuple(inputs.shape)}, or {(rows, *map_shape)} with one mask per input."
        )
