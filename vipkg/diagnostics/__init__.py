"""Diagnostics: gradient noise, ArviZ export, plots."""

from vipkg.diagnostics.arviz_adapter import to_arviz
from vipkg.diagnostics.plots import plot_losses
from vipkg.diagnostics.psis import PSISResult, importance_ess, psis_khat
from vipkg.diagnostics.variance import (
    GradientVariance,
    GradientVarianceResult,
    gradient_samples,
    gradient_variance,
)

__all__ = [
    "gradient_samples",
    "gradient_variance",
    "GradientVariance",
    "GradientVarianceResult",
    "to_arviz",
    "plot_losses",
    "psis_khat",
    "PSISResult",
    "importance_ess",
]
