"""
Train the age-group ResNet on Adience
=====================================

Train the age-group ResNet of Hong and Yoo (2021) on a local copy of the Adience benchmark.

The three groups are minor (0-12), adult (15-53) and old (60-100). The first
run draws a balanced split (1,340 training and 400 test images per group by
default) and saves it as ``split.json`` in the output folder. Later runs reuse
it. After every epoch the script logs the training and test accuracy and the
test confusion matrix, and writes ``checkpoint.pt`` atomically, so an
interrupted run continues with ``--resume``. The finished run also writes the
weights alone to ``model.pt``.

Example, on a real copy (about 130 epochs; a GPU helps)::

    python examples/train_age_resnet.py --root /data/adience --out out/age_resnet

and on the synthetic copy that the tests generate, in seconds::

    python tests/reference/adience_synthetic.py out/adience_synthetic
    python examples/train_age_resnet.py --root out/adience_synthetic --out out/age_tiny \\
        --input-size 32 --train-per-class 4 --test-per-class 2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from efmap.reference import AdienceDataset, AgeResNet, collate_skipping, find_root, load_or_make_split
from efmap.reference.adience import GROUP_NAMES

logger = logging.getLogger("train_age_resnet")

#: Options that must not change between a run and its resumption, because they change the result.
RESUME_KEYS = (
    "input_size",
    "train_per_class",
    "test_per_class",
    "seed",
    "crop",
    "folds",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--root", type=Path, required=True, help="Adience folder (or a folder with it one level down)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/age_resnet"), help="output folder (default out/age_resnet)"
    )
    parser.add_argument("--split", type=Path, help="split file to reuse or create (default OUT/split.json)")

    parser.add_argument(
        "--crop", choices=("aligned", "faces"), default="aligned", help="image folder (default aligned)"
    )
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="folds to use (default all)")
    parser.add_argument("--input-size", type=int, default=128, help="side of the network input in pixels (default 128)")
    parser.add_argument("--train-per-class", type=int, default=1340, help="training images per group (default 1340)")
    parser.add_argument("--test-per-class", type=int, default=400, help="test images per group (default 400)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the weights and the shuffling (default 0)"
    )

    parser.add_argument("--epochs", type=int, default=130, help="total number of epochs (default 130)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per SGD step (default 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)")

    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default cuda if available, else cpu)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch, 0 for its default (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    parser.add_argument(
        "--stop-after", type=int, default=0, help="stop after this many epochs in this run, 0 for no limit (default 0)"
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"), help="default INFO")
    args = parser.parse_args(argv)

    for name in ("input_size", "train_per_class", "test_per_class", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, but got {getattr(args, name)}.")
    if min(args.stop_after, args.workers, args.seed, args.threads) < 0:
        parser.error("--stop-after, --workers, --seed and --threads must not be negative.")
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


def write_json_atomic(obj: Any, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(obj, file, indent=1)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def train_one_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[float, float, int]:
    """Run one epoch of SGD; return the mean loss, the accuracy and the number of images used."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        if labels.numel() == 0:
            continue
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        scores = model(images)
        loss = criterion(scores, labels)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * labels.numel()
        correct += int((scores.argmax(dim=1) == labels).sum())
        seen += labels.numel()
    return total_loss / max(seen, 1), correct / max(seen, 1), seen


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, torch.Tensor]:
    """Return the accuracy and the confusion matrix (rows: true group, columns: predicted group)."""
    model.eval()
    confusion = torch.zeros(len(GROUP_NAMES), len(GROUP_NAMES), dtype=torch.int64)
    with torch.inference_mode():
        for images, labels in loader:
            if labels.numel() == 0:
                continue
            predicted = model(images.to(device)).argmax(dim=1).cpu()
            for true, guess in zip(labels.tolist(), predicted.tolist(), strict=True):
                confusion[true, guess] += 1
    seen = int(confusion.sum())
    return float(confusion.trace()) / max(seen, 1), confusion


