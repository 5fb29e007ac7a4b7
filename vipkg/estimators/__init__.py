"""Gradient estimators: one module per family, one interface (:class:`Estimator`)."""

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo
from vipkg.estimators.bures import BWSGD, FBGVI, smoothness_constant, smoothness_step_size
from vipkg.estimators.control_variates import (
    ControlVariate,
    Learned,
    LeaveOneOut,
    MovingAverage,
    OptimalScaling,
    Stein,
    chain,
)
from vipkg.estimators.path import STL, DReG, FastPath
from vipkg.estimators.per_site import PerSite
from vipkg.estimators.relaxed import Anneal, GumbelSoftmax
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.rsvi import RSVI
from vipkg.estimators.score import ScoreFunction
from vipkg.estimators.stein import IMQ, RBF, SVGD, MirroredSVGD, mirrored_svgd_direction, svgd_direction

__all__ = [
    "Estimator",
    "StepInfo",
    "IncompatibleEstimatorError",
    "Reparam",
    "STL",
    "DReG",
    "FastPath",
    "PerSite",
    "RSVI",
    "ScoreFunction",
    "ControlVariate",
    "MovingAverage",
    "LeaveOneOut",
    "OptimalScaling",
    "Learned",
    "Stein",
    "chain",
    "GumbelSoftmax",
    "Anneal",
    "FBGVI",
    "BWSGD",
    "smoothness_constant",
    "smoothness_step_size",
    "SVGD",
    "MirroredSVGD",
    "RBF",
    "IMQ",
    "svgd_direction",
    "mirrored_svgd_direction",
]
