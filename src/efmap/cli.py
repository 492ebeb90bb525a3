"""The ``efmap`` command: explain images with a saved model, merge runs, select landmarks.

Exit codes: 0 on success, 2 for usage errors, 1 for failures. Every error is
one line that names the file or value involved; ``--debug`` shows the traceback
instead. Exceptions that efmap does not expect are never turned into one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from efmap._checkpoint import atomic_save, atomic_write_json
from efmap._cli_io import (
    ArrayImages,
    CliError,
    accumulator_from_state,
    check_first_image,
    check_model_runs,
    grey_background,
    load_model,
    load_state,
    open_images,
    write_heatmap_png,
    write_mask_png,
)
from efmap._rundir import FINGERPRINT_LABELS, RUN_OPTIONS_KEY, ResumeError, short_repr
from efmap._version import __version__
from efmap.dataset import DEFAULT_CHUNK_SIZE, explain_dataset
from efmap.landmarks import select_landmarks
from efmap.merge import HeatMapAccumulator
from efmap.scoring import DEFAULT_BATCH_SIZE

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of ``efmap`` and its subcommands."""
    parser = _Parser(prog="efmap", description="Explainable Feature Maps for PyTorch classifiers.")
    parser.add_argument("--version", action="version", version=f"efmap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_explain(commands)
    _add_merge(commands)
    _add_landmarks(commands)
    return parser


def _add_explain(commands: Any) -> None:
    explain = commands.add_parser(
        "explain",
        help="explain every image with a saved model; resumable",
        description="Explain every image with a TorchScript or torch.export model. Writes the maps (maps.npz), "
        "PNG overlays, a JSON summary and the merged accumulator (accumulator.pt) to --out. A run that is "
        "interrupted continues where it stopped when started again with the same arguments. Start it with "
        "torchrun to split the images across processes.",
    )
    explain.add_argument("model", metavar="MODEL", type=Path, help="TorchScript file or torch.export program (.pt2)")
    explain.add_argument(
        "images",
        metavar="IMAGES",
        type=Path,
        help="an image file, a folder of images or a .npy array (N, C, H, W); an array (N, H, W, C) with C of 1 "
        "or 3 is transposed, with a note",
    )
    explain.add_argument("--out", metavar="DIR", type=Path, required=True, help="output directory (required)")
    _add_scoring_options(explain.add_argument_group("scoring"))
    _add_image_options(explain.add_argument_group("images"))
    _add_run_options(explain.add_argument_group("run"))
    _add_debug(explain)
    explain.set_defaults(run=_explain, parser=explain)


def _add_scoring_options(group: Any) -> None:
    group.add_argument(
        "--score",
        choices=("max", "target"),
        default="max",
        help="read the new maximum over all classes (max) or the target class (target) (default: max)",
    )
    group.add_argument(
        "--target",
        metavar="CLASS",
        type=int,
        default=None,
        help="class index to explain, with --score target (default: the class predicted for each image)",
    )
    group.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"perturbed copies per forward pass (default: {DEFAULT_BATCH_SIZE})",
    )
    group.add_argument(
        "--patch-size",
        metavar="PIXELS",
        type=int,
        default=None,
        help="side of the square patch reversed as one feature, in pixels (default: 1, one feature per pixel)",
    )
    group.add_argument(
        "--reduction",
        choices=("mean", "max", "sum"),
        default="mean",
        help="how the normalised maps merge per class and overall (default: mean)",
    )


def _add_image_options(group: Any) -> None:
    group.add_argument(
        "--value-range",
        metavar=("LO", "HI"),
        type=float,
        nargs=2,
        default=(-1.0, 1.0),
        help="range of the model's input values; 8-bit pixels (image files, uint8 arrays) are mapped linearly "
        "from [0, 255] onto it, float arrays are used as they are (default: -1 1)",
    )
    group.add_argument(
        "--mode",
        choices=("L", "RGB"),
        default="RGB",
        help="colour mode image files are converted to: L for 1 channel, RGB for 3 (default: RGB)",
    )
    group.add_argument(
        "--resize",
        metavar=("HEIGHT", "WIDTH"),
        type=int,
        nargs=2,
        default=None,
        help="resize image files to this size in pixels (default: keep the size, which all images must share)",
    )


def _add_run_options(group: Any) -> None:
    group.add_argument(
        "--chunk-size",
        metavar="N",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"images explained and checkpointed together (default: {DEFAULT_CHUNK_SIZE})",
    )
    group.add_argument("--device", default="cpu", help="torch device to run the model on (default: cpu)")
    group.add_argument(
        "--no-range-check",
        action="store_true",
        help="accept a first image whose values all lie in the upper half of the range (default: reject it)",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="discard an unfinished or finished run in DIR instead of resuming it (default: resume)",
    )
    group.add_argument(
        "--overlays",
        metavar="N",
        type=int,
        default=16,
        help="number of images, from the first, that get a PNG overlay; 0 for none (default: 16)",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar with forward passes per second and time left (default: when stderr is a terminal)",
    )


