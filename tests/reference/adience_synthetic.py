"""Write a small synthetic copy of the Adience benchmark in the real layout, for tests and demos.

The copy has the five fold files and small JPEG faces under ``aligned/`` and
``faces/``. It contains one row for every raw age label listed in
:data:`RAW_AGES` (labels that occur in the real fold files) and a few more rows
per standard bucket, so that a balanced split of a few images per group can be
drawn. One row points at an image that is not written, so that the missing-file
path is exercised. Faces of the three age groups differ in brightness and size,
so a model can learn something from them.

Create one from the command line with::

    python tests/reference/adience_synthetic.py out/adience_synthetic
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

#: One of every raw age label form found in the real fold files, 30 in all.
RAW_AGES = (
    "(0, 2)",
    "(4, 6)",
    "(8, 12)",
    "(15, 20)",
    "(25, 32)",
    "(38, 43)",
    "(48, 53)",
    "(60, 100)",
    "(8, 23)",
    "(27, 32)",
    "(38, 42)",
    "(38, 48)",
    "2",
    "3",
    "13",
    "22",
    "23",
    "29",
    "32",
    "34",
    "35",
    "36",
    "42",
    "45",
    "46",
    "55",
    "56",
    "57",
    "58",
    "None",
)
#: Groups of :data:`RAW_AGES` under the three-group rule.
RAW_AGE_COUNTS = {"minor": 5, "adult": 17, "old": 1, "dropped": 7}
#: The eight standard age buckets of the benchmark.
BUCKETS = ("(0, 2)", "(4, 6)", "(8, 12)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)")
GENDERS = ("m", "f", "u", "")
HEADER = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"


@dataclass(frozen=True)
class SyntheticAdience:
    """What :func:`write_synthetic_adience` wrote.

    Attributes
    ----------
    root
        Folder with the fold files, ``aligned/`` and ``faces/``.
    rows
        Number of data rows over all fold files.
    counts
        Rows per age group name, plus ``"dropped"``.
    missing
        Path, relative to ``root``, of the aligned image that a row lists but that was not written.
    """

    root: Path
    rows: int
    counts: dict[str, int]
    missing: str


def write_synthetic_adience(
    root: str | Path, *, extra_per_bucket: int = 3, image_size: int = 40, seed: int = 0
) -> SyntheticAdience:
    """Write the synthetic copy into ``root`` (created if needed) and return a summary of it.

    Rows are the 30 labels of :data:`RAW_AGES` followed by ``extra_per_bucket`` rows of each
    standard bucket. With the default 3 the groups hold 14 minor, 29 adult and 4 old rows,
    and one adult row has no image.
    """
    root = Path(root)
    rng = random.Random(seed)
    ages = list(RAW_AGES) + [bucket for bucket in BUCKETS for _ in range(extra_per_bucket)]
    missing_row = len(RAW_AGES) + 4 * extra_per_bucket  # the first extra (25, 32) row

    folds: list[list[str]] = [[] for _ in range(5)]
    missing = ""
    for index, age in enumerate(ages):
        user_id = f"{7153718 + index // 3}@N0{index % 9}"
        face_id = 1 + index % 7
        original_image = f"{9000000000 + 7919 * index}_{index:04x}e2f1_o.jpg"
        gender = GENDERS[index % len(GENDERS)]
        row = [user_id, original_image, str(face_id), age, gender]
        row += [str(rng.randint(0, 900)), str(rng.randint(0, 900)), str(rng.randint(200, 1200))]
        row += [str(rng.randint(200, 1200)), str(rng.randint(-180, 180)), str(rng.randint(-60, 60))]
        row += [str(rng.randint(0, 120))]
        folds[index % 5].append("\t".join(row))

        aligned = f"aligned/{user_id}/landmark_aligned_face.{face_id}.{original_image}"
        coarse = f"faces/{user_id}/coarse_tilt_aligned_face.{face_id}.{original_image}"
        if index == missing_row:
            missing = aligned
            continue
        shade = _shade(age)
        _write_face(root / aligned, image_size, shade, rng)
        _write_face(root / coarse, image_size + 8, shade, rng)

    for fold, rows in enumerate(folds):
        (root / f"fold_{fold}_data.txt").write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")

    counts = dict(RAW_AGE_COUNTS)
    counts["minor"] += 3 * extra_per_bucket
    counts["adult"] += 4 * extra_per_bucket
    counts["old"] += extra_per_bucket
    return SyntheticAdience(root=root, rows=len(ages), counts=counts, missing=missing)


def _shade(age: str) -> int:
    """Return a face brightness that falls with age, so the three groups look different."""
    digits = age.strip("()").split(",")[0]
    years = int(digits) if digits.strip().isdigit() else 30
    return max(40, 230 - 2 * years)


def _write_face(path: Path, size: int, shade: int, rng: random.Random) -> None:
    """Write a JPEG of an oval face of brightness ``shade`` on a noisy background."""
    path.parent.mkdir(parents=True, exist_ok=True)
    background = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = size // 6 + rng.randint(0, 2)
    draw.ellipse((margin, margin - 2, size - margin, size - margin + 2), fill=(shade, shade - 20, shade - 35))
    eye = size // 3
    for x in (eye, size - eye):
        draw.ellipse((x - 2, eye, x + 2, eye + 3), fill=(20, 20, 20))
    draw.line((size // 3, 2 * size // 3 + 2, 2 * size // 3, 2 * size // 3 + 2), fill=(90, 20, 20), width=2)
    image.save(path, format="JPEG", quality=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a small synthetic Adience copy in the real layout.")
    parser.add_argument("root", type=Path, help="folder to write the copy into (created if needed)")
    parser.add_argument("--extra-per-bucket", type=int, default=3, help="extra rows per age bucket (default 3)")
    parser.add_argument("--image-size", type=int, default=40, help="side of the aligned faces in pixels (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random image details (default 0)")
    args = parser.parse_args(argv)
    copy = write_synthetic_adience(
        args.root, extra_per_bucket=args.extra_per_bucket, image_size=args.image_size, seed=args.seed
    )
    print(f"Wrote {copy.rows} rows to {copy.root}: {copy.counts}; missing image {copy.missing}")


if __name__ == "__main__":
    main()
