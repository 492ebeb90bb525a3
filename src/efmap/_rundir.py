"""The directory of a resumable run: its fingerprint, per-rank checkpoints and per-image stores.

Layout of a run directory::

    run.json            fingerprint of the arguments, number of images, map shape
    state-rank{r}.pt    rank r's committed progress and accumulator state
    targets.npy         explained class per image, int64 (N,), -1 until written
    labels.npy          data set label per image, int64 (N,), -1 where there is none
    maps.npy            positive map per image, float32 (N, *map_shape), only with store_maps
    accumulator.pt      the merged accumulator state, written when the run finishes; its "run_options"
                        entry records the options that define the maps (see ``map_options``)

A fresh start deletes ``run.json`` first and writes it last, so a directory
with a ``run.json`` always has complete, preallocated stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from efmap._checkpoint import atomic_save, atomic_write_json, create_npy, read_json, remove_temporaries
from efmap._distributed import broadcast_code
from efmap.merge import HeatMapAccumulator

CONFIG_NAME = "run.json"
ACCUMULATOR_NAME = "accumulator.pt"
STORE_NAMES = ("targets.npy", "labels.npy", "maps.npy")

#: Description of each fingerprint entry, in the order in which differences are reported.
FINGERPRINT_LABELS = {
    "model": "model weights (SHA-256 of the state_dict tensors)",
    "dataset_length": "data set length",
    "first_input": "first input (SHA-256)",
    "input_shape": "input shape",
    "score": "score",
    "target": "target",
    "labels_from": "labels_from",
    "chunk_size": "chunk_size",
    "value_range": "value_range",
    "patch_size": "patch_size",
    "feature_mask": "feature_mask (SHA-256)",
    "output_fn": "output_fn",
    "reduction": "reduction",
    "store_maps": "store_maps",
    "world_size": "world size (number of ranks)",
    "efmap_version": "efmap version",
    "map_shape": "map shape",
}

#: Key of the saved accumulator state under which :func:`map_options` are stored.
RUN_OPTIONS_KEY = "run_options"

#: Fingerprint entries that define what the maps mean. Runs that differ in any of them must not be merged.
MAP_KEYS = (
    "model", "input_shape", "score", "target", "labels_from", "value_range", "patch_size", "feature_mask", "output_fn",
)  # fmt: skip


class ResumeError(ValueError):
    """A run directory that cannot be resumed.

    ``reason`` gives the cause, without the fix. The fix names an option, which the
    Python API and the command line spell differently, so :meth:`message`
    builds it from the spelling of the caller.
    """

    def __init__(self, reason: str, *, other_dir: bool) -> None:
        self.reason = reason
        self.other_dir = other_dir
        super().__init__(self.message("overwrite=True", "out_dir"))

    def message(self, overwrite: str, out_dir: str) -> str:
        """Return the message with the fix spelt as ``overwrite`` and ``out_dir``, e.g. ``"--overwrite"``."""
        if self.other_dir:
            return f"{self.reason} Pass {overwrite} to discard it and start again, or choose another {out_dir}."
        return f"{self.reason} Pass {overwrite} to start the run again."


def map_options(fingerprint: dict[str, Any], map_shape: tuple[int, ...]) -> dict[str, Any]:
    """Return the fingerprint entries that define the maps, and the map shape, for the saved accumulator."""
    options = {key: fingerprint[key] for key in MAP_KEYS}
    options["map_shape"] = list(map_shape)
    return options


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """Return a SHA-256 hex digest of a fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def describe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """List every fingerprint entry that differs, as ``"what: X in the saved run, Y now"``."""
    differences = []
    for key in dict.fromkeys([*FINGERPRINT_LABELS, *saved, *current]):
        before, after = saved.get(key), current.get(key)
        if before != after:
            label = FINGERPRINT_LABELS.get(key, key)
            differences.append(f"{label}: {short_repr(before)} in the saved run, {short_repr(after)} now")
    return differences


def short_repr(value: Any) -> str:
    """Return ``repr(value)``, with a SHA-256 hex digest cut to its first 12 characters."""
    # Hex digests are long; their first 12 characters identify them well enough in a message.
    if isinstance(value, str) and len(value) == 64:
        return repr(value[:12] + "...")
    return repr(value)


