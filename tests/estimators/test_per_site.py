"""PerSite: every part estimator, per site next to a Reparam part, against a closed-form ELBO gradient.

The model couples a positive site and a real one through the data, so the score terms'
costs matter: ``lam ~ Gamma(3, 2)``, ``mu ~ N(0.5, 1.5)``, ``x_i ~ N(mu, lam^-1/2)``. Its ELBO
has a closed form for a Gamma or a log-normal (Gaussian over ``log lam``) family on ``lam``
and a Gaussian on ``mu``. With ``with_terms`` the model exposes its log joint split into
terms, so score terms are Rao-Blackwellized; without, they are weighted by the whole bound.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import constraints

import vipkg
from tests.estimators.contract import Case, EstimatorContract
from tests.estimators.example_part import Antithetic
from tests.helpers import assert_unbiased, exact_loss_gradient, gaussian_elbo, random_gaussian_target
from vipkg.diagnostics import gradient_samples
from vipkg.estimators import (
    BWSGD,
    FBGVI,
    RSVI,
    STL,
    SVGD,
    DReG,
    FastPath,
    GumbelSoftmax,
    IncompatibleEstimatorError,
    LeaveOneOut,
    MirroredSVGD,
    MovingAverage,
    Reparam,
    ScoreFunction,
)
from vipkg.estimators.per_site import PerSite
from vipkg.guides import Categorical, Composite, Gamma, MeanFieldNormal
from vipkg.model import Model, Site

F64 = torch.float64
X = torch.tensor([0.3, 1.1, -0.4, 0.8], dtype=F64)
A0, B0, M0, S0 = 3.0, 2.0, 0.5, 1.5
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _model(with_terms: bool) -> Model:
    # validate_args=False: the support checks read on the host (the estimator contract's guard)
    prior_lam = torch.distributions.Gamma(
        torch.tensor(A0, dtype=F64), torch.tensor(B0, dtype=F64), validate_args=False
    )
    prior_mu = torch.distributions.Normal(
        torch.tensor(M0, dtype=F64), torch.tensor(S0, dtype=F64), validate_args=False
    )

    def terms(latents, data):
        lam, mu = latents["lam"], latents["mu"]
        x = data["x"]
        lik = 0.5 * torch.log(lam)[:, None] - HALF_LOG_2PI - 0.5 * lam[:, None] * (x - mu[:, None]) ** 2
        return {"lam": prior_lam.log_prob(lam), "mu": prior_mu.log_prob(mu), "x": lik}

    def log_joint(latents, data):
        t = terms(latents, data)
        return t["lam"] + t["mu"] + t["x"].sum(-1)

    kw = {"log_joint_terms": terms, "term_sites": {"lam": {"lam"}, "mu": {"mu"}, "x": {"lam", "mu"}}}
    sites = {"lam": Site(torch.Size([]), constraints.positive), "mu": Site(torch.Size([]), constraints.real)}
    return Model(sites, log_joint, data={"x": X}, name="gamma_normal_obs", **(kw if with_terms else {}))


def _gamma(m, **kw):
    return Gamma(m, concentration=2.5, rate=1.7, **kw)


def _log_normal(m, **kw):
    return MeanFieldNormal(m, loc=0.3, scale=0.4, **kw)


def _normal(m, **kw):
    return MeanFieldNormal(m, loc=-0.2, scale=0.6, **kw)


def _guide(lam_family, mu_family=_normal):
    return Composite(_model(False), {"lam": lam_family, "mu": mu_family}, dtype=F64)


def _exact_elbo(guide):
    g_lam, g_mu = guide.parts
    if isinstance(g_lam, Gamma):
        a, b = g_lam.concentration[0], g_lam.rate[0]
        e_log, e_lam = torch.digamma(a) - torch.log(b), a / b
        entropy_lam = torch.distributions.Gamma(a, b).entropy()
    else:  # a Gaussian over log lam: lam is log-normal
        ml, sl = g_lam.loc[0], g_lam.scale[0]
        e_log, e_lam = ml, torch.exp(ml + 0.5 * sl**2)
        entropy_lam = ml + 0.5 * torch.log(2 * math.pi * math.e * sl**2)
    m, s = g_mu.loc[0], g_mu.scale[0]
    prior_lam = A0 * math.log(B0) - math.lgamma(A0) + (A0 - 1) * e_log - B0 * e_lam
    prior_mu = -0.5 * math.log(2 * math.pi * S0**2) - ((m - M0) ** 2 + s**2) / (2 * S0**2)
    entropy_mu = 0.5 * torch.log(2 * math.pi * math.e * s**2)
    lik = (0.5 * e_log - HALF_LOG_2PI - 0.5 * e_lam * ((X - m) ** 2 + s**2)).sum()
    return prior_lam + prior_mu + lik + entropy_lam + entropy_mu


def test_closed_form_elbo_matches_monte_carlo():
    """The closed form the checks below rely on, against 200k draws of each family."""
    model = _model(False)
    for family in (_gamma, _log_normal):
        guide = _guide(family)
        torch.manual_seed(0)
        with torch.no_grad():
            z, log_q = guide.rsample_and_log_prob((200_000,))
            log_w = model.log_joint(z) - log_q
        se = float(log_w.std()) / math.sqrt(log_w.numel())
        assert abs(float(log_w.mean()) - float(_exact_elbo(guide))) < 4 * se


#: (id, family on lam, part estimator on lam, particles); mu always has Reparam on a Gaussian.
CASES = [
    ("reparam-gamma", _gamma, Reparam, 8),
    ("reparam-lognormal", _log_normal, Reparam, 8),
    ("stl-lognormal", _log_normal, STL, 8),
    ("rsvi-boost1", _gamma, lambda: RSVI(boost=1), 8),
    ("rsvi-boost3", _gamma, lambda: RSVI(boost=3), 8),
    ("score-loo-gamma", _gamma, lambda: ScoreFunction(LeaveOneOut()), 16),
    ("score-loo-lognormal", _log_normal, lambda: ScoreFunction(LeaveOneOut()), 16),
    ("score-moving-average", _gamma, lambda: ScoreFunction(MovingAverage()), 16),
    ("score-plain", _gamma, ScoreFunction, 16),
    ("antithetic-example", _log_normal, Antithetic, 8),
]


@pytest.mark.parametrize("with_terms", [True, False], ids=["rao_blackwellized", "whole"])
@pytest.mark.parametrize(("family", "make", "particles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_part_estimator_is_unbiased_next_to_a_reparam_part(family, make, particles, with_terms):
    model = _model(with_terms)
    guide = _guide(family)
    est = PerSite({"lam": make(), "mu": Reparam()})
    exact = exact_loss_gradient(guide, _exact_elbo(guide))
    samples = gradient_samples(model, guide, est, num_particles=particles, repeats=300, seed=3)
    assert set(samples) == set(exact) and all(torch.isfinite(v).all() for v in samples.values())
    assert_unbiased(samples, exact)


class _NoScore(ScoreFunction):
    """A biased part estimator: the score-function part with its score term left out."""

    def draw(self, guide, model, shape):
        return dataclasses.replace(super().draw(guide, model, shape), score_terms=())


@pytest.mark.parametrize("with_terms", [True, False], ids=["rao_blackwellized", "whole"])
def test_the_check_has_power_when_the_score_term_is_dropped(with_terms):
    """The same check rejects a score-function part whose score term is left out, and RSVI without
    its correction (at B = 0, where it matters most)."""
    NoScore = _NoScore
    model = _model(with_terms)
    for family, part, particles in (
        (_gamma, NoScore(LeaveOneOut()), 16),
        (_log_normal, NoScore(LeaveOneOut()), 16),
        (lambda m, **kw: Gamma(m, concentration=1.4, rate=0.8, **kw), RSVI(boost=0, correction=False), 256),
    ):
        guide = _guide(family)
        exact = exact_loss_gradient(guide, _exact_elbo(guide))
        est = PerSite({"lam": part, "mu": Reparam()})
        samples = gradient_samples(model, guide, est, num_particles=particles, repeats=300, seed=3)
        with pytest.raises(AssertionError, match="standard errors"):
            assert_unbiased(samples, exact)


# ------------------------------------------------------------------ GumbelSoftmax, K = 2

SHIFT = torch.tensor([-1.0, 1.5], dtype=F64)
PRIOR = torch.tensor([0.3, -0.2], dtype=F64)
X_OBS = 1.3


def _binary_model() -> Model:
    """mu ~ N(0, 1), c ~ Categorical(softmax(PRIOR)) with K = 2, x = 1.3 ~ N(mu + SHIFT[c], 1)."""

    def log_joint(latents, data):
        mu, c = latents["mu"], latents["c"]
        log_pi = torch.log_softmax(PRIOR, -1)
        if c.is_floating_point() and c.dim() == 2:  # (relaxed) one-hot
            shift, lp_c = c @ SHIFT, c @ log_pi
        else:
            shift, lp_c = SHIFT[c.long()], log_pi[c.long()]
        lik = -0.5 * (X_OBS - mu - shift) ** 2 - HALF_LOG_2PI
        return -0.5 * mu**2 - HALF_LOG_2PI + lp_c + lik

    sites = {
        "mu": Site(torch.Size([]), constraints.real),
        "c": Site(torch.Size([]), constraints.integer_interval(0, 1)),
    }
    return Model(sites, log_joint, name="binary_mixture")


def _relaxed_elbo(guide, tau: float, grid: int = 200_000):
    """The bound GumbelSoftmax(tau, kl="analytic") estimates, by quadrature.

    GumbelSoftmax is biased for the discrete ELBO at every tau > 0 by design, so it is checked
    against the objective it is unbiased for: E over the Concrete draw y of the model's log
    joint at y, plus the exact entropies. With K = 2, y_0 = sigmoid((l_0 - l_1 + L) / tau) with
    L = g_0 - g_1 ~ Logistic(0, 1), a one-dimensional integral over L's quantiles; at tau = 1
    (or 1/2) y_0 is a rational function of the quantile level u (u e^d / (u e^d + 1 - u)), so the
    midpoint rule is accurate to O(1 / grid^2). The Gaussian site enters in closed form.
    """
    g_mu, g_c = guide.parts
    m, s = g_mu.loc[0], g_mu.scale[0]
    logits = g_c.raw_logits["c"]
    u = (torch.arange(grid, dtype=F64) + 0.5) / grid
    y0 = torch.sigmoid((logits[0] - logits[1] + torch.log(u) - torch.log1p(-u)) / tau)
    y = torch.stack([y0, 1 - y0], -1)
    log_pi = torch.log_softmax(PRIOR, -1)
    lik = -HALF_LOG_2PI - 0.5 * ((X_OBS - m - y @ SHIFT) ** 2 + s**2)
    prior_mu = -HALF_LOG_2PI - 0.5 * (m**2 + s**2)
    entropy_mu = 0.5 * torch.log(2 * math.pi * math.e * s**2)
    entropy_c = torch.distributions.Categorical(logits=logits).entropy()
    return prior_mu + entropy_mu + (lik + y @ log_pi).mean() + entropy_c


def test_gumbel_softmax_part_is_unbiased_for_the_relaxed_objective():
    model = _binary_model()
    guide = Composite(
        model,
        {
            "mu": lambda m, **kw: MeanFieldNormal(m, loc=0.2, scale=0.7, **kw),
            "c": lambda m, **kw: Categorical(m, logits=torch.tensor([0.4, -0.2]), **kw),
        },
        dtype=F64,
    )
    est = PerSite({"mu": Reparam(), "c": GumbelSoftmax(1.0)})
    exact = exact_loss_gradient(guide, _relaxed_elbo(guide, 1.0))
    samples = gradient_samples(model, guide, est, num_particles=64, repeats=400, seed=4)
    assert_unbiased(samples, exact)
    # power: the discrete ELBO's gradient (what the relaxation is biased for) is rejected
    logits = guide.parts[1].raw_logits["c"]
    q = torch.softmax(logits, -1)
    g_mu = guide.parts[0]
    m, s = g_mu.loc[0], g_mu.scale[0]
    lik = -HALF_LOG_2PI - 0.5 * ((X_OBS - m - SHIFT) ** 2 + s**2)
    discrete = (
        -HALF_LOG_2PI
        - 0.5 * (m**2 + s**2)
        + 0.5 * torch.log(2 * math.pi * math.e * s**2)
        + (q * (lik + torch.log_softmax(PRIOR, -1) - torch.log_softmax(logits, -1))).sum()
    )
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(samples, exact_loss_gradient(guide, discrete))


# ------------------------------------------------------------------ the example part estimator


def test_example_part_estimator_works_alone_and_per_site():
    """tests/estimators/example_part.py is one class; it is unbiased on a single family and per site."""
    target = random_gaussian_target(d=3, seed=5)
    guide = MeanFieldNormal(target, loc=torch.zeros(3), scale=torch.full((3,), 0.8), dtype=F64)
    exact = exact_loss_gradient(
        guide, gaussian_elbo(guide, target.reference["mean"], target.reference["cov"])
    )
    samples = gradient_samples(target, guide, Antithetic(), num_particles=8, repeats=300, seed=6)
    assert_unbiased(samples, exact)
    # per site, next to an RSVI part, on the coupled model with terms
    model = _model(True)
    guide = _guide(_gamma, _normal)
    exact = exact_loss_gradient(guide, _exact_elbo(guide))
    est = PerSite({"lam": RSVI(boost=1), "mu": Antithetic()})
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=300, seed=7)
    assert_unbiased(samples, exact)
    assert repr(est) == "PerSite({'lam': RSVI(boost=1, correction=True), 'mu': Antithetic()})"


# ------------------------------------------------------------------ update estimators


UPDATE_ESTIMATORS = [SVGD, MirroredSVGD, lambda: FBGVI(0.1), lambda: BWSGD(0.1), FastPath, DReG]


@pytest.mark.parametrize(
    "make", UPDATE_ESTIMATORS, ids=["SVGD", "MirroredSVGD", "FBGVI", "BWSGD", "FastPath", "DReG"]
)
def test_update_estimators_are_refused_per_site(make):
    est = make()
    assert type(est).composable is False
    with pytest.raises(IncompatibleEstimatorError, match="update estimator"):
        PerSite({"mu": est})
    # the deprecated pair form reaches the same refusal when PerSite meets the guide
    model = _model(False)
    with pytest.warns(DeprecationWarning):
        guide = Composite(model, {"lam": _gamma, "mu": (_normal, est)}, dtype=F64)
    with pytest.raises(IncompatibleEstimatorError, match="update estimator"):
        PerSite().check(model, guide, vipkg.ELBO())


def test_part_estimators_say_so():
    for cls in (Reparam, STL, RSVI, ScoreFunction, GumbelSoftmax):
        assert cls.composable is True, cls
    assert PerSite.composable is False


# ------------------------------------------------------------------ defaults, identity, one evaluation


def test_defaults_and_repr_list_every_part():
    model = _model(True)
    guide = Composite(model, {"lam": _gamma, "mu": _normal}, dtype=F64)
    est = PerSite({"lam": ScoreFunction(MovingAverage(0.5))})
    assert repr(est) == "PerSite({'lam': ScoreFunction(MovingAverage(beta=0.5))})"
    est.check(model, guide, vipkg.ELBO())
    assert repr(est) == "PerSite({'lam': ScoreFunction(MovingAverage(beta=0.5)), 'mu': Reparam()})"
    assert repr(PerSite({("a", "b"): Reparam()})) == "PerSite({('a', 'b'): Reparam()})"
    # a discrete part without an estimator gets ScoreFunction(LeaveOneOut())
    disc = _binary_model()
    bare = PerSite()
    bare.check(disc, Composite(disc, {"mu": MeanFieldNormal, "c": Categorical}), vipkg.ELBO())
    assert repr(bare) == "PerSite({'mu': Reparam(), 'c': ScoreFunction(LeaveOneOut())})"


def test_model_terms_are_evaluated_once_per_step():
    """Rao-Blackwellized costs for every scored part come from one evaluation of the terms, which
    also gives the log joint: one model evaluation per step, whatever the number of parts."""
    model = _model(True)
    calls = {"terms": 0, "joint": 0}
    terms_fn, joint_fn = model._terms_fn, model._fn

    def counted_terms(latents, data):
        calls["terms"] += 1
        return terms_fn(latents, data)

    def counted_joint(latents, data):
        calls["joint"] += 1
        return joint_fn(latents, data)

    model._terms_fn, model._fn = counted_terms, counted_joint
    guide = _guide(_gamma, _normal)
    est = PerSite({"lam": ScoreFunction(LeaveOneOut()), "mu": ScoreFunction(LeaveOneOut())})
    est.estimate(model, guide, vipkg.ELBO(), 4)
    assert calls == {"terms": 1, "joint": 0}
    PerSite({"lam": Reparam(), "mu": Reparam()}).estimate(model, guide, vipkg.ELBO(), 4)
    assert calls == {"terms": 1, "joint": 1}


# ------------------------------------------------------------------ the estimator contract
class TestPerSiteContract(EstimatorContract):
    """PerSite on the coupled Gamma-Normal model (terms exposed: Rao-Blackwellized costs), a
    score-function part on lam next to a Reparam part on mu, against the closed-form ELBO
    gradient; biased variant: the score term left out. With a moving-average baseline the
    estimator has state (kept per part), for the round trip."""

    cases = [
        Case(
            f"persite-{name}-gamma",
            model=lambda: _model(True),
            guide=lambda m: _guide(_gamma),
            estimator=lambda cv=cv: PerSite({"lam": ScoreFunction(cv()), "mu": Reparam()}),
            num_particles=16,
            exact=lambda m, g: exact_loss_gradient(g, _exact_elbo(g)),
            biased=lambda: PerSite({"lam": _NoScore(LeaveOneOut()), "mu": Reparam()}),
            shift=0.5,  # standard errors 0.05 to 0.14
            seed=3,
            stateful=stateful,
            lr=0.05,
        )
        for name, cv, stateful in [
            ("score-loo", LeaveOneOut, False),
            ("score-moving-average", MovingAverage, True),
        ]
    ]


# ------------------------------------------------------------------ many discrete sites: a Markov chain
CHAIN_TRANS = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]], dtype=F64)


def _pyro_chain(y):
    """An HMM over ``len(y)`` categorical sites with latent emission means: each ``x_t`` has its own
    part, and its Rao-Blackwellized cost sees only ``x_t``'s, ``x_{t+1}``'s and ``y_t``'s terms."""
    import pyro
    import pyro.distributions as dist

    locs = pyro.sample("locs", dist.Normal(torch.zeros(3, dtype=F64), 3.0).to_event(1))
    x = 0
    for t in pyro.markov(range(len(y))):
        x = pyro.sample(f"x_{t}", dist.Categorical(CHAIN_TRANS[x]))
        pyro.sample(
            f"y_{t}", dist.Normal(locs.gather(-1, torch.as_tensor(x)[..., None])[..., 0], 1.0), obs=y[t]
        )


