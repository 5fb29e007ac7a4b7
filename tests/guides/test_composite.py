import dataclasses
import itertools
import math

import pytest
import torch
from torch.distributions import constraints

import vipkg
from tests.helpers import assert_unbiased, exact_loss_gradient
from vipkg.checkpoint import CheckpointError
from vipkg.diagnostics import gradient_samples
from vipkg.estimators import per_site
from vipkg.estimators.base import IncompatibleEstimatorError
from vipkg.estimators.control_variates import LeaveOneOut, MovingAverage, OptimalScaling
from vipkg.estimators.per_site import PerSite
from vipkg.estimators.relaxed import GumbelSoftmax
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.score import ScoreFunction
from vipkg.guides import MeanFieldNormal
from vipkg.guides.composite import Composite
from vipkg.guides.discrete import Categorical
from vipkg.model import Model, Site
from vipkg.models.mixture import discrete_mixture

X_OBS = 1.3
SHIFT = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
PRIOR = torch.tensor([0.2, -0.3, 0.6], dtype=torch.float64)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _small_model(with_terms=True):
    """mu ~ N(0, 1), c ~ Categorical(softmax(PRIOR)), x = 1.3 ~ N(mu + SHIFT[c], 1)."""

    def terms(latents, data):
        mu, c = latents["mu"], latents["c"]
        log_pi = torch.log_softmax(data["prior"], -1)
        if c.is_floating_point() and c.dim() == 2:
            shift, lp_c = c @ data["shift"], c @ log_pi
        else:
            shift, lp_c = data["shift"][c.long()], log_pi[c.long()]
        lik = -0.5 * (X_OBS - mu - shift) ** 2 - HALF_LOG_2PI
        return {"mu": -0.5 * mu**2 - HALF_LOG_2PI, "c": lp_c, "x": lik}

    def log_joint(latents, data):
        return sum(terms(latents, data).values())

    kw = {"log_joint_terms": terms, "term_sites": {"mu": {"mu"}, "c": {"c"}, "x": {"mu", "c"}}}
    return Model(
        {
            "mu": Site(torch.Size([]), constraints.real),
            "c": Site(torch.Size([]), constraints.integer_interval(0, 2)),
        },
        log_joint,
        data={"shift": SHIFT, "prior": PRIOR},
        name="small_mixed",
        **(kw if with_terms else {}),
    )


def _exact_elbo(guide):
    normal, cat = guide.parts
    m, s = normal.loc[0], normal.scale[0]
    q = torch.softmax(cat.raw_logits["c"], -1)
    log_q = torch.log_softmax(cat.raw_logits["c"], -1)
    log_pi = torch.log_softmax(PRIOR, -1)
    prior_mu = -HALF_LOG_2PI - 0.5 * (m**2 + s**2)
    entropy_mu = 0.5 * torch.log(2 * math.pi * math.e * s**2)
    lik = -HALF_LOG_2PI - 0.5 * ((X_OBS - m - SHIFT) ** 2 + s**2)
    return prior_mu + entropy_mu + (q * (lik + log_pi - log_q)).sum()


def _composite(model):
    return Composite(
        model,
        {
            "mu": lambda m, dtype: MeanFieldNormal(m, loc=0.2, scale=0.7, dtype=dtype),
            "c": lambda m, dtype: Categorical(m, logits=torch.tensor([0.4, -0.2, 0.1]), dtype=dtype),
        },
        dtype=torch.float64,
    )


@pytest.mark.parametrize("with_terms", [True, False], ids=["rao_blackwellized", "whole"])
def test_per_site_estimator_is_unbiased(with_terms):
    """Reparam on mu + ScoreFunction(LeaveOneOut) on c, in one estimate, against the closed form."""
    model = _small_model(with_terms)
    guide = _composite(model)
    est = PerSite({"mu": Reparam(), "c": ScoreFunction(LeaveOneOut())})
    exact = exact_loss_gradient(guide, _exact_elbo(guide))
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=400, seed=0)
    assert set(samples) == {"parts.0.loc", "parts.0.raw_scale", "parts.1.raw_logits.c"}
    worst = assert_unbiased(samples, exact)
    assert max(worst.values()) > 0


def test_plain_score_function_on_a_composite_is_unbiased():
    model = _small_model()
    guide = _composite(model)
    exact = exact_loss_gradient(guide, _exact_elbo(guide))
    samples = gradient_samples(
        model, guide, ScoreFunction(MovingAverage()), num_particles=8, repeats=400, seed=1
    )
    assert_unbiased(samples, exact)


