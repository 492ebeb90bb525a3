"""Input checks shared by the public entry points.

Every check raises before any forward pass, with a message that names the
offending value and gives the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from efmap._typing import ValueRange


def check_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a tensor, else raise a TypeError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}. "
            f"Convert it first, for example with torch.as_tensor({name}, dtype=torch.float32)."
        )
    return x


def check_floating(x: object, name: str) -> torch.Tensor:
    """Reject tensors whose dtype is not floating point, with the conversion to use."""
    tensor = check_tensor(x, name)
    if tensor.dtype == torch.uint8:
        raise TypeError(
            f"Expected `{name}` to have a floating dtype, but got torch.uint8. Convert 8-bit images to "
            f"[-1, 1] with `{name}.float() / 127.5 - 1` (or to [0, 1] with `{name}.float() / 255` and "
            "value_range=(0, 1)); integer arithmetic would wrap around silently."
        )
    if not tensor.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to have a floating dtype, but got {tensor.dtype}. "
            f"Convert it with `{name}.float()` and scale it into the declared value_range."
        )
    return tensor


def check_value_range(value_range: Sequence[float]) -> ValueRange:
    """Validate ``(lo, hi)`` and return it as a pair of floats."""
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"Expected `value_range` to be a pair (lo, hi) of numbers, but got {value_range!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"Expected `value_range` to be finite with lo < hi, but got ({lo}, {hi}).")
    return lo, hi


def check_finite(x: torch.Tensor, name: str) -> None:
    """Reject NaN and infinite values, naming how many there are."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        count = int(bad.sum())
        raise ValueError(
            f"Expected `{name}` to contain only finite values, but got {count} NaN or infinite "
            f"value(s) out of {x.numel()}. Clean or impute them before explaining."
        )


def check_in_range(x: torch.Tensor, name: str, value_range: ValueRange, *, strict: bool = True) -> None:
    """Reject inputs outside ``value_range``, and with ``strict`` inputs that use only its upper half.

    The second rule catches the common mistake of passing images in ``[0, 1]``
    while the declared range is ``[-1, 1]``: such values lie inside the range,
    but the reversal would then move most of them to the wrong half.
    """
    lo, hi = value_range
    x_min = float(x.min())
    x_max = float(x.max())
    hint = (
        "Scale the inputs into the declared range, or pass the range they really use as value_range=(lo, hi). "
        "For 8-bit images use x / 127.5 - 1 for [-1, 1], or x / 255 with value_range=(0, 1)."
    )
    if x_min < lo or x_max > hi:
        raise ValueError(
            f"Expected `{name}` to lie in value_range [{lo}, {hi}], but got values from {x_min:.6g} to {x_max:.6g}. "
            + hint
        )

    middle = (lo + hi) / 2
    if strict and lo < middle <= x_min and x_max > middle and x.numel() > 1:
        raise ValueError(
            f"Expected `{name}` to use the declared value_range [{lo}, {hi}], but all values lie in its upper "
            f"half ({x_min:.6g} to {x_max:.6g}), which usually means inputs in [0, 1] were passed for [-1, 1]. "
            "Map them with x * 2 - 1, or pass value_range=(0, 1). If the values are right as they are, "
            "pass check_range=False."
        )


def check_batch_size(batch_size: object) -> int:
    """Validate a positive integer batch size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
    return batch_size


def check_labels(labels: object, count: int, unit: str) -> torch.Tensor:
    """Convert integer class labels to an int64 CPU tensor ``(count,)``, one per ``unit`` (input or map)."""
    tensor = torch.as_tensor(labels)
    if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"Expected `labels` to be integer class labels, but got dtype {tensor.dtype}.")
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(
            f"Expected `labels` to have one entry per {unit} ({count}), but got shape {tuple(tensor.shape)}."
        )
    return tensor.to(device="cpu", dtype=torch.int64)
