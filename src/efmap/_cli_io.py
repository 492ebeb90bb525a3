"""Files the command line reads and writes: models, images, accumulator states and PNG pictures.

Pillow and matplotlib are optional and imported only where they are used.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efmap._typing import ValueRange
from efmap.merge import HeatMapAccumulator

#: File name endings read as images when IMAGES is a file or a folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: Pictures are enlarged by whole factors until their longer side reaches this many pixels.
MIN_PICTURE_SIDE = 128

_STATE_KEYS = {"reduction", "normalize", "dims", "labels", "counts", "sums", "maxima"}


def dynamic_export_hint(argument: str | None = None) -> str:
    """Return how to export a model so that it accepts batches of any size, for error messages.

    ``argument`` is the name of the argument of ``forward``, where known.
    """
    name = argument or "x"
    where = "" if argument else ", where x is the name of the argument of forward"
    return (
        f'torch.export.export(model.eval(), (example,), dynamic_shapes={{"{name}": {{0: torch.export.Dim("batch")}}}})'
        + where
    )


class CliError(Exception):
    """An expected failure, reported as one line and exit code 1."""


class ModelCallError(CliError):
    """The loaded model raised an exception when it was called."""


def model_format(path: Path) -> str:
    """Return ``"torchscript"``, ``"export"``, ``"pickle"`` or ``"unknown"`` from the file's contents."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith(("/archive_format", "/models/model.json")) for name in names):
            return "export"
        if any("/code/" in name for name in names) and any(name.endswith("/constants.pkl") for name in names):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in names):
            return "pickle"
        return "unknown"
    with open(path, "rb") as handle:
        head = handle.read(2)
    # Pickle protocols 2 to 5 start with the PROTO opcode 0x80 followed by the protocol number.
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def load_model(path: Path, device: torch.device) -> torch.nn.Module:
    """Load a TorchScript file or a ``torch.export`` program, never a pickle.

    Raises
    ------
    CliError
        If the file is missing, pickled, of another format, or fails to load.
    """
    if not path.is_file():
        raise CliError(f"MODEL file not found: {path}")
    kind = model_format(path)
    if kind == "pickle":
        raise CliError(
            f"{path} is a pickled module or checkpoint (torch.save), which efmap does not load because unpickling "
            "can run arbitrary code. Export the model with a dynamic batch dimension, "
            f"{dynamic_export_hint()}, and save it with torch.export.save(program, 'model.pt2'). "
            "TorchScript files (torch.jit.script) load too, but "
            "PyTorch 2.13 deprecates TorchScript."
        )
    if kind == "unknown":
        raise CliError(f"{path} is neither a TorchScript file nor a torch.export program (.pt2).")
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript; reading existing files is still supported, so stay quiet.
                warnings.simplefilter("ignore", DeprecationWarning)
                model: torch.nn.Module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
            # The command line has no other place to switch a TorchScript model to inference behaviour.
            model.eval()
        else:
            model = torch.export.load(str(path)).module().to(device)
            # An exported graph was fixed when it was exported, so its training flags change nothing; and
            # eval() raises NotImplementedError on it. Clearing the flags keeps efmap from warning about them.
            for module in model.modules():
                module.training = False
    except (RuntimeError, ValueError, OSError) as error:
        raise CliError(f"Failed to load the {kind} model {path}: {error_summary(error)}.") from None
    return CheckedModel(model, path)


class CheckedModel(torch.nn.Module):
    """A loaded model whose exceptions become one-line :class:`ModelCallError` messages naming its file.

    The loaded model is a submodule, so efmap finds its device, dtype and training flags as before.
    ``state_dict`` is the loaded model's own, so a run's model SHA-256 does not depend on the wrapper.
    """

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        super().__init__()
        self.model = model
        self.path = path
        self.training = False

    def forward(self, x: torch.Tensor) -> Any:
        if isinstance(x, torch.fx.Proxy):
            # efmap's incremental engine traces models with torch.fx. It must see a tracing failure as it is, and
            # must not trace a TorchScript module, whose compiled forward fx cannot follow.
            if isinstance(self.model, torch.jit.ScriptModule):
                raise TypeError("torch.fx cannot trace a TorchScript module")
            return self.model(x)
        try:
            return self.model(x)
        except Exception as error:  # a loaded model may raise any exception, and its message is what the user needs
            raise ModelCallError(describe_model_failure(self.path, tuple(x.shape), error)) from error

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.state_dict(*args, **kwargs)


