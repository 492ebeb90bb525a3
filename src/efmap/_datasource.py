"""Reading a data set for :func:`efmap.explain_dataset`: sources, the first item and labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset, default_collate

from efmap._checkpoint import tensor_digest
from efmap._checks import check_finite, check_floating, check_in_range
from efmap._typing import ValueRange
from efmap.scoring import _as_batch, _build_layout


@dataclass(frozen=True)
class DataSource:
    """A map-style data set with the collate function and worker count to read it with."""

    dataset: Any
    collate: Callable[[list[Any]], Any]
    num_workers: int
    length: int

    def batches(self, indices: list[int], chunk_size: int) -> Iterator[Any]:
        """Iterate over the items at ``indices`` in order, collated in batches of ``chunk_size``."""
        loader = DataLoader(
            Subset(self.dataset, indices),
            batch_size=chunk_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )
        return iter(loader)


@dataclass(frozen=True)
class DataProbe:
    """Structure, input shape and feature layout of the items, read from the first one."""

    item_length: int | None  # None for bare inputs, 1 for (input,), 2 for (input, label)
    input_shape: tuple[int, ...]
    map_shape: tuple[int, ...]
    num_features: int
    first_digest: str


def resolve_source(data: object) -> DataSource:
    """Return the data set, collate function and worker count to read ``data`` with."""
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(
                "Expected a DataLoader over a map-style data set, but got one over an IterableDataset. "
                "Runs address inputs by index to shard and resume them."
            )
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"Expected a DataLoader that reads the data set in order, but got one with a "
                f"{type(data.sampler).__name__}. Create it with shuffle=False and no sampler: explain_dataset "
                "shards the data set across ranks itself."
            )
        # Without automatic batching the loader's collate_fn converts single items and cannot batch.
        collate = data.collate_fn if data.batch_size is not None else default_collate
        return DataSource(data.dataset, collate, data.num_workers, _length(data.dataset))
    if isinstance(data, IterableDataset):
        raise TypeError(
            "Expected a map-style data set with __len__ and __getitem__, but got an IterableDataset. "
            "Runs address inputs by index to shard and resume them."
        )
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TypeError(
            f"Expected `data` to be a map-style torch Dataset or a DataLoader, but got {type(data).__name__}."
        )
    return DataSource(data, default_collate, 0, _length(data))


def _length(dataset: Any) -> int:
    length = len(dataset)
    if length < 1:
        raise ValueError("Expected a data set with at least one input, but got an empty one.")
    return length


def probe_data(
    source: DataSource,
    *,
    value_range: ValueRange,
    patch_size: int | None,
    feature_mask: torch.Tensor | None,
    label_option: str | None,
    check_range: bool,
) -> DataProbe:
    """Read the first item to check the inputs, labels and feature layout before any forward pass."""
    item = source.dataset[0]
    item_length = None
    if not isinstance(item, (torch.Tensor, np.ndarray)):
        item_length = len(item) if isinstance(item, (tuple, list)) else 0
    if item_length not in (None, 1, 2):
        raise TypeError(
            f"Expected data set items to be an input tensor, a 1-tuple (input,) or a pair (input, label), but got "
            f"{type(item).__name__}{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}."
        )
    if label_option is not None and item_length != 2:
        raise ValueError(
            f"Expected data set items (input, label) with {label_option}, but the items are inputs without labels. "
            "Use labels_from='target' and target=None, or a data set that yields labels."
        )

    inputs, labels = split_batch(source.collate([item]), item_length)
    check_floating(inputs, "inputs")
    check_finite(inputs, "inputs")
    check_in_range(inputs, "inputs", value_range, strict=check_range)
    if label_option is not None:
        label_rows(labels, 1, strict=True)
    batch = _as_batch(inputs, image=feature_mask is None)
    layout = _build_layout(batch, patch_size, feature_mask)
    return DataProbe(
        item_length=item_length,
        input_shape=tuple(batch.shape[1:]),
        map_shape=tuple(layout.map_shape),
        num_features=layout.num_features,
        first_digest=tensor_digest(inputs).hexdigest(),
    )


def split_batch(batch: Any, item_length: int | None) -> tuple[torch.Tensor, Any]:
    if item_length is None:
        inputs, labels = batch, None
    else:
        inputs, labels = batch[0], (batch[1] if item_length == 2 else None)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"Expected the collated inputs to be a tensor, but got {type(inputs).__name__}. Return tensors or "
            "numpy arrays from the data set, or pass a DataLoader whose collate_fn stacks them."
        )
    return inputs, labels


def label_rows(labels: Any, count: int, *, strict: bool) -> torch.Tensor | None:
    """Return the labels as int64 ``(count,)``; when not ``strict``, None for labels that are not class indices."""
    tensor = labels if isinstance(labels, torch.Tensor) else None
    valid = (
        tensor is not None
        and not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
        and tensor.dim() == 1
        and tensor.shape[0] == count
        and (count == 0 or int(tensor.min()) >= 0)
    )
    if valid:
        return tensor.to(device="cpu", dtype=torch.int64)  # type: ignore[union-attr]
    if not strict:
        return None
    if tensor is None or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        kind = type(labels).__name__ if tensor is None else str(tensor.dtype)
        raise TypeError(f"Expected data set labels to be integer class indices, but got {kind}.")
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(
            f"Expected one class index per input, shape ({count},), but got labels of shape {tuple(tensor.shape)}. "
            "For one-hot labels return label.argmax() from the data set."
        )
    raise ValueError(f"Expected non-negative class indices as labels, but got {int(tensor.min())}.")
