"""Batched perturbation scoring: the Explainable Feature Map of a classifier.

For every input and every feature, the feature is reversed, the model runs on
the perturbed copy, and the change of the score is recorded:
``positive = ReLU(old - new)`` (the feature supported the decision) and
``negative = ReLU(new - old)`` (the feature argued against it).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from efmap._checks import check_finite, check_floating, check_in_range, check_value_range
from efmap._dense import check_batch_option, dense_outputs
from efmap._model import OutputFn, evaluation_mode, model_device_dtype, read_scores
from efmap._typing import BatchSize, Model, ProgressType, ScoreMode, TargetType, ValueRange
from efmap._warnings import EfmapWarning
from efmap.features import FeatureLayout, mask_layout, patch_layout, pixel_layout
from efmap.incremental import incremental_outputs
from efmap.reversal import reverse

__all__ = ["Explanation", "explain"]

logger = logging.getLogger(__name__)

#: Inputs per forward pass of the clean scoring when ``batch_size="auto"``.
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class Explanation:
    """Result of :func:`explain` for a batch of ``N`` inputs.

    Attributes
    ----------
    positive
        ``ReLU(old - new)`` per feature, shape ``(N, *map_shape)``: ``(N, H, W)``
        for images explained per pixel or patch. Non-negative.
    negative
        ``ReLU(new - old)`` per feature, same shape. Non-negative.
    target
        Explained class per input, int64, shape ``(N,)``. With ``score="max"``
        it is the class predicted on the clean input.
    clean_score
        ``old``: the score read on the clean input, shape ``(N,)``.
    clean_output
        All class scores of the clean input, shape ``(N, K)``.
    output_change
        Signed change ``new - old`` of every class score when each feature is
        reversed, shape ``(N, K, *map_shape)``. It comes from the same forward
        passes, so maps for every class cost nothing extra.
    feature_index
        Dense feature index of every map element, int64, shape ``(1 or N, *map_shape)``.
    score
        The reading of ``new``: ``"max"`` or ``"target"``.
    value_range
        The declared input range.
    """

    positive: torch.Tensor
    negative: torch.Tensor
    target: torch.Tensor
    clean_score: torch.Tensor
    clean_output: torch.Tensor
    output_change: torch.Tensor
    feature_index: torch.Tensor
    score: str
    value_range: ValueRange

    @property
    def num_features(self) -> int:
        """Number of features scored per input."""
        return int(self.feature_index.max()) + 1

    def class_maps(self, class_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(positive, negative)`` maps that read the score of class ``class_index``.

        These equal the maps of ``explain(..., score="target", target=class_index)``.
        """
        num_classes = self.output_change.shape[1]
        if not 0 <= class_index < num_classes:
            raise ValueError(f"Expected `class_index` in [0, {num_classes - 1}], but got {class_index}.")
        change = self.output_change[:, class_index]
        return torch.relu(-change), torch.relu(change)


