"""Exact incremental inference: recompute only the part of each layer that a reversed feature can reach.

Reversing one pixel of an image changes only a small window of each early
layer's output. The incremental engine runs the clean input once and keeps
every layer's output. For each perturbed feature it then recomputes, layer by
layer, only the window of the output that the change can reach. It reads the
layer's input around the window from the clean cache and pastes the recomputed
window of the input into it. The layer then runs without padding on that region,
so the values at the window's border are exact. Once a window covers so much of
a layer's output that recomputing it costs more than the whole layer, the
remaining layers run on whole maps.

The engine traces the model with :mod:`torch.fx` and runs only layers whose
spatial reach it can compute (see :func:`incremental_outputs`). For any other model it
falls back to the dense engine and logs why at INFO level, so a map is never
computed with a rule that does not fit the model.

The method follows Nakandala, Kumar and Papakonstantinou, "Incremental and
Approximate Inference for Faster Occlusion-based Deep CNN Explanations",
SIGMOD 2019 (only the exact part).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from efmap._dense import dense_outputs
from efmap._graph import Step, Unsupported, analyse, describe
from efmap._model import OutputFn, read_scores
from efmap._progress import Progress
from efmap._typing import Model, ProgressType
from efmap._windows import Geometry, gather, pad_map, paste, union
from efmap.features import FeatureLayout

__all__ = ["incremental_outputs"]

logger = logging.getLogger(__name__)

#: Cost of copying one element, in multiply-adds, for choosing between window and whole-map computation.
# NOTE: an estimate for CPUs, not measured per machine. A poor value costs speed only, never exactness.
COPY_COST = 16.0

DenseEngine = Callable[
    [Model, OutputFn | None, torch.Tensor, torch.Tensor, FeatureLayout, int, ProgressType], torch.Tensor
]


def incremental_outputs(
    model: Model,
    output_fn: OutputFn | None,
    inputs: torch.Tensor,
    reversed_inputs: torch.Tensor,
    layout: FeatureLayout,
    batch_size: int,
    progress: ProgressType,
    *,
    strict: bool = False,
    dense: DenseEngine | None = None,
    clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every (input, feature) perturbation, recomputing only what each one changes.

    Returns the same class scores as the dense engine, which runs the whole model
    on every perturbed copy, up to floating-point rounding.

    Parameters
    ----------
    model
        An ``nn.Module`` in eval mode. It must trace with ``torch.fx`` and use only these
        layers on the input-dependent path: ``Conv2d`` (any stride, padding, dilation and
        groups, zero padding), ``BatchNorm`` with running statistics, pointwise activations
        and dropout in eval mode, elementwise arithmetic such as residual additions,
        ``MaxPool2d``, ``AvgPool2d``, global average pooling, flatten, reshape and
        ``Linear``, plus a few other layers that run on whole maps.
    output_fn
        Function that picks the class scores from the model output, or None.
    inputs
        Clean images ``(N, C, H, W)``.
    reversed_inputs
        The reversed images, same shape.
    layout
        Features of the images. ``layout.index`` has shape ``(1 or N, 1 or C, H or 1, W or 1)``.
    batch_size
        Number of perturbations recomputed together.
    progress
        ``True`` for a tqdm bar, a callable receiving ``(done, total)``, or ``False``.
    strict
        Raise instead of falling back to the dense engine when the model is not supported.
        Default False.
    dense
        The engine to fall back to, with the same arguments. Default: the dense engine of
        ``efmap._dense``.
    clean
        Class scores of the clean inputs ``(N, K)``, if known, to check the traced graph against.
        Default: the engine runs the model once on the first inputs.

    Returns
    -------
    torch.Tensor
        Class scores of every perturbed copy, shape ``(N, F, K)``.

    Raises
    ------
    ValueError
        With ``strict=True``, if the model or its inputs are not supported. The message
        names the layer.

    Notes
    -----
    Without ``strict``, the engine also falls back to the dense engine when no layer
    would run on windows (for example when every feature spans the whole image).
    The dense engine then does the same work with less overhead.

    Examples
    --------
    >>> import torch
    >>> from efmap.features import pixel_layout
    >>> from efmap.incremental import incremental_outputs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 4 * 4, 3)).eval()
    >>> x = torch.rand(1, 1, 6, 6)
    >>> incremental_outputs(net, None, x, 1 - x, pixel_layout(6, 6, 3), 16, False, strict=True).shape
    torch.Size([1, 36, 3])
    """
    if dense is None:
        dense = dense_outputs
    with torch.inference_mode():
        return _score(model, output_fn, inputs, reversed_inputs, layout, batch_size, progress, strict, dense, clean)


