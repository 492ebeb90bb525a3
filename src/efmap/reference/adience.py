"""Reader for a local copy of the Adience face benchmark, with age labels merged into three groups.

Adience (Eidinger, Enbar and Hassner, "Age and Gender Estimation of Unfiltered
Faces", IEEE TIFS 2014) is distributed after registration only, so this module
never downloads anything: it reads a copy that the user already has. The copy
contains five fold files ``fold_0_data.txt`` to ``fold_4_data.txt`` and the image
folders ``aligned/`` and ``faces/``.

Age groups
----------
The raw ``age`` column contains ranges such as ``(25, 32)``, single ages such as
``35`` and ``None``. :func:`parse_age` maps them to three groups:

====  =====  ===========
id    name   ages
====  =====  ===========
0     minor  0 to 12
1     adult  15 to 53
2     old    60 to 100
====  =====  ===========

A range belongs to a group when both of its ends lie in that group, and a
single age when it lies in that group. Everything else (``(8, 23)``, ``13``,
``55`` to ``58``, ``None``) is dropped. Other works place ages 55 to 58 in the
old group; this rule drops them, because no group contains them.

Pillow is imported only when an image is read, so this module imports without it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "FOLD_COLUMNS",
    "GROUP_AGES",
    "GROUP_NAMES",
    "AdienceDataset",
    "NUM_FOLDS",
    "AdienceRecord",
    "Sample",
    "collate_skipping",
    "count_groups",
    "find_root",
    "fold_file_name",
    "load_image",
    "parse_age",
    "read_fold_file",
    "read_folds",
]

logger = logging.getLogger(__name__)

#: Names of the three age groups, indexed by group id.
GROUP_NAMES = ("minor", "adult", "old")
#: Inclusive age bounds ``(first, last)`` of each group, indexed by group id.
GROUP_AGES = ((0, 12), (15, 53), (60, 100))
#: Column names of the header row of every fold file, in order.
FOLD_COLUMNS = (
    "user_id",
    "original_image",
    "face_id",
    "age",
    "gender",
    "x",
    "y",
    "dx",
    "dy",
    "tilt_ang",
    "fiducial_yaw_angle",
    "fiducial_score",
)
#: Number of folds in the benchmark.
NUM_FOLDS = 5
#: Image folder and file name prefix of each crop kind.
CROP_LAYOUT = {"aligned": "landmark_aligned_face", "faces": "coarse_tilt_aligned_face"}
GENDERS = frozenset({"m", "f", "u", ""})

Crop = Literal["aligned", "faces"]

_RANGE = re.compile(r"\(\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)")
_AGE = re.compile(r"\d{1,3}")
_NUMBER_COLUMNS = FOLD_COLUMNS[5:]


def parse_age(label: str | int | None) -> int | None:
    """Map a raw Adience age label to an age group id, or to None when it fits no group.

    Parameters
    ----------
    label
        The ``age`` column as written in a fold file: a range ``"(a, b)"``, a single age
        ``"35"``, or ``"None"``. Surrounding spaces are ignored. An ``int`` or ``None`` is
        accepted as well.

    Returns
    -------
    int or None
        0 (minor, ages 0 to 12), 1 (adult, 15 to 53) or 2 (old, 60 to 100). A range counts
        when both ends lie in one group, and a single age when it lies in a group. Any
        other label, ``"None"`` included, returns None, and the caller drops the row.

    Raises
    ------
    ValueError
        If the label is none of the three forms, or a range ends before it starts.
    TypeError
        If ``label`` is not a string, an int or None.

    Examples
    --------
    >>> from efmap.reference.adience import parse_age
    >>> [parse_age(x) for x in ["(8, 12)", "(38, 48)", "(8, 23)", "35", "57", "None"]]
    [0, 1, None, 1, None, None]
    """
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise TypeError(f"Expected an age label as str, int or None, but got {type(label).__name__}.")
    if isinstance(label, int):
        return _group_of(label, label)

    text = label.strip()
    if text == "None":
        return None
    if _AGE.fullmatch(text):
        return _group_of(int(text), int(text))
    match = _RANGE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"Expected an age label such as '(25, 32)', '35' or 'None', but got {label!r}. "
            "Check the age column of the fold file."
        )
    first, last = int(match.group(1)), int(match.group(2))
    if first > last:
        raise ValueError(f"Expected an age range (a, b) with a <= b, but got {label!r}.")
    return _group_of(first, last)


def _group_of(first: int, last: int) -> int | None:
    for group, (low, high) in enumerate(GROUP_AGES):
        if low <= first and last <= high:
            return group
    return None


@dataclass(frozen=True)
class AdienceRecord:
    """One row of a fold file.

    Attributes
    ----------
    user_id, original_image, face_id, age, gender
        The first five columns; ``age`` is the raw label and ``gender`` is ``"m"``,
        ``"f"``, ``"u"`` or empty.
    x, y, dx, dy, tilt_ang, fiducial_yaw_angle, fiducial_score
        Face box and pose columns, as floats.
    fold
        Index of the fold file, 0 to 4.
    line
        Line number in the fold file, counting the header as line 1.
    """

    user_id: str
    original_image: str
    face_id: int
    age: str
    gender: str
    x: float
    y: float
    dx: float
    dy: float
    tilt_ang: float
    fiducial_yaw_angle: float
    fiducial_score: float
    fold: int
    line: int

    @property
    def group(self) -> int | None:
        """Age group id from :func:`parse_age`, or None for a dropped label."""
        return parse_age(self.age)

    def image_path(self, crop: Crop = "aligned") -> str:
        """Return the image's path relative to the data root, with ``/`` separators.

        ``"aligned"`` gives ``aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>``
        and ``"faces"`` the coarse crop ``faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image>``.
        """
        prefix = CROP_LAYOUT[_check_crop(crop)]
        return f"{crop}/{self.user_id}/{prefix}.{self.face_id}.{self.original_image}"


def _check_crop(crop: object) -> Crop:
    if crop not in CROP_LAYOUT:
        raise ValueError(f"Expected `crop` to be 'aligned' or 'faces', but got {crop!r}.")
    return crop  # type: ignore[return-value]


def _check_folds(folds: Iterable[int]) -> tuple[int, ...]:
    chosen = tuple(folds)
    if not chosen or any(isinstance(f, bool) or f not in range(NUM_FOLDS) for f in chosen):
        raise ValueError(f"Expected `folds` to be a non-empty selection of 0 to {NUM_FOLDS - 1}, but got {chosen!r}.")
    return tuple(sorted(set(chosen)))


def fold_file_name(fold: int) -> str:
    """Return the file name of fold ``fold``, for example ``fold_0_data.txt``.

    Examples
    --------
    >>> from efmap.reference.adience import fold_file_name
    >>> fold_file_name(3)
    'fold_3_data.txt'
    """
    return f"fold_{fold}_data.txt"


def find_root(path: str | Path, *, crop: Crop = "aligned", folds: Iterable[int] = range(NUM_FOLDS)) -> Path:
    """Locate the Adience data root at ``path`` or in one folder directly inside it.

    Some mirrors unpack the benchmark one level deeper (for example into
    ``AdienceBenchmarkGenderAndAgeClassification/``), so the folders inside
    ``path`` are searched too, in sorted order.

    Parameters
    ----------
    path
        Folder given by the user.
    crop
        Image folder the caller needs: ``"aligned"`` (default) or ``"faces"``.
    folds
        Folds whose files must be present. Default all five.

    Returns
    -------
    pathlib.Path
        The folder that contains the fold files and the image folder.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist, or neither it nor a folder inside it contains the
        fold files and the image folder; the message lists what is missing.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from efmap.reference.adience import find_root
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     inner = Path(folder) / "AdienceBenchmark"
    ...     (inner / "aligned").mkdir(parents=True)
    ...     (inner / "fold_0_data.txt").touch()
    ...     find_root(folder, folds=[0]).name
    'AdienceBenchmark'
    """
    crop = _check_crop(crop)
    chosen = _check_folds(folds)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Adience root {str(root)!r} does not exist or is not a folder.")

    missing = _missing_parts(root, crop, chosen)
    if not missing:
        return root
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if not _missing_parts(child, crop, chosen):
            logger.info("Found the Adience data one level down, in %s.", child)
            return child
    raise FileNotFoundError(
        f"Expected the Adience root {str(root)!r}, or a folder directly inside it, to contain "
        f"{', '.join(missing)}, but they are missing. Point the root at the folder that contains the "
        "fold files, and unpack the image archive there."
    )


def _missing_parts(folder: Path, crop: Crop, folds: tuple[int, ...]) -> list[str]:
    missing = [fold_file_name(f) for f in folds if not (folder / fold_file_name(f)).is_file()]
    if not (folder / crop).is_dir():
        missing.append(f"the folder {crop}/")
    return missing


def read_fold_file(path: str | Path, fold: int) -> list[AdienceRecord]:
    r"""Parse one fold file strictly: UTF-8, a header row, 12 tab-separated columns per row.

    Empty lines are skipped. Nothing in the file is evaluated as code.

    Parameters
    ----------
    path
        The fold file.
    fold
        Fold index stored in every record.

    Returns
    -------
    list of AdienceRecord
        One record per data row, in file order.

    Raises
    ------
    ValueError
        If the file is not UTF-8, the header differs from :data:`FOLD_COLUMNS`, a row does
        not have 12 columns, a number, gender or age label is invalid, or a name contains a
        path separator. The message names the file and line.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from efmap.reference.adience import FOLD_COLUMNS, read_fold_file
    >>> row = ["u1", "a.jpg", "3", "(25, 32)", "f", "0", "0", "10", "10", "0", "0", "1"]
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "fold_0_data.txt"
    ...     _ = path.write_text("\t".join(FOLD_COLUMNS) + "\n" + "\t".join(row) + "\n", encoding="utf-8")
    ...     [record] = read_fold_file(path, fold=0)
    >>> record.face_id, record.group, record.line, record.image_path()
    (3, 1, 2, 'aligned/u1/landmark_aligned_face.3.a.jpg')
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"Expected fold file {str(path)!r} to be UTF-8 text, but decoding failed: {error}.") from None

    lines = text.split("\n")
    header = tuple(field.strip() for field in lines[0].rstrip("\r").split("\t"))
    if header != FOLD_COLUMNS:
        raise ValueError(
            f"Expected the header of {str(path)!r} to be the 12 tab-separated columns "
            f"{', '.join(FOLD_COLUMNS)}, but got {lines[0].rstrip()!r}."
        )

    records = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            records.append(_parse_row(line.split("\t"), fold, number))
        except ValueError as error:
            raise ValueError(f"Invalid row at {path}:{number}: {error}") from None
    return records