def explain(
    model: Model,
    inputs: torch.Tensor,
    *,
    target: TargetType = None,
    score: ScoreMode = "max",
    batch_size: BatchSize = "auto",
    value_range: ValueRange = (-1.0, 1.0),
    patch_size: int | None = None,
    feature_mask: torch.Tensor | None = None,
    output_fn: OutputFn | None = None,
    progress: ProgressType = False,
    check_range: bool = True,
    engine: Literal["auto", "dense", "incremental"] = "auto",
) -> Explanation:
    """Score every feature of every input by reversing it and reading the model's output.

    Parameters
    ----------
    model
        Callable from a batch ``(N, ...)`` to class scores ``(N, K)``, ``(N, 1)`` or ``(N,)``:
        an ``nn.Module``, a TorchScript module or a plain function.
    inputs
        Images ``(N, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` (the last two are a batch of one),
        or with ``feature_mask`` any batch ``(N, ...)``. Floating dtype, values in ``value_range``.
    target
        Class to explain with ``score="target"``: an int for all inputs, or one per input as a
        sequence or tensor. Default: the class predicted on each clean input.
    score
        ``"max"`` reads the new maximum over all classes; ``"target"`` reads the target class.
    batch_size
        Number of perturbed copies per forward pass, or ``"auto"`` (the default). With ``"auto"``
        a short timed probe over the first forward passes picks the batch size and, for 4-D inputs,
        the memory format (row-major or channels-last). On CUDA an out-of-memory error then halves
        the batch and retries. Memory grows with the batch size. Results change only at
        floating-point rounding level, where the model's kernels depend on batch size or format.
    value_range
        Interval ``(lo, hi)`` of valid input values. Default ``(-1.0, 1.0)``.
    patch_size
        Side of square patches that form one feature each. Default: one feature per pixel.
    feature_mask
        Integer tensor in which equal ids form one feature, broadcastable to the inputs as in
        Captum. Maps take its per-sample shape.
    output_fn
        Function that picks the class scores from the model output (a tuple or dict).
    progress
        ``True`` shows a tqdm bar; a callable receives ``(done, total)`` after every batch.
    check_range
        Reject inputs that use only the upper half of ``value_range`` (inputs in ``[0, 1]``
        passed for ``[-1, 1]``). Values outside the range are always rejected.
    engine
        ``"dense"`` runs the whole model on every perturbed copy. ``"incremental"`` recomputes
        only the part of each layer that a feature can change (see ``efmap.incremental``)
        and gives the same maps up to rounding. ``"auto"``, the default, uses the incremental
        engine where the model supports it and the dense engine otherwise.

    Returns
    -------
    Explanation
        Positive and negative maps of shape ``(N, *map_shape)`` and the per-class changes.

    Raises
    ------
    TypeError
        If the inputs are not floating point, the model returns a tuple, dict or other non-tensor
        without ``output_fn``, or ``target`` does not hold integers.
    ValueError
        If the inputs are empty, contain NaN or infinity, lie outside ``value_range`` or have an
        unsupported shape; if the model output is not ``(N, K)`` or ``(N,)`` class scores with
        one row per input; if ``target`` does not match the inputs or classes; or if an option
        is invalid.
        Also with ``engine="incremental"`` for a model that the incremental engine does not support.

    Notes
    -----
    With ``score="target"``, ``positive`` equals ``ReLU`` of Captum's ``FeatureAblation``
    with ``baselines=reverse(inputs)`` and the same features. A model in training mode is
    explained in eval mode and restored afterwards, also after an error.

    For a model with a single output (one logit of a binary classifier), both readings track
    that output, so the maps say what raises or lowers the positive class, and ``target`` is 0
    even for inputs the model would call negative.

    Before the perturbed forward passes start, their count and (after the probe of
    ``batch_size="auto"``) the estimated time are logged at INFO level. On CPU the
    throughput of large batches depends on the memory allocator; the benchmarks page
    gives an opt-in environment setting for it, which efmap never sets itself.

    Examples
    --------
    >>> import torch, efmap
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> result = efmap.explain(model.eval(), torch.full((1, 2, 2), -0.5))
    >>> result.positive.shape
    torch.Size([1, 2, 2])
    """
    if score not in ("max", "target"):
        raise ValueError(f"Expected `score` to be 'max' or 'target', but got {score!r}.")
    if score == "max" and target is not None:
        raise ValueError(
            "`target` is only read with score='target'; with score='max' the new maximum over all classes is "
            "compared with the clean maximum. Pass score='target' to explain a given class."
        )
    if engine not in ("auto", "dense", "incremental"):
        raise ValueError(f"Expected `engine` to be 'auto', 'dense' or 'incremental', but got {engine!r}.")
    batch_size = check_batch_option(batch_size)
    lo_hi = check_value_range(value_range)
    inputs = _as_tensor(inputs).detach()
    check_floating(inputs, "inputs")
    shape_note = _shape_note(tuple(inputs.shape)) if feature_mask is None else ""
    inputs = _as_batch(inputs, image=feature_mask is None)
    if inputs.shape[0] == 0 or inputs.numel() == 0:
        raise ValueError(f"Expected at least one non-empty input, but got `inputs` of shape {tuple(inputs.shape)}.")
    check_finite(inputs, "inputs")
    check_in_range(inputs, "inputs", lo_hi, strict=check_range)

    device, dtype = model_device_dtype(model)
    inputs = inputs.to(device=device or inputs.device, dtype=dtype or inputs.dtype)
    layout = _build_layout(inputs, patch_size, feature_mask)

    with evaluation_mode(model), torch.inference_mode():
        clean_batch = DEFAULT_BATCH_SIZE if batch_size == "auto" else batch_size
        clean = _clean_forward(model, inputs, output_fn, clean_batch, shape_note)
        targets = _resolve_target(target, clean)
        old = clean.max(dim=1).values if score == "max" else clean.gather(1, targets[:, None])[:, 0]
        reversed_inputs = reverse(inputs, lo_hi)
        if engine == "dense":
            outputs = dense_outputs(model, output_fn, inputs, reversed_inputs, layout, batch_size, progress)
        else:
            # NOTE: the timed probe of batch_size="auto" serves the dense engine only; the incremental
            # engine then batches DEFAULT_BATCH_SIZE perturbations per pass, and its dense fallback probes.
            def dense_fallback(
                model: Model,
                output_fn: OutputFn | None,
                inputs: torch.Tensor,
                reversed_inputs: torch.Tensor,
                layout: FeatureLayout,
                _incremental_batch: int,
                progress: ProgressType,
            ) -> torch.Tensor:
                return dense_outputs(model, output_fn, inputs, reversed_inputs, layout, batch_size, progress)

            outputs = incremental_outputs(
                model, output_fn, inputs, reversed_inputs, layout, clean_batch, progress,
                strict=engine == "incremental", dense=dense_fallback, clean=clean,
            )  # fmt: skip

    if score == "max":
        new = outputs.max(dim=2).values
    else:
        new = outputs.gather(2, targets[:, None, None].expand(-1, outputs.shape[1], 1))[..., 0]
    drop = old[:, None] - new
    change = outputs - clean[:, None, :]

    return Explanation(
        positive=layout.to_map(torch.relu(drop)),
        negative=layout.to_map(torch.relu(-drop)),
        target=targets,
        clean_score=old,
        clean_output=clean,
        output_change=layout.to_map(change.transpose(1, 2)),
        feature_index=layout.index.reshape(layout.index.shape[0], *layout.map_shape),
        score=score,
        value_range=lo_hi,
    )