def _score(
    model: Model,
    output_fn: OutputFn | None,
    inputs: torch.Tensor,
    reversed_inputs: torch.Tensor,
    layout: FeatureLayout,
    batch_size: int,
    progress: ProgressType,
    strict: bool,
    dense: DenseEngine,
    clean: torch.Tensor | None,
) -> torch.Tensor:
    # NOTE: only run on CPU so far. The CUDA path uses the same tensor operations but has not been tested.
    count = inputs.shape[0]
    num_features = layout.num_features
    # Cache only enough samples to fill a batch, because the cache contains every layer's output.
    samples_per_pass = max(1, -(-batch_size // num_features))

    try:
        engine = _Engine.from_model(model, output_fn, inputs, layout)
        first_clean = None if clean is None else clean[:samples_per_pass]
        engine.load(
            inputs[:samples_per_pass],
            reversed_inputs[:samples_per_pass],
            _chunk_index(layout, 0, samples_per_pass),
            first_clean,
        )
        groups = engine.plan(num_features)
    except Unsupported as error:
        if strict:
            raise ValueError(
                f"Expected a model that the incremental engine supports, but {error}. "
                "Use engine='auto' to fall back to the dense engine, or engine='dense'."
            ) from None
        logger.info("The incremental engine does not support this model, so the dense engine runs it: %s.", error)
        return dense(model, output_fn, inputs, reversed_inputs, layout, batch_size, progress)
    if not strict and not any(group.windowed for group in groups):
        logger.info("No layer of this model would run on windows for these features, so the dense engine runs it.")
        return dense(model, output_fn, inputs, reversed_inputs, layout, batch_size, progress)

    total = count * num_features
    logger.info(
        "Scoring %d features of %d input(s) with the incremental engine: %d perturbations.", num_features, count, total
    )
    results = engine.clean_scores.new_empty((total, engine.clean_scores.shape[1]))
    bar = Progress(progress, total, "efmap")
    try:
        for first in range(0, count, samples_per_pass):
            last = min(first + samples_per_pass, count)
            if first > 0:
                engine.load(inputs[first:last], reversed_inputs[first:last], _chunk_index(layout, first, last))
                groups = engine.plan(num_features)
            offset = first * num_features
            for group in groups:
                for start in range(0, group.size, batch_size):
                    stop = min(start + batch_size, group.size)
                    if group.unchanged:
                        scores = engine.clean_scores.index_select(0, group.samples[start:stop])
                    else:
                        scores = engine.run_batch(group, start, stop)
                    results.index_copy_(0, group.order[start:stop] + offset, scores)
                    bar.advance(stop - start)
    finally:
        bar.close()
    return results.reshape(count, num_features, -1)


def _chunk_index(layout: FeatureLayout, first: int, last: int) -> torch.Tensor:
    return layout.index if layout.index.shape[0] == 1 else layout.index[first:last]


@dataclass
class _Group:
    """Perturbations of one chunk of samples whose feature boxes have the same size.

    Attributes
    ----------
    order
        Position of each perturbation in the chunk's flattened ``(sample, feature)`` grid, shape ``(P,)``.
    samples, features
        Sample (within the chunk) and feature of each perturbation, shape ``(P,)``.
    windows
        Window of every node computed on windows. Nodes left out run on whole maps.
    positions
        The same windows' rows and columns as tensors on the model's device.
    aligned
        ``(node, operand)`` pairs where the operand's windows are the node's windows.
    unchanged
        The features are absent from their samples, so every score is the clean score.
    """

    order: torch.Tensor
    samples: torch.Tensor
    features: torch.Tensor
    windows: dict[fx.Node, Geometry]
    positions: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]
    aligned: set[tuple[fx.Node, fx.Node]]
    unchanged: bool = False

    @property
    def size(self) -> int:
        """Number of perturbations."""
        return int(self.order.shape[0])

    @property
    def windowed(self) -> bool:
        """Whether any layer runs on windows."""
        return len(self.windows) > 1


@dataclass
class _Window:
    """The changed window of one node's output for a batch of perturbations.

    ``data`` has shape ``(B, C, h, w)``, and ``rows`` and ``cols`` give each window's top left
    position in the node's map. Outside the window the output equals the clean output.
    """

    data: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


class _Engine:
    """A traced model with the clean outputs of every layer for a chunk of samples."""

    def __init__(self, graph_module: fx.GraphModule, model: torch.nn.Module, output_fn: OutputFn | None) -> None:
        self.graph_module = graph_module
        self.modules = dict(graph_module.named_modules())
        self.model = model
        self.output_fn = output_fn
        self.steps: list[Step] = []
        self.release: list[list[fx.Node]] = []
        self.maps: dict[fx.Node, torch.Tensor] = {}
        self.others: dict[fx.Node, Any] = {}
        self.padded: dict[tuple[fx.Node, tuple[int, int, int, int], float], torch.Tensor] = {}
        self.clean_scores = torch.empty(0)
        self.index_map = torch.empty(0)
        self.reversed_map = torch.empty(0)

    @classmethod
    def from_model(
        cls, model: Model, output_fn: OutputFn | None, inputs: torch.Tensor, layout: FeatureLayout
    ) -> _Engine:
        """Trace ``model``, checking that it and the inputs are of a supported kind."""
        if not isinstance(model, torch.nn.Module):
            raise Unsupported(f"the model is a {type(model).__name__}, not a torch.nn.Module that torch.fx can trace")
        if isinstance(model, torch.jit.ScriptModule):
            raise Unsupported("the model is a TorchScript module, which torch.fx cannot trace")
        if inputs.dim() != 4 or layout.index.dim() != 4:
            raise Unsupported(f"the inputs of shape {tuple(inputs.shape)} are not images (N, C, H, W)")
        hooked = [
            name or type(model).__name__
            for name, module in model.named_modules()
            if module._forward_hooks or module._forward_pre_hooks  # PyTorch has no public way to list hooks
        ]
        if hooked or _global_forward_hooks or _global_forward_pre_hooks:
            where = f"module '{hooked[0]}'" if hooked else "a global module hook"
            raise Unsupported(f"{where} has forward hooks, which layers run on windows would skip")
        # Tracing runs forward with proxy objects, and a forward with side effects (such as appending to a
        # list) would leave them in the model. A copy that shares the parameters and buffers keeps them away.
        shared: dict[int, Any] = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
        try:
            copy_of_model = copy.deepcopy(model, shared)
        except Exception as error:  # deepcopy runs user code (__deepcopy__, __reduce__), which may raise anything
            raise Unsupported(f"the model could not be copied for tracing ({type(error).__name__}: {error})") from None
        before = _attributes(copy_of_model)
        try:
            graph_module = fx.symbolic_trace(copy_of_model)
        except Exception as error:  # tracing runs user code, which may raise anything
            raise Unsupported(f"torch.fx could not trace the model ({type(error).__name__}: {error})") from None
        changed = _changed_attribute(before, _attributes(copy_of_model))
        if changed is not None:
            # A traced graph replays only tensor operations, so a forward that keeps Python state cannot be replayed.
            module_name, attribute = changed
            raise Unsupported(
                f"forward changes the attribute '{attribute}' of module '{module_name or type(model).__name__}'"
            )
        return cls(graph_module, model, output_fn)

    def load(
        self,
        inputs: torch.Tensor,
        reversed_inputs: torch.Tensor,
        index: torch.Tensor,
        clean: torch.Tensor | None = None,
    ) -> None:
        """Run the clean ``inputs`` through the graph and keep every node's output.

        On the first call the graph is also sorted into steps and checked against the
        model's own output: ``clean`` if given, else the output of one model call.
        """
        self.maps.clear()
        self.others.clear()
        self.padded.clear()
        values = self._run_clean(inputs)
        if not self.steps:
            self.steps = analyse(self.graph_module, values)
            self._plan_release()
            self._check_trace(inputs, values, clean)
        output = next(node for node in self.graph_module.graph.nodes if node.op == "output")
        self.clean_scores = read_scores(values[output], self.output_fn, inputs.shape[0], check=False)
        height, width = inputs.shape[2:]
        self.index_map = _channels_last(index.expand(index.shape[0], index.shape[1], height, width))
        self.reversed_map = _channels_last(reversed_inputs)

    def _run_clean(self, inputs: torch.Tensor) -> dict[fx.Node, Any]:
        values: dict[fx.Node, Any] = {}
        dependent: set[fx.Node] = set()
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder":
                value: Any = inputs
                dependent.add(node)
            elif node.op == "output":
                value = fx.node.map_arg(node.args[0], lambda arg: values[arg])
            else:
                value = self._call(node, lambda arg: values[arg])
                if any(arg in dependent for arg in node.all_input_nodes):
                    dependent.add(node)
            values[node] = value
            # Copies, so that a later in-place layer cannot change the cached output.
            if node in dependent and isinstance(value, torch.Tensor) and value.dim() == 4:
                self.maps[node] = _channels_last(value)
            elif node in dependent and isinstance(value, torch.Tensor):
                self.others[node] = value.clone()
            elif node.op != "output":
                self.others[node] = value
        return values

    def _check_trace(self, inputs: torch.Tensor, values: dict[fx.Node, Any], clean: torch.Tensor | None) -> None:
        output = next(node for node in self.graph_module.graph.nodes if node.op == "output")
        traced = read_scores(values[output], self.output_fn, inputs.shape[0], check=False)
        if clean is None:
            clean = read_scores(self.model(inputs), self.output_fn, inputs.shape[0], check=False)
        difference = float((traced - clean).abs().max()) if traced.shape == clean.shape else float("inf")
        # The bound allows for rounding differences between batch sizes. A graph traced down a different branch
        # than the model takes is expected to differ by far more.
        tolerance = (1e-5 + 64 * torch.finfo(traced.dtype).eps) * (float(clean.abs().max()) + 1.0)
        if difference > tolerance:
            raise Unsupported(f"the traced graph does not reproduce the model's output (difference {difference:.3g})")

    def _plan_release(self) -> None:
        """Note after which step each node's per-batch value is no longer needed."""
        position = {step.node: i for i, step in enumerate(self.steps)}
        self.release = [[] for _ in self.steps]
        for step in self.steps:
            users = [position[user] for user in step.node.users if user in position]
            self.release[max(users, default=position[step.node])].append(step.node)

    def plan(self, num_features: int) -> list[_Group]:
        """Group the loaded chunk's perturbations by feature box size and choose each group's windows."""
        layouts, height, width = self.index_map.shape[:3]
        count = self.clean_scores.shape[0]
        top, bottom, left, right = _feature_boxes(self.index_map, num_features)
        owner = np.arange(count) if layouts > 1 else np.zeros(count, dtype=np.int64)
        boxes = (top[owner].reshape(-1), bottom[owner].reshape(-1), left[owner].reshape(-1), right[owner].reshape(-1))
        sizes = np.stack([boxes[1] - boxes[0] + 1, boxes[3] - boxes[2] + 1], axis=1)
        sizes[sizes[:, 0] <= 0] = 0
        device = self.clean_scores.device

        groups = []
        for size, members in _split_by(sizes):
            samples = members // num_features
            group = _Group(
                order=torch.from_numpy(members).to(device),
                samples=torch.from_numpy(samples).to(device),
                features=torch.from_numpy(members % num_features).to(device),
                windows={},
                positions={},
                aligned=set(),
                unchanged=size[0] == 0,
            )
            if not group.unchanged:
                start = Geometry(boxes[0][members], boxes[2][members], int(size[0]), int(size[1]))
                self._choose_windows(group, start, height, width)
            groups.append(group)
        return groups

    def _choose_windows(self, group: _Group, start: Geometry, height: int, width: int) -> None:
        """Propagate the feature windows through the graph, stopping where whole maps cost less."""
        windows = group.windows
        for step in self.steps:
            node = step.node
            if step.kind == "input":
                windows[node] = start
            elif step.kind == "elementwise":
                operands = [arg for arg in node.all_input_nodes if arg in self.maps]
                if operands and all(arg in windows for arg in operands):
                    map_height, map_width = self.maps[node].shape[1:3]
                    merged = union([windows[arg] for arg in operands], map_height, map_width)
                    windows[node] = merged
                    group.aligned.update((node, arg) for arg in operands if windows[arg].same_as(merged))
            elif step.kind == "slide" and isinstance(node.args[0], fx.Node) and node.args[0] in windows:
                sliding_window = self._slide_window(step, windows[node.args[0]])
                if sliding_window is not None:
                    windows[node] = sliding_window
        device = self.clean_scores.device
        for node, window in windows.items():
            group.positions[node] = (torch.from_numpy(window.rows).to(device), torch.from_numpy(window.cols).to(device))

    def _slide_window(self, step: Step, window: Geometry) -> Geometry | None:
        """Return the output windows of a convolution or pooling layer, or None where the whole map is cheaper."""
        assert step.sliding is not None
        source = self.maps[step.node.args[0]]  # type: ignore[index]
        output = self.maps[step.node]
        in_height, in_width, channels = source.shape[1:]
        out_height, out_width = output.shape[1:3]
        along_rows, along_cols = step.sliding
        rows, height = along_rows.output_window(window.rows, window.height, out_height)
        cols, width = along_cols.output_window(window.cols, window.width, out_width)
        region = along_rows.input_region(height) * along_cols.input_region(width)
        window_cost = height * width * step.macs + COPY_COST * region * channels
        full_cost = out_height * out_width * step.macs + COPY_COST * in_height * in_width * channels
        if window_cost >= full_cost:
            return None
        return Geometry(rows, cols, height, width)

    def run_batch(self, group: _Group, start: int, stop: int) -> torch.Tensor:
        """Score perturbations ``start .. stop - 1`` of ``group`` and return their class scores ``(B, K)``."""
        samples = group.samples[start:stop]
        values: dict[fx.Node, Any] = {}
        fulls: dict[fx.Node, torch.Tensor] = {}

        def full(arg: fx.Node) -> Any:
            if arg not in values:
                return self.others[arg]
            value = values[arg]
            if not isinstance(value, _Window):
                return value
            if arg not in fulls:
                whole = self.maps[arg].index_select(0, samples)
                paste(whole, _channels_last_view(value.data), value.rows, value.cols)
                fulls[arg] = whole.permute(0, 3, 1, 2)
            return fulls[arg]

        def shaped(arg: fx.Node) -> Any:
            value = values.get(arg)
            if isinstance(value, _Window):
                # A view of the right shape, dtype and device, without copying any data.
                clean = self.maps[arg][:1].permute(0, 3, 1, 2)
                return clean.expand(samples.shape[0], -1, -1, -1)
            return full(arg)

        for step, released in zip(self.steps, self.release, strict=True):
            node = step.node
            position = group.positions.get(node)
            window = None if position is None else (position[0][start:stop], position[1][start:stop])
            if step.kind == "output":
                output = fx.node.map_arg(node.args[0], full)
                return read_scores(output, self.output_fn, samples.shape[0], check=False)
            if step.kind == "input":
                assert window is not None
                values[node] = self._input_window(group, start, stop, window)
            elif window is not None and step.kind == "elementwise":
                values[node] = self._elementwise(group, node, values, samples, window, full)
            elif window is not None and step.kind == "slide":
                values[node] = self._slide(step, group, values[node.args[0]], samples, window)  # type: ignore[index]
            elif step.kind == "mean" and isinstance(values.get(node.args[0]), _Window):  # type: ignore[arg-type]
                values[node] = self._mean(node, values[node.args[0]], samples)  # type: ignore[index]
            elif step.kind == "shape":
                values[node] = self._call(node, shaped)
            else:
                values[node] = self._call(node, full)
            for done in released:
                values.pop(done, None)
                fulls.pop(done, None)
        raise RuntimeError("The traced graph has no output node.")

    def _input_window(
        self, group: _Group, start: int, stop: int, position: tuple[torch.Tensor, torch.Tensor]
    ) -> _Window:
        """Build each perturbed copy's feature box: reversed where the feature lies, clean elsewhere."""
        input_node = self.steps[0].node
        window = group.windows[input_node]
        samples = group.samples[start:stop]
        rows, cols = position
        clean = gather(self.maps[input_node], samples, rows, cols, window.height, window.width)
        flipped = gather(self.reversed_map, samples, rows, cols, window.height, window.width)
        owners = samples if self.index_map.shape[0] > 1 else torch.zeros_like(samples)
        index = gather(self.index_map, owners, rows, cols, window.height, window.width)
        selected = index == group.features[start:stop, None, None, None]
        data = torch.where(selected, flipped, clean)
        return _Window(data.permute(0, 3, 1, 2), rows, cols)

    def _elementwise(
        self,
        group: _Group,
        node: fx.Node,
        values: dict[fx.Node, Any],
        samples: torch.Tensor,
        position: tuple[torch.Tensor, torch.Tensor],
        full: Callable[[fx.Node], Any],
    ) -> _Window:
        """Run an elementwise layer on the union of its operands' windows."""
        window = group.windows[node]
        rows, cols = position
        operands: dict[fx.Node, torch.Tensor] = {}
        for arg in node.all_input_nodes:
            value = values.get(arg)
            if not isinstance(value, _Window):
                continue
            if (node, arg) in group.aligned:
                operands[arg] = value.data
                continue
            region = gather(self.maps[arg], samples, rows, cols, window.height, window.width)
            paste(region, _channels_last_view(value.data), value.rows - rows, value.cols - cols)
            operands[arg] = region.permute(0, 3, 1, 2)
        result = self._call(node, lambda arg: operands[arg] if arg in operands else full(arg))
        return _Window(result, rows, cols)

    def _slide(
        self,
        step: Step,
        group: _Group,
        value: _Window,
        samples: torch.Tensor,
        position: tuple[torch.Tensor, torch.Tensor],
    ) -> _Window:
        """Run a convolution or pooling layer on the input region that its output windows read."""
        assert step.sliding is not None
        source = step.node.args[0]
        assert isinstance(source, fx.Node)
        along_rows, along_cols = step.sliding
        window = group.windows[step.node]
        out_height, out_width = self.maps[step.node].shape[1:3]
        in_height, in_width = self.maps[source].shape[1:3]
        margins = (*along_rows.margins(in_height, out_height), *along_cols.margins(in_width, out_width))
        key = (source, margins, step.pad_value)
        if key not in self.padded:
            self.padded[key] = pad_map(self.maps[source], margins[:2], margins[2:], step.pad_value)
        rows, cols = position
        # In padded coordinates the region starts at rows * stride, since the padding before equals the margin.
        region_rows, region_cols = rows * along_rows.stride, cols * along_cols.stride
        height, width = along_rows.input_region(window.height), along_cols.input_region(window.width)
        region = gather(self.padded[key], samples, region_rows, region_cols, height, width)
        paste(
            region,
            _channels_last_view(value.data),
            value.rows - region_rows + along_rows.padding,
            value.cols - region_cols + along_cols.padding,
        )
        return _Window(step.run_region(region.permute(0, 3, 1, 2)), rows, cols)

    def _mean(self, node: fx.Node, value: _Window, samples: torch.Tensor) -> torch.Tensor:
        """Update the clean global mean by the change inside the window."""
        source = node.args[0]
        assert isinstance(source, fx.Node)
        cache = self.maps[source]
        height, width = value.data.shape[2:]
        clean = gather(cache, samples, value.rows, value.cols, height, width)
        change = (value.data.sum(dim=(2, 3)) - clean.sum(dim=(1, 2))) / (cache.shape[1] * cache.shape[2])
        before = self.maps[node].permute(0, 3, 1, 2) if node in self.maps else self.others[node]
        before = before.index_select(0, samples)
        return before + change.reshape(*change.shape, *([1] * (before.dim() - 2)))

    def _call(self, node: fx.Node, resolve: Callable[[fx.Node], Any]) -> Any:
        """Run one node with its arguments resolved by ``resolve``."""
        args = fx.node.map_arg(node.args, resolve)
        kwargs = fx.node.map_arg(node.kwargs, resolve)
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "get_attr":
            value: Any = self.graph_module
            for name in str(node.target).split("."):
                value = getattr(value, name)
            return value
        raise Unsupported(f"{describe(self.graph_module, node)} has the unknown node kind {node.op!r}")


def _feature_boxes(index_map: torch.Tensor, num_features: int) -> tuple[np.ndarray, ...]:
    """Return the bounding box of every feature in every index map.

    ``index_map`` has shape ``(M, H, W, c)``. Returns ``top``, ``bottom``, ``left`` and
    ``right`` (inclusive), int64, shape ``(M, F)``. A feature absent from a map gets
    ``top > bottom``.
    """
    count, height, width, channels = index_map.shape
    device = index_map.device
    rows = torch.arange(height, device=device).view(1, height, 1, 1).expand_as(index_map).reshape(-1)
    cols = torch.arange(width, device=device).view(1, 1, width, 1).expand_as(index_map).reshape(-1)
    ids = (index_map + torch.arange(count, device=device).view(count, 1, 1, 1) * num_features).reshape(-1)
    size = count * num_features
    top = torch.full((size,), height, device=device).scatter_reduce(0, ids, rows, "amin")
    bottom = torch.full((size,), -1, device=device).scatter_reduce(0, ids, rows, "amax")
    left = torch.full((size,), width, device=device).scatter_reduce(0, ids, cols, "amin")
    right = torch.full((size,), -1, device=device).scatter_reduce(0, ids, cols, "amax")
    return tuple(t.reshape(count, num_features).cpu().numpy() for t in (top, bottom, left, right))


def _split_by(sizes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split the row indices of ``sizes`` ``(P, 2)`` into ``(size, members)`` pairs of equal rows."""
    unique, inverse = np.unique(sizes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    return [(unique[i], order[bounds[i] : bounds[i + 1]]) for i in range(len(unique))]


def _channels_last(value: torch.Tensor) -> torch.Tensor:
    """Copy ``(N, C, H, W)`` into a new contiguous ``(N, H, W, C)`` tensor."""
    return value.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)


def _channels_last_view(value: torch.Tensor) -> torch.Tensor:
    return value.permute(0, 2, 3, 1)


# Attributes that every nn.Module has; the rest are the model's own Python state.
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


def _attributes(model: torch.nn.Module) -> dict[tuple[str, str], Any]:
    """Copy every module's own Python attributes (not tensors or submodules), keyed by module and name."""
    state: dict[tuple[str, str], Any] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in _MODULE_INTERNALS or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            try:
                state[(name, key)] = copy.deepcopy(value)
            except Exception:  # an attribute that cannot be copied is compared as it is
                state[(name, key)] = value
    return state


def _changed_attribute(before: dict[tuple[str, str], Any], after: dict[tuple[str, str], Any]) -> tuple[str, str] | None:
    """Return the first attribute that differs between two :func:`_attributes` copies, or None."""
    for key in (*before, *after):
        if key not in before or key not in after:
            return key
        old, new = before[key], after[key]
        if old is new:
            continue
        try:
            same = bool(np.array_equal(old, new)) if isinstance(old, np.ndarray) else bool(old == new)
        except Exception:  # a value that cannot be compared, for example one holding a tracing proxy, counts as changed
            return key
        if not same:
            return key
    return None
