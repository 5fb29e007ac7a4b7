"""Gradient-noise diagnostics: repeated independent estimates of the same gradient."""

from __future__ import annotations

import dataclasses
import math

import torch

from vipkg._rng import seeded

__all__ = ["gradient_samples", "gradient_variance", "GradientVariance", "GradientVarianceResult"]


def _default_objective(objective):
    if objective is None:
        from vipkg.objectives import ELBO

        return ELBO()
    return objective


def gradient_samples(
    model,
    guide,
    estimator,
    *,
    objective=None,
    num_particles: int = 16,
    repeats: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Independent estimates of the loss gradient, one per repeat, per guide parameter.

    Parameters
    ----------
    model : vipkg.Model
    guide : vipkg.guides.Guide
    estimator : vipkg.estimators.Estimator
    objective : vipkg.objectives.Objective, optional
        Default :class:`vipkg.objectives.ELBO`.
    num_particles : int
        Particles per estimate, as in :func:`vipkg.fit`.
    repeats : int
        Number of independent estimates.
    seed : int
        Seeds a forked torch RNG: the caller's RNG stream is not advanced.

    Returns
    -------
    dict of str to Tensor
        For a model with local sites in subsampled plates, each repeat also draws its
        minibatch. ``{name: Tensor[repeats, *param.shape]}`` keyed by ``guide.named_parameters()``
        and, for a model with parameters of its own, ``"model." + name``;
        each row is what one :meth:`~vipkg.estimators.Estimator.estimate` wrote into
        ``.grad`` (the gradient of minus the bound). The guide's parameters,
        gradients and the estimator's state are restored afterwards.

    References
    ----------
    .. [1] Kim, K., Oh, J., Wu, K., Ma, Y.-A., Gardner, J. R. "Practical and Matching
       Gradient Variance Bounds for Black-Box Variational Bayesian Inference". ICML (2023).
    """
    objective = _default_objective(objective)
    if not isinstance(repeats, int) or repeats < 2:
        raise ValueError(f"repeats must be an int >= 2 to measure variance, got {repeats!r}.")
    from vipkg.estimators.base import check_minibatch_support
    from vipkg.guides.minibatch import draw_minibatch

    if model.is_subsampled:
        check_minibatch_support(estimator, model, objective)
    with torch.random.fork_rng(devices=[]):
        estimator.check(*draw_minibatch(model, guide), objective)
    estimator.check_particles(num_particles)
    params = dict(guide.named_parameters())
    own = {f"model.{k}": p for k, p in model.named_parameters()}
    params.update(own)
    saved_values = {n: p.detach().clone() for n, p in params.items()}
    saved_grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in params.items()}
    saved_state = estimator.state_dict()
    out = {n: torch.zeros((repeats, *p.shape), dtype=p.dtype, device=p.device) for n, p in params.items()}
    try:
        with seeded(seed, guide.device):
            for r in range(repeats):
                for p in own.values():
                    # estimate replaces the guide's .grad; the model's would accumulate.
                    p.grad = None
                # A model with local sites: each estimate on a fresh minibatch, as in a fit.
                estimator.estimate(*draw_minibatch(model, guide), objective, num_particles)
                for n, p in params.items():
                    if p.grad is not None:
                        out[n][r] = p.grad.detach()
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved_values[n])
                p.grad = saved_grads[n]
        estimator.load_state_dict(saved_state)
    return out


@dataclasses.dataclass
class GradientVarianceResult:
    """Summary of repeated gradient estimates.

    Attributes
    ----------
    mean, variance, second_moment, snr : dict of str to Tensor
        Per parameter and coordinate: sample mean, unbiased variance, mean of
        squares, and signal-to-noise ratio ``|mean| / std``.
    trace : dict of str to float
        Per parameter: trace of the gradient covariance (sum of variances).
    total_trace : float
        Sum over parameters.
    repeats : int
    """

    mean: dict[str, torch.Tensor]
    variance: dict[str, torch.Tensor]
    second_moment: dict[str, torch.Tensor]
    snr: dict[str, torch.Tensor]
    trace: dict[str, float]
    total_trace: float
    repeats: int

    @property
    def mean_snr(self) -> float:
        """Average per-coordinate SNR over every parameter."""
        flat = torch.cat([s.reshape(-1) for s in self.snr.values()])
        flat = flat[torch.isfinite(flat)]
        return float(flat.mean()) if flat.numel() else math.nan


def summarize_gradient_samples(samples: dict[str, torch.Tensor]) -> GradientVarianceResult:
    """Reduce the output of :func:`gradient_samples` to a :class:`GradientVarianceResult`."""
    mean, var, m2, snr, trace = {}, {}, {}, {}, {}
    repeats = 0
    for n, g in samples.items():
        g = g.detach().double()
        repeats = g.shape[0]
        mean[n] = g.mean(0)
        var[n] = g.var(0, unbiased=True)
        m2[n] = g.pow(2).mean(0)
        snr[n] = mean[n].abs() / var[n].sqrt()
        trace[n] = float(var[n].sum())
    return GradientVarianceResult(mean, var, m2, snr, trace, float(sum(trace.values())), repeats)


def gradient_variance(
    model,
    guide,
    estimator,
    *,
    objective=None,
    num_particles: int = 16,
    repeats: int = 32,
    seed: int = 0,
) -> GradientVarianceResult:
    """Trace of the gradient covariance, per-coordinate variance and SNR of an estimator.

    Takes the same arguments as :func:`gradient_samples`.

    References
    ----------
    .. [1] Kim, K. et al. "Practical and Matching Gradient Variance Bounds for
       Black-Box Variational Bayesian Inference". ICML (2023).
    """
    samples = gradient_samples(
        model, guide, estimator, objective=objective, num_particles=num_particles, repeats=repeats, seed=seed
    )
    return summarize_gradient_samples(samples)


@dataclasses.dataclass
class GradientVariance:
    """Ask :func:`vipkg.fit` to record gradient variance every ``every`` steps.

    The measurement runs on a forked RNG, so recording it does not change the
    fit's trajectory.

    Parameters
    ----------
    every : int
        Steps between measurements (the first is at step 0, the last after the final step).
        Each measurement costs about ``repeats`` estimates, so the extra work is about
        ``repeats / every`` of the fit (8% at the defaults; see benchmarks/bench_diagnostics.py).
    repeats : int
        Independent estimates per measurement.
    """

    every: int = 400
    repeats: int = 32

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"GradientVariance.every must be a positive int, got {self.every!r}.")
        if not isinstance(self.repeats, int) or self.repeats < 2:
            raise ValueError(f"GradientVariance.repeats must be an int >= 2, got {self.repeats!r}.")

    def measure(self, model, guide, estimator, objective, num_particles, seed) -> GradientVarianceResult:
        return gradient_variance(
            model,
            guide,
            estimator,
            objective=objective,
            num_particles=num_particles,
            repeats=self.repeats,
            seed=seed,
        )
