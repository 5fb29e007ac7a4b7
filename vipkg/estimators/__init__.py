"""Gradient estimators: one module per family, one interface (:class:`Estimator`)."""

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo
from vipkg.estimators.bures import BWSGD, FBGVI, smoothness_constant, smoothness_step_size
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.rsvi import RSVI
from vipkg.estimators.score import ScoreFunction

__all__ = [
    "Estimator",
    "StepInfo",
    "IncompatibleEstimatorError",
    "Reparam",
    "RSVI",
    "ScoreFunction",
    "FBGVI",
    "BWSGD",
    "smoothness_constant",
    "smoothness_step_size",
]