def _parse_row(fields: list[str], fold: int, line: int) -> AdienceRecord:
    if len(fields) != len(FOLD_COLUMNS):
        raise ValueError(f"expected {len(FOLD_COLUMNS)} tab-separated columns, but got {len(fields)}.")
    user_id, original_image, face_id, age, gender = (field.strip() for field in fields[:5])
    for name, value in (("user_id", user_id), ("original_image", original_image)):
        if not value or value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError(f"expected `{name}` to be a non-empty file name without separators, but got {value!r}.")
    if not face_id.isdigit():
        raise ValueError(f"expected `face_id` to be a non-negative integer, but got {face_id!r}.")
    if gender not in GENDERS:
        raise ValueError(f"expected `gender` to be 'm', 'f', 'u' or empty, but got {gender!r}.")
    parse_age(age)  # rejects malformed labels now, with the line number attached by the caller

    numbers = [_parse_number(name, value) for name, value in zip(_NUMBER_COLUMNS, fields[5:], strict=True)]
    x, y, dx, dy, tilt_ang, yaw, score = numbers
    return AdienceRecord(
        user_id, original_image, int(face_id), age, gender, x, y, dx, dy, tilt_ang, yaw, score, fold=fold, line=line
    )


def _parse_number(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"expected `{name}` to be a finite number, but got {value!r}.")
    return number


