"""Image operations behind two fills: a separable Gaussian blur, and noisy linear imputation (ROAD)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from efmap._checks import check_floating, check_value_range
from efmap._typing import ValueRange

__all__ = ["gaussian_blur", "noisy_linear_imputation"]

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
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
        raise ValueError(f"Expected `sigma` to be a positive number of pixels, but got {sigma!r}.")

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
        Stopping rule of the conjugate-gradient solve, see :class:`~efmap.evaluate.fills.NoisyImputation`.

    Returns
    -------
    torch.Tensor
        Images of the same shape and dtype: kept pixels unchanged, removed ones imputed.

    Raises
    ------
    ValueError
        If the shapes of ``inputs``, ``keep`` and ``noise`` do not fit together.

    Notes
    -----
    The weights are 1/6 for the 4 direct neighbours and 1/12 for the 4 diagonal ones,
    renormalised where the image border cuts neighbours off. A plane in which every pixel
    is removed is set to the middle of ``value_range`` before the noise is added.

    References
    ----------
    Y. Rong, T. Leemann, V. Borisov, G. Kasneci and E. Kasneci, "A Consistent and Efficient
    Evaluation Strategy for Attribution Methods", ICML 2022.

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
