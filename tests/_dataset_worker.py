"""Run explain_dataset on a fixed tiny model and data set, as a subprocess of the tests.

Usage: ``python _dataset_worker.py OUT_DIR [--kill POINT:N] [--chunks-before-exit K] [--distributed]``.

``--kill POINT:N`` sends SIGKILL to this process at the N-th occurrence (from 1) of POINT:

- ``forward``: a forward pass of the model, in the middle of a chunk;
- ``commit``: after a chunk's rows are written and flushed, before its checkpoint is written;
- ``rename``: after a checkpoint's temporary file is fsynced, before it is renamed into place;
- ``renamed``: after the rename, before the directory is fsynced;
- ``prepare``: after the stores are created, before run.json is written;
- ``result``: after every chunk is committed, before accumulator.pt is written.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
from pathlib import Path

import torch

NUM_IMAGES = 11
CHUNK_SIZE = 3
BATCH_SIZE = 24


class TinyNet(torch.nn.Module):
    """A small convolutional classifier for 1x8x8 inputs with 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def build(num_images: int = NUM_IMAGES) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    """Return the seeded model and a data set of (image, label) pairs in [-1, 1]."""
    generator = torch.Generator().manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    images = torch.rand(num_images, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.arange(num_images) % 3
    return model.eval(), torch.utils.data.TensorDataset(images, labels)


def run_options() -> dict[str, object]:
    """Options shared by the subprocess runs and the in-process reference runs."""
    return {"store_maps": True, "labels_from": "dataset", "chunk_size": CHUNK_SIZE, "batch_size": BATCH_SIZE}


def _kill_on(count: int):
    calls = {"n": 0}

    def tick() -> None:
        calls["n"] += 1
        if calls["n"] == count:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return tick


def _install_kill(spec: str, model: torch.nn.Module) -> None:
    import efmap._checkpoint
    import efmap._rundir
    import efmap.dataset

    point, count = spec.split(":")
    tick = _kill_on(int(count))
    if point == "forward":
        model.register_forward_pre_hook(lambda module, args: tick())
    elif point == "commit":
        original_commit = efmap._rundir.RunDirectory.commit

        def commit(self, *args, **kwargs):
            tick()
            return original_commit(self, *args, **kwargs)

        efmap._rundir.RunDirectory.commit = commit
    elif point in ("rename", "renamed"):
        original_replace = os.replace

        def replace(source, destination):
            is_state = Path(destination).name.startswith("state-rank")
            if is_state and point == "rename":
                tick()
            original_replace(source, destination)
            if is_state and point == "renamed":
                tick()

        os.replace = replace
    elif point == "prepare":
        original_write = efmap._rundir.atomic_write_json

        def write_json(obj, path):
            tick()
            return original_write(obj, path)

        efmap._rundir.atomic_write_json = write_json
    elif point == "result":
        original_save = efmap.dataset.atomic_save

        def save(obj, path):
            tick()
            return original_save(obj, path)

        efmap.dataset.atomic_save = save
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill", default=None)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--report", action="store_true", help="print a line after every chunk")
    parser.add_argument("--perturb-rank", type=int, default=None, help="change the weights on this rank")
    args = parser.parse_args()

    torch.set_num_threads(1)
    import efmap

    model, data = build()
    if args.kill:
        _install_kill(args.kill, model)
    if args.distributed:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        if torch.distributed.get_rank() == args.perturb_rank:
            with torch.no_grad():
                model.fc.bias[0] += 1.0

    printed = set()

    def report(progress: efmap.RunProgress) -> None:
        if progress.images_done not in printed:
            printed.add(progress.images_done)
            print(f"images {progress.images_done}", flush=True)

    result = efmap.explain_dataset(
        model, data, out_dir=args.out_dir, progress=report if args.report else False, **run_options()
    )
    if args.distributed:
        # A second run without out_dir checks the in-memory reduction of targets and labels.
        memory = efmap.explain_dataset(model, data, **{**run_options(), "store_maps": False})
        if torch.distributed.get_rank() == 0:
            torch.save(
                {
                    "state": memory.accumulator.state_dict(),
                    "targets": torch.from_numpy(memory.targets.copy()),
                    "labels": torch.from_numpy(memory.labels.copy()),
                },
                Path(args.out_dir) / "memory.pt",
            )
        torch.distributed.destroy_process_group()
    print("finished", result.accumulator.counts, flush=True)


if __name__ == "__main__":
    main()
