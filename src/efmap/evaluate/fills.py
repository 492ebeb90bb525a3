"""Fills for removed features: a constant, the reversed value, a Gaussian blur, or noisy linear imputation.

A fill decides what a "removed" feature looks like to the model. Every
evaluation in :mod:`efmap.evaluate` takes one ``fill`` and applies it to all
the masks it compares, so that the landmarks, the random masks and the
centered box are removed in the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from efmap._checks import check_floating, check_value_range
from efmap._typing import ValueRange
from efmap.reversal import reverse

__all__ = ["Blur", "EvalFill", "NoisyImputation", "fill_removed", "gaussian_blur", "noisy_linear_imputation"]


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

# Neighbour weights of the linear imputation: direct neighbours 1/6, diagonal ones 1/12, centre 0.
_NEIGHBOUR_WEIGHTS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def gaussian_blur(inputs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur the last two dimensions of ``inputs`` with a separable Gaussian kernel.

    The kernel is truncated at ``ceil(3 * sigma)`` pixels on each side and the image is
    extended by repeating its border pixels, so a constant image stays constant.

    Parameters
    ----------
    inputs
        Floating tensor ``(..., H, W)``, for example ``(N, C, H, W)``.
    sigma
        Standard deviation of the kernel in pixels, positive.

    Returns
    -------
    torch.Tensor
        Blurred tensor of the same shape, dtype and device.

    Raises
    ------
    TypeError
        If ``inputs`` is not a floating-point tensor.
    ValueError
        If ``inputs`` has fewer than two dimensions or ``sigma`` is not positive.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import gaussian_blur
    >>> image = torch.zeros(1, 1, 9, 9)
    >>> image[..., 4, 4] = 1.0
    >>> blurred = gaussian_blur(image, sigma=1.0)
    >>> round(float(blurred.sum()), 4), round(float(blurred[..., 4, 4]), 4)
    (1.0, 0.1592)
    """
    check_floating(inputs, "inputs")
    if inputs.dim() < 2:
        raise ValueError(f"Expected `inputs` with at least two dimensions (..., H, W), but got {tuple(inputs.shape)}.")
    sigma = Blur(sigma).sigma

    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=inputs.dtype, device=inputs.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    height, width = inputs.shape[-2:]
    planes = inputs.reshape(-1, 1, height, width)
    planes = F.pad(planes, (radius, radius, radius, radius), mode="replicate")
    planes = F.conv2d(planes, kernel.reshape(1, 1, 1, -1))
    planes = F.conv2d(planes, kernel.reshape(1, 1, -1, 1))

    return planes.reshape(inputs.shape)


