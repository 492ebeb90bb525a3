"""Reading a traced model for incremental inference: which node is which kind of layer.

Every node that depends on the input is sorted into one kind, which sets how the
incremental engine may run it. A node that fits no kind makes the whole model
unsupported, so the engine never guesses what an operation does.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from efmap._windows import Sliding


class Unsupported(Exception):
    """Raised when the incremental engine cannot run a model exactly. The message names the cause."""


@dataclass(frozen=True)
class Step:
    """How to run one node of the traced graph.

    Attributes
    ----------
    node
        The graph node.
    kind
        One of ``"input"`` (the image batch), ``"elementwise"`` (each output element depends
        only on the elements at the same position of its inputs), ``"slide"`` (a convolution
        or pooling layer), ``"mean"`` (a global spatial mean), ``"shape"`` (a query of shape or
        type), ``"python"`` (arithmetic on shapes) and ``"output"``. The kind ``"dense"`` is
        any other layer that treats every sample on its own, and it runs on whole maps.
    sliding
        Row and column geometry of a ``"slide"`` step.
    pad_value
        Value of a ``"slide"`` step's padding: 0 for convolution and average pooling,
        minus infinity for max pooling.
    run_region
        For a ``"slide"`` step: the layer without padding, applied to an input region.
    macs
        For a ``"slide"`` step: multiply-adds per output position, all channels together.
    """

    node: fx.Node
    kind: str
    sliding: tuple[Sliding, Sliding] | None = None
    pad_value: float = 0.0
    run_region: Any = None
    macs: int = 0


_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)  # fmt: skip

_ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus,
    F.softsign, F.logsigmoid, torch.clamp, torch.clip, torch.abs, torch.exp, torch.neg, torch.square,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
})  # fmt: skip

_ELEMENTWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
    "abs", "neg", "exp", "square", "contiguous", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
})  # fmt: skip

_DENSE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LayerNorm, nn.GroupNorm,
    nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d,
)  # fmt: skip

_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Flatten)
_ALIAS_METHODS = frozenset({"contiguous", "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "detach"})
_ALIAS_FUNCTIONS = frozenset({torch.flatten, torch.reshape, F.dropout, F.dropout2d})

_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


def analyse(graph_module: fx.GraphModule, values: dict[fx.Node, Any]) -> list[Step]:
    """Sort every input-dependent node of ``graph_module`` into a :class:`Step`.

    ``values`` contains every node's value on a clean batch, which is read for shapes
    and dimensions. Nodes that do not depend on the input are left
    out: their clean value is reused for every perturbation.

    Raises
    ------
    Unsupported
        If a node depending on the input is not one of the known kinds, or a layer
        would mix samples, read batch statistics or overwrite a value that another
        node reads.
    """
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise Unsupported(f"the model's forward takes {len(placeholders)} arguments instead of one input batch")

    dependent: set[fx.Node] = set()
    steps: list[Step] = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
            steps.append(Step(node, "input"))
        elif node.op == "output":
            steps.append(Step(node, "output"))
        elif any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
            _check_in_place(graph_module, node, dependent)
            steps.append(_classify(graph_module, node, values, dependent))
    return steps


def describe(graph_module: fx.GraphModule, node: fx.Node) -> str:
    """Name a node for messages: the module class and path, the function or the method."""
    if node.op == "call_module":
        return f"module {type(graph_module.get_submodule(str(node.target))).__name__} at '{node.target}'"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    name = getattr(node.target, "__name__", repr(node.target))
    module = getattr(node.target, "__module__", None) or ""
    return f"function {module + '.' if module and module != 'builtins' else ''}{name}"


def _classify(graph_module: fx.GraphModule, node: fx.Node, values: dict[fx.Node, Any], dependent: set[fx.Node]) -> Step:
    inputs = [arg for arg in node.all_input_nodes if arg in dependent]
    tensors = [values[arg] for arg in inputs if isinstance(values[arg], torch.Tensor)]
    if not tensors and node.op == "call_function" and _is_python_builtin(node.target):
        return Step(node, "python")
    if node.op == "call_method" and node.target in ("size", "dim"):
        return Step(node, "shape")
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in _SHAPE_ATTRIBUTES:
        return Step(node, "shape")
    first = tensors[0] if tensors else values[inputs[0]]

    if node.op == "call_module":
        step = _classify_module(graph_module, node, first)
    elif node.op == "call_method":
        step = _classify_method(node, first)
    elif node.op == "call_function":
        step = _classify_function(node, first)
    else:
        step = None
    if step is None:
        raise Unsupported(f"{describe(graph_module, node)} is not supported")
    if step.kind == "elementwise" and not _elementwise_fits(node, inputs, values, dependent):
        step = Step(node, "dense")
    return step


def _classify_module(graph_module: fx.GraphModule, node: fx.Node, value: Any) -> Step | None:
    module = graph_module.get_submodule(str(node.target))
    if module.training:
        raise Unsupported(f"{describe(graph_module, node)} is in training mode")

    # Exact types: torch.nn subclasses such as quantisation-aware convolutions change what forward computes.
    kind = type(module)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise Unsupported(
                f"{describe(graph_module, node)} normalises with batch statistics (track_running_stats=False)"
            )
        return Step(node, "elementwise")
    if kind in _ELEMENTWISE_MODULES:
        return Step(node, "elementwise")

    spatial = isinstance(value, torch.Tensor) and value.dim() == 4
    if spatial and isinstance(module, nn.Conv2d) and kind is nn.Conv2d and module.padding_mode == "zeros":
        return _conv_step(node, module, value)
    if spatial and isinstance(module, nn.MaxPool2d) and kind is nn.MaxPool2d and not module.return_indices:
        return _pool_step(node, module, value, float("-inf"))
    if spatial and isinstance(module, nn.AvgPool2d) and kind is nn.AvgPool2d and not module.ceil_mode:
        if module.count_include_pad or _pair(module.padding) == (0, 0):
            return _pool_step(node, module, value, 0.0)
    if spatial and isinstance(module, nn.AdaptiveAvgPool2d) and kind is nn.AdaptiveAvgPool2d:
        if _pair(module.output_size) == (1, 1):
            return Step(node, "mean")

    if isinstance(module, nn.Flatten) and kind is nn.Flatten:
        return Step(node, "dense") if _normal_dim(module.start_dim, value) >= 1 else None
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)) and kind in (nn.Softmax, nn.LogSoftmax):
        return Step(node, "dense") if module.dim is not None and _normal_dim(module.dim, value) != 0 else None
    if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and module.return_indices:
        return None
    if kind in _DENSE_MODULES:
        return Step(node, "dense")
    return None


def _classify_method(node: fx.Node, value: Any) -> Step | None:
    name = str(node.target)
    if name in _ELEMENTWISE_METHODS:
        return Step(node, "elementwise")
    if name == "mean" and _is_spatial_mean(node, value):
        return Step(node, "mean")
    if name in ("mean", "sum", "softmax", "log_softmax", "flatten"):
        return Step(node, "dense") if _keeps_batch(node, value, name) else None
    if name in ("view", "reshape"):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        leading = sizes[0] if sizes else None
        # The batch size differs between the clean run and the perturbed batches, so it must not be a constant.
        return Step(node, "dense") if isinstance(leading, fx.Node) or leading == -1 else None
    return None


def _classify_function(node: fx.Node, value: Any) -> Step | None:
    target = node.target
    if target in (F.dropout, F.dropout2d):
        return Step(node, "elementwise") if _argument(node, 2, "training", True) is False else None
    if target in _ELEMENTWISE_FUNCTIONS:
        return Step(node, "elementwise")
    if target is torch.mean and _is_spatial_mean(node, value):
        return Step(node, "mean")
    if target is F.adaptive_avg_pool2d and _pair(_argument(node, 1, "output_size", None)) == (1, 1):
        return Step(node, "mean")
    if target in (torch.flatten, torch.mean, torch.sum, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax):
        name = "flatten" if target is torch.flatten else "reduce"
        return Step(node, "dense") if _keeps_batch(node, value, name) else None
    if target is torch.cat:
        tensors = node.args[0]
        ndim = value.dim() if isinstance(value, torch.Tensor) else 0
        dim = _argument(node, 1, "dim", 0)
        ok = isinstance(tensors, (tuple, list)) and isinstance(dim, int) and dim % max(ndim, 1) != 0
        return Step(node, "dense") if ok else None
    if target in (F.linear, F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return Step(node, "dense")
    return None


def _conv_step(node: fx.Node, conv: nn.Conv2d, value: torch.Tensor) -> Step:
    kernel = _pair(conv.kernel_size)
    stride = _pair(conv.stride)
    dilation = _pair(conv.dilation)
    if isinstance(conv.padding, str):
        # "same" pads (dilation * (kernel - 1)) // 2 before and the rest after, and "valid" pads nothing.
        same = conv.padding == "same"
        padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2) if same else (0, 0)
    else:
        padding = _pair(conv.padding)
    sliding = (
        Sliding(kernel[0], stride[0], padding[0], dilation[0]),
        Sliding(kernel[1], stride[1], padding[1], dilation[1]),
    )

    def run_region(region: torch.Tensor) -> torch.Tensor:
        return F.conv2d(region, conv.weight, conv.bias, stride, 0, dilation, conv.groups)

    macs = conv.out_channels * (conv.in_channels // conv.groups) * kernel[0] * kernel[1]
    return Step(node, "slide", sliding=sliding, pad_value=0.0, run_region=run_region, macs=macs)


def _pool_step(node: fx.Node, pool: nn.MaxPool2d | nn.AvgPool2d, value: torch.Tensor, pad_value: float) -> Step:
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride or pool.kernel_size)
    padding = _pair(pool.padding)
    dilation = _pair(pool.dilation) if isinstance(pool, nn.MaxPool2d) else (1, 1)
    sliding = (
        Sliding(kernel[0], stride[0], padding[0], dilation[0]),
        Sliding(kernel[1], stride[1], padding[1], dilation[1]),
    )

    def run_region(region: torch.Tensor) -> torch.Tensor:
        if isinstance(pool, nn.MaxPool2d):
            return F.max_pool2d(region, kernel, stride, 0, dilation)
        # The region contains the padding as zeros, so dividing by the kernel area matches count_include_pad.
        return F.avg_pool2d(region, kernel, stride, 0, divisor_override=pool.divisor_override)

    return Step(
        node,
        "slide",
        sliding=sliding,
        pad_value=pad_value,
        run_region=run_region,
        macs=value.shape[1] * kernel[0] * kernel[1],
    )


def _check_in_place(graph_module: fx.GraphModule, node: fx.Node, dependent: set[fx.Node]) -> None:
    """Reject in-place layers whose overwritten input is also read elsewhere.

    The engine keeps every node's clean value apart from the tensors it runs on. An
    in-place layer is therefore exact only when nothing else reads the value it overwrites
    or a tensor that shares its memory, such as the input of an identity, dropout or view.
    """
    if not _is_in_place(graph_module, node):
        return
    target = node.args[0] if node.args else None
    while True:
        if not isinstance(target, fx.Node) or target not in dependent or len(target.users) > 1:
            raise Unsupported(f"in-place {describe(graph_module, node)} overwrites a value that another layer reads")
        if not _is_alias(graph_module, target):
            return
        target = target.args[0] if target.args else None


def _is_alias(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Return whether a node's output may share memory with its first argument."""
    if node.op == "call_module":
        return type(graph_module.get_submodule(str(node.target))) in _ALIAS_MODULES
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    return node.op == "call_function" and node.target in _ALIAS_FUNCTIONS


