"""Time efmap.explain against raw forward passes, Captum's FeatureAblation and a naive loop.

Every method performs the same perturbed forward passes, so the fastest raw
batched forward over that many inputs (best batch size and memory format) is
the limit, and the other rows show how close each method comes to it. Methods
run round-robin, and the order rotates each round, so that drift of a shared
machine hits all of them alike. The tables give medians over the rounds with
their minimum and maximum. Each method's time relative to efmap is the median
of the per-round ratios.

By default per-feature times are measured on a fixed subset of features that is
the same for every method (a central block of pixels for the image model; see
``--features``); ``--full`` scores whole maps instead. The naive loop always
runs on a small subset and is extrapolated per feature. Peak memory is the rise
of the peak resident set size during one run of each method in a fresh process,
over its resident size after setting up the model.

Run it with ``nox -s bench`` or ``python benchmarks/bench.py``; the results
table replaces the section between the markers in ``docs/benchmarks.rst``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import efmap
from efmap.reference import AgeResNet

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "benchmarks.rst"
START_MARKER = ".. bench-results-start"
END_MARKER = ".. bench-results-end"
CHANNELS_LAST = torch.channels_last
CONTIGUOUS = torch.contiguous_format
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")


@dataclass
class Workload:
    """A model, its inputs and the features that every method scores."""

    name: str
    title: str
    model: nn.Module
    inputs: torch.Tensor
    feature_mask: torch.Tensor  # efmap's mask, broadcast over the inputs
    captum_mask: torch.Tensor  # the same mask with the batch and channel dimensions Captum expects
    target: torch.Tensor
    naive_pairs: list[tuple[int, int]]  # (input, feature) pairs timed by the naive loop
    raw_sizes: list[int]
    captum_sizes: list[int]
    formats: list[torch.memory_format]
    repeats: int
    note: str

    @property
    def num_features(self) -> int:
        return int(self.feature_mask.max()) + 1

    @property
    def passes(self) -> int:
        """Perturbed forward passes of one run: one per (input, feature)."""
        return self.inputs.shape[0] * self.num_features


@dataclass
class Method:
    """A timed method: ``run`` does the work of ``passes`` perturbed forward passes."""

    key: str
    label: str
    setting: str
    passes: int
    run: Callable[[], object]
    times: list[float] = field(default_factory=list)
    memory_mib: float | None = None


# --- Workloads ------------------------------------------------------------------------------------------------


def face_image(size: int) -> torch.Tensor:
    """Return the astronaut photograph shipped with scikit-image, resized, as ``(1, 3, size, size)`` in [-1, 1]."""
    from skimage.data import astronaut
    from skimage.transform import resize

    image = resize(astronaut(), (size, size), anti_aliasing=True)
    return torch.from_numpy(image).float().permute(2, 0, 1)[None].clamp(0, 1) * 2 - 1


def age_resnet_workload(features: int, full: bool, repeats: int) -> Workload:
    torch.manual_seed(0)
    model = AgeResNet(3, 3, 128).eval()
    x = face_image(128)
    if full:
        mask = torch.arange(128 * 128).reshape(128, 128)
        note = "every pixel of the 128x128 image is one feature (full map)"
    else:
        side = math.isqrt(features)
        if side * side != features or side > 128:
            raise SystemExit(f"--features must be a square number up to 16384, but got {features}.")
        top = (128 - side) // 2
        # The central side x side block is scored pixel by pixel; the rest of the image is one more feature.
        mask = torch.full((128, 128), side * side, dtype=torch.int64)
        mask[top : top + side, top : top + side] = torch.arange(side * side).reshape(side, side)
        note = (
            f"the central {side}x{side} pixels are one feature each and the rest of the image is one more "
            f"feature: {side * side + 1} forward passes per run"
        )
    with torch.inference_mode():
        target = model(x).argmax(dim=1)
    return Workload(
        name="age_resnet",
        title="AgeResNet(3, 3, 128), one 3x128x128 image (random weights)",
        model=model,
        inputs=x,
        feature_mask=mask,
        captum_mask=mask[None, None],
        target=target,
        naive_pairs=[(0, f) for f in range(0, int(mask.max()) + 1, max(1, (int(mask.max()) + 1) // 128))][:128],
        raw_sizes=[8, 16, 32, 64],
        captum_sizes=[4, 8, 16, 32, 64],
        formats=[CONTIGUOUS, CHANNELS_LAST],
        repeats=repeats,
        note=note,
    )


def vgg_workload(features: int, repeats: int) -> Workload:
    """Build a plain VGG-style net at 224x224, scored on a central block of pixels like the AgeResNet workload."""
    from incremental import vgg_style

    torch.manual_seed(0)
    model = vgg_style().eval()
    x = face_image(224)
    side = math.isqrt(features)
    top = (224 - side) // 2
    mask = torch.full((224, 224), side * side, dtype=torch.int64)
    mask[top : top + side, top : top + side] = torch.arange(side * side).reshape(side, side)
    with torch.inference_mode():
        target = model(x).argmax(dim=1)
    return Workload(
        name="vgg_224",
        title="VGG-style net (10 convolutions, widths 16-128), one 3x224x224 image (random weights)",
        model=model,
        inputs=x,
        feature_mask=mask,
        captum_mask=mask[None, None],
        target=target,
        naive_pairs=[(0, f) for f in range(0, side * side + 1, max(1, (side * side + 1) // 32))][:32],
        raw_sizes=[8, 16, 32],
        captum_sizes=[8, 16, 32],
        formats=[CONTIGUOUS, CHANNELS_LAST],
        repeats=repeats,
        note=(
            f"the central {side}x{side} pixels are one feature each and the rest of the image is one more "
            f"feature: {side * side + 1} forward passes per run"
        ),
    )


def tabular_workload(repeats: int) -> Workload:
    torch.manual_seed(0)
    rows, columns = 512, 32
    model = nn.Sequential(nn.Linear(columns, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    x = torch.rand(rows, columns) * 2 - 1
    mask = torch.arange(columns)
    with torch.inference_mode():
        target = model(x).argmax(dim=1)
    pairs = [(n, f) for n in range(0, rows, 16) for f in range(columns)][:1024]
    return Workload(
        name="tabular_mlp",
        title="MLP 32-256-256-4 on 512 tabular rows, one feature per column (random weights)",
        model=model,
        inputs=x,
        feature_mask=mask,
        captum_mask=mask[None],
        target=target,
        naive_pairs=pairs,
        raw_sizes=[256, 1024, 4096, 16384],
        captum_sizes=[1, 2, 4, 8, 16, 32],
        formats=[CONTIGUOUS],
        repeats=repeats * 3,
        note="every column is one feature: 512 x 32 = 16384 forward passes per run (full map)",
    )


# --- Methods --------------------------------------------------------------------------------------------------


def raw_forward(work: Workload, batch_size: int, memory_format: torch.memory_format, passes: int) -> Callable[[], None]:
    """Return a loop of forward passes over ``passes`` prebuilt copies of the first input."""
    batch = work.inputs[:1].expand(batch_size, *work.inputs.shape[1:]).contiguous(memory_format=memory_format)

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, passes, batch_size):
                work.model(batch[: min(batch_size, passes - start)])

    return run


def efmap_explain(work: Workload, engine: str = "auto") -> Callable[[], efmap.Explanation]:
    def run() -> efmap.Explanation:
        return efmap.explain(
            work.model, work.inputs, feature_mask=work.feature_mask, score="target", target=work.target, engine=engine
        )

    return run


def captum_ablation(
    work: Workload, per_eval: int, memory_format: torch.memory_format, mask: torch.Tensor | None = None
) -> Callable[[], torch.Tensor]:
    from captum.attr import FeatureAblation

    x = work.inputs.contiguous(memory_format=memory_format)
    baselines = efmap.reverse(x)
    ablation = FeatureAblation(work.model)
    feature_mask = work.captum_mask if mask is None else mask

    def run() -> torch.Tensor:
        return ablation.attribute(
            x, baselines=baselines, target=work.target, feature_mask=feature_mask, perturbations_per_eval=per_eval
        )

    return run


def naive_loop(work: Workload) -> Callable[[], None]:
    """Return a loop that builds one perturbed copy at a time and runs one forward pass for it."""
    reversed_inputs = efmap.reverse(work.inputs)
    mask = work.feature_mask

    def run() -> None:
        with torch.inference_mode():
            for n, f in work.naive_pairs:
                copy = torch.where(mask == f, reversed_inputs[n : n + 1], work.inputs[n : n + 1])
                work.model(copy)

    return run


# --- Calibration and timing -----------------------------------------------------------------------------------


def seconds(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def best_raw_setting(work: Workload) -> tuple[int, torch.memory_format]:
    """Pick the fastest batch size and memory format for raw forward passes by a short sweep."""
    timings = {}
    for memory_format in work.formats:
        for size in work.raw_sizes:
            passes = max(4 * size, min(work.passes, 256))
            run = raw_forward(work, size, memory_format, passes)
            run()  # the first call at a new shape pays one-off setup costs
            timings[(size, memory_format)] = seconds(run) / passes
    log(work, "raw sweep (µs per pass): " + describe(timings))
    return min(timings, key=timings.__getitem__)


def best_captum_setting(work: Workload) -> tuple[int, torch.memory_format]:
    """Pick Captum's fastest perturbations_per_eval and memory format by a short sweep."""
    if work.inputs.dim() == 4:
        # A few single-pixel features plus the rest of the image, as in the timed runs but shorter.
        height, width = work.inputs.shape[-2:]
        count = 128 if work.name == "age_resnet" else 32
        mask = torch.full((height, width), count, dtype=torch.int64)
        mask.view(-1)[:count] = torch.arange(count)
        mask = mask[None, None]
    else:
        mask = None
    passes = work.inputs.shape[0] * (int((work.captum_mask if mask is None else mask).max()) + 1)
    timings = {}
    for memory_format in work.formats:
        for per_eval in work.captum_sizes:
            run = captum_ablation(work, per_eval, memory_format, mask)
            run()
            timings[(per_eval, memory_format)] = seconds(run) / passes
    log(work, "Captum sweep (µs per pass): " + describe(timings))
    return min(timings, key=timings.__getitem__)


