"""The balanced, seeded train/test split of Adience into three age groups, saved as JSON for reuse.

Hong and Yoo (2021) train on 1,340 and test on 400 images per age group. The
old group has only 670 + 200 originals for this, so each of them is used twice:
once whole and once as a random crop. :func:`make_split` draws such a split
with a seed, and :func:`load_or_make_split` writes it to a JSON file that later
runs read back, so they use exactly the same images and crop boxes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efmap.reference.adience import (
    GROUP_NAMES,
    NUM_FOLDS,
    Crop,
    Sample,
    _check_crop,
    _check_folds,
    find_root,
    read_folds,
)

__all__ = ["AdienceSplit", "SplitSettings", "load_or_make_split", "make_split"]

logger = logging.getLogger(__name__)

SPLIT_FORMAT = "efmap.adience-split"
SPLIT_VERSION = 1
#: Number of paths named when images are reported missing.
REPORT_LIMIT = 5


@dataclass(frozen=True)
class SplitSettings:
    """Settings that determine a split; two runs with equal settings on the same copy get the same split.

    Attributes
    ----------
    train_per_class, test_per_class
        Images per age group in the training and the test part. Defaults 1,340 and 400.
    seed
        Seed of the random draw and of the crop boxes. Default 0.
    crop
        Image folder: ``"aligned"`` (default) or ``"faces"``.
    folds
        Folds the images come from. Default all five.
    crop_scale
        Range of the side of a random crop, as a fraction of the image side. Default (0.8, 0.95).
    """

    train_per_class: int = 1340
    test_per_class: int = 400
    seed: int = 0
    crop: Crop = "aligned"
    folds: tuple[int, ...] = tuple(range(NUM_FOLDS))
    crop_scale: tuple[float, float] = (0.8, 0.95)

    def __post_init__(self) -> None:
        for name in ("train_per_class", "test_per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Expected `seed` to be a non-negative integer, but got {self.seed!r}.")
        _check_crop(self.crop)
        object.__setattr__(self, "folds", _check_folds(self.folds))
        low, high = (float(v) for v in self.crop_scale)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"Expected `crop_scale` to be (low, high) with 0 < low <= high <= 1, but got {self.crop_scale!r}."
            )
        object.__setattr__(self, "crop_scale", (low, high))


@dataclass(frozen=True)
class AdienceSplit:
    """A training and a test list of samples, with the settings that produced them.

    Attributes
    ----------
    settings
        The :class:`SplitSettings` of the draw.
    train, test
        The samples; a sample with a crop box is a random-crop copy of an original in the same part.
    """

    settings: SplitSettings
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]

    def counts(self) -> dict[str, dict[str, int]]:
        """Return the number of samples per part and age group name."""
        result = {}
        for part, samples in (("train", self.train), ("test", self.test)):
            result[part] = {name: sum(s.group == g for s in samples) for g, name in enumerate(GROUP_NAMES)}
        return result

    def save(self, path: str | Path) -> None:
        """Write the split to a JSON file atomically, through a temporary file and a rename."""
        document = {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            "settings": dataclasses.asdict(self.settings),
            "groups": list(GROUP_NAMES),
            "train": [_sample_to_json(s) for s in self.train],
            "test": [_sample_to_json(s) for s in self.test],
        }
        _write_text_atomic(Path(path), json.dumps(document, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AdienceSplit:
        """Read a split written by :meth:`save`.

        Raises
        ------
        ValueError
            If the file is not valid JSON or not a split of this format and version.
        """
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"Expected split file {str(path)!r} to be JSON, but reading it failed: {error}.") from None
        if not isinstance(document, dict) or document.get("format") != SPLIT_FORMAT:
            raise ValueError(
                f"Expected {str(path)!r} to be an Adience split file, but its format is not {SPLIT_FORMAT!r}."
            )
        if document.get("version") != SPLIT_VERSION:
            raise ValueError(
                f"Expected split file version {SPLIT_VERSION}, but {str(path)!r} has {document.get('version')!r}."
            )
        try:
            raw = document["settings"]
            settings = SplitSettings(
                train_per_class=raw["train_per_class"],
                test_per_class=raw["test_per_class"],
                seed=raw["seed"],
                crop=raw["crop"],
                folds=tuple(raw["folds"]),
                crop_scale=tuple(raw["crop_scale"]),
            )
            train = tuple(_sample_from_json(item) for item in document["train"])
            test = tuple(_sample_from_json(item) for item in document["test"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"Split file {str(path)!r} is damaged: {error!r}. Delete it to draw a new split."
            ) from None
        return cls(settings, train, test)


def make_split(
    root: str | Path,
    *,
    train_per_class: int = 1340,
    test_per_class: int = 400,
    seed: int = 0,
    crop: Crop = "aligned",
    folds: Iterable[int] = range(NUM_FOLDS),
    crop_scale: tuple[float, float] = (0.8, 0.95),
) -> AdienceSplit:
    r"""Draw a balanced split: ``train_per_class`` training and ``test_per_class`` test images per age group.

    Rows whose age label fits no group (see :func:`~efmap.reference.adience.parse_age`) and
    rows whose image file is missing are left out. The log reports the missing files with a
    count and the first few paths. Repeated rows are used once. A group with fewer images than
    ``train_per_class + test_per_class`` is oversampled as in Hong and Yoo (2021): half as
    many originals are drawn for each part, and each is used once whole and once as a
    random crop, so the copies of an original stay in the part of the original.

    Parameters
    ----------
    root
        Adience folder, or a folder with it one level down (see :func:`~efmap.reference.adience.find_root`).
    train_per_class, test_per_class
        Images per group in each part. Defaults 1,340 and 400, the sizes of Hong and Yoo (2021).
    seed
        Seed of the draw and of the crop boxes. Default 0.
    crop
        ``"aligned"`` (default) or ``"faces"`` images.
    folds
        Folds to draw from. Default all five.
    crop_scale
        Range of the random crop's side as a fraction of the image side. Default (0.8, 0.95).

    Returns
    -------
    AdienceSplit
        The drawn samples; call :meth:`AdienceSplit.save` to keep them.

    Raises
    ------
    ValueError
        If a group has fewer than ``ceil(train_per_class / 2) + ceil(test_per_class / 2)``
        usable images, too few even with doubling.
    FileNotFoundError
        If the root lacks fold files or the image folder.

    Examples
    --------
    A fold file with two images per age group. The image files stay empty, because the split
    only checks that they exist.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from efmap.reference.adience import FOLD_COLUMNS
    >>> from efmap.reference.adience_split import make_split
    >>> folder = tempfile.TemporaryDirectory()
    >>> root = Path(folder.name)
    >>> lines = ["\t".join(FOLD_COLUMNS)]
    >>> for face_id, age in enumerate(["(0, 2)", "(4, 6)", "(25, 32)", "35", "(60, 100)", "66"]):
    ...     lines.append("\t".join(["u", "a.jpg", str(face_id), age, "f"] + ["0"] * 7))
    ...     image = root / "aligned" / "u" / f"landmark_aligned_face.{face_id}.a.jpg"
    ...     image.parent.mkdir(parents=True, exist_ok=True)
    ...     image.touch()
    >>> _ = (root / "fold_0_data.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    >>> split = make_split(root, train_per_class=1, test_per_class=1, folds=[0])
    >>> split.counts()
    {'train': {'minor': 1, 'adult': 1, 'old': 1}, 'test': {'minor': 1, 'adult': 1, 'old': 1}}
    >>> folder.cleanup()
    """
    settings = SplitSettings(train_per_class, test_per_class, seed, crop, tuple(folds), crop_scale)
    root = find_root(root, crop=settings.crop, folds=settings.folds)
    records = read_folds(root, settings.folds)

    by_group: list[set[str]] = [set() for _ in GROUP_NAMES]
    missing: set[str] = set()
    for record in records:
        group = record.group
        if group is None:
            continue
        path = record.image_path(settings.crop)
        if (root / path).is_file():
            by_group[group].add(path)
        else:
            missing.add(path)
    if missing:
        first = ", ".join(sorted(missing)[:REPORT_LIMIT])
        logger.warning("Skipping %d listed images that are missing under %s; the first: %s.", len(missing), root, first)

    rng = np.random.default_rng(settings.seed)
    train: list[Sample] = []
    test: list[Sample] = []
    for group, paths in enumerate(by_group):
        group_train, group_test = _draw_group(group, sorted(paths), settings, rng)
        train.extend(group_train)
        test.extend(group_test)

    split = AdienceSplit(settings, tuple(train), tuple(test))
    logger.info("Drew a split with seed %d: %s.", settings.seed, split.counts())
    return split


def _draw_group(
    group: int, paths: list[str], settings: SplitSettings, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    train_size, test_size = settings.train_per_class, settings.test_per_class
    order = [paths[i] for i in rng.permutation(len(paths))]
    if len(order) >= train_size + test_size:
        train_paths, test_paths = order[:train_size], order[train_size : train_size + test_size]
        return [Sample(p, group) for p in train_paths], [Sample(p, group) for p in test_paths]

    train_originals, test_originals = math.ceil(train_size / 2), math.ceil(test_size / 2)
    if len(order) < train_originals + test_originals:
        raise ValueError(
            f"Age group {GROUP_NAMES[group]!r} has {len(order)} usable images, but {train_size} training and "
            f"{test_size} test images need at least {train_originals + test_originals} even when every image is "
            "used twice. Lower train_per_class or test_per_class, or add folds."
        )
    logger.info(
        "Age group %r has %d usable images for %d: doubling %d originals with random crops.",
        GROUP_NAMES[group],
        len(order),
        train_size + test_size,
        train_originals + test_originals,
    )
    train_part = order[:train_originals]
    test_part = order[train_originals : train_originals + test_originals]
    train = _with_crops(group, train_part, train_size, settings, rng)
    test = _with_crops(group, test_part, test_size, settings, rng)
    return train, test


def _with_crops(
    group: int, originals: list[str], size: int, settings: SplitSettings, rng: np.random.Generator
) -> list[Sample]:
    low, high = settings.crop_scale
    copies = []
    for path in originals[: size - len(originals)]:
        side = float(rng.uniform(low, high))
        left, top = (float(v) for v in rng.uniform(0.0, 1.0 - side, size=2))
        copies.append(Sample(path, group, (left, top, side, side)))
    return [Sample(p, group) for p in originals] + copies


def load_or_make_split(
    path: str | Path,
    root: str | Path,
    *,
    train_per_class: int = 1340,
    test_per_class: int = 400,
    seed: int = 0,
    crop: Crop = "aligned",
    folds: Iterable[int] = range(NUM_FOLDS),
    crop_scale: tuple[float, float] = (0.8, 0.95),
) -> AdienceSplit:
    r"""Read the split at ``path`` if it exists, else draw one with :func:`make_split` and save it there.

    The parameters are those of :func:`make_split`.

    Raises
    ------
    ValueError
        If the file exists but was drawn with other settings, since reusing it would
        silently change the experiment.

    Examples
    --------
    The same data as in :func:`make_split`. The second call reads the saved file.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from efmap.reference.adience import FOLD_COLUMNS
    >>> from efmap.reference.adience_split import load_or_make_split
    >>> folder = tempfile.TemporaryDirectory()
    >>> root = Path(folder.name)
    >>> lines = ["\t".join(FOLD_COLUMNS)]
    >>> for face_id, age in enumerate(["(0, 2)", "(4, 6)", "(25, 32)", "35", "(60, 100)", "66"]):
    ...     lines.append("\t".join(["u", "a.jpg", str(face_id), age, "f"] + ["0"] * 7))
    ...     image = root / "aligned" / "u" / f"landmark_aligned_face.{face_id}.a.jpg"
    ...     image.parent.mkdir(parents=True, exist_ok=True)
    ...     image.touch()
    >>> _ = (root / "fold_0_data.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    >>> first = load_or_make_split(root / "split.json", root, train_per_class=1, test_per_class=1, folds=[0])
    >>> (root / "split.json").is_file()
    True
    >>> load_or_make_split(root / "split.json", root, train_per_class=1, test_per_class=1, folds=[0]) == first
    True
    >>> folder.cleanup()
    """
    requested = SplitSettings(train_per_class, test_per_class, seed, crop, tuple(folds), crop_scale)
    path = Path(path)
    if path.exists():
        split = AdienceSplit.load(path)
        if split.settings != requested:
            raise ValueError(
                f"Expected the split file {str(path)!r} to match the requested settings {requested}, but it was "
                f"drawn with {split.settings}. Pass the same settings, or choose another split file to draw a "
                "new split."
            )
        logger.info("Reusing the split in %s: %s.", path, split.counts())
        return split

    split = make_split(root, **dataclasses.asdict(requested))
    split.save(path)
    logger.info("Saved the split to %s.", path)
    return split


def _sample_to_json(sample: Sample) -> list[Any]:
    return [sample.path, sample.group, None if sample.crop is None else list(sample.crop)]


def _sample_from_json(item: Any) -> Sample:
    path, group, crop = item
    if not isinstance(path, str) or isinstance(group, bool) or group not in range(len(GROUP_NAMES)):
        raise ValueError(f"invalid sample {item!r}")
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"sample path {path!r} leaves the data root")
    if crop is not None:
        left, top, width, height = (float(v) for v in crop)
        crop = (left, top, width, height)
    return Sample(path, group, crop)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