def read_folds(root: str | Path, folds: Iterable[int] = range(NUM_FOLDS)) -> list[AdienceRecord]:
    r"""Read the fold files of a data root and log how many rows fall in each age group.

    Parameters
    ----------
    root
        Folder with the fold files (see :func:`find_root`).
    folds
        Folds to read. Default all five.

    Returns
    -------
    list of AdienceRecord
        All rows of the chosen folds, fold by fold.

    Raises
    ------
    FileNotFoundError
        If a fold file is missing.
    ValueError
        If a fold file is invalid (see :func:`read_fold_file`).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from efmap.reference.adience import FOLD_COLUMNS, read_folds
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for fold, age in [(0, "(0, 2)"), (1, "(60, 100)")]:
    ...         row = ["u1", "a.jpg", str(fold), age, "m"] + ["0"] * 7
    ...         text = "\t".join(FOLD_COLUMNS) + "\n" + "\t".join(row) + "\n"
    ...         _ = (Path(folder) / f"fold_{fold}_data.txt").write_text(text, encoding="utf-8")
    ...     records = read_folds(folder, folds=[0, 1])
    >>> [(record.fold, record.group) for record in records]
    [(0, 0), (1, 2)]
    """
    records: list[AdienceRecord] = []
    for fold in _check_folds(folds):
        path = Path(root) / fold_file_name(fold)
        if not path.is_file():
            raise FileNotFoundError(f"Fold file {str(path)!r} is missing; check the Adience root folder.")
        records.extend(read_fold_file(path, fold))

    counts = count_groups(records)
    logger.info(
        "Read %d rows: %s; %d dropped because their age label fits no group.",
        len(records),
        ", ".join(f"{name} {counts[name]}" for name in GROUP_NAMES),
        counts["dropped"],
    )
    return records


