"""FullRankNormal on the hard posteriors of ``vipkg.models.hard``, against reference moments.

Every check fits with the settings a user would pick (Adam from lr 0.05 decayed to 1e-3,
16 particles, float32) and compares the guide's moments with the reference in reference
SDs, on two seeds; the tolerances are the measured worst case with a margin (numbers in
each case's comment), so another CPU's rounding cannot flip them, and each is far inside
what a failed fit gives.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal

import vipkg
from vipkg.guides import FullRankNormal
from vipkg.guides.base import Guide, inverse_softplus
from vipkg.models.hard import HARD_POSTERIORS

SEEDS = (0, 1)


class CholeskyEntries(Guide):
    """The parameterization FullRankNormal had before: the entries of L trained directly
    (softplus diagonal, free strict lower triangle). Kept here to show the checks have power."""

    def __init__(self, model, init_scale: float = 0.1):
        super().__init__(model)
        self.loc = nn.Parameter(torch.zeros(self.dim))
        L = torch.eye(self.dim) * init_scale
        self.raw_scale_tril = nn.Parameter(L.tril(-1) + torch.diag_embed(inverse_softplus(L.diagonal())))

    @property
    def scale_tril(self):
        raw = self.raw_scale_tril
        return raw.tril(-1) + torch.diag_embed(F.softplus(raw.diagonal()))

    def forward(self):
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril, validate_args=False)

    def rsample_and_log_prob(self, shape=()):
        L = self.scale_tril
        eps = torch.randn(*shape, self.dim)
        log_q = (
            -0.5 * eps.square().sum(-1) - self.dim * 0.5 * math.log(2 * math.pi) - L.diagonal().log().sum()
        )
        return self.loc + eps @ L.T, log_q


def _fit_errors(model, make_guide, estimator, seed, steps, lr=0.05):
    guide = make_guide(model)
    vipkg.fit(
        model,
        guide,
        estimator,
        steps=steps,
        lr=lr,
        num_particles=16,
        seed=seed,
        progress=False,
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.02 ** (1 / steps)),
    )
    ref = model.reference
    with torch.no_grad(), vipkg._rng.seeded(123):
        z = guide().sample((20000,))
    mean_err = ((z.mean(0) - ref["unconstrained_mean"]) / ref["unconstrained_sd"]).abs()
    sd_ratio = z.std(0) / ref["unconstrained_sd"]
    return float(mean_err.max()), float(sd_ratio.min()), float(sd_ratio.max())


# (target, estimator) -> (lr, seeds, max |mean err| / ref sd, lowest and highest sd ratio allowed).
# Measured on the two seeds (8000 steps) in each comment. Where the posterior is not Gaussian the
# best Gaussian cannot match every moment: the limits then sit just outside what the fits reach,
# all seeds and both estimators alike, i.e. at the family's own limit, not at a lucky run.
CASES = {
    # cond(X'X) = 3.6e4, posterior correlations up to 0.994. Max err 0.038 / 0.075, sd ratios
    # [0.68, 1.02] (the long axis of the most correlated pair converges last).
    ("correlated_regression", "Reparam"): (0.05, SEEDS, 0.2, 0.55, 1.15),
    # max err 0.008 / 0.013, sd ratios [0.81, 1.01].
    ("correlated_regression", "STL"): (0.05, SEEDS, 0.06, 0.7, 1.1),
    # 52 dims, 20% of the observations missing. Max err 0.238 / 0.254 (STL 0.262 / 0.221), sd
    # ratios [0.44, 1.04] for both: the scales' posteriors are skewed.
    ("random_walk", "Reparam"): (0.05, SEEDS, 0.4, 0.33, 1.15),
    ("random_walk", "STL"): (0.05, SEEDS, 0.4, 0.33, 1.15),
    # The funnel: max err 0.49 on log tau for every seed and estimator (0.488-0.495), whose sd
    # the Gaussian gets at 0.22; the others within [0.87, 0.99].
    ("eight_schools_centered", "Reparam"): (0.05, SEEDS, 0.65, 0.15, 1.1),
    ("eight_schools_centered", "STL"): (0.05, SEEDS, 0.65, 0.15, 1.1),
    # AR(5): max err 0.039 / 0.043 (STL 0.018 / 0.019), sd ratios [0.41, 0.99] (STL [0.42, 1.00]).
    ("ar_series", "Reparam"): (0.05, SEEDS, 0.1, 0.3, 1.1),
    ("ar_series", "STL"): (0.05, SEEDS, 0.05, 0.3, 1.1),
    # 103 dims. Reparam: max err 0.126 / 0.110, sd ratios [0.50, 1.05], -ELBO 110.7.
    ("stochastic_volatility", "Reparam"): (0.05, SEEDS, 0.3, 0.35, 1.15),
    # STL needs a smaller step here: at lr 0.05 it runs away (seed 1: losses of 1.6e9, reported
    # as divergence; seed 0: it ends at -ELBO 5600 against 110). At lr 0.02: max err 0.129 /
    # 0.141, sd ratios [0.49, 1.04], and a better bound than Reparam's (-ELBO 110.3 / 110.4).
    ("stochastic_volatility", "STL"): (0.02, SEEDS, 0.3, 0.35, 1.15),
}


ESTIMATORS = {"Reparam": vipkg.Reparam, "STL": vipkg.STL}


def _check(target, estimator, lr, seeds, max_err, sd_lo, sd_hi):
    model = HARD_POSTERIORS[target]()
    assert "unconstrained_mean" in model.reference, f"{target} has no reference moments"
    for seed in seeds:
        err, lo, hi = _fit_errors(model, FullRankNormal, ESTIMATORS[estimator](), seed, 8000, lr)
        assert err < max_err, (target, estimator, seed, err)
        assert sd_lo < lo and hi < sd_hi, (target, estimator, seed, lo, hi)


@pytest.mark.parametrize("target, estimator", sorted(CASES), ids=lambda x: x)
def test_full_rank_matches_reference_moments(target, estimator):
    _check(target, estimator, *CASES[(target, estimator)])


def test_every_hard_posterior_is_checked():
    assert {t for t, _ in CASES} == set(HARD_POSTERIORS)


def test_cholesky_entries_fail_the_badly_scaled_regression_where_unit_lower_passes():
    """With columns left on their own scales (divided by sqrt(sd) only: posterior SDs from
    0.006 to 0.84, cond(X'X) = 1.3e7), training L's entries directly leaves the means 0.72
    reference SDs off (measured on two seeds: 0.717, 0.732); L = diag(scale) @ U gets 0.24
    (0.244, 0.246). With STL, the entries' form (and the generic stopped log q, which
    recomputes the noise from z: what STL did before) diverges to an impossible bound (losses of
    -2.6e6 and -1.7e7 against an optimum of +513) while this form does not."""
    model = HARD_POSTERIORS["correlated_regression"](column_scale_power=0.5)
    for seed in SEEDS:
        err, _, _ = _fit_errors(model, FullRankNormal, vipkg.Reparam(), seed, 8000)
        assert err < 0.4, (seed, err)
        old, _, _ = _fit_errors(model, CholeskyEntries, vipkg.Reparam(), seed, 8000)
        assert old > 0.5, (seed, old)
    with pytest.raises(vipkg.NonFiniteLossError, match="diverged"):
        _fit_errors(model, CholeskyEntries, vipkg.STL(), 0, 8000)
    _fit_errors(model, FullRankNormal, vipkg.STL(), 0, 8000)
