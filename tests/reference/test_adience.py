"""Tests of the Adience reader, the balanced split and the two example scripts, on a synthetic copy."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from adience_synthetic import BUCKETS, RAW_AGE_COUNTS, RAW_AGES, SyntheticAdience, write_synthetic_adience
from hypothesis import given
from hypothesis import strategies as st

import efmap
from efmap.reference import AdienceDataset, AdienceSplit, AgeResNet, Sample, collate_skipping, find_root, parse_age
from efmap.reference.adience import GROUP_AGES, count_groups, read_fold_file, read_folds
from efmap.reference.adience_split import load_or_make_split, make_split

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRAIN = EXAMPLES / "train_age_resnet.py"
EXPLAIN = EXAMPLES / "explain_age_resnet.py"
# Tiny settings that keep each script run to seconds: 12 training and 6 test images of 16x16 pixels.
SIZE = 16
TINY = ["--input-size", str(SIZE), "--train-per-class", "4", "--test-per-class", "2", "--threads", "1"]
HEADER = "\t".join(
    ["user_id", "original_image", "face_id", "age", "gender", "x", "y", "dx", "dy"]
    + ["tilt_ang", "fiducial_yaw_angle", "fiducial_score"]
)
ROW = "u1@N00\tphoto.jpg\t3\t(25, 32)\tf\t1\t2\t30\t40\t0\t5\t10"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticAdience:
    """A synthetic copy nested one level down, as some mirrors unpack it."""
    return write_synthetic_adience(tmp_path_factory.mktemp("adience") / "AdienceBenchmark")


@pytest.fixture
def one_thread() -> object:
    """Run torch on one thread, because the CPUs are shared and thread contention makes tiny models crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- age labels


def test_parse_age_listed_labels() -> None:
    groups = [parse_age(label) for label in RAW_AGES]
    counts = {
        "minor": groups.count(0),
        "adult": groups.count(1),
        "old": groups.count(2),
        "dropped": groups.count(None),
    }
    assert len(RAW_AGES) == 30
    assert counts == {"minor": 5, "adult": 17, "old": 1, "dropped": 7}
    assert counts == RAW_AGE_COUNTS


@pytest.mark.parametrize(
    ("label", "group"),
    [
        ("(0, 2)", 0),
        ("(8, 12)", 0),
        ("(15, 20)", 1),
        ("(48, 53)", 1),
        ("(60, 100)", 2),
        ("(8, 23)", None),
        ("(38, 48)", 1),
        (" (27,32) ", 1),
        ("3", 0),
        ("13", None),
        ("14", None),
        ("53", 1),
        ("55", None),
        ("58", None),
        ("59", None),
        ("60", 2),
        ("None", None),
        (35, 1),
        (None, None),
    ],
)
def test_parse_age_single_labels(label: str | int | None, group: int | None) -> None:
    assert parse_age(label) == group


@pytest.mark.parametrize("label", ["(25, 32", "abc", "", "1.5", "-3", "(4; 6)", "__import__('os')", "1000"])
def test_parse_age_rejects_malformed(label: str) -> None:
    with pytest.raises(ValueError, match=r"Expected an age label such as '\(25, 32\)', '35' or 'None'"):
        parse_age(label)


def test_parse_age_rejects_reversed_range() -> None:
    with pytest.raises(ValueError, match=r"Expected an age range \(a, b\) with a <= b, but got '\(32, 25\)'"):
        parse_age("(32, 25)")


@pytest.mark.parametrize("label", [3.0, True, ["(0, 2)"]])
def test_parse_age_rejects_types(label: object) -> None:
    with pytest.raises(TypeError, match="Expected an age label as str, int or None"):
        parse_age(label)  # type: ignore[arg-type]


@given(st.integers(0, 120), st.integers(0, 120))
def test_parse_age_range_rule(first: int, second: int) -> None:
    low, high = min(first, second), max(first, second)
    expected = next((g for g, (a, b) in enumerate(GROUP_AGES) if a <= low and high <= b), None)
    assert parse_age(f"({low}, {high})") == expected
    assert parse_age(str(low)) == parse_age(f"({low}, {low})")


# ---------------------------------------------------------------- root and fold files


