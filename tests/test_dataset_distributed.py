"""Two ranks on the gloo backend give the same result as one process, bit for bit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import efmap
from _dataset_worker import NUM_IMAGES, build, run_options

WORKER = Path(__file__).with_name("_dataset_worker.py")
SOURCE_ROOT = Path(efmap.__file__).resolve().parents[1]

# Two extra Python processes that import torch take several seconds on a busy machine.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_two_ranks(out_dir: Path, *args: str) -> list[tuple[int, str]]:
    """Start two ranks of the worker the way torchrun would, through environment variables.

    Returns the exit code and standard error of each rank.
    """
    port = free_port()
    workers = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), str(WORKER.parent)]),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        command = [sys.executable, str(WORKER), str(out_dir), "--distributed", *args]
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [worker.communicate(timeout=120) for worker in workers]
    return [(worker.returncode, stderr) for worker, (_, stderr) in zip(workers, outputs, strict=True)]


def run_two_ranks(out_dir: Path) -> None:
    for rank, (code, stderr) in enumerate(start_two_ranks(out_dir)):
        assert code == 0, f"rank {rank} failed:\n{stderr}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, efmap.DatasetExplanation]:
    single = tmp_path_factory.mktemp("single")
    double = tmp_path_factory.mktemp("double")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data = build()
        result = efmap.explain_dataset(model, data, out_dir=single, **run_options())
    finally:
        torch.set_num_threads(before)
    run_two_ranks(double)
    return single, double, result


def test_two_ranks_store_equals_one_process(runs):
    single, double, _ = runs
    for name in ("maps.npy", "targets.npy", "labels.npy"):
        assert (double / name).read_bytes() == (single / name).read_bytes(), f"{name} differs"


def test_two_ranks_accumulator_equals_one_process(runs):
    single, double, result = runs
    state = torch.load(double / "accumulator.pt", weights_only=True)
    expected = result.accumulator.state_dict()
    for key in ("labels", "counts", "sums", "maxima"):
        assert torch.equal(state[key], expected[key]), f"{key} differs"


def test_two_ranks_each_commit_their_own_share(runs):
    _, double, _ = runs
    # Eleven images in chunks of three are four blocks: rank 0 takes blocks 0 and 2, rank 1 blocks 1 and 3.
    for rank in range(2):
        state = torch.load(double / f"state-rank{rank}.pt", weights_only=True)
        assert state["blocks_done"] == 2
        assert int(state["accumulator"]["counts"].sum()) == (6 if rank == 0 else 5)


def test_two_ranks_without_out_dir_reduce_rows(runs):
    _, double, result = runs
    memory = torch.load(double / "memory.pt", weights_only=True)
    assert np.array_equal(memory["targets"].numpy(), np.asarray(result.targets))
    assert np.array_equal(memory["labels"].numpy(), np.arange(NUM_IMAGES) % 3)
    for key in ("labels", "counts", "sums", "maxima"):
        assert torch.equal(memory["state"][key], result.accumulator.state_dict()[key]), f"{key} differs"


def test_single_process_rejects_two_rank_run(runs):
    _, double, _ = runs
    model, data = build()
    with pytest.raises(ValueError, match=r"world size \(number of ranks\): 2 in the saved run, 1 now"):
        efmap.explain_dataset(model, data, out_dir=double, **run_options())


def test_ranks_with_different_weights_rejected(tmp_path):
    results = start_two_ranks(tmp_path, "--perturb-rank", "1")
    for rank, (code, stderr) in enumerate(results):
        assert code != 0, f"rank {rank} accepted different weights"
        assert "same model, data set and options, but rank 1 differs from rank 0" in stderr
    assert not (tmp_path / "run.json").exists(), "the run started although the ranks disagree"