def describe_model_failure(path: Path, shape: tuple[int, ...], error: BaseException) -> str:
    """Return a one-line message for an exception that the model at ``path`` raised on a batch of ``shape``."""
    detail = error_summary(error)
    # torch.export programs check the input shapes they were exported with. Recent PyTorch reports
    # "Guard failed: x.size()[0] == 2", older releases "Expected input at *args[0].shape[0] to be equal to 2".
    guard = re.search(r"(\w+)\.size\(\)\[(\d+)\] == (\d+)", detail)
    old_guard = re.search(r"shape\[(\d+)\] to be equal to (\d+)", detail)
    argument, dim, size = guard.groups() if guard else (None, *(old_guard.groups() if old_guard else (None, None)))
    if dim == "0":
        return (
            f"{path} was exported with a fixed batch size of {size}, but efmap runs it on batches of other sizes "
            f"(this one has {shape[0]}). Export it again with a dynamic batch dimension: "
            f"{dynamic_export_hint(argument)}."
        )
    if dim is not None:
        return (
            f"{path} was exported for inputs of size {size} in dimension {dim}, but got a batch of shape {shape}. "
            "Check the image size and channels (--resize, --mode)."
        )
    if "out of memory" in detail.lower():
        return f"{path} ran out of memory on a batch of shape {shape}: {detail}. Pass a smaller --batch-size."
    return f"{path} failed on a batch of shape {shape}: {detail}. Check the image size and channels (--resize, --mode)."


def check_model_runs(model: torch.nn.Module, example: torch.Tensor, batch_size: int) -> None:
    """Run the model on copies of ``example`` so that shape and batch errors surface before the run.

    A run calls the model on batches of every size up to ``batch_size``. A ``torch.export`` program
    exported with a fixed batch size rejects all but one size, so two sizes are tried: 3 (or
    ``batch_size`` if smaller), which is rarely the size a model was exported with, and 1.

    Raises
    ------
    ModelCallError
        If a call raises.
    """
    for size in dict.fromkeys([min(3, batch_size), 1]):
        with torch.inference_mode():
            model(example.expand(size, *example.shape).contiguous())


