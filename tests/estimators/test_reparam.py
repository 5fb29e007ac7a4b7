import pytest
import torch

import vipkg
from tests.estimators.contract import Case, EstimatorContract
from tests.helpers import assert_unbiased, exact_loss_gradient, gaussian_elbo, random_gaussian_target
from vipkg.diagnostics import gradient_samples, gradient_variance
from vipkg.guides import FullRankNormal, LowRankNormal, MeanFieldNormal

FAMILIES = [MeanFieldNormal, FullRankNormal, lambda m, **kw: LowRankNormal(m, rank=2, **kw)]
IDS = ["meanfield", "fullrank", "lowrank"]


def _target(d=5):
    return random_gaussian_target(d)


def _guide(family, model):
    g = torch.Generator().manual_seed(5)
    d = model.dim
    # Away from the optimum so that every gradient coordinate is far from zero.
    return family(
        model, loc=0.5 * torch.randn(d, generator=g, dtype=torch.float64), init_scale=0.7, dtype=torch.float64
    )


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_reparam_unbiased_against_closed_form(family):
    model = _target()
    guide = _guide(family, model)
    exact = exact_loss_gradient(guide, gaussian_elbo(guide, model.reference["mean"], model.reference["cov"]))
    samples = gradient_samples(model, guide, vipkg.Reparam(), num_particles=4, repeats=400, seed=11)
    assert set(samples) == {n for n, _ in guide.named_parameters()}
    worst = assert_unbiased(samples, exact)
    assert max(worst.values()) > 0.0


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_unbiasedness_check_has_power(family):
    """The same check rejects the gradient of another objective (IWAE(8)) and a
    gradient shifted by 0.1 (about five standard errors here)."""
    model = _target()
    guide = _guide(family, model)
    exact = exact_loss_gradient(guide, gaussian_elbo(guide, model.reference["mean"], model.reference["cov"]))
    iwae = gradient_samples(
        model, guide, vipkg.Reparam(), objective=vipkg.IWAE(8), num_particles=1, repeats=400, seed=11
    )
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(iwae, exact)
    samples = gradient_samples(model, guide, vipkg.Reparam(), num_particles=4, repeats=400, seed=11)
    shifted = {k: torch.where(v == 0, v, v + 0.1) for k, v in exact.items()}
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(samples, shifted)


def test_variance_falls_as_one_over_particles():
    model = _target()
    guide = _guide(MeanFieldNormal, model)
    v4 = gradient_variance(model, guide, vipkg.Reparam(), num_particles=4, repeats=300, seed=1).total_trace
    v16 = gradient_variance(model, guide, vipkg.Reparam(), num_particles=16, repeats=300, seed=2).total_trace
    # i.i.d. particles: the trace scales as 1/S, so the ratio is 4 (sampling error ~ +-15% at 300 repeats).
    assert 3.0 < v4 / v16 < 5.3


def test_reparam_exact_target_mean_gradient_vanishes_at_optimum():
    """At q = p the loc gradient is zero in expectation (and scale gradients too)."""
    model = _target()
    L = torch.linalg.cholesky(model.reference["cov"])
    guide = FullRankNormal(model, loc=model.reference["mean"], scale_tril=L, dtype=torch.float64)
    g = gradient_samples(model, guide, vipkg.Reparam(), num_particles=8, repeats=200, seed=0)
    zero = {k: torch.zeros_like(v[0]) for k, v in g.items()}
    assert_unbiased(g, zero)


def test_reparam_works_with_iwae_and_renyi():
    model = vipkg.models.eight_schools()
    guide = MeanFieldNormal(model)
    for obj in (vipkg.IWAE(4), vipkg.Renyi(0.5, k=4)):
        info = vipkg.Reparam().estimate(model, guide, obj, 3)
        assert info.log_weights.shape == (3, 4)
        assert all(torch.isfinite(p.grad).all() for p in guide.parameters())


def test_reparam_rejects_guide_without_rsample():
    class NoRsample(MeanFieldNormal):
        def forward(self):
            return torch.distributions.Categorical(logits=torch.zeros(3))

    model = vipkg.models.gaussian(dim=2)
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="ScoreFunction"):
        vipkg.Reparam().check(model, NoRsample(model), vipkg.ELBO())


# ------------------------------------------------------------------ the estimator contract
def _elbo_gradient(model, guide):
    return exact_loss_gradient(guide, gaussian_elbo(guide, model.reference["mean"], model.reference["cov"]))


class TestReparamContract(EstimatorContract):
    """Reparam on a 5-d Gaussian target against the closed-form ELBO gradient; the biased variant
    is the gradient of another objective (IWAE(8)), as in test_unbiasedness_check_has_power."""

    cases = [
        Case(
            f"reparam-{name}",
            model=_target,
            guide=lambda m, family=family: _guide(family, m),
            estimator=vipkg.Reparam,
            exact=_elbo_gradient,
            biased=vipkg.Reparam,
            biased_objective=lambda: vipkg.IWAE(8),
            biased_particles=1,
            seed=11,
        )
        for family, name in zip(FAMILIES[:2], IDS[:2])
    ]
