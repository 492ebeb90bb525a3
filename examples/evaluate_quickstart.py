"""
Evaluate efmap on real faces
============================

Masked accuracy with controls, deletion/insertion curves, ROAD, sanity check.

The data are the 200 grayscale 25x25 images that scikit-image bundles
(``skimage.data.lfw_subset``): 100 faces and 100 non-face patches, split
140/60 for training and testing. For every seed an AgeResNet is trained,
landmarks are selected from maps of training images only, and the test
images are used for:

* masked accuracy: landmarks kept, landmarks removed, random masks of the
  same size, and a centered box of the same size, for four fills;
* deletion and insertion curves of efmap and (where Captum is installed)
  Occlusion, Saliency and IntegratedGradients, with a constant fill and with
  ROAD's noisy linear imputation, against random orders;
* the model-randomization sanity check (Spearman correlation between maps of
  the trained model and of copies randomized from the output layer down).

The tables give the mean and the sample standard deviation over seeds; each
seed changes the split, the training run and the random draws. The numbers
hold for this data and this model only.

Run it with ``python examples/evaluate_quickstart.py --out out/evaluate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch

import efmap
from efmap.evaluate import NoisyImputation, attribution_maps, compare_methods, randomization_check
from efmap.evaluate.compare import CAPTUM_METHODS, EFMAP_METHODS
from efmap.reference import AgeResNet
from efmap.reference.lfw import load_lfw_faces
from efmap.reference.training import fit

logger = logging.getLogger("evaluate_quickstart")

# Fills of the masked-accuracy table, by column name.
MASK_FILLS = {"constant 0": 0.0, "reverse": "reverse", "blur": "blur", "road": NoisyImputation()}
# Fills of the deletion/insertion curves.
CURVE_FILLS = {"constant 0": 0.0, "road": NoisyImputation()}
# AgeResNet layers randomized cumulatively from the output towards the input in the sanity check.
# The step "stages" redraws all five residual stages, so after the last step no trained weight is left.
SANITY_LAYERS = ["fc", "stages.4", "stages.3", "stages", "stem"]
MASK_ROWS = ("full input", "landmarks kept", "random masks", "centered box", "landmarks removed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, default=Path("out/evaluate"), help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds, for the spreads (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    parser.add_argument(
        "--keep-fraction", type=float, default=0.66, help="fraction of pixels kept as landmarks (default: %(default)s)"
    )
    parser.add_argument(
        "--landmark-images",
        type=int,
        default=40,
        help="training images per seed explained to select the landmarks, half per class (default: %(default)s)",
    )
    parser.add_argument("--num-random", type=int, default=10, help="random masks per fill (default: %(default)s)")
    parser.add_argument("--random-orders", type=int, default=3, help="random orders per curve (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="steps of each curve (default: %(default)s)")
    parser.add_argument(
        "--sanity-images", type=int, default=6, help="test images in the sanity check (default: %(default)s)"
    )
    parser.add_argument(
        "--max-test", type=int, default=None, help="use only N test images, half per class (default: all 60)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="copies per forward pass (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=0, help="PyTorch CPU threads; 0 keeps PyTorch's choice (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("efmap").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = EFMAP_METHODS + (CAPTUM_METHODS if captum_installed() else ())
    started = time.perf_counter()

    runs = [run_seed(args, seed, methods) for seed in range(args.seed, args.seed + args.seeds)]
    elapsed = time.perf_counter() - started

    print(f"\nLFW subset, 25x25 pixels, {args.seeds} seed(s) from {args.seed}; mean +/- std over seeds.")
    if "occlusion" not in methods:
        print("Captum is not installed, so only efmap is compared (pip install efmap[compare]).")
    print(f"\nTest accuracy with pixels removed ({args.keep_fraction:.0%} kept, landmarks from training maps):")
    print(mask_table(runs))
    count = runs[0]["test images"]
    print(f"\nAttribution methods on the {count} test images (areas over the fraction of pixels, softmax scores):")
    print(method_table(runs, methods))
    print(f"\nTotal time {elapsed:.0f} s on {torch.get_num_threads()} CPU thread(s).")

    (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    save_figure(args.out / "curves.png", runs, methods)
    print(f"Results and curves written to {args.out}/")
    return {"runs": runs, "seconds": elapsed}


def captum_installed() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def run_seed(args: argparse.Namespace, seed: int, methods: tuple[str, ...]) -> dict[str, object]:
    clock = time.perf_counter()
    split = load_lfw_faces(seed=seed)
    torch.manual_seed(seed)
    model = AgeResNet(in_channels=1, num_classes=2, input_size=25)
    fit(model, split.x_train, split.y_train, epochs=args.epochs, seed=seed)
    x_test, y_test = split.x_test, split.y_test
    if args.max_test is not None:
        kept = torch.cat([torch.nonzero(y_test == k).flatten()[: args.max_test // 2] for k in (0, 1)])
        x_test, y_test = x_test[kept], y_test[kept]
    logger.info(
        "seed %d: trained in %.0f s, test accuracy %.3f",
        seed,
        time.perf_counter() - clock,
        efmap.accuracy(model, x_test, y_test),
    )

    # Landmarks come from training images only, so the test accuracy below is not fitted to the test set.
    per_class = args.landmark_images // 2
    rows = torch.cat([torch.nonzero(split.y_train == k).flatten()[:per_class] for k in (0, 1)])
    explanation = efmap.explain(model, split.x_train[rows], batch_size=args.batch_size)
    accumulator = efmap.HeatMapAccumulator()
    accumulator.update(explanation.positive, labels=split.y_train[rows])
    landmarks = efmap.select_landmarks(accumulator.overall(), keep_fraction=args.keep_fraction)
    masked = {}
    for name, fill in MASK_FILLS.items():
        result = efmap.masked_accuracy(
            model,
            x_test,
            y_test,
            landmarks,
            fill=fill,
            num_random=args.num_random,
            seed=seed,
            batch_size=args.batch_size,
        )
        masked[name] = {
            "full input": result.full,
            "landmarks kept": result.landmarks,
            "random masks": result.random_mean,
            "random masks std over draws": result.random_std,
            "centered box": result.box,
            "landmarks removed": result.removed,
        }
    logger.info("seed %d: landmarks and masked accuracy after %.0f s", seed, time.perf_counter() - clock)

    maps = attribution_maps(model, x_test, methods=methods, batch_size=args.batch_size)
    logger.info("seed %d: maps of %d methods after %.0f s", seed, len(maps), time.perf_counter() - clock)
    curves: dict[str, dict[str, object]] = {}
    for fill_name, fill in CURVE_FILLS.items():
        comparison = compare_methods(
            model,
            x_test,
            maps=maps,
            steps=args.steps,
            fill=fill,
            num_random=args.random_orders,
            seed=seed,
            batch_size=args.batch_size,
        )
        for method, result in comparison.curves.items():
            fractions = result.fractions.tolist()
            entry = curves.setdefault(method, {})
            entry[f"deletion {fill_name}"] = float(result.deletion_area.mean())
            entry[f"insertion {fill_name}"] = float(result.insertion_area.mean())
            entry[f"deletion curve {fill_name}"] = result.deletion.mean(dim=0).tolist()
            entry[f"insertion curve {fill_name}"] = result.insertion.mean(dim=0).tolist()
        if comparison.random is not None:
            entry = curves.setdefault("random order", {})
            entry[f"deletion {fill_name}"] = float(comparison.random.random_deletion_area.mean())
            entry[f"insertion {fill_name}"] = float(comparison.random.random_insertion_area.mean())
            entry[f"deletion curve {fill_name}"] = comparison.random.random_deletion.mean(dim=(0, 1)).tolist()
            entry[f"insertion curve {fill_name}"] = comparison.random.random_insertion.mean(dim=(0, 1)).tolist()
    logger.info("seed %d: curves after %.0f s", seed, time.perf_counter() - clock)

    # The sanity check reads the class that the trained model predicts, for the trained and the randomized copies.
    sanity_rows = torch.cat([torch.nonzero(y_test == k).flatten()[: args.sanity_images // 2] for k in (0, 1)])
    x_sanity = x_test[sanity_rows]
    with torch.no_grad():
        predicted = model(x_sanity).argmax(dim=1)
    # efmap-target reads the same forward passes as efmap-max, so the costly check runs for efmap-max only.
    for method in (m for m in methods if m != "efmap-target"):

        def attribute(copy: torch.nn.Module, inputs: torch.Tensor, method: str = method) -> torch.Tensor:
            target = None if method == "efmap-max" else predicted
            return attribution_maps(copy, inputs, methods=[method], target=target, batch_size=args.batch_size)[method]

        check = randomization_check(model, x_sanity, attribute, layers=SANITY_LAYERS, seed=seed)
        curves[method]["sanity per step"] = check.mean.tolist()
        curves[method]["sanity"] = float(check.mean[-1])
        curves[method]["sanity abs per step"] = check.absolute_mean.tolist()
        curves[method]["sanity abs"] = float(check.absolute_mean[-1])
    logger.info("seed %d: sanity check done after %.0f s", seed, time.perf_counter() - clock)

    return {
        "seed": seed,
        "test images": len(y_test),
        "kept": landmarks.count,
        "masked": masked,
        "methods": curves,
        "fractions": fractions,
    }


def spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +/- {deviation:.3f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def mask_table(runs: list[dict]) -> str:
    header = ["pixels kept", *MASK_FILLS]
    rows = [[row, *(spread([run["masked"][fill][row] for run in runs]) for fill in MASK_FILLS)] for row in MASK_ROWS]
    return format_table(header, rows)


def method_table(runs: list[dict], methods: tuple[str, ...]) -> str:
    metrics = [f"{kind} {fill}" for fill in CURVE_FILLS for kind in ("deletion", "insertion")]
    header = ["method", *metrics, "sanity rho", "sanity rho |map|"]
    rows = []
    for method in [*methods, "random order"]:
        cells = [spread([run["methods"][method][metric] for run in runs]) for metric in metrics]
        for key in ("sanity", "sanity abs"):
            checked = key in runs[0]["methods"][method]
            cells.append(spread([run["methods"][method][key] for run in runs]) if checked else "-")
        rows.append([method, *cells])
    legend = (
        "deletion: lower is better; insertion: higher is better; sanity rho: Spearman correlation with the trained\n"
        "model's maps (and their absolute values) after every layer is randomized; near 0 passes; '-': not run."
    )
    return format_table(header, rows) + "\n" + legend


def save_figure(path: Path, runs: list[dict], methods: tuple[str, ...]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no figure was written (pip install efmap[plot]).")
        return

    fractions = runs[0]["fractions"]
    colors = {method: f"C{index}" for index, method in enumerate([*methods, "random order"])}
    figure, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    panels = [(kind, fill) for fill in CURVE_FILLS for kind in ("deletion", "insertion")]
    for ax, (kind, fill) in zip(axes, panels, strict=False):
        for method in [*methods, "random order"]:
            curve = torch.tensor([run["methods"][method][f"{kind} curve {fill}"] for run in runs]).mean(dim=0)
            style = "--" if method == "random order" else "-"
            ax.plot(fractions, curve.numpy(), style, color=colors[method], label=method)
        ax.set_title(f"{kind}, fill: {fill}")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(0, 1.02)
    steps = ["trained", *SANITY_LAYERS]
    for method in (m for m in methods if "sanity per step" in runs[0]["methods"][m]):
        for key, style in (("sanity per step", "-o"), ("sanity abs per step", ":x")):
            values = torch.tensor([run["methods"][method][key] for run in runs]).nanmean(dim=0)
            axes[-1].plot(range(len(steps)), [1.0, *values.tolist()], style, color=colors[method])
    axes[-1].set_xticks(range(len(steps)), steps, rotation=45)
    axes[-1].set_title("sanity check (dotted: absolute maps)")
    axes[-1].set_ylabel("Spearman correlation with trained maps")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
