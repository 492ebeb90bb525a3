"""Running an arbitrary model: output checks, device placement and state restoration."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from efmap._typing import Model
from efmap._warnings import EfmapWarning

OutputFn = Callable[[Any], torch.Tensor]


def model_device_dtype(model: Model) -> tuple[torch.device | None, torch.dtype | None]:
    """Return the device and floating dtype of a module's parameters or buffers, or ``(None, None)``."""
    if not isinstance(model, torch.nn.Module):
        return None, None
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else None
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return device, dtype


def read_scores(output: Any, output_fn: OutputFn | None, batch: int, *, check: bool) -> torch.Tensor:
    """Turn a model output into class scores ``(batch, K)``.

    With ``check`` the output is validated and a failure raises a message
    that names what the model returned and how to adapt it.
    """
    if output_fn is not None:
        output = output_fn(output)
    if check:
        if isinstance(output, dict):
            keys = ", ".join(repr(k) for k in list(output)[:5])
            raise TypeError(
                f"Expected the model to return class scores as a tensor, but got a {type(output).__name__} "
                f"with keys {keys}. Pass output_fn to pick the scores, for example output_fn=lambda out: out['logits']."
            )
        if isinstance(output, (tuple, list)):
            raise TypeError(
                f"Expected the model to return class scores as a tensor, but got a {type(output).__name__} of "
                f"{len(output)} items. Pass output_fn to pick the scores, for example output_fn=lambda out: out[0]."
            )
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"Expected the model to return class scores as a tensor, but got {type(output).__name__}. "
                "Wrap the model, or pass output_fn, so that it returns a tensor of shape (N, K)."
            )
        if output.dim() not in (1, 2):
            raise ValueError(
                f"Expected the model to return class scores of shape (N, K) or (N,), but got shape "
                f"{tuple(output.shape)}. Flatten or select the class scores with output_fn."
            )
        if output.shape[0] != batch:
            raise ValueError(
                f"Expected the model output to have one row per input ({batch}), but got shape "
                f"{tuple(output.shape)}. The model must keep the batch dimension first."
            )
        if not output.is_floating_point():
            raise TypeError(f"Expected the model to return floating-point class scores, but got {output.dtype}.")
    scores: torch.Tensor = output.unsqueeze(1) if output.dim() == 1 else output
    return scores


@contextlib.contextmanager
def evaluation_mode(model: Model) -> Iterator[None]:
    """Put a module into eval mode for the duration, restoring every submodule's flag afterwards.

    A module found in training mode is switched with an :class:`EfmapWarning`,
    since dropout would make the scores random and batch normalisation would
    both mix the perturbed copies and update its running statistics.
    """
    if not isinstance(model, torch.nn.Module):
        yield
        return

    flags = [(module, module.training) for module in model.modules()]
    try:
        if any(training for _, training in flags):
            _switch_to_eval(model)
        yield
    finally:
        for module, training in flags:
            module.training = training


def _switch_to_eval(model: torch.nn.Module) -> None:
    try:
        model.eval()
    except NotImplementedError:
        # Modules from torch.export.load reject eval(): their train or eval behaviour was fixed when they were
        # exported, and the flag they report has no effect.
        return
    warnings.warn(
        "The model is in training mode; it is explained in eval mode, and its mode is restored afterwards. "
        "Call model.eval() first to silence this warning.",
        EfmapWarning,
        stacklevel=5,
    )