class ImageFiles(torch.utils.data.Dataset[torch.Tensor]):
    """Image files read lazily with Pillow, as float32 ``(C, H, W)`` tensors in ``value_range``."""

    def __init__(self, paths: list[Path], mode: str, size: tuple[int, int] | None, value_range: ValueRange) -> None:
        self.paths = paths
        self.mode = mode
        self.size = size
        self.value_range = value_range
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.size is not None:
            return
        image_module = _pillow()
        first = None
        for path in self.paths:
            # Opening reads only the header, so checking every size up front is cheap.
            with image_module.open(path) as image:
                if first is None:
                    first = image.size
                elif image.size != first:
                    raise CliError(
                        f"{path} is {image.size[0]}x{image.size[1]} pixels, but {self.paths[0]} is "
                        f"{first[0]}x{first[1]}. Pass --resize HEIGHT WIDTH to bring all images to one size."
                    )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image_module = _pillow()
        with image_module.open(self.paths[index]) as image:
            image = image.convert(self.mode)
            if self.size is not None:
                image = image.resize((self.size[1], self.size[0]), image_module.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return from_8bit(pixels, self.value_range)


class ArrayImages(torch.utils.data.Dataset[torch.Tensor]):
    """Rows of a ``.npy`` array read lazily through a memory map, as float32 ``(C, H, W)`` tensors.

    With ``channels_last`` the rows are ``(H, W, C)`` and are transposed. Float rows are checked
    against ``value_range`` as they are read, with a message in terms of the command line.
    """

    def __init__(self, array: np.ndarray, value_range: ValueRange, path: Path, *, channels_last: bool) -> None:
        self.array = array
        self.value_range = value_range
        self.path = path
        self.channels_last = channels_last

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        row = np.asarray(self.array[index])
        if self.channels_last:
            row = row.transpose(2, 0, 1)
        row = np.ascontiguousarray(row[None] if row.ndim == 2 else row)
        if row.dtype == np.uint8:
            return from_8bit(row, self.value_range)
        values = row.astype(np.float32)
        self._check_range(values, index)
        return torch.from_numpy(values)

    def _check_range(self, values: np.ndarray, index: int) -> None:
        if not np.isfinite(values).all():
            raise CliError(f"Expected finite values in {self.path}, but row {index} contains NaN or infinity.")
        lo, hi = self.value_range
        low, high = float(values.min()), float(values.max())
        if low < lo or high > hi:
            raise CliError(
                f"Expected the values in {self.path} to lie in --value-range {lo:g} {hi:g}, but row {index} has "
                f"values from {low:.6g} to {high:.6g}. Float arrays are used as they are, so pass the range the "
                "array uses, for example --value-range 0 255 for pixels in [0, 255], or save 8-bit pixels as "
                "uint8 to have them mapped onto --value-range."
            )


def check_first_image(image: torch.Tensor, value_range: ValueRange, source: Path) -> None:
    """Reject a first image whose values all lie in the upper half of ``value_range``, like efmap itself does.

    The check is repeated here so that the message names the command-line options.
    """
    lo, hi = value_range
    middle = (lo + hi) / 2
    low, high = float(image.min()), float(image.max())
    if low >= middle and high > middle and image.numel() > 1:
        raise CliError(
            f"Expected the first image of {source} to use --value-range {lo:g} {hi:g}, but all its values lie in "
            f"the upper half ({low:.6g} to {high:.6g}). A float array in [0, 1] needs --value-range 0 1. If the "
            "values are right as they are (a very bright image, for example), pass --no-range-check."
        )


def from_8bit(pixels: np.ndarray, value_range: ValueRange) -> torch.Tensor:
    """Map 8-bit values linearly from ``[0, 255]`` onto ``value_range``."""
    lo, hi = value_range
    return torch.from_numpy(pixels.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo))


def open_images(
    source: Path, *, mode: str, size: tuple[int, int] | None, value_range: ValueRange
) -> tuple[torch.utils.data.Dataset[torch.Tensor], list[str]]:
    """Return a lazily read data set of the images at ``source`` and a name per image.

    Raises
    ------
    CliError
        If ``source`` is missing, an empty folder, an unsupported file or an unusable array.
    """
    if source.is_dir():
        paths = sorted(path for path in source.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise CliError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) found in the folder {source}.")
        return ImageFiles(paths, mode, size, value_range), [path.name for path in paths]
    if not source.is_file():
        raise CliError(f"IMAGES not found: {source}")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return ImageFiles([source], mode, size, value_range), [source.name]
    if source.suffix.lower() == ".npy":
        array = _load_array(source)
        images = ArrayImages(array, value_range, source, channels_last=is_channels_last(array.shape))
        return images, [str(index) for index in range(array.shape[0])]
    raise CliError(f"IMAGES must be an image file ({', '.join(IMAGE_SUFFIXES)}), a folder of images or a .npy array, "
                   f"but got {source}.")  # fmt: skip


def _load_array(path: Path) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise CliError(f"Cannot read {path} as a numeric array without unpickling: {error_summary(error)}.") from None
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise CliError(
            f"Expected the array in {path} to be uint8 (8-bit images) or floating point, but got {array.dtype}."
        )
    if array.ndim == 2:
        array = array[None]
    if array.ndim not in (3, 4) or array.shape[0] == 0:
        raise CliError(
            f"Expected the array in {path} to have shape (N, C, H, W), (N, H, W, C), (N, H, W) or (H, W), "
            f"but got {array.shape}."
        )
    return array


def is_channels_last(shape: tuple[int, ...]) -> bool:
    """Tell whether an array of images ``(N, ...)`` is laid out ``(N, H, W, C)``: C is 1 or 3 and dimension 1 is not."""
    return len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3)


