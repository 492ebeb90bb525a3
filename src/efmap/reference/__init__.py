"""Reference models and data: the age-group ResNet of Hong and Yoo (2021) and the loaders of its examples."""

from efmap.reference.age_resnet import AgeResNet, BasicBlock

__all__ = ["AgeResNet", "BasicBlock"]