def build_methods(work: Workload) -> tuple[list[Method], dict[str, object]]:
    """Return the timed methods and the settings the sweeps chose, which the memory processes reuse."""
    raw_size, raw_format = best_raw_setting(work)
    per_eval, captum_format = best_captum_setting(work)
    settings = {
        "raw_size": raw_size,
        "raw_format": format_name(raw_format),
        "per_eval": per_eval,
        "captum_format": format_name(captum_format),
    }
    passes = work.passes
    methods = [
        Method(
            "raw",
            "raw batched forward (the limit)",
            f"batch {raw_size}, {format_name(raw_format)}",
            passes,
            raw_forward(work, raw_size, raw_format, passes),
        ),
        Method("efmap", "efmap.explain", 'engine="auto", batch_size="auto" (defaults)', passes, efmap_explain(work)),
        Method(
            "efmap_dense",
            "efmap.explain, dense engine",
            'engine="dense", batch_size="auto"',
            passes,
            efmap_explain(work, "dense"),
        ),
        Method(
            "captum_default",
            "Captum FeatureAblation",
            "perturbations_per_eval=1 (default)",
            passes,
            captum_ablation(work, 1, CONTIGUOUS),
        ),
        Method(
            "captum_best",
            "Captum FeatureAblation",
            f"perturbations_per_eval={per_eval}, {format_name(captum_format)}",
            passes,
            captum_ablation(work, per_eval, captum_format),
        ),
        Method(
            "naive",
            "naive loop, one forward per feature",
            f"batch 1, timed on {len(work.naive_pairs)} features and extrapolated",
            len(work.naive_pairs),
            naive_loop(work),
        ),
    ]
    return methods, settings


