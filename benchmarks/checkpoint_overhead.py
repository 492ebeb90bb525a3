"""Measure what checkpointing costs explain_dataset, per image and per commit.

Usage: ``python benchmarks/checkpoint_overhead.py [--images 64] [--size 16] [--repeats 3]``.

For each chunk size the script runs explain_dataset without an out_dir,
with an out_dir, and with an out_dir and store_maps=True. Inside the runs
with an out_dir it wraps the checkpoint functions in timers: flushing the
stores, and writing, fsyncing and renaming the checkpoint. The reported cost
is therefore not blurred by the much larger and noisier time of the forward
passes. Wall times are the fastest of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import efmap
import efmap._rundir
import efmap.dataset

TIMINGS: dict[str, list[float]] = defaultdict(list)


class SmallNet(torch.nn.Module):
    """Two convolutions and a linear layer over 1-channel images, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``function`` so that each call's duration is appended to ``TIMINGS[name]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMINGS[name].append(time.perf_counter() - start)

    return wrapper


def install_timers() -> None:
    efmap._rundir.RunDirectory.commit = timed("commit", efmap._rundir.RunDirectory.commit)
    efmap._rundir.RunDirectory.prepare = timed("prepare", efmap._rundir.RunDirectory.prepare)
    efmap.dataset._flush = timed("flush", efmap.dataset._flush)


def run(model: torch.nn.Module, data: Any, out_dir: bool, repeats: int, **options: Any) -> tuple[float, dict]:
    """Return the fastest wall time in seconds and the checkpoint timings of that run."""
    best, best_timings = float("inf"), {}
    for _ in range(repeats):
        TIMINGS.clear()
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            efmap.explain_dataset(model, data, out_dir=Path(folder) / "run" if out_dir else None, **options)
            seconds = time.perf_counter() - start
        if seconds < best:
            best, best_timings = seconds, {key: list(values) for key, values in TIMINGS.items()}
    return best, best_timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest counts (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    install_timers()
    model = SmallNet().eval()
    images = torch.rand(args.images, 1, args.size, args.size) * 2 - 1
    data = torch.utils.data.TensorDataset(images, torch.arange(args.images) % 3)

    print(
        f"{args.images} images of {args.size}x{args.size} ({args.size**2} forward passes each), batch_size 64, "
        f"{args.threads} thread(s), fastest of {args.repeats} runs"
    )
    header = f"{'chunk':>5}  {'setting':<22}{'wall ms/image':>14}{'commit ms':>11}{'checkpoint ms/image':>21}"
    print(header)
    for chunk_size in (1, 8):
        common = {"chunk_size": chunk_size, "batch_size": 64, "labels_from": "dataset"}
        for name, out_dir, extra in (
            ("no out_dir", False, {}),
            ("out_dir", True, {}),
            ("out_dir + store_maps", True, {"store_maps": True}),
        ):
            seconds, timings = run(model, data, out_dir, args.repeats, **common, **extra)
            per_image = 1000 * seconds / args.images
            if not out_dir:
                print(f"{chunk_size:>5}  {name:<22}{per_image:>14.2f}{'-':>11}{'-':>21}")
                continue
            # One commit per chunk = flushing the stores plus writing the checkpoint.
            commits = [flush + commit for flush, commit in zip(timings["flush"], timings["commit"], strict=False)]
            checkpoint = 1000 * (sum(timings["flush"]) + sum(timings["commit"]) + sum(timings["prepare"]))
            commit_ms = 1000 * statistics.median(commits)
            print(f"{chunk_size:>5}  {name:<22}{per_image:>14.2f}{commit_ms:>11.2f}{checkpoint / args.images:>21.2f}")
    print("commit ms: median time of one commit (store flush, checkpoint write, fsync, rename, directory fsync).")
    print("checkpoint ms/image: all checkpoint work of the run, the one-off preparation of out_dir included,")
    print("divided by the number of images.")


if __name__ == "__main__":
    main()
