"""Resuming explain_dataset after a real SIGKILL, and rejecting a resume with other arguments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import efmap
from _dataset_worker import CHUNK_SIZE, NUM_IMAGES, build, run_options
from efmap._checkpoint import model_digest
from efmap._rundir import ResumeError

WORKER = Path(__file__).with_name("_dataset_worker.py")
SOURCE_ROOT = Path(efmap.__file__).resolve().parents[1]
NUM_BLOCKS = -(-NUM_IMAGES // CHUNK_SIZE)


@pytest.fixture(autouse=True)
def one_thread():
    """Run with one thread like the worker, so that forward passes match bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the worker's model and data set."""
    out_dir = tmp_path_factory.mktemp("reference")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data = build()
        efmap.explain_dataset(model, data, out_dir=out_dir, **run_options())
    finally:
        torch.set_num_threads(before)
    return out_dir


def start_worker(out_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), str(WORKER.parent)])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out_dir), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_blocks(out_dir: Path) -> int | None:
    state_path = out_dir / "state-rank0.pt"
    if not state_path.exists():
        return None
    return int(torch.load(state_path, weights_only=True)["blocks_done"])


def resume(out_dir: Path) -> list[efmap.RunProgress]:
    """Finish the run in this process and return the progress it reported."""
    reports: list[efmap.RunProgress] = []
    model, data = build()
    efmap.explain_dataset(model, data, out_dir=out_dir, progress=reports.append, **run_options())
    return reports


def assert_same_run(out_dir: Path, reference: Path) -> None:
    for name in ("maps.npy", "targets.npy", "labels.npy"):
        assert (out_dir / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    state = torch.load(out_dir / "accumulator.pt", weights_only=True)
    expected = torch.load(reference / "accumulator.pt", weights_only=True)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), f"accumulator {key} differs"
        else:
            assert state[key] == value, f"accumulator {key} differs"
    assert not list(out_dir.glob(".efmap-tmp-*")), "temporary files were left behind"


# (kill point, blocks committed when the process dies: None means run.json was never written)
KILL_POINTS = [
    ("forward:25", 2),  # ten forward passes per chunk, so the 25th is in the middle of the third chunk
    ("commit:2", 1),
    ("rename:2", 1),
    ("renamed:3", 3),
    ("prepare:1", None),
    ("result:1", NUM_BLOCKS),
]


@pytest.mark.parametrize(("point", "blocks"), KILL_POINTS, ids=[point for point, _ in KILL_POINTS])
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, reference, point, blocks):
    worker = start_worker(tmp_path, "--kill", point)
    _, stderr = worker.communicate(timeout=120)

    assert worker.returncode == -signal.SIGKILL, stderr
    assert committed_blocks(tmp_path) == blocks
    assert (tmp_path / "run.json").exists() == (blocks is not None)
    assert not (tmp_path / "accumulator.pt").exists()

    reports = resume(tmp_path)

    first_done = reports[0].images_done if reports else NUM_IMAGES
    assert first_done == min(NUM_IMAGES, (blocks or 0) * CHUNK_SIZE), "committed images were explained again"
    assert_same_run(tmp_path, reference)


def test_resume_after_external_sigkill(tmp_path, reference):
    worker = start_worker(tmp_path, "--report")
    assert worker.stdout is not None
    for line in worker.stdout:
        if line.strip() == "images 6":
            worker.send_signal(signal.SIGKILL)
            break
    worker.communicate(timeout=120)
    assert worker.returncode == -signal.SIGKILL

    resume(tmp_path)

    assert_same_run(tmp_path, reference)


def test_resume_of_finished_run_runs_no_forward_pass(tmp_path, reference):
    model, data = build()
    efmap.explain_dataset(model, data, out_dir=tmp_path, **run_options())
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))

    result = efmap.explain_dataset(model, data, out_dir=tmp_path, **run_options())

    assert calls == []
    assert result.accumulator.counts == {0: 4, 1: 4, 2: 3}
    assert_same_run(tmp_path, reference)


@pytest.fixture
def finished_run(tmp_path) -> Path:
    model, data = build()
    efmap.explain_dataset(model, data, out_dir=tmp_path, **run_options())
    return tmp_path


def test_resume_rejected_for_changed_weights(finished_run):
    model, data = build()
    with torch.no_grad():
        model.fc.bias[0] += 1e-3
    with pytest.raises(ValueError, match=r"Cannot resume the run in .*model weights \(SHA-256 of the state_dict"):
        efmap.explain_dataset(model, data, out_dir=finished_run, **run_options())


def test_resume_rejected_for_changed_dataset_length(finished_run):
    model, data = build(NUM_IMAGES - 1)
    with pytest.raises(ValueError, match=rf"data set length: {NUM_IMAGES} in the saved run, {NUM_IMAGES - 1} now"):
        efmap.explain_dataset(model, data, out_dir=finished_run, **run_options())