def time_round_robin(work: Workload, methods: list[Method]) -> None:
    for method in methods:
        method.run()  # warm-up: one-off setup costs stay out of the timings
    for round_index in range(work.repeats):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            method.times.append(seconds(method.run))
        log(work, f"round {round_index + 1}/{work.repeats} done")


def check_agreement(work: Workload) -> float:
    """Return the largest difference between efmap's positive map and ReLU of Captum's attributions."""
    explanation = efmap_explain(work)()
    attributions = captum_ablation(work, 16, CONTIGUOUS)()
    if work.inputs.dim() == 4:
        captum_map = torch.relu(attributions[:, 0])
    else:
        captum_map = torch.relu(attributions)
    return float((explanation.positive - captum_map).abs().max())


# --- Peak memory in fresh processes ---------------------------------------------------------------------------


def measure_memory(
    work_name: str, method_key: str, settings: dict[str, dict[str, object]], args: argparse.Namespace
) -> float | None:
    """Run one method once in a fresh process and return its peak resident memory rise in MiB."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", work_name, method_key]
    command += ["--features", str(args.features), "--vgg-features", str(args.vgg_features)]
    command += ["--full"] if args.full else []
    environment = {**os.environ, "EFMAP_BENCH_SETTINGS": json.dumps(settings)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def memory_child(work_name: str, method_key: str, args: argparse.Namespace) -> None:
    """Set up one workload, run one method once and print its peak memory rise as JSON.

    The rise is the largest anonymous resident memory (``RssAnon``, which leaves out shared
    libraries paged in from disk) sampled every half millisecond during the run, minus its value
    just before. Allocations that live for less than the sampling period can be missed.
    """
    work = make_workload(work_name, args)
    with torch.inference_mode():
        work.model(work.inputs[:1])
    methods = {m.key: m for m in child_methods(work)}
    release_free_memory()
    baseline = resident_kib("RssAnon")
    peak = [baseline]
    finished = threading.Event()

    def sample() -> None:
        while not finished.is_set():
            peak[0] = max(peak[0], resident_kib("RssAnon"))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        methods[method_key].run()
    finally:
        finished.set()
        sampler.join()
    peak[0] = max(peak[0], resident_kib("RssAnon"))
    print(json.dumps({"peak_mib": (peak[0] - baseline) / 1024}))


def release_free_memory() -> None:
    """Ask glibc to return freed memory to the system, so that reusing it shows up as a rise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_kib(field_name: str) -> int:
    """Return a memory field of /proc/self/status in KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status.")


def child_methods(work: Workload) -> list[Method]:
    """Build the methods at the settings the parent's sweeps chose, which it passes in the environment."""
    settings = json.loads(os.environ["EFMAP_BENCH_SETTINGS"])[work.name]
    raw_format = CHANNELS_LAST if settings["raw_format"] == "channels_last" else CONTIGUOUS
    captum_format = CHANNELS_LAST if settings["captum_format"] == "channels_last" else CONTIGUOUS
    passes = work.passes
    return [
        Method("raw", "", "", passes, raw_forward(work, settings["raw_size"], raw_format, passes)),
        Method("efmap", "", "", passes, efmap_explain(work)),
        Method("efmap_dense", "", "", passes, efmap_explain(work, "dense")),
        Method("captum_default", "", "", passes, captum_ablation(work, 1, CONTIGUOUS)),
        Method("captum_best", "", "", passes, captum_ablation(work, settings["per_eval"], captum_format)),
        Method("naive", "", "", len(work.naive_pairs), naive_loop(work)),
    ]