def _slow_cost(model, terms, sites, log_q):
    """The cost as written before the O(T) lookup: every term scanned for every factor, in the
    order of ``terms``, kept where ``model.term_sites`` says it depends on the factor's sites."""
    from vipkg.estimators.base import align_term

    cost = -log_q.detach()
    for name in terms:
        if set(model.term_sites.get(name, ())) & set(sites):
            cost = cost + align_term(terms[name].detach(), log_q.shape)
    return cost


def test_rao_blackwellized_chain_estimate_equals_the_slow_path():
    """On a chain of 60 categorical sites (one part each, next to a Reparam part on the emission
    means), the costs that estimate_parts forms from one lookup per site equal, bit for bit, the costs
    of scanning every term per factor, and the step's loss and gradient equal those of a surrogate
    rebuilt from those slow costs on the same draws."""
    from vipkg.estimators.base import rao_blackwell_cost, terms_by_site

    g = torch.Generator().manual_seed(0)
    y = (
        torch.randn(60, generator=g, dtype=F64)
        + torch.tensor([-2.0, 0.0, 2.0], dtype=F64)[torch.randint(3, (60,), generator=g)]
    )
    model = Model.from_pyro(_pyro_chain, y)
    guide, est = vipkg.estimators.per_site.auto(model, dtype=F64)
    assert len(guide.parts) == 61 and model.term_sites["x_5"] == {"x_4", "x_5"}
    with torch.no_grad():
        for p in guide.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    objective, S = vipkg.ELBO(), 8
    torch.manual_seed(3)
    info = est.estimate(model, guide, objective, S)
    fast = {n: p.grad.clone() for n, p in guide.named_parameters()}

    # The slow path, by hand, on the same draws (same seed, same order of draws).
    torch.manual_seed(3)
    parts = [
        (e, family, sub) for (_, e), family, sub in zip(est._resolve(guide), guide.parts, guide.sub_models)
    ]
    shape = torch.Size(objective.sample_shape(S))
    draws = [e.draw(family, sub, shape) for e, family, sub in parts]
    latents = {k: v for d in draws for k, v in d.latents.items()}
    log_q = sum(d.log_q for d in draws)
    terms = model.log_joint_terms(latents)
    by_site = terms_by_site(model, terms)
    log_w = sum(v.reshape(S, -1).sum(-1) for v in terms.values()) - log_q
    loss = -log_w.mean()
    score = 0.0
    n_terms = 0
    for (e, _, _), d in zip(parts, draws):
        for t in d.score_terms:
            cost = _slow_cost(model, terms, t.sites, t.log_q)
            assert torch.equal(rao_blackwell_cost(model, terms, t.sites, t.log_q, by_site), cost)
            w, _ = e.center(cost, ",".join(sorted(t.sites)))
            score = score + (w * t.log_prob).reshape(S, -1).sum(-1).mean()
            n_terms += 1
    assert n_terms == 60
    for p in guide.parameters():
        p.grad = None
    (loss - (score - score.detach())).backward()
    assert torch.allclose(info.loss, loss.detach(), rtol=1e-12, atol=0)
    for n, p in guide.named_parameters():
        assert torch.allclose(fast[n], p.grad, rtol=1e-10, atol=1e-12), n
