"""The dense scoring engine: one forward pass per (input, feature) perturbation.

Perturbed copies are built in one buffer of ``batch_size`` rows that lives for
the whole run. Each row contains a copy of its clean input. For every chunk
only the elements of the reversed features are written, and they get their
clean values back before the next chunk. Building a chunk therefore touches a
few elements per copy instead of whole inputs, and no input-sized tensor is
allocated per chunk.

With ``batch_size="auto"`` a short timed probe over the first chunks of the
real work picks the batch size and, for 4-D inputs, the memory format. The
probe's forward passes are part of the result, so only the time its slower
settings lose is overhead.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from efmap._model import OutputFn, read_scores
from efmap._progress import Progress
from efmap._typing import BatchSize, Model, ProgressType
from efmap.features import FeatureLayout

__all__ = ["check_batch_option", "dense_outputs"]

logger = logging.getLogger(__name__)

#: Batch size when ``batch_size="auto"`` skips the probe because the work is small.
SMALL_WORK_BATCH_SIZE = 64
#: Fewest perturbed copies for which ``batch_size="auto"`` runs the timed probe.
PROBE_MIN_COPIES = 256
#: Largest share of the perturbed copies that the probe may compute.
PROBE_FRACTION = 0.2
#: Batch size at which the probe compares memory formats, and its smallest candidate.
PROBE_FIRST_BATCH = 8
#: Largest batch the probe tries: at most this many copies ...
PROBE_MAX_BATCH = 4096
#: ... and at most this many bytes of perturbed inputs per batch.
PROBE_MAX_BATCH_BYTES = 64 * 2**20
#: Chunks shorter than this are dominated by the fixed cost per chunk (tens of microseconds of
#: Python and dispatch), so the probe grows the batch faster and settles on a larger one.
PROBE_MIN_CHUNK_SECONDS = 0.004
#: Each setting is timed on at least two chunks, and on up to this many while their total time is
#: below ``PROBE_MIN_TIMED_SECONDS``.
PROBE_MAX_TIMED_CHUNKS = 6
PROBE_MIN_TIMED_SECONDS = 0.02
#: A batch size whose throughput is below this share of the best seen ends the search upwards.
PROBE_STOP_SHARE = 0.9
#: Among measured batch sizes, the smallest one within this share of the best throughput is chosen.
PROBE_CHOOSE_SHARE = 0.97


def check_batch_option(batch_size: object) -> BatchSize:
    """Validate ``batch_size``: a positive integer or ``"auto"``."""
    if batch_size == "auto":
        return "auto"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive integer or 'auto', but got {batch_size!r}.")
    return batch_size


def dense_outputs(
    model: Model,
    output_fn: OutputFn | None,
    inputs: torch.Tensor,
    reversed_inputs: torch.Tensor,
    layout: FeatureLayout,
    batch_size: BatchSize,
    progress: ProgressType,
) -> torch.Tensor:
    """Run the model on every (input, feature) perturbation and return the class scores ``(N, F, K)``.

    Copy ``g`` of the flattened grid is input ``g // F`` with feature ``g % F``
    taken from ``reversed_inputs``. At most ``batch_size`` copies exist at once
    (with ``"auto"``, at most the largest batch the probe tries). Elements whose
    layout index is negative belong to no feature and are never reversed.
    """
    count = inputs.shape[0]
    num_features = layout.num_features
    total = count * num_features
    elements = FeatureElements(layout, tuple(inputs.shape[1:]))
    bar = Progress(progress, total, "efmap")
    runner = _Runner(model, output_fn, inputs, reversed_inputs, elements, bar)
    own_format = _input_memory_format(inputs)

    try:
        if batch_size != "auto":
            _log_start(num_features, count, total, batch_size, own_format)
            _run_remaining(runner, min(batch_size, total), own_format, halve_on_oom=False)
        elif total < PROBE_MIN_COPIES:
            _log_start(num_features, count, total, min(SMALL_WORK_BATCH_SIZE, total), own_format)
            _run_remaining(runner, min(SMALL_WORK_BATCH_SIZE, total), own_format, halve_on_oom=True)
        else:
            plan = _probe(runner, _candidate_formats(model, inputs), _largest_batch(inputs, total))
            remaining = total - runner.cursor
            logger.info(
                "Scoring %d feature(s) of %d input(s): %d forward passes in batches of %d (%s memory format); "
                "estimated %.1f s at %.0f passes/s, measured by a probe over the first %d passes.",
                num_features,
                count,
                total,
                plan.batch_size,
                _format_name(plan.memory_format),
                remaining / plan.rate,
                plan.rate,
                runner.cursor,
            )
            _run_remaining(runner, plan.batch_size, plan.memory_format, halve_on_oom=True)
    finally:
        bar.close()

    return runner.result().reshape(count, num_features, -1)


class FeatureElements:
    """Positions of the input elements of every feature, grouped by feature.

    ``key = m * F + f`` names feature ``f`` of layout row ``m`` (``m`` is 0 when
    one layout serves every input). Positions are flat, logical (row-major)
    offsets inside one input, sorted by key: feature ``key`` owns
    ``positions[offsets[key] : offsets[key] + counts[key]]``. Index arithmetic
    runs in NumPy, whose calls cost far less than PyTorch's on arrays this small.
    """

    def __init__(self, layout: FeatureLayout, sample_shape: tuple[int, ...]) -> None:
        rows = layout.index.shape[0]
        index = layout.index.to("cpu").expand(rows, *sample_shape).reshape(rows, -1).numpy()
        self.num_features = layout.num_features
        self.per_input = rows > 1
        self.sample_size = index.shape[1]

        valid = index >= 0
        keys = (np.arange(rows)[:, None] * self.num_features + index)[valid]
        positions = np.broadcast_to(np.arange(self.sample_size), index.shape)[valid]
        order = np.argsort(keys, kind="stable")
        self.positions = positions[order]
        self.counts = np.bincount(keys, minlength=rows * self.num_features)
        self.offsets = np.cumsum(self.counts) - self.counts
        width = int(self.counts[0]) if self.counts.size else 0
        #: Every feature has ``width`` elements, so positions also form a ``(keys, width)`` matrix.
        self.uniform = width > 0 and bool((self.counts == width).all())

    def select(self, keys: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(slot, position)`` for every element of the features ``keys``; ``slot`` indexes ``keys``.

        ``positions`` is :attr:`positions`, or the same positions mapped to another memory format.
        """
        if self.uniform:
            selected = positions.reshape(self.counts.size, -1)[keys]
            slots = np.repeat(np.arange(keys.size), selected.shape[1])
            return slots, selected.reshape(-1)
        lengths = self.counts[keys]
        slots = np.repeat(np.arange(keys.size), lengths)
        # Element j of the output belongs to slot s and is element j - first_output[s] of that feature.
        shift = self.offsets[keys] - (np.cumsum(lengths) - lengths)
        return slots, positions[np.arange(slots.size) + shift[slots]]


