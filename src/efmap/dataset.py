"""Explaining a whole data set: streaming, resumable and distributed runs.

The data set is cut into fixed chunks of ``chunk_size`` consecutive images.
Each chunk is explained in one call of :func:`efmap.explain`, merged into a
:class:`~efmap.HeatMapAccumulator` and, with an ``out_dir``, committed to disk
before the next chunk starts. Chunks are dealt to ``torch.distributed`` ranks
round-robin. Because a chunk is always explained the same way, whichever rank
runs it and whenever, restarts and rank counts cannot change its maps.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from efmap._checkpoint import atomic_save, model_digest, tensor_digest
from efmap._checks import check_batch_size, check_value_range
from efmap._datasource import DataProbe, DataSource, label_rows, probe_data, resolve_source, split_batch
from efmap._distributed import barrier, first_disagreeing_rank, rank_and_world, reduce_accumulator, reduce_rows
from efmap._model import OutputFn, evaluation_mode
from efmap._rundir import RUN_OPTIONS_KEY, RunDirectory, fingerprint_digest, map_options
from efmap._typing import Model, Reduction, ScoreMode, ValueRange
from efmap._version import __version__
from efmap._warnings import EfmapWarning
from efmap.merge import HeatMapAccumulator
from efmap.scoring import DEFAULT_BATCH_SIZE, explain

__all__ = ["DatasetExplanation", "RunProgress", "explain_dataset"]

#: Default number of consecutive images explained, merged and committed together.
DEFAULT_CHUNK_SIZE = 8

# Normalised maps are rounded to multiples of 2**-24, below float32 resolution near 1. Sums of such values
# are exact in float64 for fewer than 2**29 maps, so they do not depend on the order of addition.
_GRID_STEPS = float(2**24)


@dataclass(frozen=True)
class RunProgress:
    """Progress of one rank, passed to a ``progress`` callback after every batch of forward passes.

    Attributes
    ----------
    rank
        The rank reporting, 0 without ``torch.distributed``.
    images_done, images_total
        Images of this rank's share that are finished (resumed ones included) and in total.
    passes_done, passes_total
        Perturbed forward passes (one per image and feature) done and in total for this rank's share.
    passes_per_second
        Forward passes per second since this call started; NaN before the first batch.
    seconds_left
        Estimated time left for this rank at that rate, in seconds; NaN before the first batch.
    """

    rank: int
    images_done: int
    images_total: int
    passes_done: int
    passes_total: int
    passes_per_second: float
    seconds_left: float


@dataclass(frozen=True)
class DatasetExplanation:
    """Result of :func:`explain_dataset` for a data set of ``N`` inputs.

    Attributes
    ----------
    accumulator
        Merged normalised positive maps per class; the class is the explained target or the
        data set label, as chosen by ``labels_from``. Identical on every rank.
    targets
        Explained class per input, int64, shape ``(N,)``.
    labels
        Data set label per input, int64, shape ``(N,)``; -1 where the data set has none.
    maps
        Raw positive map per input, float32, shape ``(N, *map_shape)``, as a read-only memory
        map of ``out_dir/maps.npy``; None unless ``store_maps=True``.
    num_features
        Number of features scored per input.
    out_dir
        The run directory, or None.
    images_explained
        Inputs explained by this call, summed over ranks. The other ``N - images_explained`` were
        loaded from the checkpoints in ``out_dir``, so 0 means that the run was already complete.
    """

    accumulator: HeatMapAccumulator
    targets: np.ndarray
    labels: np.ndarray
    maps: np.ndarray | None
    num_features: int
    out_dir: Path | None
    images_explained: int

    def class_maps(self) -> dict[int, torch.Tensor]:
        """Return the merged map of every class, keyed by class, as float64."""
        return self.accumulator.class_maps()

    def overall(self, over: Literal["classes", "inputs"] = "classes") -> torch.Tensor:
        """Return the map merged over all classes (see :meth:`efmap.merge.HeatMapAccumulator.overall`)."""
        return self.accumulator.overall(over)


@dataclass(frozen=True)
class _Options:
    score: ScoreMode
    target: int | Literal["label"] | None
    labels_from: Literal["target", "dataset"]
    batch_size: int
    chunk_size: int
    value_range: ValueRange
    patch_size: int | None
    feature_mask: torch.Tensor | None
    output_fn: OutputFn | None
    reduction: Reduction
    store_maps: bool

    @property
    def uses_labels(self) -> bool:
        return self.labels_from == "dataset" or self.target == "label"

    @property
    def label_option(self) -> str | None:
        """The option that needs data set labels, as written in a call, or None."""
        if self.labels_from == "dataset":
            return "labels_from='dataset'"
        return "target='label'" if self.target == "label" else None


def explain_dataset(
    model: Model,
    data: Dataset[Any] | DataLoader[Any],
    *,
    out_dir: str | PathLike[str] | None = None,
    store_maps: bool = False,
    labels_from: Literal["target", "dataset"] = "target",
    target: int | Literal["label"] | None = None,
    score: ScoreMode = "max",
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    value_range: ValueRange = (-1.0, 1.0),
    patch_size: int | None = None,
    feature_mask: torch.Tensor | None = None,
    output_fn: OutputFn | None = None,
    reduction: Reduction = "mean",
    progress: bool | Callable[[RunProgress], None] = False,
    check_range: bool = True,
    overwrite: bool = False,
) -> DatasetExplanation:
    """Explain every input of a data set and merge the positive maps per class and overall.

    Parameters
    ----------
    model
        Callable from a batch ``(N, ...)`` to class scores ``(N, K)``, as for :func:`efmap.explain`.
    data
        A map-style ``Dataset`` whose items are an input ``(C, H, W)``, a 1-tuple ``(input,)`` or a
        pair ``(input, label)``. Or a ``DataLoader`` over one that reads it in order: its ``collate_fn``
        and ``num_workers`` are used, and ``chunk_size`` replaces its batch size.
    out_dir
        Directory for checkpoints and stores. With it the run is resumable: call again with the
        same arguments to continue after an interruption. Default None: nothing is written.
    store_maps
        Keep every raw positive map in ``out_dir/maps.npy`` (needs ``out_dir``). Default False.
    labels_from
        Class under which each map is merged: ``"target"`` (default) for the explained class,
        ``"dataset"`` for the label from the data set.
    target
        With ``score="target"``: None (default) for the predicted class, an int for one class,
        or ``"label"`` for each input's data set label.
    score
        ``"max"`` (default) or ``"target"``, as for :func:`efmap.explain`.
    batch_size
        Perturbed copies per forward pass. Default 64.
    chunk_size
        Consecutive inputs explained and committed together. A run killed mid-chunk repeats at
        most one chunk per rank. Default 8.
    value_range
        Interval ``(lo, hi)`` of valid input values. Default ``(-1.0, 1.0)``.
    patch_size, feature_mask, output_fn
        As for :func:`efmap.explain`. A ``feature_mask`` applies to every input.
    reduction
        How the accumulator merges maps: ``"mean"`` (default), ``"max"`` or ``"sum"``.
    progress
        ``True`` shows a tqdm bar on rank 0 with forward passes per second and the estimated time
        left; a callable receives a :class:`RunProgress` on every rank. Default False.
    check_range
        Reject a first input that uses only the upper half of ``value_range``. Inputs outside the
        range are rejected in every chunk regardless. Default True.
    overwrite
        Discard a run found in ``out_dir`` instead of resuming it. Default False.

    Returns
    -------
    DatasetExplanation
        The merged accumulator, per-input targets and labels, and the lazily read map store.

    Raises
    ------
    TypeError
        If ``data`` is not a map-style data set or such a loader, its items are neither an input nor
        a pair, or labels are not integers.
    ValueError
        If an option is invalid, an input is outside ``value_range``, or ``out_dir`` holds a run
        started with other arguments (the message lists them) and ``overwrite`` is False.

    Notes
    -----
    **Resuming.** After each chunk the stores are flushed and the rank's progress and accumulator
    state are written to a temporary file, fsynced and renamed over the last checkpoint. A run killed
    at any moment and restarted with the same arguments ends with bit-identical merged maps and
    stores. The fingerprint that must match covers a SHA-256 of the model's ``state_dict``, the data
    set length, a SHA-256 of the first input and every option that affects the result, the number
    of ranks included. ``batch_size``, ``progress`` and ``check_range`` are not part of it, so a run
    may resume with another batch size (a forward pass on a batch of another size can round
    differently, so maps explained after the change may differ in the last bits). Forward passes
    must be deterministic: on a GPU, set ``torch.use_deterministic_algorithms(True)``.

    The saved ``out_dir/accumulator.pt`` also holds, under ``"run_options"``, the options that define
    the maps (model SHA-256, input and map shape, score, target, labels_from, value_range,
    patch_size, feature_mask, output_fn), so that ``efmap merge`` can reject unrelated runs.

    **Distributed runs.** When a ``torch.distributed`` process group is initialised (for example by
    ``torchrun``), rank ``r`` explains chunks ``r, r + W, r + 2W, ...`` of the ``W`` ranks, writing its
    rows of the shared stores, and the accumulators are reduced with ``all_reduce`` at the end. Every
    rank returns the same result, which equals a single-process run bit for bit. ``out_dir`` must
    be shared by all ranks.

    **Exact merging.** Each positive map is min-max normalised and rounded to a multiple of
    ``2**-24`` (below float32 resolution near 1) before it is merged. Sums of such values are exact
    in float64, so the merged maps do not depend on the order of addition.

    Examples
    --------
    >>> import torch, efmap
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    >>> images = torch.rand(6, 1, 4, 4) * 2 - 1
    >>> data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]))
    >>> result = efmap.explain_dataset(model, data, labels_from="dataset", chunk_size=4)
    >>> sorted(result.class_maps()), tuple(result.overall().shape)
    ([0, 1, 2], (4, 4))
    """
    options = _check_options(
        score, target, labels_from, batch_size, chunk_size, value_range, patch_size, feature_mask, output_fn,
        reduction, store_maps, out_dir,
    )  # fmt: skip
    _check_progress(progress)
    source = resolve_source(data)
    probe = probe_data(
        source,
        value_range=options.value_range,
        patch_size=options.patch_size,
        feature_mask=options.feature_mask,
        label_option=options.label_option,
        check_range=check_range,
    )
    rank, world_size = rank_and_world()

    fingerprint = _fingerprint(model, source, probe, options, world_size)
    disagreeing = first_disagreeing_rank(json.dumps(fingerprint, sort_keys=True))
    if disagreeing is not None:
        raise ValueError(
            f"Expected every rank to pass the same model, data set and options, but rank {disagreeing} differs "
            "from rank 0."
        )
    digest = fingerprint_digest(fingerprint)

    accumulator = HeatMapAccumulator(reduction, normalize="minmax", dims=len(probe.map_shape))
    num_blocks = math.ceil(source.length / options.chunk_size)
    blocks = list(range(rank, num_blocks, world_size))
    run = None
    blocks_done = 0
    if out_dir is not None:
        run = RunDirectory(Path(out_dir), rank, world_size)
        run.prepare(
            fingerprint, overwrite=overwrite, num_images=source.length, map_shape=probe.map_shape,
            store_maps=options.store_maps,
        )  # fmt: skip
        blocks_done = run.load_state(accumulator, digest, len(blocks))
        targets, labels, maps = run.open_stores(writable=True, store_maps=options.store_maps)
    else:
        targets = np.full(source.length, -1, dtype=np.int64)
        labels = np.full(source.length, -1, dtype=np.int64)
        maps = None

    sizes = [len(_block_range(block, options.chunk_size, source.length)) for block in blocks]
    meter = _Meter(progress, rank, sum(sizes), sum(sizes[:blocks_done]), probe.num_features)
    explained_here = sum(sizes[blocks_done:])
    try:
        with evaluation_mode(model):
            for position, block, batch in _pending(source, options, blocks, blocks_done):
                rows = _block_range(block, options.chunk_size, source.length)
                _explain_chunk(model, batch, rows, options, probe, accumulator, (targets, labels, maps), meter)
                if run is not None:
                    _flush(targets, labels, maps)
                    run.commit(position + 1, accumulator, digest)
                meter.finish_chunk(len(rows))
    finally:
        meter.close()

    saved_options = map_options(fingerprint, probe.map_shape)
    return _finish(accumulator, probe, run, options, (targets, labels, maps), saved_options, explained_here)


def _check_options(
    score: Any,
    target: Any,
    labels_from: Any,
    batch_size: Any,
    chunk_size: Any,
    value_range: Any,
    patch_size: Any,
    feature_mask: Any,
    output_fn: Any,
    reduction: Any,
    store_maps: Any,
    out_dir: Any,
) -> _Options:
    """Validate every option before any data is read."""
    if score not in ("max", "target"):
        raise ValueError(f"Expected `score` to be 'max' or 'target', but got {score!r}.")
    if target is not None and score != "target":
        raise ValueError(f"Expected `target` to be None with score='max', but got {target!r}. Pass score='target'.")
    if target is not None and target != "label" and (isinstance(target, bool) or not isinstance(target, int)):
        raise TypeError(f"Expected `target` to be None, an int class index or 'label', but got {target!r}.")
    if isinstance(target, int) and target < 0:
        raise ValueError(f"Expected `target` to be a non-negative class index, but got {target}.")
    if labels_from not in ("target", "dataset"):
        raise ValueError(f"Expected `labels_from` to be 'target' or 'dataset', but got {labels_from!r}.")
    if reduction not in ("mean", "max", "sum"):
        raise ValueError(f"Expected `reduction` to be 'mean', 'max' or 'sum', but got {reduction!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be a positive integer, but got {chunk_size!r}.")
    if store_maps and out_dir is None:
        raise ValueError(
            "Expected `out_dir` with store_maps=True, but got None: the maps are stored in out_dir/maps.npy."
        )
    if feature_mask is not None and not isinstance(feature_mask, torch.Tensor):
        raise TypeError(
            f"Expected `feature_mask` to be an integer torch.Tensor, but got {type(feature_mask).__name__}."
        )
    return _Options(
        score=score,
        target=target,
        labels_from=labels_from,
        batch_size=check_batch_size(batch_size),
        chunk_size=chunk_size,
        value_range=check_value_range(value_range),
        patch_size=patch_size,
        feature_mask=feature_mask,
        output_fn=output_fn,
        reduction=reduction,
        store_maps=bool(store_maps),
    )


def _check_progress(progress: object) -> None:
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"Expected `progress` to be a bool or a callable taking a RunProgress, but got {progress!r}.")


def _fingerprint(
    model: Model, source: DataSource, probe: DataProbe, options: _Options, world_size: int
) -> dict[str, Any]:
    mask = options.feature_mask
    output_fn = options.output_fn
    return {
        "model": model_digest(model),
        "dataset_length": source.length,
        "first_input": probe.first_digest,
        "input_shape": list(probe.input_shape),
        "score": options.score,
        "target": options.target,
        "labels_from": options.labels_from,
        "chunk_size": options.chunk_size,
        "value_range": list(options.value_range),
        "patch_size": options.patch_size,
        "feature_mask": None if mask is None else tensor_digest(mask).hexdigest(),
        "output_fn": None if output_fn is None else getattr(output_fn, "__qualname__", type(output_fn).__qualname__),
        "reduction": options.reduction,
        "store_maps": options.store_maps,
        "world_size": world_size,
        "efmap_version": __version__,
    }


def _sum_over_ranks(count: int, rank: int, world_size: int) -> int:
    # Each rank fills its own row and MAX-reduction over rows that are -1 elsewhere collects them all.
    rows = np.full(world_size, -1, dtype=np.int64)
    rows[rank] = count
    return int(reduce_rows(rows, -1).sum())


def _block_range(block: int, chunk_size: int, length: int) -> range:
    return range(block * chunk_size, min(length, (block + 1) * chunk_size))


def _pending(
    source: DataSource, options: _Options, blocks: list[int], blocks_done: int
) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(position, block, batch)`` for every block of this rank that is not committed yet."""
    remaining = blocks[blocks_done:]
    indices = [i for block in remaining for i in _block_range(block, options.chunk_size, source.length)]
    if not indices:
        return
    # Only the data set's last block can be short, and it comes last, so batches line up with blocks.
    yield from zip(range(blocks_done, len(blocks)), remaining, source.batches(indices, options.chunk_size), strict=True)


