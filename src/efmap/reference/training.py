"""A small, deterministic training loop for the reference examples."""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["fit"]

logger = logging.getLogger(__name__)


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` with SGD and momentum on in-memory data, with a cosine learning-rate schedule.

    Batches are drawn in a seeded random order, so a run is repeatable on the
    same machine and PyTorch build. The model is left in eval mode.

    Parameters
    ----------
    model
        Classifier from ``(N, ...)`` to class scores ``(N, K)``.
    inputs, labels
        Training inputs ``(N, ...)`` and integer labels ``(N,)``.
    epochs, batch_size, lr, momentum, weight_decay
        Optimisation settings.
    seed
        Seed of the batch order.

    Returns
    -------
    list[float]
        Mean training loss of every epoch.

    Raises
    ------
    ValueError
        If ``inputs`` and ``labels`` differ in length.

    Examples
    --------
    >>> import torch
    >>> from efmap.reference.training import fit
    >>> model = torch.nn.Linear(2, 2)
    >>> inputs = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 1)
    >>> losses = fit(model, inputs, torch.tensor([0, 1]).repeat(8), epochs=10, batch_size=4)
    >>> len(losses), losses[-1] < losses[0], model.training
    (10, True, False)
    """
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"Expected one label per input ({inputs.shape[0]}), but got {labels.shape[0]}.")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()

    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        total = 0.0
        for start in range(0, inputs.shape[0], batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[rows]), labels[rows])
            loss.backward()
            optimizer.step()
            total += loss.item() * rows.numel()
        schedule.step()
        losses.append(total / inputs.shape[0])
        logger.info("epoch %d/%d: training loss %.4f", epoch + 1, epochs, losses[-1])
    model.eval()
    return losses
