"""Diagnostics: gradient noise, PSIS k-hat and LOO, ArviZ export, plots."""

from vipkg.diagnostics.arviz_adapter import to_arviz
from vipkg.diagnostics.enumeration import enumerated_marginals
from vipkg.diagnostics.ksd import guide_ksd, kernel_stein_discrepancy
from vipkg.diagnostics.loo import LOOResult, loo
from vipkg.diagnostics.plots import plot_gradient_variance, plot_khat, plot_losses, plot_posteriors
from vipkg.diagnostics.psis import PSISResult, importance_ess, psis_khat
from vipkg.diagnostics.reference import laplace, reference_draws
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
    "enumerated_marginals",
    "plot_losses",
    "plot_gradient_variance",
    "plot_khat",
    "plot_posteriors",
    "reference_draws",
    "laplace",
    "psis_khat",
    "PSISResult",
    "importance_ess",
    "loo",
    "LOOResult",
    "kernel_stein_discrepancy",
    "guide_ksd",
]
