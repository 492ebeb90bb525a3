"""Crash-safe files for resumable runs: atomic writes, preallocated ``.npy`` stores and run fingerprints.

Every commit writes a temporary file in the target directory, flushes and
fsyncs it, renames it over the target with :func:`os.replace` and fsyncs the
directory. A process killed at any moment therefore leaves either the old or
the new version of a file, never a mixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

#: Prefix of temporary files; a killed run can leave them behind, and the next fresh start removes them.
TEMP_PREFIX = ".efmap-tmp-"


def fsync_directory(directory: Path) -> None:
    """Persist the directory entry of a renamed file (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it appears complete or not at all."""
    temporary = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    fsync_directory(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    """Save ``obj`` with :func:`torch.save` atomically."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def write(handle: BinaryIO) -> None:
        handle.write(data)

    atomic_write(path, write)


def create_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype[Any], fill: float | int) -> None:
    """Create a ``.npy`` file of ``shape`` filled with ``fill``, atomically.

    The file is written in slabs so that creating a large store never needs
    the whole array in memory.
    """
    temporary = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        if fill != 0 and array.size:
            rows = max(1, (1 << 24) // max(1, array[0].nbytes))
            for start in range(0, shape[0], rows):
                array[start : start + rows] = fill
        array.flush()
        del array
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    fsync_directory(path.parent)


def remove_temporaries(directory: Path) -> None:
    """Delete temporary files that a killed run left in ``directory``."""
    for leftover in directory.glob(f"{TEMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def tensor_digest(tensor: torch.Tensor, digest: Any = None) -> Any:
    """Feed dtype, shape and raw bytes of ``tensor`` into a SHA-256 object and return it."""
    digest = digest or hashlib.sha256()
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    # A byte view works for every dtype, bfloat16 included, which numpy cannot represent.
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest


def model_digest(model: Any) -> str:
    """Return a SHA-256 hex digest of a module's ``state_dict`` (names, dtypes, shapes and values).

    A plain callable has no state to hash, so its qualified name is returned instead.
    """
    if not isinstance(model, torch.nn.Module):
        # NOTE: the weights a plain function closes over cannot be hashed, so changing them goes undetected.
        name = getattr(model, "__qualname__", type(model).__qualname__)
        return f"callable:{name}"
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor_digest(value, digest)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """Read a JSON file, raising ValueError that names the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Expected `{path}` to be a JSON file written by efmap, but it is invalid: {error}.") from None