def test_find_root_direct_and_nested(synthetic: SyntheticAdience) -> None:
    assert find_root(synthetic.root) == synthetic.root
    assert find_root(synthetic.root.parent) == synthetic.root
    assert find_root(synthetic.root.parent, crop="faces") == synthetic.root


def test_find_root_names_missing_parts(tmp_path: Path) -> None:
    for fold in (0, 1, 2, 4):
        (tmp_path / f"fold_{fold}_data.txt").write_text(HEADER + "\n", encoding="utf-8")
    (tmp_path / "faces").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"to contain fold_3_data\.txt, the folder aligned/, but they are missing"
    ):
        find_root(tmp_path)
    assert find_root(tmp_path, crop="faces", folds=[0, 1]) == tmp_path


def test_find_root_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        find_root(tmp_path / "nowhere")


def test_find_root_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected `crop` to be 'aligned' or 'faces', but got 'coarse'"):
        find_root(tmp_path, crop="coarse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected `folds` to be a non-empty selection of 0 to 4, but got \(5,\)"):
        find_root(tmp_path, folds=[5])


def test_read_folds_synthetic_counts(synthetic: SyntheticAdience) -> None:
    records = read_folds(synthetic.root)
    assert len(records) == synthetic.rows == len(RAW_AGES) + 3 * len(BUCKETS)
    assert count_groups(records) == synthetic.counts
    assert {r.gender for r in records} == {"m", "f", "u", ""}
    assert {r.fold for r in records} == {0, 1, 2, 3, 4}
    first = records[0]
    assert first.line == 2
    assert first.age == "(0, 2)"
    assert first.group == 0
    assert (synthetic.root / first.image_path("faces")).is_file()
    assert first.image_path().startswith(f"aligned/{first.user_id}/landmark_aligned_face.{first.face_id}.")


def write_fold(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "fold_0_data.txt"
    path.write_bytes(text.encode(encoding))
    return path


def test_read_fold_file_accepts_crlf_and_blank_lines(tmp_path: Path) -> None:
    path = write_fold(tmp_path, HEADER + "\r\n" + ROW + "\r\n\r\n")
    (record,) = read_fold_file(path, fold=0)
    assert record.user_id == "u1@N00"
    assert record.face_id == 3
    assert record.dx == 30.0
    assert record.fiducial_score == 10.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user_id\tage\n" + ROW, "Expected the header of .* to be the 12 tab-separated columns"),
        (HEADER + "\n" + ROW.replace("\t10", ""), r"fold_0_data\.txt:2: expected 12 tab-separated columns, but got 11"),
        (
            HEADER + "\n" + ROW + "\n" + ROW.replace("\tf\t", "\tx\t"),
            r":3: expected `gender` to be 'm', 'f', 'u' or empty",
        ),
        (HEADER + "\n" + ROW.replace("\t30\t", "\tabc\t"), "expected `dx` to be a finite number, but got 'abc'"),
        (HEADER + "\n" + ROW.replace("\t30\t", "\tnan\t"), "expected `dx` to be a finite number, but got 'nan'"),
        (HEADER + "\n" + ROW.replace("\t3\t", "\t-3\t"), "expected `face_id` to be a non-negative integer"),
        (
            HEADER + "\n" + ROW.replace("u1@N00", "../u1"),
            "expected `user_id` to be a non-empty file name without separators",
        ),
        (HEADER + "\n" + ROW.replace("(25, 32)", "eval('1')"), "Expected an age label such as"),
    ],
)
def test_read_fold_file_rejects_invalid(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_fold_file(write_fold(tmp_path, text), fold=0)


def test_read_fold_file_rejects_non_utf8(tmp_path: Path) -> None:
    path = write_fold(tmp_path, HEADER + "\n" + ROW.replace("photo", "ph\u00f6to"), encoding="latin-1")
    with pytest.raises(ValueError, match="to be UTF-8 text, but decoding failed"):
        read_fold_file(path, fold=0)


def test_read_folds_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"fold_0_data\.txt' is missing"):
        read_folds(tmp_path, folds=[0])


# ---------------------------------------------------------------- data set


def test_dataset_image_shape_and_range(synthetic: SyntheticAdience) -> None:
    record = next(r for r in read_folds(synthetic.root) if r.group == 2)
    data = AdienceDataset(synthetic.root, [Sample(record.image_path(), 2)], size=24)
    image, group = data[0]
    assert image.shape == (3, 24, 24)
    assert image.dtype == torch.float32
    assert float(image.min()) >= -1.0
    assert float(image.max()) <= 1.0
    assert float(image.std()) > 0.05
    assert group == 2
    assert data.skipped == []