def format_confusion(confusion: torch.Tensor) -> str:
    width = max(len(name) for name in GROUP_NAMES) + 2
    lines = ["true \\ predicted".ljust(18) + "".join(name.rjust(width) for name in GROUP_NAMES)]
    for name, row in zip(GROUP_NAMES, confusion.tolist(), strict=True):
        lines.append(name.ljust(18) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def load_checkpoint(path: Path, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True and check that it was made with the same settings."""
    checkpoint: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    saved = checkpoint["config"]
    changed = [key for key in RESUME_KEYS if saved.get(key) != config[key]]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {config[key]!r}" for key in changed)
        raise SystemExit(
            f"Cannot resume from {path}: these options differ from the checkpoint ({details}). "
            "Pass the same options, or choose another --out folder to start a new run."
        )
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    configure_logging(args.log_level, args.out / "train.log")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {key: getattr(args, key) for key in RESUME_KEYS}
    checkpoint_path = args.out / "checkpoint.pt"
    if checkpoint_path.exists() and not args.resume:
        raise SystemExit(f"{checkpoint_path} exists. Pass --resume to continue that run, or choose another --out.")

    try:
        root = find_root(args.root, crop=args.crop, folds=args.folds)
        split = load_or_make_split(
            args.split or args.out / "split.json",
            root,
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            seed=args.seed,
            crop=args.crop,
            folds=args.folds,
        )
    except (FileNotFoundError, ValueError) as error:
        # A missing folder, an invalid fold file or a split that does not fit is a usage problem, not a crash.
        raise SystemExit(f"error: {error}") from None
    train_data = AdienceDataset(root, split.train, size=args.input_size)
    test_data = AdienceDataset(root, split.test, size=args.input_size)
    test_loader = DataLoader(
        test_data, batch_size=args.batch_size, collate_fn=collate_skipping, num_workers=args.workers
    )

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = AgeResNet(input_size=args.input_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    history: list[dict[str, Any]] = []
    start = 0
    if args.resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path, config, device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = checkpoint["history"]
        start = checkpoint["epoch"]
        logger.info("Resuming from %s after epoch %d.", checkpoint_path, start)
    elif args.resume:
        logger.info("No checkpoint in %s; starting a new run.", args.out)

    logger.info(
        "Training on %d images, testing on %d, for epochs %d to %d on %s.",
        len(train_data),
        len(test_data),
        start + 1,
        args.epochs,
        device,
    )
    for epoch in range(start + 1, args.epochs + 1):
        # The shuffle order depends only on the seed and the epoch, so a resumed run gets the same batches.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        train_loader = DataLoader(
            train_data,
            batch_size=args.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate_skipping,
            num_workers=args.workers,
        )
        loss, train_accuracy, seen = train_one_epoch(model, train_loader, optimizer, device)
        test_accuracy, confusion = evaluate(model, test_loader, device)
        logger.info(
            "Epoch %d/%d: training loss %.4f, training accuracy %.4f, test accuracy %.4f\n%s",
            epoch,
            args.epochs,
            loss,
            train_accuracy,
            test_accuracy,
            format_confusion(confusion),
        )
        train_data.report_skipped()
        test_data.report_skipped()
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss,
                "train_accuracy": train_accuracy,
                "test_accuracy": test_accuracy,
                "confusion": confusion.tolist(),
                "train_images": seen,
            }
        )

        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
            "config": config,
        }
        save_atomic(state, checkpoint_path)
        write_json_atomic(history, args.out / "history.json")

        if args.stop_after and epoch - start >= args.stop_after and epoch < args.epochs:
            logger.info("Stopping after epoch %d as --stop-after requests; continue with --resume.", epoch)
            return 0

    save_atomic(model.state_dict(), args.out / "model.pt")
    final = history[-1]["test_accuracy"] if history else float("nan")
    logger.info(
        "Finished %d epochs; final test accuracy %.4f. Weights in %s.", args.epochs, final, args.out / "model.pt"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
