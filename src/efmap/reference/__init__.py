"""Reference example of Hong and Yoo (2021): an age-group ResNet for faces and a reader for the Adience benchmark."""

from efmap.reference.adience import AdienceDataset, AdienceRecord, Sample, collate_skipping, find_root, parse_age
from efmap.reference.adience_split import AdienceSplit, SplitSettings, load_or_make_split, make_split
from efmap.reference.age_resnet import AgeResNet, BasicBlock

__all__ = [
    "AdienceDataset",
    "AdienceRecord",
    "AdienceSplit",
    "AgeResNet",
    "BasicBlock",
    "Sample",
    "SplitSettings",
    "collate_skipping",
    "find_root",
    "load_or_make_split",
    "make_split",
    "parse_age",
]
