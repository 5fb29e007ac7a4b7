"""vipkg: variational inference in PyTorch with pluggable gradient estimators."""

from vipkg import diagnostics, estimators, frontends, gp, guides, models, objectives
from vipkg.diagnostics import GradientVariance, to_arviz
from vipkg.estimators import (
    BWSGD,
    FBGVI,
    RSVI,
    STL,
    SVGD,
    DReG,
    Estimator,
    FastPath,
    GumbelSoftmax,
    IncompatibleEstimatorError,
    MirroredSVGD,
    Reparam,
    ScoreFunction,
    StepInfo,
)
from vipkg.fit import FitResult, NonFiniteLossError, fit
from vipkg.model import Model, ModelError, Site
from vipkg.objectives import ELBO, IWAE, Renyi

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Site",
    "ModelError",
    "fit",
    "FitResult",
    "NonFiniteLossError",
    "ELBO",
    "IWAE",
    "Renyi",
    "Estimator",
    "StepInfo",
    "IncompatibleEstimatorError",
    "Reparam",
    "STL",
    "DReG",
    "FastPath",
    "GumbelSoftmax",
    "RSVI",
    "ScoreFunction",
    "FBGVI",
    "BWSGD",
    "SVGD",
    "MirroredSVGD",
    "GradientVariance",
    "to_arviz",
    "guides",
    "estimators",
    "objectives",
    "diagnostics",
    "models",
    "frontends",
    "gp",
]
