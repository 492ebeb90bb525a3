"""The age-group ResNet of Hong and Yoo (2021), with configurable input and class counts."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AgeResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    """Residual block: conv-BN-ReLU-conv-BN plus a shortcut, then ReLU.

    The shortcut is a 1x1 convolution with batch normalisation when the block
    changes the channel count or the resolution, and the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``(N, in_channels, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


class AgeResNet(nn.Module):
    """ResNet for facial age groups, as described by Hong and Yoo (2021).

    A 3x3 stem convolution to 16 channels, five stages of two
    :class:`BasicBlock` each with 8, 16, 32, 64 and 128 channels (the first at
    full resolution, each later one halving it: 128, 64, 32, 16 and 8 pixels
    a side for a 128x128 input), global average pooling and a linear layer.

    Parameters
    ----------
    in_channels
        Channels of the input images. Default 3.
    num_classes
        Number of output classes. Default 3 (minor, adult, old).
    input_size
        Side of the square input the network is meant for. Default 128. The network
        itself accepts any size; this value sets ``input_shape``.

    Attributes
    ----------
    input_shape
        The per-sample input shape the network is meant for, ``(in_channels, input_size, input_size)``.

    Examples
    --------
    >>> import torch
    >>> from efmap.reference import AgeResNet
    >>> net = AgeResNet(in_channels=1, num_classes=2, input_size=25).eval()
    >>> net(torch.zeros(4, *net.input_shape)).shape
    torch.Size([4, 2])
    """

    stage_channels = (8, 16, 32, 64, 128)

    def __init__(self, in_channels: int = 3, num_classes: int = 3, input_size: int = 128) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("input_size", input_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        self.input_shape = (in_channels, input_size, input_size)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages = []
        channels = 16
        for i, out_channels in enumerate(self.stage_channels):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels))
            )
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class scores ``(N, num_classes)`` for images ``(N, in_channels, H, W)``."""
        scores: torch.Tensor = self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))
        return scores