def _is_in_place(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(graph_module.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_):
            return True
        return bool(_argument(node, None, "inplace", False))
    return False


def _elementwise_fits(
    node: fx.Node, inputs: list[fx.Node], values: dict[fx.Node, Any], dependent: set[fx.Node]
) -> bool:
    """Return whether an elementwise node can run on windows.

    All input-dependent operands must be ``(N, C, H, W)`` maps of the output's shape.
    Every constant tensor must be the same at every position (a scalar or a per-channel
    vector). Then a window of the output needs only windows of the inputs.
    """
    output = values[node]
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        return False
    if any(isinstance(values[arg], torch.Tensor) and values[arg].shape != output.shape for arg in inputs):
        return False
    for arg in node.all_input_nodes:
        constant = values[arg]
        if arg not in dependent and isinstance(constant, torch.Tensor) and constant.dim() > 0:
            padded = (1,) * (4 - constant.dim()) + tuple(constant.shape)
            if constant.dim() > 4 or padded[0] != 1 or padded[2:] != (1, 1):
                return False
    return True


def _is_spatial_mean(node: fx.Node, value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or "dtype" in node.kwargs:
        return False
    dims = _argument(node, 1, "dim", None)
    if isinstance(dims, int):
        dims = (dims,)
    return isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]


def _keeps_batch(node: fx.Node, value: Any, name: str) -> bool:
    """Return whether a reduction, softmax or flatten leaves the batch dimension alone."""
    if not isinstance(value, torch.Tensor):
        return False
    if name == "flatten":
        return _normal_dim(_argument(node, 1, "start_dim", 0), value) >= 1
    dims = _argument(node, 1, "dim", None)
    if dims is None:
        return False
    if isinstance(dims, int):
        dims = (dims,)
    return isinstance(dims, (tuple, list)) and all(isinstance(d, int) and _normal_dim(d, value) != 0 for d in dims)


def _argument(node: fx.Node, position: int | None, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    if position is not None and len(node.args) > position:
        return node.args[position]
    if position is None and node.op == "call_function":
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return default
        return bound.arguments.get(name, default)
    return default


def _normal_dim(dim: Any, value: Any) -> int:
    ndim = value.dim() if isinstance(value, torch.Tensor) else 0
    if not isinstance(dim, int) or ndim == 0:
        return -1
    return dim % ndim


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, Sequence) and len(value) == 1 and isinstance(value[0], int):
        return int(value[0]), int(value[0])
    return -1, -1


def _is_python_builtin(target: Any) -> bool:
    return getattr(target, "__module__", None) in ("_operator", "operator", "builtins")