def test_dataset_crop_box_changes_image(synthetic: SyntheticAdience) -> None:
    path = read_folds(synthetic.root)[0].image_path("faces")
    data = AdienceDataset(synthetic.root, [Sample(path, 0), Sample(path, 0, (0.25, 0.25, 0.5, 0.5))], size=16)
    whole, cropped = data[0][0], data[1][0]
    assert cropped.shape == whole.shape
    assert not torch.allclose(whole, cropped)


def test_dataset_skips_missing_and_unreadable(
    synthetic: SyntheticAdience, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = read_folds(synthetic.root)[0].image_path()
    shutil.copytree(synthetic.root / "aligned", tmp_path / "aligned")
    (tmp_path / "aligned" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    samples = [Sample(good, 0), Sample(synthetic.missing, 1), Sample("aligned/broken.jpg", 1), Sample(good, 0)]
    data = AdienceDataset(tmp_path, samples, size=8, report_limit=1)

    with caplog.at_level(logging.WARNING, logger="efmap.reference.adience"):
        items = [data[i] for i in range(len(data))]
        data[1]  # a second failure of the same image is neither counted nor logged again
        data.report_skipped()
        data.report_skipped()  # nothing new since the last report, so nothing is logged

    assert items[1] is None
    assert items[2] is None
    assert data.skipped == [synthetic.missing, "aligned/broken.jpg"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"Skipping image {synthetic.missing}")
    assert messages[1].startswith(
        f"Skipped 2 of 4 images that are missing or unreadable; the first: {synthetic.missing}"
    )

    images, groups = collate_skipping(items)
    assert images.shape == (2, 3, 8, 8)
    assert groups.tolist() == [0, 0]
    empty_images, empty_groups = collate_skipping([None, None])
    assert empty_images.numel() == 0
    assert empty_groups.shape == (0,)


def test_dataset_rejects_bad_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Expected `size` to be a positive integer, but got 0"):
        AdienceDataset(tmp_path, [], size=0)


# ---------------------------------------------------------------- split


def test_split_balanced_with_doubled_old(synthetic: SyntheticAdience, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="efmap.reference.adience_split"):
        split = make_split(synthetic.root.parent, train_per_class=4, test_per_class=2, seed=3)

    assert split.counts() == {"train": {"minor": 4, "adult": 4, "old": 4}, "test": {"minor": 2, "adult": 2, "old": 2}}
    assert "Skipping 1 listed images that are missing" in caplog.text
    assert synthetic.missing in caplog.text
    everything = split.train + split.test
    assert all(s.path != synthetic.missing for s in everything)
    assert all((synthetic.root / s.path).is_file() for s in everything)

    # Groups with enough images use each original once; the old group uses each twice, whole and cropped.
    for part in (split.train, split.test):
        plain = [s for s in part if s.group < 2]
        assert all(s.crop is None for s in plain)
        assert len({s.path for s in plain}) == len(plain)
        old = [s for s in part if s.group == 2]
        assert sorted(s.path for s in old if s.crop is None) == sorted(s.path for s in old if s.crop is not None)
        for sample in old:
            if sample.crop is not None:
                left, top, width, height = sample.crop
                assert 0.8 <= width == height <= 0.95
                assert 0.0 <= left <= 1.0 - width
                assert 0.0 <= top <= 1.0 - height
    assert not {s.path for s in split.train} & {s.path for s in split.test}


def test_split_depends_on_seed_only(synthetic: SyntheticAdience) -> None:
    first = make_split(synthetic.root, train_per_class=4, test_per_class=2, seed=5)
    again = make_split(synthetic.root, train_per_class=4, test_per_class=2, seed=5)
    other = make_split(synthetic.root, train_per_class=4, test_per_class=2, seed=6)
    assert first == again
    assert first.train != other.train


def test_split_too_small_group(synthetic: SyntheticAdience) -> None:
    with pytest.raises(
        ValueError, match="Age group 'old' has 4 usable images, but 8 training and 2 test images need at least 5"
    ):
        make_split(synthetic.root, train_per_class=8, test_per_class=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_per_class": 0}, "Expected `train_per_class` to be a positive integer, but got 0"),
        ({"seed": -1}, "Expected `seed` to be a non-negative integer, but got -1"),
        ({"crop_scale": (0.9, 0.5)}, r"Expected `crop_scale` to be \(low, high\) with 0 < low <= high <= 1"),
    ],
)
def test_split_rejects_bad_settings(synthetic: SyntheticAdience, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_split(synthetic.root, **options)  # type: ignore[arg-type]


def test_split_file_reused_exactly(synthetic: SyntheticAdience, tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    split = load_or_make_split(path, synthetic.root, train_per_class=4, test_per_class=2, seed=1)
    written = path.stat().st_mtime_ns

    # A later run with the same settings reads the file instead of drawing again, even from a changed copy.
    copy = tmp_path / "copy"
    shutil.copytree(synthetic.root, copy)
    (copy / split.train[0].path).unlink()
    reused = load_or_make_split(path, copy, train_per_class=4, test_per_class=2, seed=1)
    assert reused == split
    assert path.stat().st_mtime_ns == written
    assert AdienceSplit.load(path) == split
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["groups"] == ["minor", "adult", "old"]
    assert len(document["train"]) == 12


def test_split_file_rejects_other_settings(synthetic: SyntheticAdience, tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    load_or_make_split(path, synthetic.root, train_per_class=4, test_per_class=2)
    with pytest.raises(ValueError, match="to match the requested settings .* but it was drawn with"):
        load_or_make_split(path, synthetic.root, train_per_class=4, test_per_class=2, seed=9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "to be JSON, but reading it failed"),
        ('{"format": "other"}', "to be an Adience split file"),
        ('{"format": "efmap.adience-split", "version": 7}', "Expected split file version 1"),
        ('{"format": "efmap.adience-split", "version": 1, "settings": {}}', "is damaged"),
    ],
)
def test_split_file_rejects_damage(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "split.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        AdienceSplit.load(path)


def test_split_file_rejects_escaping_path(synthetic: SyntheticAdience, tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    make_split(synthetic.root, train_per_class=4, test_per_class=2).save(path)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["test"][0][0] = "../../etc/passwd"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError, match="leaves the data root"):
        AdienceSplit.load(path)


# ---------------------------------------------------------------- scripts


def run_script(script: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(script), *options], env=script_env(), capture_output=True, text=True, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script.name} failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def script_env() -> dict[str, str]:
    """Environment that imports this efmap in the child and keeps it to one thread."""
    env = dict(os.environ)
    source = str(Path(efmap.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(synthetic: SyntheticAdience, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    run_script(TRAIN, "--root", str(synthetic.root.parent), "--out", str(out), "--epochs", "2", *TINY)
    return out


@pytest.fixture(scope="module")
def explained(synthetic: SyntheticAdience, trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explained")
    for name in ("checkpoint.pt", "split.json"):
        shutil.copy(trained / name, out / name)
    run_script(EXPLAIN, "--root", str(synthetic.root), "--out", str(out), "--threads", "1", "--num-random", "3")
    return out


def copy_training(trained: Path, out: Path) -> Path:
    out.mkdir()
    for name in ("checkpoint.pt", "split.json"):
        shutil.copy(trained / name, out / name)
    return out


def test_train_writes_outputs(trained: Path) -> None:
    checkpoint = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2]
    assert checkpoint["config"]["input_size"] == SIZE
    assert torch.tensor(checkpoint["history"][0]["confusion"]).sum() == 6
    assert checkpoint["history"][0]["train_images"] == 12
    assert json.loads((trained / "history.json").read_text(encoding="utf-8")) == checkpoint["history"]

    model = AgeResNet(input_size=SIZE)
    model.load_state_dict(torch.load(trained / "model.pt", weights_only=True))
    assert AdienceSplit.load(trained / "split.json").counts()["train"] == {"minor": 4, "adult": 4, "old": 4}
    log = (trained / "train.log").read_text(encoding="utf-8")
    assert "Epoch 2/2: training loss" in log
    assert "true \\ predicted" in log
    assert not list(trained.glob(".*.tmp"))


@pytest.mark.slow
def test_train_resume_matches_uninterrupted(synthetic: SyntheticAdience, trained: Path, tmp_path: Path) -> None:
    options = ["--root", str(synthetic.root), "--out", str(tmp_path), "--epochs", "2", *TINY]
    run_script(TRAIN, *options, "--stop-after", "1")
    stopped = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert stopped["epoch"] == 1
    assert not (tmp_path / "model.pt").exists()

    result = run_script(TRAIN, *options, "--resume")
    assert "Resuming from" in result.stderr
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    reference = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"] == reference["history"]
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)


def test_train_refuses_to_overwrite(synthetic: SyntheticAdience, trained: Path, tmp_path: Path) -> None:
    out = copy_training(trained, tmp_path / "run")
    script = load_script(TRAIN)
    with pytest.raises(SystemExit, match="checkpoint.pt exists. Pass --resume to continue that run"):
        script.main(["--root", str(synthetic.root), "--out", str(out), *TINY])


def test_train_resume_rejects_changed_options(synthetic: SyntheticAdience, trained: Path, tmp_path: Path) -> None:
    out = copy_training(trained, tmp_path / "run")
    script = load_script(TRAIN)
    with pytest.raises(SystemExit, match=r"these options differ from the checkpoint \(lr: 0.01 -> 0.5\)"):
        script.main(["--root", str(synthetic.root), "--out", str(out), "--resume", "--lr", "0.5", *TINY])


def test_train_rejects_missing_root(tmp_path: Path) -> None:
    script = load_script(TRAIN)
    with pytest.raises(SystemExit, match="error: Adience root .* does not exist or is not a folder"):
        script.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *TINY])


def test_train_rejects_bad_option(synthetic: SyntheticAdience, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script(TRAIN)
    with pytest.raises(SystemExit):
        script.main(["--root", str(synthetic.root), "--epochs", "0"])
    assert "--epochs must be a positive integer, but got 0" in capsys.readouterr().err


def test_explain_writes_outputs(synthetic: SyntheticAdience, explained: Path, one_thread: object) -> None:
    maps = sorted((explained / "maps").glob("*.pt"))
    assert len(maps) == 6
    merged = torch.load(explained / "merged.pt", weights_only=True)

    accumulator = efmap.HeatMapAccumulator()
    for path in maps:
        record = torch.load(path, weights_only=True)
        assert record["positive"].shape == (SIZE, SIZE)
        assert float(record["positive"].min()) >= 0.0
        accumulator.update(record["positive"][None].double(), labels=[record["label"]])
    assert accumulator.counts == {0: 2, 1: 2, 2: 2}
    torch.testing.assert_close(merged["overall"], accumulator.overall(), rtol=0, atol=1e-12)
    expected = efmap.select_landmarks(accumulator.overall(), keep_fraction=10810 / 16384)
    assert torch.equal(merged["landmarks"], expected.mask)
    assert int(merged["landmarks"].sum()) == round(10810 / 16384 * SIZE * SIZE)

    # A stored map equals a fresh explanation of the same test image with the same weights.
    checkpoint = torch.load(explained / "checkpoint.pt", weights_only=True)
    model = AgeResNet(input_size=SIZE)
    model.load_state_dict(checkpoint["model"])
    split = AdienceSplit.load(explained / "split.json")
    image, label = AdienceDataset(synthetic.root, split.test, size=SIZE)[3]
    fresh = efmap.explain(model.eval(), image[None], score="max")
    stored = torch.load(maps[3], weights_only=True)
    assert stored["label"] == label
    torch.testing.assert_close(stored["positive"], fresh.positive[0], rtol=1e-5, atol=1e-6)

    summary = json.loads((explained / "masked_accuracy.json").read_text(encoding="utf-8"))
    assert summary["images"] == 6
    assert summary["kept"] == int(merged["landmarks"].sum())
    assert len(summary["random"]) == 3
    table = (explained / "masked_accuracy.txt").read_text(encoding="utf-8")
    assert "landmarks only" in table
    assert "random masks (n=3)" in table
    assert (explained / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_explain_resume_after_stop_and_kill(
    synthetic: SyntheticAdience, trained: Path, explained: Path, tmp_path: Path
) -> None:
    out = copy_training(trained, tmp_path / "run")
    options = ["--root", str(synthetic.root), "--out", str(out), "--threads", "1", "--num-random", "3"]
    maps_dir = out / "maps"

    # First stop: the script ends itself after two images.
    run_script(EXPLAIN, *options, "--stop-after", "2")
    first = {p.name: p.stat().st_mtime_ns for p in maps_dir.glob("*.pt")}
    assert sorted(first) == ["000000.pt", "000001.pt"]
    assert not (out / "merged.pt").exists()

    # Second stop: SIGKILL once a third map exists, with small batches so that images remain.
    process = subprocess.Popen(
        [sys.executable, str(EXPLAIN), *options, "--batch-size", "4"],
        env=script_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while len(list(maps_dir.glob("*.pt"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    still_running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert still_running, "the run ended before it could be killed"
    killed = {p.name: p.stat().st_mtime_ns for p in maps_dir.glob("*.pt")}
    assert 3 <= len(killed) < 6
    assert not (out / "merged.pt").exists()

    result = run_script(EXPLAIN, *options)
    assert f"{len(killed)} of 6 test images already explained; explaining {6 - len(killed)}." in result.stderr
    final = {p.name: p.stat().st_mtime_ns for p in maps_dir.glob("*.pt")}
    assert len(final) == 6
    assert all(final[name] == stamp for name, stamp in killed.items())  # no finished image was explained again
    assert all(killed[name] == stamp for name, stamp in first.items())
    assert not list(maps_dir.glob(".*.tmp"))

    # The maps equal those of the uninterrupted run. Maps made with --batch-size 4 differ from those made
    # with 256 only by the float32 rounding of the convolutions.
    for name in final:
        resumed = torch.load(maps_dir / name, weights_only=True)
        reference = torch.load(explained / "maps" / name, weights_only=True)
        assert resumed["label"] == reference["label"]
        exact = name in first
        tolerance = 0.0 if exact else 1e-4 * float(reference["positive"].max())
        torch.testing.assert_close(resumed["positive"], reference["positive"], rtol=0, atol=tolerance, msg=name)
    merged = torch.load(out / "merged.pt", weights_only=True)
    assert merged["accumulator"]["counts"].tolist() == [2, 2, 2]
    expected = torch.load(explained / "merged.pt", weights_only=True)["overall"]
    torch.testing.assert_close(merged["overall"], expected, rtol=0, atol=1e-4)


def test_explain_rejects_other_checkpoint(synthetic: SyntheticAdience, explained: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(explained, out)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    checkpoint["model"]["fc.bias"] += 1.0
    torch.save(checkpoint, out / "checkpoint.pt")
    script = load_script(EXPLAIN)
    with pytest.raises(SystemExit, match="were computed with another checkpoint_sha256. Delete that folder"):
        script.main(["--root", str(synthetic.root), "--out", str(out)])


def test_explain_needs_checkpoint(synthetic: SyntheticAdience, tmp_path: Path) -> None:
    script = load_script(EXPLAIN)
    with pytest.raises(SystemExit, match="checkpoint.pt not found; train first with train_age_resnet.py"):
        script.main(["--root", str(synthetic.root), "--out", str(tmp_path)])


def test_explain_images_skips_unreadable(
    synthetic: SyntheticAdience, tmp_path: Path, caplog: pytest.LogCaptureFixture, one_thread: object
) -> None:
    script = load_script(EXPLAIN)
    args = script.parse_args(["--root", str(synthetic.root), "--batch-size", "64"])
    torch.manual_seed(0)
    model = AgeResNet(input_size=8).eval()
    good = read_folds(synthetic.root)[0].image_path()
    data = AdienceDataset(synthetic.root, [Sample(synthetic.missing, 1), Sample(good, 0)], size=8)

    with caplog.at_level(logging.INFO):
        assert script.explain_images(args, model, data, tmp_path)
        assert script.explain_images(args, model, data, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.skipped.json", "000001.pt"]
    assert json.loads((tmp_path / "000000.skipped.json").read_text(encoding="utf-8")) == {"path": synthetic.missing}
    assert "0 of 2 test images already explained; explaining 2." in caplog.text
    assert "2 of 2 test images already explained; explaining 0." in caplog.text
    assert "1 test images could not be read and have no map" in caplog.text
    stored = torch.load(tmp_path / "000001.pt", weights_only=True)
    assert stored["positive"].shape == (8, 8)
    assert stored["path"] == good