class PerturbationBuffer:
    """A reused buffer of ``capacity`` perturbed copies in one memory format.

    :meth:`fill` returns copies ``start .. stop - 1`` as a view of the buffer;
    the view is valid until the next call. Rows are copied from the clean
    inputs only when a row moves to another input, or after the model wrote
    into its input (detected through the buffer's version counter).

    All element offsets are storage offsets in the buffer's memory format, and
    the clean and reversed inputs are kept in the same order, so one offset
    serves both as destination and as source.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        reversed_inputs: torch.Tensor,
        elements: FeatureElements,
        capacity: int,
        memory_format: torch.memory_format,
    ) -> None:
        self.elements = elements
        self.capacity = capacity
        self.memory_format = memory_format
        self.sample_size = elements.sample_size
        self.clean_rows = _storage_rows(inputs, memory_format)
        self.reversed_rows = _storage_rows(reversed_inputs, memory_format)
        physical = _physical_offsets(tuple(inputs.shape[1:]), memory_format)
        self.positions = elements.positions if physical is None else physical[elements.positions]
        # A normal (non-inference) tensor keeps a version counter even inside inference mode,
        # and that counter reveals a model that modifies its input in place.
        # NOTE: writes through ``x.data``, which has its own counter, go unnoticed.
        with torch.inference_mode(False):
            self.buffer = torch.empty(
                (capacity, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device, memory_format=memory_format
            )
            self.rows = self.buffer.as_strided((capacity, self.sample_size), (self.sample_size, 1))
        self.row_input = np.full(capacity, -1, dtype=np.int64)
        self.written: tuple[torch.Tensor, torch.Tensor] | None = None
        self.version = self.buffer._version

    def fill(self, start: int, stop: int) -> torch.Tensor:
        """Build copies ``start .. stop - 1`` of the flattened (input, feature) grid and return them."""
        count = stop - start
        grid = np.arange(start, stop)
        samples = grid // self.elements.num_features

        if self.buffer._version != self.version:
            # The model wrote into its input: every row is rebuilt from the clean inputs.
            logger.debug("The model modified its input in place; perturbed rows are rebuilt from the clean inputs.")
            self.row_input[:] = -1
            self.written = None
        moved = np.flatnonzero(self.row_input[:count] != samples)
        if moved.size == count:
            # Every row is copied again below, so the last chunk's reversed elements need no restoring.
            self.row_input[count:] = -1
            self.written = None
        self._restore()
        if moved.size:
            # Rows between the first and the last moved one are all clean now, so copying them again is harmless.
            low, high = int(moved[0]), int(moved[-1]) + 1
            indices = self._to_device(samples[low:high])
            torch.index_select(self.clean_rows, 0, indices, out=self.rows[low:high])
            self.row_input[low:high] = samples[low:high]

        keys = grid if self.elements.per_input else grid - samples * self.elements.num_features
        slots, positions = self.elements.select(keys, self.positions)
        offsets = self._to_device(slots * self.sample_size + positions)
        sources = self._to_device(samples[slots] * self.sample_size + positions)
        self.rows.put_(offsets, self.reversed_rows.take(sources))
        self.written = (offsets, sources)
        self.version = self.buffer._version
        return self.buffer[:count]

    def _restore(self) -> None:
        """Write the clean values back where the last chunk was reversed."""
        if self.written is not None:
            offsets, sources = self.written
            self.rows.put_(offsets, self.clean_rows.take(sources))
            self.written = None

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.buffer.device)


@dataclass(frozen=True)
class _Plan:
    batch_size: int
    memory_format: torch.memory_format
    rate: float


class _Runner:
    """Walks the (input, feature) grid in chunks and stores the scores of every copy."""

    def __init__(
        self,
        model: Model,
        output_fn: OutputFn | None,
        inputs: torch.Tensor,
        reversed_inputs: torch.Tensor,
        elements: FeatureElements,
        bar: Progress,
    ) -> None:
        self.model = model
        self.output_fn = output_fn
        self.inputs = inputs
        self.reversed_inputs = reversed_inputs
        self.elements = elements
        self.bar = bar
        self.total = inputs.shape[0] * elements.num_features
        self.cursor = 0
        self.scores: torch.Tensor | None = None
        self.buffer: PerturbationBuffer | None = None

    def use(self, batch_size: int, memory_format: torch.memory_format) -> None:
        """Switch to a buffer of exactly ``batch_size`` rows in ``memory_format``."""
        current = self.buffer
        if current is not None and current.capacity == batch_size and current.memory_format == memory_format:
            return
        self.buffer = None
        self.buffer = PerturbationBuffer(self.inputs, self.reversed_inputs, self.elements, batch_size, memory_format)

    def release(self) -> None:
        """Drop the buffer, and on CUDA return cached blocks so that a smaller batch can fit."""
        self.buffer = None
        if self.inputs.device.type == "cuda":
            torch.cuda.empty_cache()

    def step(self, count: int) -> float:
        """Score the next ``count`` copies with the current buffer and return the seconds it took."""
        if self.buffer is None:
            raise RuntimeError("PerturbationBuffer missing: call use() before step().")
        stop = self.cursor + count
        _synchronize(self.inputs.device)
        began = time.perf_counter()
        chunk = self.buffer.fill(self.cursor, stop)
        scores = read_scores(self.model(chunk), self.output_fn, count, check=False)
        if self.scores is None:
            self.scores = torch.empty((self.total, scores.shape[1]), dtype=scores.dtype, device=scores.device)
        self.scores[self.cursor : stop] = scores
        _synchronize(self.inputs.device)
        elapsed = time.perf_counter() - began
        self.cursor = stop
        self.bar.advance(count)
        return elapsed

    def result(self) -> torch.Tensor:
        """Return the scores ``(N * F, K)`` once every copy is done."""
        if self.scores is None or self.cursor != self.total:
            raise RuntimeError(f"Scoring stopped after {self.cursor} of {self.total} perturbed copies.")
        return self.scores


def _run_remaining(runner: _Runner, batch_size: int, memory_format: torch.memory_format, *, halve_on_oom: bool) -> None:
    """Score every copy after the cursor; with ``halve_on_oom`` an out-of-memory error halves the batch.

    NOTE: the halving is tested with a simulated ``torch.OutOfMemoryError`` on CPU, not on a CUDA device.
    """
    while runner.cursor < runner.total:
        runner.use(batch_size, memory_format)
        out_of_memory = False
        try:
            while runner.cursor < runner.total:
                runner.step(min(batch_size, runner.total - runner.cursor))
        except torch.OutOfMemoryError:
            if not halve_on_oom or batch_size == 1:
                raise
            out_of_memory = True
        # The retry happens outside the except block, whose traceback would keep the failed batch alive.
        if out_of_memory:
            runner.release()
            logger.info("Out of memory at batch size %d; retrying with %d.", batch_size, batch_size // 2)
            batch_size //= 2


def _probe(runner: _Runner, formats: list[torch.memory_format], largest: int) -> _Plan:
    """Time the first chunks of the work at several settings and return the fastest one.

    Memory formats are compared at a small batch. Then, in the faster format,
    the batch doubles until one of these happens: the throughput drops clearly,
    the batch reaches the memory cap, the probe has used its share of the work,
    or the device runs out of memory.
    Each setting runs one untimed chunk (the first call at a new shape pays
    one-off setup costs) and keeps the fastest of the timed ones. While chunks take less
    than ``PROBE_MIN_CHUNK_SECONDS`` the batch grows up to eightfold per step,
    and if the search ends on the budget with chunks still that short, the
    chosen batch is scaled up in the same way without being measured.
    """
    budget = int(runner.total * PROBE_FRACTION)
    first = max(1, min(PROBE_FIRST_BATCH, largest, budget // (3 * len(formats))))

    rates: dict[torch.memory_format, float] = {}
    while not rates:
        for memory_format in formats:
            rate = _measure(runner, first, memory_format, budget, optional=memory_format is not formats[0])
            if rate is not None:
                rates[memory_format] = rate
        if not rates:
            # Out of memory in every format: even the first batch size is too large.
            first //= 2
    memory_format = max(rates, key=rates.__getitem__)

    measured = {first: rates[memory_format]}
    batch_size = min(largest, first * _growth(first / rates[memory_format]))
    limited_by_speed = False
    while batch_size > max(measured) and runner.cursor + 3 * batch_size <= budget:
        rate = _measure(runner, batch_size, memory_format, budget, optional=False)
        if rate is None or rate < PROBE_STOP_SHARE * max(measured.values()):
            limited_by_speed = True
            if rate is not None:
                measured[batch_size] = rate
            break
        measured[batch_size] = rate
        batch_size = min(largest, batch_size * _growth(batch_size / rate))

    best = max(measured.values())
    chosen = min(size for size, rate in measured.items() if rate >= PROBE_CHOOSE_SHARE * best)
    rate = measured[chosen]
    logger.debug(
        "Probe throughput in passes/s: formats %s, batch sizes %s.",
        {_format_name(f): round(r) for f, r in rates.items()},
        {size: round(rate) for size, rate in measured.items()},
    )
    if not limited_by_speed and chosen / rate < PROBE_MIN_CHUNK_SECONDS:
        # The search stopped at the probe's share of the work while chunks were still short: larger
        # batches can only cut the per-chunk cost. The measured rate stays as a conservative estimate.
        chosen = min(largest, chosen * _growth(chosen / rate))
    return _Plan(chosen, memory_format, rate)


def _growth(chunk_seconds: float) -> int:
    """Return the factor for the next batch size: 2, or up to 8 while chunks are short."""
    if chunk_seconds >= PROBE_MIN_CHUNK_SECONDS:
        return 2
    return int(min(8, max(2, 2 ** math.ceil(math.log2(PROBE_MIN_CHUNK_SECONDS / max(chunk_seconds, 1e-9))))))


def _measure(
    runner: _Runner, batch_size: int, memory_format: torch.memory_format, budget: int, *, optional: bool
) -> float | None:
    """Return the throughput in copies per second, or None if this setting ran out of memory or failed."""
    try:
        runner.use(batch_size, memory_format)
        runner.step(batch_size)
        times = [runner.step(batch_size), runner.step(batch_size)]
        # Short chunks are timed a few more times, since one scheduler hiccup can exceed their whole duration.
        while (
            sum(times) < PROBE_MIN_TIMED_SECONDS
            and len(times) < PROBE_MAX_TIMED_CHUNKS
            and runner.cursor + batch_size <= budget
        ):
            times.append(runner.step(batch_size))
    except torch.OutOfMemoryError:
        if batch_size == 1:
            raise
        runner.release()
        return None
    except RuntimeError as error:
        # A model may reject a memory format (for example .view() on a channels-last tensor).
        if not optional:
            raise
        logger.info("The model failed on %s inputs, which are not used: %s", _format_name(memory_format), error)
        runner.release()
        return None
    return batch_size / max(min(times), 1e-9)


def _candidate_formats(model: Model, inputs: torch.Tensor) -> list[torch.memory_format]:
    """Return the memory formats to probe, the input's own first."""
    own = _input_memory_format(inputs)
    if inputs.dim() != 4:
        return [own]
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        has_conv = any(isinstance(module, torch.nn.modules.conv._ConvNd) for module in model.modules())
        if not has_conv:
            return [own]
    other = torch.contiguous_format if own == torch.channels_last else torch.channels_last
    return [own, other]