def count_groups(records: Iterable[AdienceRecord]) -> dict[str, int]:
    """Count records per age group name, plus ``"dropped"`` for labels that fit no group.

    Examples
    --------
    >>> from efmap.reference.adience import AdienceRecord, count_groups
    >>> ages = ["(0, 2)", "(25, 32)", "35", "(60, 100)", "None"]
    >>> records = [AdienceRecord("u", "a.jpg", 0, age, "f", *[0.0] * 7, fold=0, line=2) for age in ages]
    >>> count_groups(records)
    {'minor': 1, 'adult': 2, 'old': 1, 'dropped': 1}
    """
    counts = dict.fromkeys((*GROUP_NAMES, "dropped"), 0)
    for record in records:
        group = record.group
        counts["dropped" if group is None else GROUP_NAMES[group]] += 1
    return counts


@dataclass(frozen=True)
class Sample:
    """One image of a data set: its path under the root, its age group and an optional crop box.

    Attributes
    ----------
    path
        Image path relative to the data root, with ``/`` separators.
    group
        Age group id, 0 to 2.
    crop
        ``(left, top, width, height)`` as fractions of the image's width and height, for the
        copies made by random-crop oversampling; None for the whole image.
    """

    path: str
    group: int
    crop: tuple[float, float, float, float] | None = None


