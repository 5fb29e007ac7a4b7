import pytest
import torch

import vipkg
from tests.estimators.contract import Case, EstimatorContract
from tests.helpers import assert_unbiased, exact_loss_gradient, gaussian_elbo
from vipkg.diagnostics import gradient_samples
from vipkg.estimators.base import Estimator, StepInfo, surrogate_backward
from vipkg.estimators.control_variates import MovingAverage
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.score import ScoreFunction
from vipkg.guides import MeanFieldNormal
from vipkg.guides.positive import Dirichlet
from vipkg.models.conjugate import dirichlet_multinomial

ALPHA = (1.3, 2.0, 0.6, 3.5, 1.1)


def _problem():
    model = dirichlet_multinomial(
        5, prior=(0.8, 1.5, 1.0, 2.0, 0.7), counts=(3, 0, 7, 2, 5), dtype=torch.float64
    )
    guide = Dirichlet(model, concentration=torch.tensor(ALPHA), dtype=torch.float64)
    return model, guide


def _closed_form_elbo(guide, model):
    a = guide.concentration
    prior, counts = model.reference["prior"], model.reference["counts"]
    e_log = torch.digamma(a) - torch.digamma(a.sum())
    log_prior = torch.lgamma(prior.sum()) - torch.lgamma(prior).sum() + ((prior - 1) * e_log).sum()
    log_lik = torch.lgamma(counts.sum() + 1) - torch.lgamma(counts + 1).sum() + (counts * e_log).sum()
    return log_prior + log_lik + torch.distributions.Dirichlet(a).entropy()


def test_score_function_unbiased_on_dirichlet_multinomial():
    model, guide = _problem()
    exact = exact_loss_gradient(guide, _closed_form_elbo(guide, model))
    samples = gradient_samples(model, guide, ScoreFunction(), num_particles=8, repeats=400, seed=0)
    worst = assert_unbiased(samples, exact)
    assert max(worst.values()) > 0


def test_score_function_unbiased_on_gaussian_guide():
    model = vipkg.models.gaussian(
        torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]), dtype=torch.float64
    )
    guide = MeanFieldNormal(model, loc=torch.tensor([0.3, 0.2]), scale=0.8, dtype=torch.float64)
    exact = exact_loss_gradient(guide, gaussian_elbo(guide, model.reference["mean"], model.reference["cov"]))
    samples = gradient_samples(model, guide, ScoreFunction(), num_particles=8, repeats=400, seed=1)
    assert_unbiased(samples, exact)


class _NoScoreTerm(Estimator):
    """Differentiates only through -log q in the log-weights: a biased 'estimator'."""

    def estimate(self, model, guide, objective, num_particles):
        z, log_q = guide.sample_and_log_prob(objective.sample_shape(num_particles))
        log_w = guide.log_joint(model, z.detach()) - log_q
        loss = -objective(log_w)
        surrogate_backward(guide, loss)
        return StepInfo(loss=loss.detach(), log_weights=log_w.detach())


def test_check_has_power_without_the_score_term():
    model, guide = _problem()
    exact = exact_loss_gradient(guide, _closed_form_elbo(guide, model))
    samples = gradient_samples(model, guide, _NoScoreTerm(), num_particles=8, repeats=400, seed=0)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(samples, exact)


def test_iwae_gradient_agrees_with_implicit_reparam():
    model, guide = _problem()
    obj = vipkg.IWAE(4)
    a = gradient_samples(model, guide, ScoreFunction(), objective=obj, num_particles=8, repeats=300, seed=1)
    b = gradient_samples(model, guide, Reparam(), objective=obj, num_particles=8, repeats=300, seed=2)
    for k in a:
        diff = a[k].mean(0) - b[k].mean(0)
        se = (a[k].var(0) / 300 + b[k].var(0) / 300).sqrt()
        assert (diff.abs() < 4 * se).all(), (k, diff / se)


def test_value_is_the_loss_and_shapes():
    model, guide = _problem()
    info = ScoreFunction().estimate(model, guide, vipkg.IWAE(3), 5)
    assert info.log_weights.shape == (5, 3)
    expected = -vipkg.IWAE(3)(info.log_weights)
    assert torch.allclose(info.loss, expected)
    assert all(torch.isfinite(p.grad).all() for p in guide.parameters())


def test_fit_runs():
    model, guide = _problem()
    r = vipkg.fit(model, guide, ScoreFunction(), steps=20, num_particles=8, lr=0.05, progress=False)
    assert torch.isfinite(r.losses).all()


def test_bad_control_variate_is_rejected():
    with pytest.raises(ValueError, match="ControlVariate"):
        ScoreFunction(control_variate="moving_average")


# ------------------------------------------------------------------ the estimator contract
def _gaussian_problem():
    return vipkg.models.gaussian(
        torch.tensor([1.0, -0.5]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]), dtype=torch.float64
    )


def _gaussian_guide(model):
    return MeanFieldNormal(model, loc=torch.tensor([0.3, 0.2]), scale=0.8, dtype=torch.float64)


def _gaussian_gradient(model, guide):
    return exact_loss_gradient(guide, gaussian_elbo(guide, model.reference["mean"], model.reference["cov"]))


class TestScoreFunctionContract(EstimatorContract):
    """Plain REINFORCE on the Dirichlet-multinomial (biased variant: the score term left out), and
    with a moving-average baseline (state: the average, checked by the round trip) on a Gaussian."""

    cases = [
        Case(
            "score-plain-dirichlet",
            model=lambda: _problem()[0],
            guide=lambda m: _problem()[1],
            estimator=ScoreFunction,
            num_particles=8,
            exact=lambda m, g: exact_loss_gradient(g, _closed_form_elbo(g, m)),
            biased=_NoScoreTerm,
            shift=5.0,  # plain REINFORCE is noisy: standard errors up to 1.3 (gradient entries up to 15)
        ),
        Case(
            "score-moving-average-gaussian",
            model=_gaussian_problem,
            guide=_gaussian_guide,
            estimator=lambda: ScoreFunction(MovingAverage()),
            num_particles=8,
            exact=_gaussian_gradient,
            biased=_NoScoreTerm,
            shift=0.5,  # standard errors about 0.08
            stateful=True,
            seed=1,
        ),
    ]