def _largest_batch(inputs: torch.Tensor, total: int) -> int:
    """Return the largest batch size the probe may try."""
    copy_bytes = max(1, inputs[0].numel() * inputs.element_size())
    by_memory = max(1, PROBE_MAX_BATCH_BYTES // copy_bytes)
    return max(1, min(PROBE_MAX_BATCH, by_memory, total // 8))


def _input_memory_format(inputs: torch.Tensor) -> torch.memory_format:
    if inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _storage_rows(inputs: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """Return ``(N, size)`` rows that hold each input's elements in the storage order of ``memory_format``."""
    stored = inputs.contiguous(memory_format=memory_format)
    size = stored[0].numel()
    return stored.as_strided((stored.shape[0], size), (size, 1))


def _physical_offsets(sample_shape: tuple[int, ...], memory_format: torch.memory_format) -> np.ndarray | None:
    """Map logical element offsets of one input to storage offsets in ``memory_format``; None for row-major."""
    if memory_format == torch.contiguous_format:
        return None
    size = math.prod(sample_shape)
    logical = torch.arange(size).reshape(1, *sample_shape).contiguous(memory_format=memory_format)
    stored = logical.as_strided((size,), (1,)).numpy()
    physical = np.empty(size, dtype=np.int64)
    physical[stored] = np.arange(size)
    return physical


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _format_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "contiguous"


def _log_start(num_features: int, count: int, total: int, batch_size: int, memory_format: torch.memory_format) -> None:
    logger.info(
        "Scoring %d feature(s) of %d input(s): %d forward passes in batches of %d (%s memory format).",
        num_features,
        count,
        total,
        batch_size,
        _format_name(memory_format),
    )