class AdienceDataset(Dataset):  # type: ignore[type-arg]
    """Images of Adience samples as ``(image, group)`` pairs, resized and scaled to ``[-1, 1]``.

    An image that is missing or cannot be decoded yields None instead of a pair, so
    that a long run goes on; :func:`collate_skipping` drops such items from a batch.
    The first ``report_limit`` failures are logged with their path and error, and
    ``skipped`` keeps all of them.

    Parameters
    ----------
    root
        Data root, the folder that contains ``aligned/`` and ``faces/``.
    samples
        The images to serve, for example ``split.train``.
    size
        Side of the square output image in pixels. Default 128.
    report_limit
        Number of failures logged one by one. Default 5.

    Notes
    -----
    With ``DataLoader`` worker processes each worker has its own copy of the data set, so it
    logs its own failures, and ``skipped`` in the main process lists only failures that
    happened there.

    Examples
    --------
    >>> import tempfile
    >>> from efmap.reference.adience import AdienceDataset, Sample
    >>> data = AdienceDataset(tempfile.mkdtemp(), [Sample("aligned/u/missing.jpg", 1)], size=32)
    >>> data[0] is None, data.skipped
    (True, ['aligned/u/missing.jpg'])
    """

    def __init__(self, root: str | Path, samples: Sequence[Sample], *, size: int = 128, report_limit: int = 5) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"Expected `size` to be a positive integer, but got {size!r}.")
        self.root = Path(root)
        self.samples = tuple(samples)
        self.size = size
        self.report_limit = report_limit
        self.skipped: list[str] = []
        self._reported = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        """Return ``(image, group)`` with ``image`` of shape ``(3, size, size)`` in ``[-1, 1]``, or None."""
        sample = self.samples[index]
        try:
            image = load_image(self.root / sample.path, self.size, sample.crop)
        except (OSError, ValueError) as error:
            self._report(sample.path, error)
            return None
        return image, sample.group

    def report_skipped(self) -> None:
        """Log how many images were skipped so far and the first few paths, if more were skipped since the last call."""
        if len(self.skipped) > self._reported:
            self._reported = len(self.skipped)
            logger.warning(
                "Skipped %d of %d images that are missing or unreadable; the first: %s.",
                len(self.skipped),
                len(self.samples),
                ", ".join(self.skipped[: self.report_limit]),
            )

    def _report(self, path: str, error: Exception) -> None:
        if path not in self.skipped:
            self.skipped.append(path)
            if len(self.skipped) <= self.report_limit:
                logger.warning("Skipping image %s: %s", path, error)


def load_image(path: str | Path, size: int, crop: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """Read an image file as RGB, crop it, resize it to ``size`` x ``size`` and scale it to ``[-1, 1]``.

    Returns a float32 tensor of shape ``(3, size, size)``.

    Raises
    ------
    OSError
        If the file is missing or Pillow cannot decode it.
    ImportError
        If Pillow is not installed.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from efmap.reference.adience import load_image
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "face.jpg"
    ...     Image.new("RGB", (8, 6), (255, 0, 0)).save(path)
    ...     image = load_image(path, 4)
    ...     corner = load_image(path, 2, crop=(0.0, 0.0, 0.5, 0.5))
    >>> image.shape, corner.shape
    (torch.Size([3, 4, 4]), torch.Size([3, 2, 2]))
    >>> image[:, 0, 0].round(decimals=1)
    tensor([ 1., -1., -1.])
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("Reading Adience images needs Pillow; install it with `pip install efmap[data]`.") from None
    resampling = getattr(Image, "Resampling", Image).BILINEAR

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if crop is not None:
        left, top, width, height = crop
        box = (
            round(left * image.width),
            round(top * image.height),
            round((left + width) * image.width),
            round((top + height) * image.height),
        )
        image = image.crop(box)
    image = image.resize((size, size), resampling)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def collate_skipping(batch: Sequence[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, group)`` pairs into ``(images (B, 3, H, W), groups (B,))``, dropping None items.

    A batch in which every item is None gives ``(images (0,), groups (0,))``.

    Examples
    --------
    >>> import torch
    >>> from efmap.reference.adience import collate_skipping
    >>> images, groups = collate_skipping([(torch.zeros(3, 4, 4), 0), None, (torch.ones(3, 4, 4), 2)])
    >>> images.shape, groups
    (torch.Size([2, 3, 4, 4]), tensor([0, 2]))
    >>> collate_skipping([None])[0].shape
    torch.Size([0])
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    images = torch.stack([image for image, _ in kept])
    groups = torch.tensor([group for _, group in kept], dtype=torch.int64)
    return images, groups