def _explain_chunk(
    model: Model,
    batch: Any,
    rows: range,
    options: _Options,
    probe: DataProbe,
    accumulator: HeatMapAccumulator,
    stores: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    meter: _Meter,
) -> None:
    """Explain one chunk, merge its maps and write its rows of the stores."""
    inputs, labels = split_batch(batch, probe.item_length)
    if inputs.shape[0] != len(rows):
        raise ValueError(
            f"Expected a chunk of {len(rows)} inputs (rows {rows.start} to {rows.stop - 1}), but the collate_fn "
            f"returned {inputs.shape[0]}."
        )
    chunk_labels = label_rows(labels, len(rows), strict=options.uses_labels) if labels is not None else None
    target: Any = chunk_labels if options.target == "label" else options.target
    result = explain(
        model,
        inputs,
        target=target,
        score=options.score,
        batch_size=options.batch_size,
        value_range=options.value_range,
        patch_size=options.patch_size,
        feature_mask=options.feature_mask,
        output_fn=options.output_fn,
        progress=meter.explain_callback,
        check_range=False,
    )
    keys = result.target if options.labels_from == "target" else chunk_labels
    accumulator.update(_grid_normalize(result.positive), keys)  # type: ignore[arg-type]

    targets, labels_store, maps = stores
    targets[rows.start : rows.stop] = result.target.cpu().numpy()
    if chunk_labels is not None:
        labels_store[rows.start : rows.stop] = chunk_labels.numpy()
    if maps is not None:
        maps[rows.start : rows.stop] = result.positive.detach().to(device="cpu", dtype=torch.float32).numpy()


