"""Type aliases shared across efmap."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

#: A closed interval ``(lo, hi)`` of input values.
ValueRange = tuple[float, float]

#: A model: anything that maps a batch ``(N, ...)`` to class scores.
Model = Callable[[torch.Tensor], Any]

#: Classes to explain: one class for all inputs, one per input, or none (the predicted class).
TargetType = int | Sequence[int] | torch.Tensor | None

#: Reading of the perturbed output: the new maximum over all classes, or the target class.
ScoreMode = Literal["max", "target"]

#: A progress sink: ``True`` for a tqdm bar, a callable receiving ``(done, total)``, or ``False``.
ProgressType = bool | Callable[[int, int], None]

#: Reduction that combines maps.
Reduction = Literal["mean", "max", "sum"]

#: Perturbed copies per forward pass: a positive integer, or ``"auto"`` to let a timed probe choose.
BatchSize = int | Literal["auto"]
