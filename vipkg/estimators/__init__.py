"""Gradient estimators: one module per family, one interface (:class:`Estimator`)."""

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo
from vipkg.estimators.reparam import Reparam

__all__ = ["Estimator", "StepInfo", "IncompatibleEstimatorError", "Reparam"]