def _add_debug(command: Any) -> None:
    command.add_argument(
        "--debug",
        action="store_true",
        help="on a failure, show the Python traceback instead of a one-line error (default: one line)",
    )


def _add_merge(commands: Any) -> None:
    merge = commands.add_parser(
        "merge",
        help="combine the accumulators of several runs",
        description="Combine the accumulator states of several runs, for example from different machines, into "
        "one. Runs of another model or with other options (score, target, value range, patch size, image or map "
        "shape) are rejected. Writes accumulator.pt, maps.npz, PNG pictures and summary.json to --out.",
    )
    merge.add_argument(
        "inputs",
        metavar="STATE",
        type=Path,
        nargs="+",
        help="accumulator state (.pt) or run directory that contains accumulator.pt",
    )
    merge.add_argument("--out", metavar="DIR", type=Path, required=True, help="output directory (required)")
    _add_debug(merge)
    merge.set_defaults(run=_merge, parser=merge)


def _add_landmarks(commands: Any) -> None:
    landmarks = commands.add_parser(
        "landmarks",
        help="select and save a landmark mask from a merged map",
        description="Threshold a merged map into a boolean landmark mask. Writes landmarks.npy (the mask), "
        "landmarks.json and landmarks.png to --out.",
    )
    landmarks.add_argument(
        "source", metavar="STATE", type=Path, help="accumulator state (.pt) or run directory that contains one"
    )
    landmarks.add_argument("--out", metavar="DIR", type=Path, required=True, help="output directory (required)")
    rule = landmarks.add_mutually_exclusive_group(required=True)
    rule.add_argument(
        "--keep-fraction",
        metavar="F",
        type=float,
        help="keep this fraction of the features with the largest values, between 0 and 1 "
        "(required unless --threshold is given)",
    )
    rule.add_argument(
        "--threshold",
        metavar="T",
        type=float,
        help="keep features whose merged value is greater than T; merged maps lie in [0, 1] "
        "(required unless --keep-fraction is given)",
    )
    landmarks.add_argument(
        "--class",
        dest="class_index",
        metavar="CLASS",
        type=int,
        default=None,
        help="use the merged map of this class (default: the overall map)",
    )
    landmarks.add_argument(
        "--over",
        choices=("classes", "inputs"),
        default="classes",
        help="build the overall map with every class weighing the same (classes) or every input (inputs) "
        "(default: classes)",
    )
    _add_debug(landmarks)
    landmarks.set_defaults(run=_landmarks, parser=landmarks)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``efmap`` command line and return its exit code.

    Parameters
    ----------
    argv
        Arguments without the program name. Default: ``sys.argv[1:]``.

    Returns
    -------
    int
        0 on success. 1 when the command fails, after printing a one-line error to stderr.

    Raises
    ------
    SystemExit
        With code 2 on a usage error, and with code 0 after ``--help`` or ``--version``.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from efmap import HeatMapAccumulator
    >>> from efmap.cli import main
    >>> accumulator = HeatMapAccumulator()
    >>> accumulator.update(torch.arange(16.0).reshape(1, 4, 4), labels=[0])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     state = Path(folder) / "state.pt"
    ...     torch.save(accumulator.state_dict(), state)
    ...     main(["landmarks", str(state), "--out", folder, "--keep-fraction", "0.25"])  # doctest: +ELLIPSIS
    ...     main(["landmarks", str(Path(folder) / "missing.pt"), "--out", folder, "--threshold", "0.5"])
    Kept 4 of 16 features (25.00%); mask in ...
    0
    1
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(args, args.parser)
    try:
        args.run(args)
    except (CliError, ValueError, TypeError, OSError) as error:
        if args.debug:
            raise
        # The Python API names the fix overwrite=True and out_dir; here they are --overwrite and --out.
        text = error.message("--overwrite", "--out") if isinstance(error, ResumeError) else str(error)
        message = " ".join(text.split())
        print(f"efmap {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _check_usage(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject option values that argparse cannot check by itself, with exit code 2."""
    if args.command == "explain":
        lo, hi = args.value_range
        if not lo < hi:
            parser.error(f"--value-range needs LO < HI, but got {lo:g} {hi:g}")
        if args.target is not None and args.score != "target":
            parser.error(f"--target {args.target} needs --score target")
        for option in ("batch_size", "chunk_size", "patch_size"):
            value = getattr(args, option)
            if value is not None and value < 1:
                parser.error(f"--{option.replace('_', '-')} must be a positive integer, but got {value}")
        if args.target is not None and args.target < 0:
            parser.error(f"--target must be a non-negative class index, but got {args.target}")
        if args.resize is not None and min(args.resize) < 1:
            parser.error(f"--resize needs positive sizes, but got {args.resize[0]} {args.resize[1]}")
        if args.overlays < 0:
            parser.error(f"--overlays must be 0 or more, but got {args.overlays}")
    if args.command == "landmarks" and args.keep_fraction is not None and not 0 <= args.keep_fraction <= 1:
        parser.error(f"--keep-fraction must lie between 0 and 1, but got {args.keep_fraction:g}")


def _explain(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    joined = _join_process_group(args.device)
    try:
        _explain_images(args, started)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _explain_images(args: argparse.Namespace, started: float) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    device = _rank_device(args.device)
    model = load_model(args.model, device)
    value_range = (args.value_range[0], args.value_range[1])
    size = None if args.resize is None else (args.resize[0], args.resize[1])
    images, names = open_images(args.images, mode=args.mode, size=size, value_range=value_range)
    if rank == 0 and isinstance(images, ArrayImages) and images.channels_last:
        shape = images.array.shape
        print(
            f"efmap explain: note: {args.images} has shape {shape}, read as channels-last (N, H, W, C) and "
            f"transposed to (N, C, H, W) = {(shape[0], shape[3], shape[1], shape[2])}.",
            file=sys.stderr,
        )
    first = images[0]
    if not args.no_range_check:
        check_first_image(first, value_range, args.images)
    check_model_runs(model, first.to(device), args.batch_size)

    result = explain_dataset(
        model,
        images,
        out_dir=args.out,
        store_maps=True,
        score=args.score,
        target=args.target,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        value_range=value_range,
        patch_size=args.patch_size,
        reduction=args.reduction,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        check_range=not args.no_range_check,
        overwrite=args.overwrite,
    )
    if rank != 0:
        return
    assert result.maps is not None  # explain_dataset was called with store_maps=True
    _write_maps(args.out, result.accumulator, maps=result.maps, targets=result.targets, names=names)
    written = _write_class_pictures(args.out, result.accumulator)
    for index in range(min(args.overlays, len(names))):
        background = grey_background(images[index], value_range)
        written += write_heatmap_png(result.maps[index], args.out / "overlays" / f"{index:05d}.png", background)
    seconds = time.perf_counter() - started
    summary = {
        "efmap_version": __version__,
        "model": str(args.model),
        "images": str(args.images),
        "num_images": len(names),
        "images_explained": result.images_explained,
        "map_shape": list(result.maps.shape[1:]),
        "num_features": result.num_features,
        "forward_passes": len(names) * result.num_features,
        "seconds": round(seconds, 3),
        "options": {
            "score": args.score,
            "target": args.target,
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "value_range": list(value_range),
            "patch_size": args.patch_size,
            "reduction": args.reduction,
        },
        "class_counts": {str(label): count for label, count in result.accumulator.counts.items()},
        "pictures_written": written,
        "per_image": [{"name": name, "target": int(t)} for name, t in zip(names, result.targets, strict=True)],
    }
    atomic_write_json(summary, args.out / "summary.json")
    print(_explain_report(len(names), result.images_explained, result.num_features, seconds, args.out))


def _explain_report(num_images: int, explained: int, num_features: int, seconds: float, out: Path) -> str:
    """Return the closing line of ``efmap explain``, which states how much of the run this call did."""
    if explained == 0:
        return f"The run in {out} was already complete ({num_images} image(s)); nothing was explained again."
    resumed = num_images - explained
    earlier = f" (the other {resumed} were done by an earlier, interrupted run)" if resumed else ""
    passes = explained * num_features
    return f"Explained {explained} image(s){earlier}, {passes} forward passes, in {seconds:.1f} s; results in {out}"


def _join_process_group(device_name: str) -> bool:
    """Join the process group that torchrun describes in the environment; return whether this call joined it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if torch.device(device_name).type == "cuda" else "gloo")
    return True


def _rank_device(device_name: str) -> torch.device:
    """Return the device to use; a bare "cuda" under torchrun becomes the GPU of the local rank."""
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _merge(args: argparse.Namespace) -> None:
    states = [load_state(path) for path in args.inputs]
    first = args.inputs[0]
    recorded = [state.get(RUN_OPTIONS_KEY) for state in states]
    options = _common_run_options(args.inputs, recorded)
    merged = accumulator_from_state(states[0], first)
    for path, state in zip(args.inputs[1:], states[1:], strict=True):
        try:
            merged.merge(accumulator_from_state(state, path))
        except ValueError as error:
            raise CliError(f"Cannot merge {path} with {first}: {error}") from None
    if not merged.counts:
        raise CliError(f"The accumulator states {', '.join(map(str, args.inputs))} contain no maps.")

    args.out.mkdir(parents=True, exist_ok=True)
    state = merged.state_dict()
    if options is not None:
        state[RUN_OPTIONS_KEY] = options
    atomic_save(state, args.out / "accumulator.pt")
    _write_maps(args.out, merged)
    written = _write_class_pictures(args.out, merged)
    summary = {
        "efmap_version": __version__,
        "inputs": [str(path) for path in args.inputs],
        "class_counts": {str(label): count for label, count in merged.counts.items()},
        "pictures_written": written,
    }
    atomic_write_json(summary, args.out / "summary.json")
    unchecked = [str(path) for path, entry in zip(args.inputs, recorded, strict=True) if not isinstance(entry, dict)]
    if unchecked and len(args.inputs) > 1:
        print(
            f"efmap merge: note: {', '.join(unchecked)} record(s) no run options, so the model and options of the "
            "runs were not compared.",
            file=sys.stderr,
        )
    print(f"Merged {len(args.inputs)} state(s), {sum(merged.counts.values())} map(s); results in {args.out}")


def _common_run_options(paths: list[Path], recorded: list[Any]) -> dict[str, Any] | None:
    """Return the run options that every state records, rejecting states whose options differ.

    Returns None when some state records none (one saved by ``HeatMapAccumulator.state_dict()``
    or by an older efmap), because its options cannot be checked.
    """
    checked = [(path, options) for path, options in zip(paths, recorded, strict=True) if isinstance(options, dict)]
    if not checked:
        return None
    first_path, first = checked[0]
    for path, options in checked[1:]:
        differences = [
            f"{FINGERPRINT_LABELS.get(key, key)}: {short_repr(first.get(key))} in {first_path}, "
            f"{short_repr(options.get(key))} in {path}"
            for key in dict.fromkeys([*first, *options])
            if first.get(key) != options.get(key)
        ]
        if differences:
            raise CliError(
                f"Cannot merge {path} with {first_path}: the runs were made with different options ("
                + "; ".join(differences)
                + "). Merge only runs of the same model, images and options."
            )
    return first if len(checked) == len(paths) else None


def _landmarks(args: argparse.Namespace) -> None:
    accumulator = accumulator_from_state(load_state(args.source), args.source)
    if args.class_index is None:
        heatmap = accumulator.overall(over=args.over)
    else:
        class_maps = accumulator.class_maps()
        if args.class_index not in class_maps:
            raise CliError(f"{args.source} has no map for class {args.class_index}; it has {sorted(class_maps)}.")
        heatmap = class_maps[args.class_index]
    landmarks = select_landmarks(heatmap, keep_fraction=args.keep_fraction, threshold=args.threshold)

    args.out.mkdir(parents=True, exist_ok=True)
    mask = landmarks.mask.numpy()
    np.save(args.out / "landmarks.npy", mask)
    written = write_mask_png(mask, args.out / "landmarks.png") if mask.ndim == 2 else False
    record = {
        "source": str(args.source),
        "map": "overall" if args.class_index is None else f"class {args.class_index}",
        "over": args.over,
        "keep_fraction": args.keep_fraction,
        "threshold": args.threshold,
        "shape": list(mask.shape),
        "count": landmarks.count,
        "fraction": landmarks.fraction,
        "picture_written": written,
    }
    atomic_write_json(record, args.out / "landmarks.json")
    print(f"Kept {landmarks.count} of {mask.size} features ({landmarks.fraction:.2%}); mask in {args.out}")


def _write_maps(
    out: Path,
    accumulator: HeatMapAccumulator,
    *,
    maps: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    names: list[str] | None = None,
) -> None:
    """Write the class maps, the overall map and optionally per-image maps to ``out/maps.npz``."""
    class_maps = accumulator.class_maps()
    arrays: dict[str, np.ndarray] = {
        "class_labels": np.array(list(class_maps), dtype=np.int64),
        "class_maps": torch.stack(list(class_maps.values())).numpy(),
        "overall": accumulator.overall().numpy(),
    }
    if maps is not None and targets is not None and names is not None:
        arrays.update(positive=np.asarray(maps), targets=np.asarray(targets), names=np.array(names, dtype=str))
    np.savez(out / "maps.npz", **arrays)  # type: ignore[arg-type]


def _write_class_pictures(out: Path, accumulator: HeatMapAccumulator) -> int:
    """Write PNG pictures of the overall and class maps (2-D maps only); return how many were written."""
    overall = accumulator.overall().numpy()
    if overall.ndim != 2:
        return 0
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    written = int(write_heatmap_png(overall, out / "overlays" / "overall.png"))
    for label, heatmap in accumulator.class_maps().items():
        written += write_heatmap_png(heatmap.numpy(), out / "overlays" / f"class_{label}.png")
    if not written:
        print("efmap: note: no PNG pictures written; install matplotlib or Pillow for them.", file=sys.stderr)
    return written


if __name__ == "__main__":
    sys.exit(main())
