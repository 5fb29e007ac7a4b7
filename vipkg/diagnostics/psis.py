"""Did it work? Pareto-smoothed importance sampling checks of a fitted guide."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from vipkg._rng import seeded
from vipkg.diagnostics.arviz_adapter import psislw
from vipkg.objectives import importance_ess  # re-exported: the log-weight maths lives in objectives

__all__ = ["PSISResult", "psis_khat", "importance_ess"]


@dataclasses.dataclass
class PSISResult:
    """What :func:`psis_khat` measured.

    Attributes
    ----------
    khat : float
        Pareto tail shape of the importance ratios p/q. Below 0.5 the guide is a good
        importance proposal; up to 0.7 usable with PSIS; above 0.7 the guide is not
        close enough to the posterior for its draws (or their expectations) to be trusted.
        ``-inf`` when every ratio is the same (the guide is the posterior).
    ess : float
        Effective sample size of the Pareto-smoothed weights.
    ess_raw : float
        Effective sample size of the raw weights.
    log_weights : ndarray ``[n]``
        Normalized Pareto-smoothed log weights.
    log_evidence : float
        Importance-sampling estimate of ``log p(x)`` (raw weights).
    mean : dict of str to ndarray
        PSIS-corrected posterior means of the named constrained sites.
    num_samples : int
    """

    khat: float
    ess: float
    ess_raw: float
    log_weights: np.ndarray
    log_evidence: float
    mean: dict
    num_samples: int

    @property
    def verdict(self) -> str:
        if math.isnan(self.khat) or self.khat == math.inf:
            return "unknown"
        if self.khat < 0.5:
            return "good"
        return "ok" if self.khat < 0.7 else "unreliable"


@torch.no_grad()
def psis_khat(model, guide, num_samples: int = 4000, *, seed: int | None = 0) -> PSISResult:
    """Pareto k-hat of the guide as an importance proposal for the posterior.

    Draws ``num_samples`` from the guide, computes log p(x, z) - log q(z), and fits a
    generalized Pareto distribution to the largest ratios through ArviZ's PSIS.

    Parameters
    ----------
    model : vipkg.Model
    guide : vipkg.guides.Guide
        Any guide with a density (``sample_and_log_prob``).
    num_samples : int
        Draws from the guide (PSIS needs a few hundred at least).
    seed : int, optional
        Seeds a forked torch RNG.

    Returns
    -------
    PSISResult

    References
    ----------
    .. [1] Yao, Y., Vehtari, A., Simpson, D., Gelman, A. "Yes, but Did It Work?:
       Evaluating Variational Inference". ICML (2018).
    .. [2] Vehtari, A., Simpson, D., Gelman, A., Yao, Y., Gabry, J. "Pareto Smoothed
       Importance Sampling". JMLR 25 (2024).
    """
    if not isinstance(num_samples, int) or num_samples < 100:
        raise ValueError(f"psis_khat needs num_samples >= 100 (an int) to fit the tail, got {num_samples!r}.")
    if not hasattr(guide, "sample_and_log_prob"):
        raise TypeError(f"{type(guide).__name__} has no density to importance-sample with.")
    with seeded(seed, guide.device):
        z, log_q = guide.sample_and_log_prob((num_samples,))
    log_p = guide.log_joint(model, z)
    lw_raw = (log_p - log_q).double()
    if not bool(torch.isfinite(lw_raw).all()):
        bad = int((~torch.isfinite(lw_raw)).sum())
        raise FloatingPointError(
            f"{bad} of {num_samples} log importance ratios are NaN or infinite (model {model.name!r}, guide "
            f"{type(guide).__name__}): the guide puts mass where the log density is not finite."
        )
    lw, khat = psislw(lw_raw.cpu().numpy())
    if float(lw_raw.max() - lw_raw.min()) < 1e-10:
        # Constant ratios: the guide is the posterior. ArviZ's tail fit degenerates
        # (it returns inf); no tail at all is the honest answer.
        khat = -math.inf
    latents = guide.constrain(model, z)
    w = torch.as_tensor(np.exp(lw - lw.max()), dtype=torch.float64)
    w = w / w.sum()
    mean = {}
    for name, v in latents.items():
        vv = v.detach().double().cpu()
        mean[name] = torch.tensordot(w, vv, dims=([0], [0])).numpy()
    return PSISResult(
        khat=khat,
        ess=float(importance_ess(torch.as_tensor(lw))),
        ess_raw=float(importance_ess(lw_raw.cpu())),
        log_weights=lw - np.logaddexp.reduce(lw),
        log_evidence=float(torch.logsumexp(lw_raw, 0) - math.log(num_samples)),
        mean=mean,
        num_samples=num_samples,
    )
