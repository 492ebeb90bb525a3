"""Shared fixtures: small seeded float64 models and inputs."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class SmallCNN(torch.nn.Module):
    """A conv net with batch normalisation, dropout and a linear head, for 3x6x5 images."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 5, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(5)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(5 * 6 * 5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x)))
        return self.head(self.drop(out.flatten(1)))


@pytest.fixture
def small_cnn() -> SmallCNN:
    model = SmallCNN().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    """Four float64 images (4, 3, 6, 5) in [-1, 1)."""
    return torch.rand(4, 3, 6, 5, dtype=torch.float64) * 2 - 1
