"""
Explain the age-group ResNet on Adience
=======================================

Explain the trained age-group ResNet on the Adience test split, merge the maps and select landmarks.

For every test image of the split that ``train_age_resnet.py`` saved, each pixel
is reversed in turn (all channels together), and the fall of the maximum output
is recorded with ``efmap.explain(..., score="max")``. Images are explained one
at a time, and the perturbed copies of an image are scored in batches. Each finished map is written atomically to
``OUT/maps/``, so an interrupted run started again skips the finished images.
When all maps exist the script

- merges them per age group and over all groups (``efmap.HeatMapAccumulator``),
- selects the landmarks of the overall map (by default the 65.98 % of pixels
  with the largest values, as Hong and Yoo (2021) kept 10,810 of 16,384),
- measures the test accuracy on the full images, on the landmarks only, and on
  random masks of the same size (``efmap.masked_accuracy``), and
- draws ``figure.png``: the overall map and its landmarks on top, the group maps
  in the middle and maps of single images at the bottom.

Example, after training::

    python examples/explain_age_resnet.py --root /data/adience --out out/age_resnet --progress
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import efmap
from efmap.reference import AdienceDataset, AdienceSplit, AgeResNet, find_root
from efmap.reference.adience import GROUP_NAMES

logger = logging.getLogger("explain_age_resnet")

#: Fraction of pixels Hong and Yoo (2021) kept as landmarks: 10,810 of 16,384.
PAPER_KEEP_FRACTION = 10810 / 16384


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--root", type=Path, required=True, help="Adience folder (or a folder with it one level down)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/age_resnet"), help="training output folder (default out/age_resnet)"
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to explain (default OUT/checkpoint.pt)")
    parser.add_argument("--split", type=Path, help="split file written by the training (default OUT/split.json)")

    parser.add_argument("--batch-size", type=int, default=256, help="perturbed copies per forward pass (default 256)")
    parser.add_argument(
        "--limit", type=int, default=0, help="explain only the first N test images, 0 for all (default 0)"
    )

    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--keep-fraction",
        type=float,
        default=PAPER_KEEP_FRACTION,
        help=f"fraction of pixels kept as landmarks (default {PAPER_KEEP_FRACTION:.4f}, i.e. 10810/16384)",
    )
    selection.add_argument("--threshold", type=float, help="keep pixels whose merged value in [0, 1] exceeds this")
    parser.add_argument(
        "--merge-by",
        choices=("label", "prediction"),
        default="label",
        help="group maps by the true label or the prediction (default label)",
    )
    parser.add_argument("--fill", type=float, default=0.0, help="value of removed pixels in [-1, 1] (default 0.0)")
    parser.add_argument("--num-random", type=int, default=10, help="random masks in the accuracy control (default 10)")
    parser.add_argument(
        "--examples-per-class", type=int, default=3, help="single-image maps per group in the figure (default 3)"
    )

    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default cuda if available, else cpu)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch, 0 for its default (default 0)")
    parser.add_argument(
        "--progress", action="store_true", help="show a progress bar of the forward passes (needs tqdm)"
    )
    parser.add_argument(
        "--stop-after", type=int, default=0, help="stop after explaining this many images in this run, 0 for no limit"
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"), help="default INFO")
    args = parser.parse_args(argv)

    if args.batch_size < 1 or args.limit < 0 or args.stop_after < 0 or args.num_random < 0 or args.threads < 0:
        parser.error("--batch-size must be positive; --limit, --stop-after, --num-random and --threads not negative.")
    if args.keep_fraction is not None and not 0.0 <= args.keep_fraction <= 1.0:
        parser.error(f"--keep-fraction must lie in [0, 1], but got {args.keep_fraction}.")
    return args


def configure_logging(level: str, log_file: Path) -> None:
    """Log to stderr and to ``log_file``, unless the program that called main() has configured logging."""
    if logging.getLogger().handlers:
        logging.getLogger().setLevel(level)
        return
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(log_file, encoding="utf-8")],
    )


def save_atomic(obj: Any, path: Path) -> None:
    """Save with torch.save to a temporary file in the same folder, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: Path, device: torch.device) -> tuple[AgeResNet, dict[str, Any]]:
    """Build the network from a training checkpoint, read with weights_only=True."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    config = checkpoint["config"]
    model = AgeResNet(num_classes=len(GROUP_NAMES), input_size=config["input_size"])
    model.load_state_dict(checkpoint["model"])
    logger.info("Loaded %s (epoch %d, input size %d).", path, checkpoint["epoch"], config["input_size"])
    return model.to(device).eval(), config


def check_run(maps_dir: Path, identity: dict[str, Any]) -> None:
    """Record what the maps in ``maps_dir`` are computed from, and reject a resumption with other inputs."""
    record = maps_dir / "run.json"
    if record.exists():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved != identity:
            changed = ", ".join(key for key in identity if saved.get(key) != identity[key])
            raise SystemExit(
                f"The maps in {maps_dir} were computed with another {changed}. Delete that folder to recompute "
                "them, or choose another --out."
            )
    else:
        write_text_atomic(json.dumps(identity, indent=1), record)


def explain_images(args: argparse.Namespace, model: AgeResNet, data: AdienceDataset, maps_dir: Path) -> bool:
    """Explain every image that has no stored map yet; return True when all are done."""
    count = len(data) if not args.limit else min(args.limit, len(data))
    finished = {i for i in range(count) if map_path(maps_dir, i).exists() or skip_path(maps_dir, i).exists()}
    todo = [i for i in range(count) if i not in finished]
    logger.info("%d of %d test images already explained; explaining %d.", len(finished), count, len(todo))

    device = next(model.parameters()).device
    for done, index in enumerate(todo, start=1):
        item = data[index]
        if item is None:
            # The marker keeps later runs from retrying the image; delete it to try again.
            write_text_atomic(json.dumps({"path": data.samples[index].path}), skip_path(maps_dir, index))
            continue
        image, label = item
        result = efmap.explain(
            model, image[None].to(device), score="max", batch_size=args.batch_size, progress=args.progress
        )
        record = {
            "positive": result.positive[0].cpu(),
            "negative": result.negative[0].cpu(),
            "label": label,
            "prediction": int(result.target[0]),
            "clean_score": float(result.clean_score[0]),
            "path": data.samples[index].path,
        }
        save_atomic(record, map_path(maps_dir, index))
        logger.info(
            "Explained test image %d (%s, predicted %s): %d of %d in this run.",
            index,
            GROUP_NAMES[label],
            GROUP_NAMES[record["prediction"]],
            done,
            len(todo),
        )
        if args.stop_after and done >= args.stop_after and done < len(todo):
            logger.info("Stopping after %d images as --stop-after requests; run again to continue.", done)
            return False
    data.report_skipped()
    skipped = sorted(maps_dir.glob("*.skipped.json"))
    if skipped:
        logger.warning(
            "%d test images could not be read and have no map; their paths are in %s and the like.",
            len(skipped),
            skipped[0],
        )
    return True


def map_path(maps_dir: Path, index: int) -> Path:
    return maps_dir / f"{index:06d}.pt"


def skip_path(maps_dir: Path, index: int) -> Path:
    return maps_dir / f"{index:06d}.skipped.json"


def merge_maps(
    args: argparse.Namespace, maps_dir: Path, count: int
) -> tuple[efmap.HeatMapAccumulator, list[dict[str, Any]]]:
    """Stream the stored maps into an accumulator.

    Returns the accumulator and one record per explained image with its index, label and
    prediction. Only the first ``--examples-per-class`` records of each group keep their map.
    """
    accumulator = efmap.HeatMapAccumulator("mean")
    records = []
    shown = dict.fromkeys(range(len(GROUP_NAMES)), 0)
    for index in range(count):
        path = map_path(maps_dir, index)
        if not path.exists():
            continue
        stored = torch.load(path, weights_only=True)
        group = stored["label"] if args.merge_by == "label" else stored["prediction"]
        accumulator.update(stored["positive"][None].double(), labels=[group])

        record = {"index": index, "label": stored["label"], "prediction": stored["prediction"]}
        if shown[stored["label"]] < args.examples_per_class:
            shown[stored["label"]] += 1
            record["positive"] = stored["positive"]
        records.append(record)
    return accumulator, records


def describe_counts(counts: dict[int, int]) -> str:
    """Describe how many maps were merged in total and per age group, e.g. ``"6 maps: 2 minor, 4 old"``."""
    groups = ", ".join(f"{count} {GROUP_NAMES[group]}" for group, count in sorted(counts.items()))
    return f"{sum(counts.values())} maps: {groups}"


def draw_figure(
    path: Path,
    accumulator: efmap.HeatMapAccumulator,
    landmarks: efmap.Landmarks,
    records: list[dict[str, Any]],
) -> None:
    """Draw the overall map and landmarks on top, the group maps in the middle and single-image maps below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class_maps = accumulator.class_maps()
    examples = sorted((r for r in records if "positive" in r), key=lambda r: (r["label"], r["index"]))
    columns = max(len(examples), len(GROUP_NAMES), 2)
    figure = plt.figure(figsize=(1.6 * columns, 6.0), layout="constrained")
    top, middle, bottom = figure.subfigures(3, 1)

    axes = top.subplots(1, 2)
    axes[0].imshow(accumulator.overall().numpy(), cmap="inferno")
    axes[0].set_title("overall merge", fontsize=8)
    axes[1].imshow(landmarks.mask.numpy(), cmap="gray")
    axes[1].set_title(f"landmarks: {landmarks.count} px ({landmarks.fraction:.2%})", fontsize=8)

    axes = middle.subplots(1, len(GROUP_NAMES))
    for group, axis in enumerate(axes):
        if group in class_maps:
            axis.imshow(class_maps[group].numpy(), cmap="inferno")
        axis.set_title(f"{GROUP_NAMES[group]} (n={accumulator.counts.get(group, 0)})", fontsize=8)

    axes = bottom.subplots(1, max(len(examples), 1), squeeze=False)[0]
    for axis, record in zip(axes, examples, strict=False):
        axis.imshow(record["positive"].numpy(), cmap="inferno")
        axis.set_title(f"#{record['index']} {GROUP_NAMES[record['label']]}", fontsize=7)
    for axis in figure.get_axes():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate_landmarks(
    args: argparse.Namespace,
    model: AgeResNet,
    data: AdienceDataset,
    records: list[dict[str, Any]],
    landmarks: efmap.Landmarks,
) -> efmap.MaskedAccuracy:
    """Measure the masked accuracy on the explained test images."""
    pairs = [data[record["index"]] for record in records]
    kept = [pair for pair in pairs if pair is not None]
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept])
    device = next(model.parameters()).device
    return efmap.masked_accuracy(
        model,
        images.to(device),
        labels,
        landmarks.mask.to(device),
        fill=args.fill,
        num_random=args.num_random,
        batch_size=args.batch_size,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    configure_logging(args.log_level, args.out / "explain.log")
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint_path = args.checkpoint or args.out / "checkpoint.pt"
    split_path = args.split or args.out / "split.json"
    for path, hint in ((checkpoint_path, "train first with train_age_resnet.py"), (split_path, "pass --split")):
        if not path.is_file():
            raise SystemExit(f"{path} not found; {hint}.")

    device = torch.device(args.device)
    model, config = load_model(checkpoint_path, device)
    try:
        split = AdienceSplit.load(split_path)
        root = find_root(args.root, crop=split.settings.crop, folds=split.settings.folds)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    drawn = {key: getattr(split.settings, key) for key in ("train_per_class", "test_per_class", "seed", "crop")}
    trained = {key: config[key] for key in drawn}
    if drawn != trained:
        raise SystemExit(f"The split {split_path} ({drawn}) is not the one the checkpoint was trained on ({trained}).")
    data = AdienceDataset(root, split.test, size=config["input_size"])

    maps_dir = args.out / "maps"
    maps_dir.mkdir(exist_ok=True)
    for stale in maps_dir.glob(".*.tmp"):
        stale.unlink()  # left by a run killed while writing; the map it was writing is recomputed
    check_run(
        maps_dir,
        {"checkpoint_sha256": file_digest(checkpoint_path), "split_sha256": file_digest(split_path), "score": "max"},
    )
    if not explain_images(args, model, data, maps_dir):
        return 0

    count = len(data) if not args.limit else min(args.limit, len(data))
    accumulator, records = merge_maps(args, maps_dir, count)
    if not records:
        raise SystemExit("No test image could be explained; check the warnings about unreadable images above.")
    overall = accumulator.overall()
    if args.threshold is not None:
        landmarks = efmap.select_landmarks(overall, threshold=args.threshold)
    else:
        landmarks = efmap.select_landmarks(overall, keep_fraction=args.keep_fraction)
    save_atomic(
        {
            "accumulator": accumulator.state_dict(),
            "class_maps": accumulator.class_maps(),
            "overall": overall,
            "landmarks": landmarks.mask,
        },
        args.out / "merged.pt",
    )
    logger.info(
        "Merged %s; landmarks keep %d of %d pixels (%.2f%%).",
        describe_counts(accumulator.counts),
        landmarks.count,
        landmarks.mask.numel(),
        100 * landmarks.fraction,
    )

    result = evaluate_landmarks(args, model, data, records, landmarks)
    table = result.table()
    write_text_atomic(table + "\n", args.out / "masked_accuracy.txt")
    summary = {
        "images": len(records),
        "full": result.full,
        "landmarks": result.landmarks,
        "random": result.random.tolist(),
        "kept": result.kept,
        "total": result.total,
        "fraction": result.fraction,
    }
    write_text_atomic(json.dumps(summary, indent=1) + "\n", args.out / "masked_accuracy.json")
    logger.info("Masked accuracy on %d test images:\n%s", len(records), table)

    draw_figure(args.out / "figure.png", accumulator, landmarks, records)
    logger.info(
        "Wrote %s, %s and %s.", args.out / "merged.pt", args.out / "masked_accuracy.txt", args.out / "figure.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
