"""The shared detector core: pure torch, imports nothing else of ablate.

Modules: ``boxes`` (IoU family), ``coding`` (t <-> box), ``anchors`` (layouts, priors,
k-means), ``assign`` (assigners -> Assignment), ``losses`` (loss terms), ``recipe``
(LossRecipe and the presets), ``criterion`` (raw outputs -> named losses).
"""

from .anchors import AnchorLayout, Priors, build_priors, fit_anchors, get_layout, kmeans_anchors
from .assign import IGNORED, NEGATIVE, POSITIVE, Assignment, Targets, assign
from .criterion import Criterion, CriterionOutput, build_criterion
from .recipe import PRESETS, LossRecipe, preset

__all__ = [
    "AnchorLayout",
    "Assignment",
    "Criterion",
    "CriterionOutput",
    "IGNORED",
    "LossRecipe",
    "NEGATIVE",
    "POSITIVE",
    "PRESETS",
    "Priors",
    "Targets",
    "assign",
    "build_criterion",
    "build_priors",
    "get_layout",
    "fit_anchors",
    "kmeans_anchors",
    "preset",
]