# --- Coarse-to-fine -------------------------------------------------------------------------------------------


def coarse_to_fine_study(settings: list[tuple[int, float]], size: int) -> list[dict[str, float]]:
    """Compare coarse-to-fine maps with the exact map of AgeResNet on a full image (one run each)."""
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    model = AgeResNet(3, 3, size).eval()
    x = face_image(size)
    began = time.perf_counter()
    exact = efmap.explain(model, x)
    exact_seconds = time.perf_counter() - began
    print(f"[coarse-to-fine] exact map: {exact_seconds:.1f} s", file=sys.stderr)

    rows = []
    for patch_size, keep in settings:
        began = time.perf_counter()
        approx = efmap.explain_coarse_to_fine(model, x, patch_size=patch_size, keep_fraction=keep)
        elapsed = time.perf_counter() - began
        exact_positive = exact.positive.reshape(-1)
        approx_positive = approx.positive.reshape(-1)
        exact_size = (exact.positive + exact.negative).reshape(-1)
        approx_size = (approx.positive + approx.negative).reshape(-1)
        rows.append(
            {
                "patch_size": patch_size,
                "keep_fraction": keep,
                "passes": approx.forward_passes,
                "exact_passes": exact.num_features,
                "seconds": elapsed,
                "exact_seconds": exact_seconds,
                "spearman_positive": float(spearmanr(exact_positive.numpy(), approx_positive.numpy()).statistic),
                "spearman_change": float(spearmanr(exact_size.numpy(), approx_size.numpy()).statistic),
                "top1": top_k_overlap(exact_positive, approx_positive, 0.01),
                "top10": top_k_overlap(exact_positive, approx_positive, 0.10),
            }
        )
        print(f"[coarse-to-fine] patch {patch_size}, keep {keep}: {elapsed:.1f} s", file=sys.stderr)
    return rows