def load_state(path: Path) -> dict[str, Any]:
    """Load an accumulator state from a ``.pt`` file or a run directory's ``accumulator.pt``, without unpickling.

    Raises
    ------
    CliError
        If the file is missing or is not an accumulator state; the message never repeats torch's
        advice to load with ``weights_only=False``.
    """
    file = path / "accumulator.pt" if path.is_dir() else path
    if not file.is_file():
        raise CliError(f"Accumulator state not found: {file}")
    kind = model_format(file)
    if kind in ("torchscript", "export"):
        description = "a TorchScript model" if kind == "torchscript" else "a torch.export program"
        raise CliError(f"{file} is not an efmap accumulator state: it is {description}.")
    try:
        with warnings.catch_warnings():
            # torch.load warns about some files it then rejects; the error below replaces that warning.
            warnings.simplefilter("ignore")
            state = torch.load(file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        if kind == "pickle":
            reason = "it contains Python objects other than tensors and plain values, which efmap does not unpickle"
        else:
            reason = "torch.load cannot read it"
        raise CliError(f"{file} is not an efmap accumulator state: {reason}.") from None
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise CliError(
            f"{file} is not an efmap accumulator state: expected the keys {sorted(_STATE_KEYS)} of "
            "HeatMapAccumulator.state_dict()."
        )
    return state


def accumulator_from_state(state: dict[str, Any], origin: Path) -> HeatMapAccumulator:
    """Build an accumulator with the settings and contents of ``state``."""
    try:
        accumulator = HeatMapAccumulator(state["reduction"], normalize=state["normalize"], dims=state["dims"])
        accumulator.load_state_dict(state)
    except (ValueError, TypeError, IndexError) as error:
        raise CliError(f"Invalid accumulator state in {origin}: {error_summary(error)}.") from None
    return accumulator


def write_heatmap_png(heatmap: np.ndarray, path: Path, background: np.ndarray | None = None) -> bool:
    """Write a 2-D map as a colour PNG, blended over a grey ``background`` in ``[0, 1]`` if given.

    Uses matplotlib's ``inferno`` colour map when matplotlib is installed, else a black-red-yellow
    ramp with Pillow. Returns False, writing nothing, when neither is installed.
    """
    heat = _unit(heatmap)
    try:
        from matplotlib import colormaps
    except ImportError:
        colours = np.stack([np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1), np.zeros_like(heat)], axis=-1)
    else:
        colours = colormaps["inferno"](heat)[..., :3]
    if background is not None:
        colours = 0.5 * colours + 0.5 * background[..., None]
    return _write_png(colours, path)


def write_mask_png(mask: np.ndarray, path: Path) -> bool:
    """Write a boolean mask as a black (removed) and white (kept) PNG; False when no writer is installed."""
    grey = mask.astype(np.float64)
    return _write_png(np.stack([grey, grey, grey], axis=-1), path)


def grey_background(image: torch.Tensor, value_range: ValueRange) -> np.ndarray:
    """Return the channel mean of a ``(C, H, W)`` input, scaled from ``value_range`` to ``[0, 1]``."""
    lo, hi = value_range
    grey = image.double().mean(dim=0).numpy()
    scaled: np.ndarray = np.clip((grey - lo) / (hi - lo), 0.0, 1.0)
    return scaled


def _write_png(colours: np.ndarray, path: Path) -> bool:
    factor = max(1, math.ceil(MIN_PICTURE_SIDE / max(colours.shape[:2])))
    pixels = np.round(np.clip(colours, 0, 1) * 255).astype(np.uint8)
    pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
    try:
        from PIL import Image
    except ImportError:
        try:
            from matplotlib import image as matplotlib_image
        except ImportError:
            return False
        matplotlib_image.imsave(path, pixels)
        return True
    Image.fromarray(pixels).save(path)
    return True


def _unit(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise CliError("Reading image files needs Pillow; install it with `pip install efmap[data]`.") from None
    return Image


def error_summary(error: BaseException) -> str:
    """Return the line of an exception's message that states the cause, without a final period.

    That is the first line, except for TorchScript errors: their first line only reports that an
    operation failed in the interpreter, and the cause, such as ``RuntimeError: Given groups=1, ...``,
    is the last line after two tracebacks.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        causes = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b[^:]*: ", line)]
        # An exception raised in scripted code is reported with its module, as builtins.RuntimeError.
        return (causes[-1] if causes else lines[-1]).removeprefix("builtins.").rstrip(".")
    return lines[0].rstrip(".")
