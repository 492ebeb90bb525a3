"""Collective operations for runs split across ``torch.distributed`` ranks.

Every helper is a no-op in a single process, so callers need no branches.
Accumulator sums are reduced with ``all_reduce``. The maps fed to them lie on a
fixed grid (see :func:`efmap.explain_dataset`), so float64 addition is exact
and does not depend on the order in which ranks combine.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

from efmap.merge import HeatMapAccumulator


def rank_and_world() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo and the other backends take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank arrives."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_code(code: int) -> int:
    """Send rank 0's ``code`` to every rank and return it."""
    if rank_and_world()[1] == 1:
        return code
    tensor = torch.tensor([code], dtype=torch.int64, device=_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def first_disagreeing_rank(text: str) -> int | None:
    """Return the lowest rank whose ``text`` differs from rank 0's, or None when all agree."""
    world = rank_and_world()[1]
    if world == 1:
        return None
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    local = torch.tensor([value], dtype=torch.int64, device=_device())
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    values = [int(t.item()) for t in gathered]
    return next((rank for rank, other in enumerate(values) if other != values[0]), None)


def reduce_accumulator(accumulator: HeatMapAccumulator, map_shape: tuple[int, ...]) -> HeatMapAccumulator:
    """Return an accumulator holding the union of every rank's state, identical on all ranks.

    Counts and sums are added and maxima combined with ``all_reduce``. Classes
    are laid out densely up to the largest label seen on any rank, so ranks
    that saw different classes line up.
    """
    if rank_and_world()[1] == 1:
        return accumulator
    device = _device()
    state = accumulator.state_dict()
    labels = state["labels"]

    size = torch.tensor([int(labels.max()) + 1 if labels.numel() else 0], dtype=torch.int64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    num_classes = int(size.item())
    counts = torch.zeros(num_classes, dtype=torch.int64)
    sums = torch.zeros((num_classes, *map_shape), dtype=torch.float64)
    maxima = torch.full((num_classes, *map_shape), -torch.inf, dtype=torch.float64)
    counts[labels] = state["counts"]
    if labels.numel():
        sums[labels] = state["sums"]
        maxima[labels] = state["maxima"]

    counts, sums, maxima = counts.to(device), sums.to(device), maxima.to(device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)

    present = torch.nonzero(counts.cpu() > 0).flatten()
    merged = HeatMapAccumulator(accumulator.reduction, normalize=accumulator.normalize, dims=accumulator.dims)
    merged.load_state_dict(
        {
            "reduction": accumulator.reduction,
            "normalize": accumulator.normalize,
            "dims": accumulator.dims,
            "labels": present,
            "counts": counts.cpu()[present],
            "sums": sums.cpu()[present] if present.numel() else torch.zeros((0, *map_shape), dtype=torch.float64),
            "maxima": maxima.cpu()[present] if present.numel() else torch.zeros((0, *map_shape), dtype=torch.float64),
        }
    )
    return merged


def reduce_rows(array: np.ndarray, missing: int) -> np.ndarray:
    """Combine per-image int64 rows that each rank filled for its own images; other rows hold ``missing``."""
    if rank_and_world()[1] == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(_device())
    # Filled rows are at least ``missing`` and every row is filled on exactly one rank, so MAX picks it.
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    result: np.ndarray = tensor.cpu().numpy()
    return result