def _as_tensor(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, np.ndarray):
        return torch.from_numpy(inputs)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"Expected `inputs` to be a torch.Tensor or numpy array, but got {type(inputs).__name__}.")
    return inputs


def _as_batch(inputs: torch.Tensor, *, image: bool) -> torch.Tensor:
    """Give images a batch and channel dimension, and reject channels-last layouts."""
    shape = tuple(inputs.shape)
    if not image:
        if inputs.dim() < 2:
            raise ValueError(
                f"Expected `inputs` with a feature_mask to be a batch (N, ...), but got shape {shape}. "
                "Add a batch dimension with inputs.unsqueeze(0)."
            )
        return inputs
    if inputs.dim() == 2:
        return inputs[None, None]
    if inputs.dim() == 3:
        _check_channels_first(shape[0], shape[-1], shape, "(C, H, W)", "x.permute(2, 0, 1)")
        return inputs[None]
    if inputs.dim() == 4:
        _check_channels_first(shape[1], shape[-1], shape, "(N, C, H, W)", "x.permute(0, 3, 1, 2)")
        return inputs
    raise ValueError(
        f"Expected image `inputs` of shape (H, W), (C, H, W) or (N, C, H, W), but got {shape}. "
        "For other inputs pass a feature_mask that assigns the elements of each feature form a feature."
    )


def _check_channels_first(channels: int, last: int, shape: tuple[int, ...], layout: str, fix: str) -> None:
    if last in (1, 3) and channels not in (1, 3):
        raise ValueError(
            f"Expected images laid out as {layout}, but got shape {shape}, which looks channels-last. "
            f"Permute it with {fix}."
        )


def _build_layout(inputs: torch.Tensor, patch_size: int | None, feature_mask: torch.Tensor | None) -> FeatureLayout:
    if feature_mask is not None:
        if patch_size is not None:
            raise ValueError("Pass either `patch_size` or `feature_mask`, not both.")
        layout = mask_layout(feature_mask, tuple(inputs.shape))
        return FeatureLayout(
            index=layout.index.to(inputs.device), map_shape=layout.map_shape, feature_ids=layout.feature_ids
        )
    height, width = inputs.shape[-2:]
    if patch_size is None:
        return pixel_layout(height, width, inputs.dim() - 1, inputs.device)
    return patch_layout(height, width, patch_size, inputs.dim() - 1, inputs.device)