def _grid_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map in float64 and round it to a multiple of ``2**-24``.

    The result has minimum 0 and maximum 1 exactly (a constant map becomes zeros), so the
    accumulator's own min-max normalisation leaves it unchanged.
    """
    flat = maps.detach().to(device="cpu", dtype=torch.float64).reshape(maps.shape[0], -1)
    low = flat.amin(dim=1, keepdim=True)
    spread = flat.amax(dim=1, keepdim=True) - low
    scaled = (flat - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    return (torch.round(scaled * _GRID_STEPS) / _GRID_STEPS).reshape(maps.shape)


def _flush(*stores: np.ndarray | None) -> None:
    for store in stores:
        if isinstance(store, np.memmap):
            store.flush()


def _finish(
    accumulator: HeatMapAccumulator,
    probe: DataProbe,
    run: RunDirectory | None,
    options: _Options,
    stores: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    saved_options: dict[str, Any],
    explained_here: int,
) -> DatasetExplanation:
    """Reduce the accumulators and counts across ranks, save the result and reopen the stores read-only."""
    merged = reduce_accumulator(accumulator, probe.map_shape)
    rank, world_size = rank_and_world()
    images_explained = _sum_over_ranks(explained_here, rank, world_size)
    targets, labels, maps = stores
    if run is None:
        targets = reduce_rows(targets, -1)
        labels = reduce_rows(labels, -1)
    else:
        _flush(targets, labels, maps)
        del targets, labels, maps
        if run.rank == 0:
            atomic_save({**merged.state_dict(), RUN_OPTIONS_KEY: saved_options}, run.result)
        barrier()
        targets, labels, maps = run.open_stores(writable=False, store_maps=options.store_maps)
    return DatasetExplanation(
        accumulator=merged,
        targets=targets,
        labels=labels,
        maps=maps,
        num_features=probe.num_features,
        out_dir=None if run is None else run.path,
        images_explained=images_explained,
    )


class _Meter:
    """Progress of one rank in images and forward passes, shown by tqdm or sent to a callback."""

    def __init__(
        self,
        progress: bool | Callable[[RunProgress], None],
        rank: int,
        images_total: int,
        images_done: int,
        passes_per_image: int,
    ) -> None:
        self.rank = rank
        self.images_total = images_total
        self.images_done = images_done
        self.passes_per_image = passes_per_image
        self.passes_total = images_total * passes_per_image
        self.passes_committed = images_done * passes_per_image
        self.passes_done = self.passes_committed
        self.passes_at_start = self.passes_done
        self.start = time.perf_counter()
        self._callback = progress if callable(progress) and not isinstance(progress, bool) else None
        self._bar: Any = None
        if progress is True and rank == 0:
            self._bar = _make_bar(self.passes_total, self.passes_done)
        if self._bar is not None:
            self._set_postfix()

    def explain_callback(self, done: int, total: int) -> None:
        """Receive ``(done, total)`` forward passes of the current chunk from :func:`efmap.explain`."""
        self._advance(self.passes_committed + done)

    def finish_chunk(self, images: int) -> None:
        """Count ``images`` more finished images."""
        self.images_done += images
        self.passes_committed += images * self.passes_per_image
        self._advance(self.passes_committed)

    def _advance(self, passes_done: int) -> None:
        if self._bar is not None:
            self._bar.update(passes_done - self.passes_done)
        self.passes_done = passes_done
        if self._bar is not None:
            self._set_postfix()
        if self._callback is not None:
            self._callback(self._snapshot())

    def _snapshot(self) -> RunProgress:
        elapsed = time.perf_counter() - self.start
        passes = self.passes_done - self.passes_at_start
        rate = passes / elapsed if passes > 0 and elapsed > 0 else math.nan
        left = (self.passes_total - self.passes_done) / rate if rate == rate and rate > 0 else math.nan
        return RunProgress(
            rank=self.rank,
            images_done=self.images_done,
            images_total=self.images_total,
            passes_done=self.passes_done,
            passes_total=self.passes_total,
            passes_per_second=rate,
            seconds_left=left,
        )

    def _set_postfix(self) -> None:
        self._bar.set_postfix_str(f"images {self.images_done}/{self.images_total}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _make_bar(total: int, initial: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn(
            "progress=True needs tqdm, which is not installed; install it with `pip install efmap[progress]`. "
            "Continuing without a progress bar.",
            EfmapWarning,
            stacklevel=4,
        )
        return None
    return tqdm(total=total, initial=initial, desc="efmap", unit="fwd", unit_scale=True)
