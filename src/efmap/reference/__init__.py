"""The paper's reference example: an age-group ResNet for face images."""

from efmap.reference.age_resnet import AgeResNet, BasicBlock

__all__ = ["AgeResNet", "BasicBlock"]