class RunDirectory:
    """Files of one run as seen from one rank."""

    def __init__(self, path: Path, rank: int, world_size: int) -> None:
        self.path = path
        self.rank = rank
        self.world_size = world_size
        self.config = path / CONFIG_NAME
        self.state = path / f"state-rank{rank}.pt"
        self.result = path / ACCUMULATOR_NAME

    def prepare(
        self,
        fingerprint: dict[str, Any],
        *,
        overwrite: bool,
        num_images: int,
        map_shape: tuple[int, ...],
        store_maps: bool,
    ) -> None:
        """Start the run afresh or accept it for resuming, on all ranks together.

        Rank 0 inspects and, when starting afresh, creates the files; the
        other ranks wait for its decision.

        Raises
        ------
        ResumeError
            If the directory contains a run started with other arguments and ``overwrite`` is False.
        RuntimeError
            If rank 0 failed to prepare the directory, or another rank cannot see its files.
        """
        code, failure = 0, None
        if self.rank == 0:
            try:
                code = self._prepare_files(fingerprint, overwrite, num_images, map_shape, store_maps)
            except Exception as error:  # every rank must learn of the failure, or the others would wait forever
                code, failure = 2, error
        code = broadcast_code(code)

        if failure is not None:
            raise failure
        if code == 2:
            raise RuntimeError(f"Rank 0 failed to prepare the run directory {self.path}; see its error message.")
        if code == 1:
            differences = describe_differences(read_json(self.config)["fingerprint"], fingerprint)
            raise ResumeError(
                f"Cannot resume the run in {self.path}: it was started with other arguments ("
                + "; ".join(differences)
                + ").",
                other_dir=True,
            )
        if not self.config.exists():
            raise RuntimeError(
                f"Rank {self.rank} cannot see {self.config}, which rank 0 wrote. With several ranks, out_dir "
                "must be a directory that every rank shares."
            )

    def _prepare_files(
        self,
        fingerprint: dict[str, Any],
        overwrite: bool,
        num_images: int,
        map_shape: tuple[int, ...],
        store_maps: bool,
    ) -> int:
        """Return 0 when the directory is ready, 1 when it contains a run with other arguments."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.exists() and not overwrite:
            saved = read_json(self.config)
            if describe_differences(saved.get("fingerprint", {}), fingerprint):
                return 1
            for name in STORE_NAMES[: 3 if store_maps else 2]:
                if not (self.path / name).exists():
                    raise ResumeError(
                        f"Expected the run directory {self.path} to contain {name}, but it is missing.",
                        other_dir=False,
                    )
            # No rank has started writing yet, so every temporary file left here belongs to a killed run.
            remove_temporaries(self.path)
            return 0

        # Deleting run.json first means a crash during the cleanup below leaves a directory that starts afresh.
        with contextlib.suppress(FileNotFoundError):
            self.config.unlink()
        for stale in [*self.path.glob("state-rank*.pt"), self.path / ACCUMULATOR_NAME]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        for name in STORE_NAMES:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        remove_temporaries(self.path)

        create_npy(self.path / "targets.npy", (num_images,), np.dtype(np.int64), -1)
        create_npy(self.path / "labels.npy", (num_images,), np.dtype(np.int64), -1)
        if store_maps:
            create_npy(self.path / "maps.npy", (num_images, *map_shape), np.dtype(np.float32), 0)
        record = {"fingerprint": fingerprint, "num_images": num_images, "map_shape": list(map_shape)}
        atomic_write_json(record, self.config)
        return 0

    def load_state(self, accumulator: HeatMapAccumulator, digest: str, num_blocks: int) -> int:
        """Load this rank's committed accumulator state and return how many of its blocks are done.

        Returns 0, leaving the accumulator empty, when the rank has committed nothing yet.
        """
        if not self.state.exists():
            return 0
        state = torch.load(self.state, weights_only=True)
        if not isinstance(state, dict) or state.get("fingerprint") != digest:
            raise ResumeError(
                f"Expected {self.state} to be a checkpoint of this run, but its fingerprint differs.",
                other_dir=False,
            )
        blocks_done = int(state["blocks_done"])
        if not 0 <= blocks_done <= num_blocks:
            raise ValueError(f"Expected at most {num_blocks} committed blocks in {self.state}, but got {blocks_done}.")
        accumulator.load_state_dict(state["accumulator"])
        return blocks_done

    def commit(self, blocks_done: int, accumulator: HeatMapAccumulator, digest: str) -> None:
        """Record ``blocks_done`` and the accumulator atomically; the stores must be flushed first."""
        state = {"fingerprint": digest, "blocks_done": blocks_done, "accumulator": accumulator.state_dict()}
        atomic_save(state, self.state)

    def open_stores(self, *, writable: bool, store_maps: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Open ``targets``, ``labels`` and (with ``store_maps``) ``maps`` as memory maps."""
        mode: Literal["r+", "r"] = "r+" if writable else "r"
        targets = np.load(self.path / "targets.npy", mmap_mode=mode)
        labels = np.load(self.path / "labels.npy", mmap_mode=mode)
        maps = np.load(self.path / "maps.npy", mmap_mode=mode) if store_maps else None
        return targets, labels, maps