def test_resume_rejection_lists_changed_options(finished_run):
    model, data = build()
    options = {**run_options(), "chunk_size": 2, "patch_size": 2, "batch_size": 5}
    with pytest.raises(
        ValueError, match=r"chunk_size: 3 in the saved run, 2 now; patch_size: None .* 2 now\)\."
    ) as raised:
        efmap.explain_dataset(model, data, out_dir=finished_run, **options)
    assert "batch_size" not in str(raised.value)


def test_resume_rejection_is_a_resume_error(finished_run):
    model, data = build()
    with pytest.raises(
        ResumeError, match=r"patch_size: None in the saved run, 2 now\)\. Pass overwrite=True"
    ) as raised:
        efmap.explain_dataset(model, data, out_dir=finished_run, **{**run_options(), "patch_size": 2})
    assert raised.value.message("--overwrite", "--out").endswith(
        "Pass --overwrite to discard it and start again, or choose another --out."
    )


class StopAfterImages(Exception):
    """Raised from a progress callback to interrupt a run."""


def test_resume_with_other_batch_size(tmp_path, reference):
    model, data = build()

    def stop(progress: efmap.RunProgress) -> None:
        if progress.images_done >= 2 * CHUNK_SIZE:
            raise StopAfterImages

    with pytest.raises(StopAfterImages):
        efmap.explain_dataset(model, data, out_dir=tmp_path, progress=stop, **run_options())
    assert committed_blocks(tmp_path) == 2

    result = efmap.explain_dataset(model, data, out_dir=tmp_path, **{**run_options(), "batch_size": 5})

    assert result.images_explained == NUM_IMAGES - 2 * CHUNK_SIZE
    # Batches of another size may round differently, so the resumed maps match up to float32 rounding.
    np.testing.assert_allclose(np.load(tmp_path / "maps.npy"), np.load(reference / "maps.npy"), rtol=0, atol=1e-6)
    assert (tmp_path / "targets.npy").read_bytes() == (reference / "targets.npy").read_bytes()


def test_images_explained_counts_this_call(tmp_path):
    model, data = build()
    first = efmap.explain_dataset(model, data, out_dir=tmp_path, **run_options())
    again = efmap.explain_dataset(model, data, out_dir=tmp_path, **run_options())
    without_dir = efmap.explain_dataset(model, data, **{**run_options(), "store_maps": False})
    assert (first.images_explained, again.images_explained, without_dir.images_explained) == (NUM_IMAGES, 0, NUM_IMAGES)


def test_saved_accumulator_records_map_options(finished_run):
    state = torch.load(finished_run / "accumulator.pt", weights_only=True)
    options = state["run_options"]
    model, _ = build()
    assert options["model"] == model_digest(model)
    assert options["input_shape"] == [1, 8, 8]
    assert options["map_shape"] == [8, 8]
    assert options["score"] == "max"
    assert options["labels_from"] == "dataset"
    assert options["value_range"] == [-1.0, 1.0]
    assert options["patch_size"] is None
    assert "batch_size" not in options
    accumulator = efmap.HeatMapAccumulator(normalize="minmax")
    accumulator.load_state_dict(state)
    assert accumulator.counts == {0: 4, 1: 4, 2: 3}


def test_resume_rejection_leaves_run_untouched(finished_run):
    before = {path.name: path.read_bytes() for path in finished_run.iterdir()}
    model, data = build()
    with pytest.raises(ValueError, match="overwrite=True"):
        efmap.explain_dataset(model, data, out_dir=finished_run, **{**run_options(), "score": "target"})
    after = {path.name: path.read_bytes() for path in finished_run.iterdir()}
    assert after == before


def test_overwrite_starts_again(finished_run):
    model, data = build()
    options = {**run_options(), "chunk_size": 5}
    result = efmap.explain_dataset(model, data, out_dir=finished_run, overwrite=True, **options)
    assert result.accumulator.counts == {0: 4, 1: 4, 2: 3}
    assert committed_blocks(finished_run) == 3


def test_resume_rejects_foreign_checkpoint(finished_run):
    torch.save({"fingerprint": "0" * 64, "blocks_done": 1, "accumulator": {}}, finished_run / "state-rank0.pt")
    model, data = build()
    with pytest.raises(ValueError, match="to be a checkpoint of this run, but its fingerprint differs"):
        efmap.explain_dataset(model, data, out_dir=finished_run, **run_options())


def test_resume_rejects_missing_store(finished_run):
    (finished_run / "maps.npy").unlink()
    model, data = build()
    with pytest.raises(ValueError, match=r"to contain maps.npy, but it is missing"):
        efmap.explain_dataset(model, data, out_dir=finished_run, **run_options())


def test_store_is_a_lazy_read_only_memmap(finished_run):
    model, data = build()
    result = efmap.explain_dataset(model, data, out_dir=finished_run, **run_options())
    assert isinstance(result.maps, np.memmap)
    assert result.maps.shape == (NUM_IMAGES, 8, 8)
    assert not result.maps.flags.writeable
    direct = efmap.explain(model, data[0][0][None], batch_size=24)
    torch.testing.assert_close(torch.from_numpy(np.array(result.maps[0])), direct.positive[0], rtol=0, atol=1e-6)
