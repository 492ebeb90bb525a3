"""Evaluation of maps and landmarks: how much of the model's behaviour they predict.

Masked accuracy with controls, deletion and insertion curves (also with ROAD's
noisy linear imputation), a model-randomization sanity check, and comparison
with other attribution methods.

Every result here is measured on the data and model it is given; none of it is a
general claim about a method.
"""

from efmap.evaluate.compare import MethodComparison, attribution_maps, compare_methods
from efmap.evaluate.curves import PerturbationCurves, curve_area, feature_ranks, perturbation_curves
from efmap.evaluate.fills import Blur, NoisyImputation, fill_removed
from efmap.evaluate.image_fills import gaussian_blur, noisy_linear_imputation
from efmap.evaluate.masked import MaskedAccuracy, accuracy, centered_box, masked_accuracy
from efmap.evaluate.sanity import RandomizationCheck, randomization_check, spearman

__all__ = [
    "Blur",
    "MaskedAccuracy",
    "MethodComparison",
    "NoisyImputation",
    "PerturbationCurves",
    "RandomizationCheck",
    "accuracy",
    "attribution_maps",
    "centered_box",
    "compare_methods",
    "curve_area",
    "feature_ranks",
    "fill_removed",
    "gaussian_blur",
    "masked_accuracy",
    "noisy_linear_imputation",
    "perturbation_curves",
    "randomization_check",
    "spearman",
]