def noisy_linear_imputation(
    inputs: torch.Tensor,
    keep: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    tolerance: float = 1e-6,
    max_iterations: int = 2000,
) -> torch.Tensor:
    """Replace the pixels where ``keep`` is False by the weighted mean of their neighbours, plus ``noise``.

    Parameters
    ----------
    inputs
        Images ``(N, C, H, W)``, floating point.
    keep
        Boolean mask of kept pixels, ``(H, W)`` for all images or ``(N, H, W)`` per image.
        Channels are imputed separately, each from the same kept pixels.
    noise
        Optional tensor of the inputs' shape added to the imputed pixels only.
    value_range
        Input range; the result is clipped to it.
    tolerance, max_iterations
        Stopping rule of the conjugate-gradient solve, see :class:`NoisyImputation`.

    Returns
    -------
    torch.Tensor
        Images of the same shape and dtype: kept pixels unchanged, removed ones imputed.

    Raises
    ------
    ValueError
        If the shapes of ``inputs``, ``keep`` and ``noise`` do not fit together.

    Examples
    --------
    >>> import torch
    >>> from efmap.evaluate import noisy_linear_imputation
    >>> ramp = torch.linspace(-1, 1, 5).repeat(5, 1)[None, None]
    >>> keep = torch.ones(5, 5, dtype=torch.bool)
    >>> keep[1:4, 1:4] = False
    >>> torch.allclose(noisy_linear_imputation(ramp, keep), ramp, atol=1e-5)
    True
    """
    check_floating(inputs, "inputs")
    lo, hi = check_value_range(value_range)
    if inputs.dim() != 4:
        raise ValueError(f"Expected `inputs` of shape (N, C, H, W) for imputation, but got {tuple(inputs.shape)}.")
    count, channels, height, width = inputs.shape
    if keep.dtype != torch.bool or tuple(keep.shape) not in ((height, width), (count, height, width)):
        raise ValueError(
            f"Expected `keep` to be a boolean mask of shape {(height, width)} or {(count, height, width)} "
            f"to match `inputs` of shape {tuple(inputs.shape)}, but got {keep.dtype} of shape {tuple(keep.shape)}."
        )
    if noise is not None and noise.shape != inputs.shape:
        raise ValueError(f"Expected `noise` of the inputs' shape {tuple(inputs.shape)}, but got {tuple(noise.shape)}.")

    # Work in float64 with channels folded into the batch: every plane is one independent system.
    x = inputs.detach().to(torch.float64).reshape(count * channels, 1, height, width)
    known = keep.to(inputs.device).expand(count, height, width)
    known = known[:, None].expand(count, channels, height, width).reshape(count * channels, 1, height, width)
    removed = (~known).to(torch.float64)
    kernel = _NEIGHBOUR_WEIGHTS.to(device=inputs.device, dtype=torch.float64).reshape(1, 1, 3, 3)
    degree = F.conv2d(torch.ones(1, 1, height, width, dtype=torch.float64, device=inputs.device), kernel, padding=1)
    middle = (lo + hi) / 2

    # A plane with no kept pixel has a singular system; a unit pull towards the middle of the range fixes its level.
    anchor = (known.flatten(1).sum(dim=1) == 0).to(torch.float64).reshape(-1, 1, 1, 1)

    def operator(values: torch.Tensor) -> torch.Tensor:
        # (D + anchor) v - W v on the removed pixels, for v that is zero on the kept ones: symmetric positive definite.
        return removed * ((degree + anchor) * values - F.conv2d(values, kernel, padding=1))

    right = removed * (F.conv2d(x * (1 - removed), kernel, padding=1) + anchor * middle)
    solution = _conjugate_gradient(operator, right, removed * middle, tolerance, max_iterations)

    imputed = solution.reshape(inputs.shape).to(inputs.dtype)
    if noise is not None:
        imputed = imputed + noise.to(device=inputs.device, dtype=inputs.dtype)
    imputed = imputed.clamp(lo, hi)
    return torch.where(known.reshape(inputs.shape), inputs, imputed)


def _conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    right: torch.Tensor,
    start: torch.Tensor,
    tolerance: float,
    max_iterations: int,
) -> torch.Tensor:
    """Solve ``apply(x) = right`` for a batch of independent symmetric positive definite systems."""
    dims = tuple(range(1, right.dim()))
    solution = start.clone()
    residual = right - apply(solution)
    direction = residual.clone()
    energy = (residual * residual).sum(dim=dims, keepdim=True)
    limit = (tolerance * right.flatten(1).norm(dim=1)).clamp_min(1e-30) ** 2
    for _ in range(max_iterations):
        if bool((energy.flatten() <= limit).all()):
            break
        product = apply(direction)
        curvature = (direction * product).sum(dim=dims, keepdim=True)
        step = energy / torch.where(curvature > 0, curvature, torch.ones_like(curvature))
        step = torch.where(curvature > 0, step, torch.zeros_like(step))
        solution = solution + step * direction
        residual = residual - step * product
        new_energy = (residual * residual).sum(dim=dims, keepdim=True)
        direction = residual + (new_energy / energy.clamp_min(1e-300)) * direction
        energy = new_energy
    # NOTE: a solve that hits max_iterations returns its last iterate without a warning.
    return solution


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
