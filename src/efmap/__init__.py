"""efmap: Explainable Feature Maps for PyTorch classifiers.

Each input feature is reversed in turn (a cyclic shift by half the value
range) and the fall of the model's top output is recorded as a heat map.
Maps merge across a data set, and the features that matter are selected as
landmarks.
"""

from efmap._version import __version__
from efmap._warnings import EfmapWarning
from efmap.coarse_to_fine import RefinedExplanation, explain_coarse_to_fine
from efmap.dataset import DatasetExplanation, RunProgress, explain_dataset
from efmap.evaluate import (
    MaskedAccuracy,
    PerturbationCurves,
    RandomizationCheck,
    accuracy,
    masked_accuracy,
    perturbation_curves,
    randomization_check,
)
from efmap.landmarks import Landmarks, apply_mask, select_landmarks
from efmap.merge import HeatMapAccumulator
from efmap.normalize import minmax, quantize
from efmap.reversal import reverse
from efmap.scoring import Explanation, explain

__all__ = [
    "DatasetExplanation",
    "EfmapWarning",
    "Explanation",
    "HeatMapAccumulator",
    "Landmarks",
    "MaskedAccuracy",
    "RunProgress",
    "PerturbationCurves",
    "RandomizationCheck",
    "RefinedExplanation",
    "__version__",
    "accuracy",
    "apply_mask",
    "explain",
    "explain_dataset",
    "explain_coarse_to_fine",
    "masked_accuracy",
    "minmax",
    "perturbation_curves",
    "quantize",
    "randomization_check",
    "reverse",
    "select_landmarks",
]
