"""
Quickstart on real faces
========================

Train, explain, merge, select landmarks and test them on real faces that ship offline.

The data are the 200 grayscale 25x25 images that scikit-image bundles
(``skimage.data.lfw_subset``): 100 faces from Labeled Faces in the Wild and
100 non-face patches. An AgeResNet learns face against non-face, every test
image is explained pixel by pixel, the maps are merged per class and
overall, and the most important pixels become landmarks. The printed table
compares test accuracy on full inputs, with only the landmarks kept, and
with random masks that keep as many pixels.

Run it with ``python examples/quickstart.py --out out/quickstart``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

import efmap
from efmap.reference import AgeResNet
from efmap.reference.lfw import CLASS_NAMES, load_lfw_faces
from efmap.reference.training import fit

logger = logging.getLogger("quickstart")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, default=Path("out/quickstart"), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, weights and masks (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    parser.add_argument(
        "--keep-fraction",
        type=float,
        default=0.66,
        help="fraction of pixels kept as landmarks; 0.66 is the 65.98%% of the paper (default: %(default)s)",
    )
    parser.add_argument("--num-random", type=int, default=20, help="random masks in the control (default: %(default)s)")
    parser.add_argument(
        "--fill", type=float, default=0.0, help="value of removed pixels, in [-1, 1] (default: %(default)s, mid grey)"
    )
    parser.add_argument(
        "--max-test", type=int, default=None, help="explain only the first N test images (default: all 60)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="perturbed copies per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> efmap.MaskedAccuracy:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    split = load_lfw_faces(seed=args.seed)
    x_test, y_test = split.x_test, split.y_test
    if args.max_test is not None:
        x_test, y_test = x_test[: args.max_test], y_test[: args.max_test]
    logger.info("LFW subset: %d training and %d test images of 25x25 pixels", len(split.y_train), len(y_test))

    model = AgeResNet(in_channels=1, num_classes=2, input_size=25)
    fit(model, split.x_train, split.y_train, epochs=args.epochs, seed=args.seed)
    trained = time.perf_counter()

    explanation = efmap.explain(model, x_test, batch_size=args.batch_size, progress=not args.no_progress)
    explained = time.perf_counter()

    accumulator = efmap.HeatMapAccumulator(reduction="mean")
    accumulator.update(explanation.positive, labels=y_test)
    class_maps = accumulator.class_maps()
    overall = accumulator.overall()
    landmarks = efmap.select_landmarks(overall, keep_fraction=args.keep_fraction)
    result = efmap.masked_accuracy(
        model, x_test, y_test, landmarks, fill=args.fill, num_random=args.num_random, seed=args.seed
    )
    finished = time.perf_counter()

    save_outputs(args.out, x_test, y_test, explanation, class_maps, overall, landmarks)
    print(
        f"\nTest images: {len(y_test)}, pixels per image: {landmarks.mask.numel()}, fill of removed pixels: {args.fill}"
    )
    print(result.table())
    print(
        f"\nTime: training {trained - started:.1f} s, explaining {explained - trained:.1f} s "
        f"({len(y_test) * landmarks.mask.numel()} perturbed inputs), total {finished - started:.1f} s."
    )
    print(f"Figures and maps written to {args.out}/")
    return result


def save_outputs(
    out: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    explanation: efmap.Explanation,
    class_maps: dict[int, torch.Tensor],
    overall: torch.Tensor,
    landmarks: efmap.Landmarks,
) -> None:
    np.savez_compressed(
        out / "maps.npz",
        positive=explanation.positive.numpy(),
        negative=explanation.negative.numpy(),
        target=explanation.target.numpy(),
        labels=labels.numpy(),
        overall=overall.numpy(),
        landmarks=landmarks.mask.numpy(),
        **{f"class_{CLASS_NAMES[k]}": m.numpy() for k, m in class_maps.items()},
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from efmap.plot import overlay, plot_grid
    except ImportError:
        logger.warning("matplotlib is not installed, so no figures were written (pip install efmap[plot]).")
        return

    shown = torch.cat([torch.nonzero(labels == k).flatten()[:4] for k in class_maps])
    normalized = efmap.minmax(explanation.positive[shown])
    figure = plot_grid(
        images[shown],
        normalized,
        class_maps=class_maps,
        overall=overall,
        landmarks=landmarks.mask,
        class_names=CLASS_NAMES,
        background=images[labels == 0].mean(dim=0),
    )
    figure.savefig(out / "maps.png", dpi=120)
    plt.close(figure)

    face = int(torch.nonzero(labels == 0).flatten()[0])
    figure, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    overlay(images[face], torch.zeros(images.shape[-2:]), ax=axes[0], alpha=0.0, title="test face")
    overlay(images[face], efmap.minmax(explanation.positive[face]), ax=axes[1], title="positive map")
    figure.tight_layout()
    figure.savefig(out / "example.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