def top_k_overlap(exact: torch.Tensor, approx: torch.Tensor, share: float) -> float:
    """Return the share of the exact map's top ``share`` pixels that are also among the approximation's top."""
    k = max(1, round(share * exact.numel()))
    top_exact = set(torch.topk(exact, k).indices.tolist())
    top_approx = set(torch.topk(approx, k).indices.tolist())
    return len(top_exact & top_approx) / k


# --- Reporting ------------------------------------------------------------------------------------------------


def format_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == CHANNELS_LAST else "contiguous"


def describe(timings: dict[tuple[int, torch.memory_format], float]) -> str:
    return ", ".join(f"{size}/{format_name(fmt)}: {significant(value * 1e6)}" for (size, fmt), value in timings.items())


def significant(value: float) -> str:
    """Format a positive number with three significant digits and no exponent."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def log(work: Workload, message: str) -> None:
    print(f"[{work.name}] {message}", file=sys.stderr, flush=True)


def summarize(work: Workload, methods: list[Method]) -> list[dict[str, object]]:
    efmap_times = next(m for m in methods if m.key == "efmap").times
    efmap_passes = next(m for m in methods if m.key == "efmap").passes
    rows = []
    for method in methods:
        per_pass = [t / method.passes * 1e6 for t in method.times]
        ratios = [(t / method.passes) / (e / efmap_passes) for t, e in zip(method.times, efmap_times, strict=True)]
        rows.append(
            {
                "method": method.label,
                "setting": method.setting,
                "us_per_feature": statistics.median(per_pass),
                "min": min(per_pass),
                "max": max(per_pass),
                "relative_to_efmap": statistics.median(ratios),
                "full_map_s": statistics.median(per_pass) * 128 * 128 / 1e6 if work.name == "age_resnet" else None,
                "peak_mib": method.memory_mib,
            }
        )
    return rows


def rst_table(rows: list[dict[str, object]], with_full_map: bool) -> list[str]:
    header = ["Method", "Setting", "µs per feature, median (min-max)", "Time relative to efmap"]
    if with_full_map:
        header.append("Estimated s per 128x128 map")
    header.append("Peak memory rise (MiB)")
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines.append("   * - " + "\n     - ".join(header))
    for row in rows:
        cells = [
            str(row["method"]),
            str(row["setting"]),
            f"{significant(row['us_per_feature'])} ({significant(row['min'])}-{significant(row['max'])})",
            f"{row['relative_to_efmap']:.2f}",
        ]
        if with_full_map:
            cells.append(f"{row['full_map_s']:.1f}")
        peak = row["peak_mib"]
        cells.append("n/a" if peak is None else f"{peak:.0f}")
        lines.append("   * - " + "\n     - ".join(cells))
    return lines + [""]


def coarse_table(rows: list[dict[str, float]]) -> list[str]:
    header = [
        "Patch size",
        "Kept patches",
        "Forward passes",
        "Speedup (time)",
        "Spearman, positive map",
        "Spearman, abs(change)",
        "Top 1% overlap",
        "Top 10% overlap",
    ]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines.append("   * - " + "\n     - ".join(header))
    for row in rows:
        cells = [
            f"{row['patch_size']}",
            f"{row['keep_fraction']:.0%}",
            f"{row['passes']:,} of {row['exact_passes']:,}",
            f"{row['exact_seconds'] / row['seconds']:.2f}x ({row['seconds']:.1f} s vs {row['exact_seconds']:.1f} s)",
            f"{row['spearman_positive']:.3f}",
            f"{row['spearman_change']:.3f}",
            f"{row['top1']:.0%}",
            f"{row['top10']:.0%}",
        ]
        lines.append("   * - " + "\n     - ".join(cells))
    return lines + [""]


def environment_lines(args: argparse.Namespace, started: float) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    allocator = ", ".join(f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if name in os.environ)
    import captum

    command = " ".join(["python benchmarks/bench.py", *sys.argv[1:]])
    finished = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {time.perf_counter() - started:.0f} s"
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, Captum {captum.__version__}"
    threads = f"{os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    return [
        f"- Run finished {finished}: ``{command}``",
        f"- {cpu}, {threads}; {versions}",
        f"- Allocator settings: {allocator or 'none (glibc defaults)'}",
        f"- Rounds: {args.repeats} for AgeResNet, {args.repeats * 3} for the MLP",
        "",
    ]


def write_docs(lines: list[str], page: Path) -> None:
    text = page.read_text()
    if START_MARKER not in text or END_MARKER not in text:
        raise SystemExit(f"{page} lacks the markers {START_MARKER!r} and {END_MARKER!r}; add them where the tables go.")
    head, rest = text.split(START_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    page.write_text(head + START_MARKER + "\n\n" + "\n".join(lines) + "\n" + END_MARKER + tail)


# --- Main -----------------------------------------------------------------------------------------------------


def make_workload(name: str, args: argparse.Namespace) -> Workload:
    if name == "age_resnet":
        return age_resnet_workload(args.features, args.full, args.repeats)
    if name == "vgg_224":
        return vgg_workload(args.vgg_features, max(1, args.repeats // 2))
    return tabular_workload(args.repeats)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--features", type=int, default=1024, help="pixels scored per run of the image model (a square)"
    )
    parser.add_argument("--full", action="store_true", help="score the whole 128x128 map in every run (slow)")
    parser.add_argument(
        "--vgg-features", type=int, default=256, help="pixels scored per run of the VGG-style model (a square)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds for the image model; the MLP runs 3 times as many"
    )
    parser.add_argument("--skip-coarse", action="store_true", help="skip the coarse-to-fine comparison")
    parser.add_argument(
        "--coarse-image", type=int, default=128, help="image side in pixels for the coarse-to-fine comparison"
    )
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS_PAGE.relative_to(ROOT)}")
    parser.add_argument("--json", type=Path, help="also write all measurements to this JSON file")
    parser.add_argument("--memory-child", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return

    started = time.perf_counter()
    report: dict[str, object] = {}
    lines: list[str] = []
    chosen: dict[str, dict[str, object]] = {}
    for name in ("age_resnet", "vgg_224", "tabular_mlp"):
        work = make_workload(name, args)
        log(work, f"{work.passes} forward passes per run; {work.note}")
        methods, chosen[name] = build_methods(work)
        difference = check_agreement(work)
        log(work, f"efmap positive vs ReLU(Captum): largest difference {difference:.2e}")
        time_round_robin(work, methods)
        if not args.skip_memory:
            for method in methods:
                method.memory_mib = measure_memory(name, method.key, chosen, args)
            log(work, "peak memory measured")
        rows = summarize(work, methods)
        report[name] = {"rows": rows, "note": work.note, "captum_difference": difference}
        lines += [work.title, "~" * len(work.title), "", f"Features: {work.note}.", ""]
        lines += rst_table(rows, with_full_map=name == "age_resnet")
        lines += [f"efmap's positive map and ReLU of Captum's attributions differ by at most {difference:.1e}.", ""]

    if not args.skip_coarse:
        coarse = coarse_to_fine_study([(8, 0.25), (8, 0.10), (4, 0.25)], args.coarse_image)
        report["coarse_to_fine"] = coarse
        side = args.coarse_image
        title = f"Coarse-to-fine against the exact map (AgeResNet, full {side}x{side} map, one run each)"
        lines += [title, "~" * len(title), ""] + coarse_table(coarse)

    lines = environment_lines(args, started) + lines
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if not args.no_docs:
        write_docs(lines, DOCS_PAGE)
        print(f"Wrote the tables to {DOCS_PAGE}", file=sys.stderr)


if __name__ == "__main__":
    main()
