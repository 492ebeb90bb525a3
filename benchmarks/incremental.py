"""Time the incremental engine against the dense engine on the same pixel features.

Run from the repository root, for example::

    PYTHONPATH=src python benchmarks/incremental.py --size 128 --pixels 2048 --threads 1

Both engines score the same features of one random image with the same random
weights, one after the other (``--repeats`` alternates them and reports medians).
``--pixels K`` scores only the first ``K`` pixels in row-major order as single
features, plus one feature made of all other pixels, so that a run fits a busy machine.
Both engines do the same work for every single-pixel feature wherever it lies, so the
ratio carries over to the full map.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from efmap import reverse
from efmap._dense import dense_outputs
from efmap.features import FeatureLayout, pixel_layout
from efmap.incremental import incremental_outputs
from efmap.reference import AgeResNet


def vgg_style(
    in_channels: int = 3, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 128, 128)
) -> nn.Module:
    """Build a plain VGG-style net: per stage two 3x3 convolutions with ReLU, then 2x2 max pooling."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in widths:
        layers += [
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
        ]
        layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def first_pixels_layout(height: int, width: int, count: int | None) -> FeatureLayout:
    """Make the first ``count`` pixels single features and put all other pixels into one more feature."""
    if count is None or count >= height * width:
        return pixel_layout(height, width, 3)
    ids = torch.arange(height * width).clamp(max=count).view(1, 1, height, width)
    return FeatureLayout(index=ids, map_shape=(height, width), feature_ids=torch.arange(count + 1))


def time_engines(
    model: nn.Module | None = None,
    *,
    size: int = 128,
    pixels: int | None = 2048,
    batch_size: int = 64,
    threads: int | None = 1,
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    seed: int = 0,
    dense_batch_size: int | None = None,
    dense_channels_last: bool = False,
) -> dict[str, Any]:
    """Score the same pixel features with the dense and the incremental engine and compare.

    Parameters
    ----------
    model
        An eval-mode model for ``(1, 3, size, size)`` images. Default: ``AgeResNet(3, 3, size)``
        with random weights.
    size
        Image side in pixels. Default 128.
    pixels
        Number of leading pixels to score (see :func:`first_pixels_layout`). None scores all.
    batch_size
        Perturbations per pass, the same for both engines. Default 64.
    threads
        ``torch.set_num_threads`` during the run, restored afterwards. None keeps the setting.
    dtype
        Dtype of the model and image. Default float32.
    repeats
        Number of alternating runs of each engine. Times are medians.
    seed
        Seed for the weights and the image.
    dense_batch_size
        Batch size of the dense engine alone, to time it at its own best setting. Default: ``batch_size``.
    dense_channels_last
        Give the dense engine a channels-last image and model, which speeds up CPU convolutions.

    Returns
    -------
    dict
        ``dense_s`` and ``incremental_s`` (median seconds), ``ratio`` (dense over incremental),
        ``max_abs_diff`` (largest absolute difference of the scores), ``max_abs_score`` (their scale),
        ``features``, ``threads``,
        ``batch_size`` and the per-run times ``dense_runs`` and ``incremental_runs``.
    """
    torch.manual_seed(seed)
    if model is None:
        model = AgeResNet(3, 3, size)
    model = model.to(dtype).eval()
    image = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)
    flipped = reverse(image, (-1.0, 1.0))
    layout = first_pixels_layout(size, size, pixels)
    dense_image, dense_flipped = image, flipped
    if dense_channels_last:
        model = model.to(memory_format=torch.channels_last)
        dense_image = image.contiguous(memory_format=torch.channels_last)
        dense_flipped = flipped.contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    dense_runs, incremental_runs = [], []
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                dense = dense_outputs(
                    model, None, dense_image, dense_flipped, layout, dense_batch_size or batch_size, False
                )
                dense_runs.append(time.perf_counter() - start)
                start = time.perf_counter()
                fast = incremental_outputs(model, None, image, flipped, layout, batch_size, False, strict=True)
                incremental_runs.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    dense_s, incremental_s = statistics.median(dense_runs), statistics.median(incremental_runs)
    return {
        "dense_s": dense_s,
        "incremental_s": incremental_s,
        "ratio": dense_s / incremental_s,
        "max_abs_diff": float((dense - fast).abs().max()),
        "max_abs_score": float(dense.abs().max()),
        "features": layout.num_features,
        "threads": torch.get_num_threads() if threads is None else threads,
        "batch_size": batch_size,
        "dense_batch_size": dense_batch_size or batch_size,
        "dense_channels_last": dense_channels_last,
        "dense_runs": dense_runs,
        "incremental_runs": incremental_runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=["age-resnet", "vgg"], default="age-resnet", help="network with random weights"
    )
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--pixels", type=int, default=2048, help="leading pixels scored, 0 for all (default 2048)")
    parser.add_argument("--batch-size", type=int, default=64, help="perturbations per pass (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, 0 for torch's default (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per engine (default 1)")
    parser.add_argument("--dense-batch-size", type=int, default=0, help="dense engine's own batch size (default: same)")
    parser.add_argument("--dense-channels-last", action="store_true", help="run the dense engine channels-last")
    args = parser.parse_args()
    model = vgg_style() if args.model == "vgg" else None
    result = time_engines(
        model,
        size=args.size,
        pixels=args.pixels or None,
        batch_size=args.batch_size,
        threads=args.threads or None,
        repeats=args.repeats,
        dense_batch_size=args.dense_batch_size or None,
        dense_channels_last=args.dense_channels_last,
    )
    print(
        f"{args.model} {args.size}x{args.size}, {result['features']} features, batch {result['batch_size']} "
        f"(dense {result['dense_batch_size']}{', channels-last' if args.dense_channels_last else ''}), "
        f"{result['threads']} thread(s): dense {result['dense_s']:.2f} s, incremental {result['incremental_s']:.2f} s, "
        f"ratio {result['ratio']:.2f}, largest difference {result['max_abs_diff']:.3g} "
        f"(scores up to {result['max_abs_score']:.3g})"
    )


if __name__ == "__main__":
    main()