def _clean_forward(
    model: Model, inputs: torch.Tensor, output_fn: OutputFn | None, batch_size: int, shape_note: str = ""
) -> torch.Tensor:
    """Score the clean inputs, validating the model output and warning if the model is not deterministic.

    ``shape_note`` describes how an unbatched input was read. It is added to any error of the first
    forward pass, since a misread shape is the usual cause.
    """
    chunks = []
    for start in range(0, inputs.shape[0], batch_size):
        # Copies, because a model that writes into its input would otherwise change the caller's tensor.
        chunk = inputs[start : start + batch_size].clone()
        try:
            chunks.append(read_scores(model(chunk), output_fn, chunk.shape[0], check=True))
        except (TypeError, ValueError, RuntimeError) as error:
            if shape_note and start == 0 and hasattr(error, "add_note"):
                error.add_note(shape_note)
            raise
    clean = torch.cat(chunks)

    # A second pass over the first chunk reveals dropout or other randomness left active in the model.
    first = inputs[:batch_size].clone()
    again = read_scores(model(first), output_fn, first.shape[0], check=True)
    difference = float((again - clean[: first.shape[0]]).abs().max())
    scale = float(clean.abs().max()) + 1.0
    if difference > 16 * torch.finfo(clean.dtype).eps * scale:
        warnings.warn(
            f"Two forward passes on the same clean inputs differ by up to {difference:.3g}, so the model is not "
            "deterministic (is dropout or another random layer active?). The maps will contain this noise.",
            EfmapWarning,
            stacklevel=3,
        )
    return clean


def _shape_note(shape: tuple[int, ...]) -> str:
    """Say how an unbatched image shape was read, for errors that a wrong reading can cause."""
    if len(shape) == 2:
        return (
            f"Note: `inputs` of shape {shape} were read as one (H, W) grayscale image. For a batch of tabular "
            f"rows (N, F) pass feature_mask=torch.arange({shape[1]})."
        )
    if len(shape) == 3:
        return (
            f"Note: `inputs` of shape {shape} were read as one (C, H, W) image. For a batch of grayscale "
            "images (N, H, W) pass inputs.unsqueeze(1)."
        )
    return ""


def _resolve_target(target: TargetType, clean: torch.Tensor) -> torch.Tensor:
    """Convert ``target`` to one class index per input, checked against the output classes."""
    count, num_classes = clean.shape
    if target is None:
        return clean.argmax(dim=1)
    if isinstance(target, np.integer):
        target = int(target)
    if isinstance(target, bool):
        raise TypeError(f"Expected `target` to be an int, a sequence or a tensor of class indices, but got {target!r}.")
    if isinstance(target, int):
        targets = torch.full((count,), target, dtype=torch.int64, device=clean.device)
    else:
        if isinstance(target, torch.Tensor):
            tensor = target
        else:
            try:
                tensor = torch.as_tensor(list(target))
            except (TypeError, ValueError):
                raise TypeError(f"Expected `target` to hold class indices, but got {target!r}.") from None
        if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.is_complex():
            raise TypeError(
                f"Expected `target` to hold integer class indices, but got dtype {tensor.dtype}. "
                "Convert it with target.long() if the values are whole numbers."
            )
        if tensor.dim() == 0:
            tensor = tensor.expand(count)
        if tensor.dim() != 1:
            raise ValueError(
                f"Expected `target` to have one class index per input, shape ({count},), but got shape "
                f"{tuple(tensor.shape)}. For one-hot labels pass labels.argmax(dim=1)."
            )
        if tensor.shape[0] != count:
            raise ValueError(f"Expected `target` to have {count} entries, one per input, but got {tensor.shape[0]}.")
        targets = tensor.to(device=clean.device, dtype=torch.int64)

    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"Expected `target` class indices in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
            f"but got {bad}."
        )
    return targets