def test_check_has_power_when_the_score_part_is_dropped():
    """Reparam-only gradient (discrete part without its score term) is rejected."""
    model = _small_model()
    guide = _composite(model)
    exact = exact_loss_gradient(guide, _exact_elbo(guide))

    class _NoScore(ScoreFunction):
        def draw(self, guide, model, shape):
            return dataclasses.replace(super().draw(guide, model, shape), score_terms=())

    est = PerSite({"mu": Reparam(), "c": _NoScore()})
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=400, seed=0)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(samples, exact)


def _match_means(fitted, true):
    k = true.shape[0]
    return min(float((fitted[list(p)] - true).abs().max()) for p in itertools.permutations(range(k)))


def test_mixture_fit_recovers_cluster_means():
    """One vipkg.fit: Reparam on the means, ScoreFunction(LeaveOneOut) per datum on the
    assignments (Rao-Blackwellized per datum). Measured max error 0.08 after 400 steps
    (cluster sd 0.6, 50 points each)."""
    model = discrete_mixture(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    guide = Composite(
        model,
        {
            "mu": lambda m, dtype: MeanFieldNormal(
                m, loc=torch.randn(6, generator=g), init_scale=0.5, dtype=dtype
            ),
            "c": Categorical,
        },
        dtype=torch.float64,
    )
    est = PerSite({"mu": Reparam(), "c": ScoreFunction(LeaveOneOut())})
    r = vipkg.fit(model, guide, est, steps=400, num_particles=8, lr=0.1, progress=False)
    assert torch.isfinite(r.losses).all()
    fitted = guide.parts[0].loc.detach().reshape(3, 2)
    assert _match_means(fitted, model.reference["means"]) < 0.3
    draws = r.sample(20)
    assert draws["mu"].shape == (20, 3, 2) and draws["c"].shape == (20, 150)


def test_mixture_fit_with_gumbel_softmax_assignments():
    model = discrete_mixture(n=60, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    guide = Composite(
        model,
        {
            "mu": lambda m, dtype: MeanFieldNormal(
                m, loc=torch.randn(6, generator=g), init_scale=0.5, dtype=dtype
            ),
            "c": Categorical,
        },
        dtype=torch.float64,
    )
    est = PerSite({"mu": Reparam(), "c": GumbelSoftmax(0.5, hard=True)})
    vipkg.fit(model, guide, est, steps=300, num_particles=8, lr=0.1, progress=False)
    assert _match_means(guide.parts[0].loc.detach().reshape(3, 2), model.reference["means"]) < 0.4


def test_per_site_state_dict_holds_the_parts_state():
    model = _small_model()
    guide = _composite(model)
    est = PerSite({"c": ScoreFunction(MovingAverage(0.5))})
    est.estimate(model, guide, vipkg.ELBO(), 4)
    state = est.state_dict()
    assert state["c"]["control_variate"]["steps"] == {"c": 1}
    fresh_c = ScoreFunction(MovingAverage(0.5))
    PerSite({"c": fresh_c}).load_state_dict(state)
    assert fresh_c.control_variate.state_dict()["steps"] == {"c": 1}
    # A part whose estimator is known only once PerSite meets its guide (the deprecated pair form
    # here) gets its state then.
    with pytest.warns(DeprecationWarning):
        legacy = Composite(
            model, {"mu": MeanFieldNormal, "c": (Categorical, ScoreFunction(MovingAverage(0.5)))}
        )
    fresh = PerSite()
    fresh.load_state_dict(state)
    fresh.check(model, legacy, vipkg.ELBO())
    assert legacy.part_estimators[1].control_variate.state_dict()["steps"] == {"c": 1}
    assert fresh.state_dict()["mu"] == {}


def test_log_prob_matches_the_draws():
    model = _small_model()
    guide = _composite(model)
    z, lq = guide.sample_and_log_prob((5, 2))
    assert z["mu"].shape == (5, 2) and z["c"].shape == (5, 2) and lq.shape == (5, 2)
    assert torch.allclose(guide.log_prob(z), lq)
    assert torch.allclose(guide().log_prob(z), lq)


def test_bad_input_errors():
    model = _small_model()
    with pytest.raises(ValueError, match=r"\['c'\] of model"):
        Composite(model, {"mu": MeanFieldNormal})
    with pytest.raises(ValueError, match="appears in two parts"):
        Composite(model, {"mu": MeanFieldNormal, ("mu", "c"): Categorical})
    with pytest.raises(ValueError, match="no site 'z'"):
        Composite(model, {"z": MeanFieldNormal})
    with pytest.raises(ValueError, match="pair"):
        Composite(model, {"mu": (MeanFieldNormal,), "c": Categorical})
    with pytest.raises(ValueError, match="neither a guide nor a guide factory"):
        Composite(model, {"mu": 3, "c": Categorical})
    wrong = MeanFieldNormal(vipkg.models.gaussian(dim=3))
    with pytest.raises(ValueError, match="sub_model"):
        Composite(model, {"mu": wrong, "c": Categorical})
    guide = Composite(model, {"mu": MeanFieldNormal, "c": Categorical})
    with pytest.raises(IncompatibleEstimatorError, match="GumbelSoftmax"):
        PerSite({"c": Reparam()}).check(model, guide, vipkg.ELBO())
    with pytest.raises(IncompatibleEstimatorError, match="baseline"):
        PerSite({"c": ScoreFunction(OptimalScaling())}).check(model, guide, vipkg.ELBO())
    with pytest.raises(IncompatibleEstimatorError, match="Composite"):
        PerSite().check(model, MeanFieldNormal(vipkg.models.gaussian(dim=2)), vipkg.ELBO())
    with pytest.raises(IncompatibleEstimatorError, match=r"'z' is not a part.*'mu', 'c'"):
        PerSite({"z": Reparam()}).check(model, guide, vipkg.ELBO())
    with pytest.raises(ValueError, match="must be an Estimator"):
        PerSite({"mu": "reparam"})


def _checkpoint_guide(model):
    return Composite(
        model,
        {"mu": lambda m, dtype: MeanFieldNormal(m, loc=torch.arange(6.0), dtype=dtype), "c": Categorical},
        dtype=torch.float64,
    )


def test_checkpoint_resume_follows_the_same_trajectory_and_arviz_export(tmp_path):
    """PerSite checkpoints its parts' control-variate state through fit."""
    model = discrete_mixture(n=30, dtype=torch.float64)

    def make():
        return _checkpoint_guide(model), PerSite({"mu": Reparam(), "c": ScoreFunction(MovingAverage(0.9))})

    ck = tmp_path / "ck.pt"
    g1, e1 = make()
    vipkg.fit(model, g1, e1, steps=20, progress=False, checkpoint=ck, checkpoint_every=10)
    g2, e2 = make()
    r2 = vipkg.fit(model, g2, e2, steps=40, progress=False, checkpoint=ck, resume=True)
    g3, e3 = make()
    r3 = vipkg.fit(model, g3, e3, steps=40, progress=False)
    assert torch.equal(r2.losses, r3.losses)
    idata = r3.to_arviz(20)
    assert idata.posterior["c"].shape[:2] == (1, 20)


def test_resume_with_a_different_part_estimator_is_refused(tmp_path):
    """The estimator's identity lists every part: a checkpoint of one configuration is not resumed
    by another, while the same configuration (defaults spelled out or not) resumes."""
    model = discrete_mixture(n=30, dtype=torch.float64)
    ck = tmp_path / "ck.pt"
    first = PerSite({"c": ScoreFunction(MovingAverage(0.9))})
    vipkg.fit(model, _checkpoint_guide(model), first, steps=10, progress=False, checkpoint=ck)
    assert repr(first) == "PerSite({'mu': Reparam(), 'c': ScoreFunction(MovingAverage(beta=0.9))})"
    for other in (
        PerSite({"c": ScoreFunction(LeaveOneOut())}),
        PerSite({"c": ScoreFunction(MovingAverage(0.5))}),
        PerSite({"mu": vipkg.STL(), "c": ScoreFunction(MovingAverage(0.9))}),
    ):
        with pytest.raises(CheckpointError, match="estimator"):
            vipkg.fit(
                model, _checkpoint_guide(model), other, steps=20, progress=False, checkpoint=ck, resume=True
            )
    same = PerSite({"c": ScoreFunction(MovingAverage(0.9)), "mu": Reparam()})
    r = vipkg.fit(model, _checkpoint_guide(model), same, steps=20, progress=False, checkpoint=ck, resume=True)
    assert r.losses.shape == (20,)


def test_auto_builds_the_usual_split():
    from vipkg.guides.discrete import Bernoulli
    from vipkg.models.mixture import sigmoid_belief_net

    g, est = per_site.auto(discrete_mixture(n=20))
    assert g.part_sites == [("mu",), ("c",)]
    assert isinstance(g.parts[0], MeanFieldNormal) and isinstance(g.parts[1], Categorical)
    assert isinstance(dict(est._estimators())[("c",)].control_variate, LeaveOneOut)
    assert repr(est) == "PerSite({'mu': Reparam(), 'c': ScoreFunction(LeaveOneOut())})"
    sbn, _ = PerSite.auto(sigmoid_belief_net(n=10, hidden=3), discrete_estimator=ScoreFunction)
    assert sbn.part_sites == [("W", "b"), ("h",)] and isinstance(sbn.parts[1], Bernoulli)
    assert sbn.parts[0].dim == 3 * 64 + 64
    with pytest.raises(ValueError, match="no discrete sites"):
        per_site.auto(vipkg.models.gaussian(dim=2))
    # GumbelSoftmax cannot serve a boolean site: the per-site check says so.
    sbn, est = per_site.auto(sigmoid_belief_net(n=10, hidden=3), discrete_estimator=GumbelSoftmax)
    with pytest.raises(IncompatibleEstimatorError, match="Categorical"):
        est.check(sigmoid_belief_net(n=10, hidden=3), sbn, vipkg.ELBO())


def test_deprecated_pair_form_and_estimator_still_work():
    """The old spelling warns and builds the same estimator as the new one."""
    model = _small_model()
    with pytest.warns(DeprecationWarning, match="PerSite"):
        guide = Composite(
            model, {"mu": (MeanFieldNormal, Reparam()), "c": (Categorical, ScoreFunction(LeaveOneOut()))}
        )
    with pytest.warns(DeprecationWarning, match="estimator"):
        est = guide.estimator()
    assert repr(est) == "PerSite({'mu': Reparam(), 'c': ScoreFunction(LeaveOneOut())})"
    bare = PerSite()
    bare.check(model, guide, vipkg.ELBO())
    assert repr(bare) == repr(est)
    est.estimate(model, guide, vipkg.ELBO(), 4)
    with pytest.warns(DeprecationWarning, match="discrete_estimator"):
        old = Composite.auto(
            discrete_mixture(n=20), discrete_estimator=lambda: ScoreFunction(MovingAverage())
        )
    assert old.part_estimators[0] is None and isinstance(
        old.part_estimators[1].control_variate, MovingAverage
    )
    with pytest.warns(DeprecationWarning, match="moved"):
        from vipkg.guides.composite import PerSite as Old
    assert Old is PerSite
    with pytest.warns(DeprecationWarning, match="moved"):
        assert vipkg.guides.PerSite is PerSite


def _gamma_normal_model():
    """lam ~ Gamma(3, 2), mu ~ N(0.5, 1.5): a normalized target, so the ELBO is minus two KLs."""
    prior_lam = torch.distributions.Gamma(
        torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    )
    prior_mu = torch.distributions.Normal(
        torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    )

    def log_joint(latents, data):
        return prior_lam.log_prob(latents["lam"]) + prior_mu.log_prob(latents["mu"])

    sites = {"lam": Site(torch.Size([]), constraints.positive), "mu": Site(torch.Size([]), constraints.real)}
    return Model(sites, log_joint, name="gamma_normal"), prior_lam, prior_mu


@pytest.mark.parametrize("correction", [True, False])
def test_rsvi_part_next_to_a_reparam_part_is_unbiased(correction):
    """RSVI on a Gamma site and Reparam on a Gaussian site in one PerSite estimate match the
    closed-form ELBO gradient; without RSVI's correction term (at B = 0, where it matters most)
    the same check sees the bias."""
    from torch.distributions import Gamma as TorchGamma
    from torch.distributions import Normal, kl_divergence

    from vipkg.estimators.rsvi import RSVI
    from vipkg.guides.positive import Gamma

    model, prior_lam, prior_mu = _gamma_normal_model()
    guide = Composite(
        model,
        {
            "lam": lambda m, **kw: Gamma(m, concentration=1.4, rate=0.8, **kw),
            "mu": lambda m, **kw: MeanFieldNormal(m, loc=-0.3, scale=0.7, **kw),
        },
        dtype=torch.float64,
    )
    est = PerSite({"lam": RSVI(boost=1 if correction else 0, correction=correction), "mu": Reparam()})
    g_lam, g_mu = guide.parts
    elbo = -(
        kl_divergence(TorchGamma(g_lam.concentration[0], g_lam.rate[0]), prior_lam)
        + kl_divergence(Normal(g_mu.loc[0], g_mu.scale[0]), prior_mu)
    )
    exact = exact_loss_gradient(guide, elbo)
    n = 256 if not correction else 16
    samples = gradient_samples(model, guide, est, num_particles=n, repeats=300, seed=2)
    if correction:
        assert_unbiased(samples, exact)
    else:
        with pytest.raises(AssertionError, match="standard errors"):
            assert_unbiased(samples, exact)
