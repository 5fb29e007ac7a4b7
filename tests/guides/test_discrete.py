import itertools

import pytest
import torch
from torch.distributions import constraints

import vipkg
from tests.helpers import assert_unbiased, exact_loss_gradient
from vipkg.diagnostics import gradient_samples
from vipkg.estimators.base import IncompatibleEstimatorError
from vipkg.estimators.control_variates import LeaveOneOut
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.score import ScoreFunction
from vipkg.guides.discrete import Bernoulli, Categorical, num_categories
from vipkg.model import Model, Site

TABLE = torch.tensor(
    [[0.5, -1.0, 2.0, 0.0], [1.5, 0.2, -0.7, -2.0], [0.0, 3.0, -1.0, 1.0]], dtype=torch.float64
)


def _table_model(with_terms=True):
    """log p(c) = sum_n TABLE[n, c_n] + 0.3 [c_0 == c_1]: three categorical entries, one coupling."""

    def terms(latents, data):
        c, t = latents["c"], data["table"]
        if c.is_floating_point() and c.dim() == 3:  # one-hot
            own = (c * t).sum(-1)
            pair = (c[:, 0] * c[:, 1]).sum(-1)
        else:
            c = c.long()
            own = torch.gather(t.expand(c.shape[0], -1, -1), -1, c.unsqueeze(-1)).squeeze(-1)
            pair = (c[:, 0] == c[:, 1]).to(t.dtype)
        return {"own": own, "pair": 0.3 * pair}

    def log_joint(latents, data):
        t = terms(latents, data)
        return t["own"].sum(-1) + t["pair"]

    kw = {"log_joint_terms": terms, "term_sites": {"own": {"c"}, "pair": {"c"}}} if with_terms else {}
    return Model(
        {"c": Site(torch.Size([3]), constraints.integer_interval(0, 3))},
        log_joint,
        data={"table": TABLE},
        name="table",
        **kw,
    )


def _exact_elbo(guide):
    """ELBO by enumerating all 4^3 joint configurations."""
    logq = torch.log_softmax(guide.raw_logits["c"], -1)
    total = 0.0
    for cfg in itertools.product(range(4), repeat=3):
        lq = sum(logq[n, k] for n, k in enumerate(cfg))
        lp = sum(TABLE[n, k] for n, k in enumerate(cfg)) + 0.3 * float(cfg[0] == cfg[1])
        total = total + lq.exp() * (lp - lq)
    return total


def _categorical_guide(model):
    g = torch.Generator().manual_seed(0)
    return Categorical(
        model, logits=0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64), dtype=torch.float64
    )


@pytest.mark.parametrize("rb", [True, False], ids=["rao_blackwellized", "whole"])
@pytest.mark.parametrize("cv", [None, LeaveOneOut], ids=["plain", "loo"])
def test_score_function_on_categorical_is_unbiased(rb, cv):
    model = _table_model()
    guide = _categorical_guide(model)
    exact = exact_loss_gradient(guide, _exact_elbo(guide))
    est = ScoreFunction(None if cv is None else cv(), rao_blackwellize=rb)
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=400, seed=2)
    worst = assert_unbiased(samples, exact)
    assert max(worst.values()) > 0


def test_rao_blackwellization_reduces_variance():
    """Per-entry Rao-Blackwellization: each entry's score sees only its own terms (measured trace
    0.57 against 4.25 without: 7.4x; 3 entries, one coupling term shared by two of them)."""
    model = _table_model()
    guide = _categorical_guide(model)
    v = {}
    for rb in (True, False):
        s = gradient_samples(
            model, guide, ScoreFunction(rao_blackwellize=rb), num_particles=8, repeats=300, seed=4
        )
        v[rb] = float(s["raw_logits.c"].var(0).sum())
    assert v[True] < 0.8 * v[False], v


def test_bernoulli_guide_unbiased_by_enumeration():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def log_joint(latents, data):
        b = latents["b"]
        return b @ data["w"] + 0.7 * b[:, 0] * b[:, 2]

    model = Model({"b": Site(torch.Size([3]), constraints.boolean)}, log_joint, data={"w": w})
    guide = Bernoulli(model, logits=torch.tensor([0.3, -0.5, 1.0]), dtype=torch.float64)

    def exact():
        p = guide.probs
        total = 0.0
        for cfg in itertools.product((0.0, 1.0), repeat=3):
            b = torch.tensor(cfg, dtype=torch.float64)
            lq = (b * p.log() + (1 - b) * (1 - p).log()).sum()
            lp = b @ w + 0.7 * b[0] * b[2]
            total = total + lq.exp() * (lp - lq)
        return total

    samples = gradient_samples(
        model, guide, ScoreFunction(LeaveOneOut()), num_particles=8, repeats=400, seed=0
    )
    assert_unbiased(samples, exact_loss_gradient(guide, exact()))


def test_categorical_draws_shapes_and_padding():
    model = Model(
        {
            "a": Site(torch.Size([2]), constraints.integer_interval(0, 1)),
            "b": Site(torch.Size([]), constraints.integer_interval(0, 4)),
        },
        lambda latents, data: latents["a"].sum(-1).double() + latents["b"].double(),
    )
    guide = Categorical(model, dtype=torch.float64)
    assert guide.num_categories == {"a": 2, "b": 5}
    z, lq = guide.sample_and_log_prob((500,))
    assert z.shape == (500, 3) and lq.shape == (500,)
    latents = guide.constrain(model, z)
    assert latents["a"].shape == (500, 2) and latents["b"].shape == (500,)
    assert int(latents["a"].max()) <= 1 and int(latents["b"].max()) <= 4  # padded categories never drawn
    assert torch.allclose(
        lq,
        torch.full_like(lq, -2 * torch.log(torch.tensor(2.0)).item() - torch.log(torch.tensor(5.0)).item()),
    )
    flat, parts = guide.log_prob_parts(model, z)
    assert [p[1].shape for p in parts] == [(500, 2), (500,)]
    assert torch.allclose(parts[0][1].sum(-1) + parts[1][1], lq)
    assert torch.allclose(sum(guide.probs["a"].sum(-1)), torch.tensor(2.0, dtype=torch.float64))


def test_fit_categorical_guide_finds_the_exact_posterior():
    """With the coupling the posterior is not factorized; without it (pair weight 0) the optimal
    mean-field guide is the exact posterior softmax(TABLE)."""

    def log_joint(latents, data):
        c = latents["c"].long()
        return torch.gather(data["table"].expand(c.shape[0], -1, -1), -1, c.unsqueeze(-1)).squeeze(-1).sum(-1)

    def terms(latents, data):
        c = latents["c"].long()
        return {
            "own": torch.gather(data["table"].expand(c.shape[0], -1, -1), -1, c.unsqueeze(-1)).squeeze(-1)
        }

    model = Model(
        {"c": Site(torch.Size([3]), constraints.integer_interval(0, 3))},
        log_joint,
        data={"table": TABLE},
        log_joint_terms=terms,
        term_sites={"own": {"c"}},
    )
    guide = Categorical(model, dtype=torch.float64)
    vipkg.fit(
        model, guide, ScoreFunction(LeaveOneOut()), steps=600, num_particles=16, lr=0.05, progress=False
    )
    assert (guide.probs["c"] - torch.softmax(TABLE, -1)).abs().max() < 0.05


def test_errors_name_what_fits():
    gauss = vipkg.models.gaussian(dim=2)
    with pytest.raises(ValueError, match="categorical"):
        Categorical(gauss)
    with pytest.raises(ValueError, match="boolean"):
        Bernoulli(gauss)
    model = _table_model()
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        Categorical(model, logits=torch.zeros(2, 3))
    with pytest.raises(IncompatibleEstimatorError, match="ScoreFunction"):
        Reparam().check(model, Categorical(model), vipkg.ELBO())
    assert num_categories(constraints.integer_interval(0, 6)) == 7
    assert num_categories(constraints.real) is None
    with pytest.raises(ValueError, match="MeanFieldNormal"):
        vipkg.guides.MeanFieldNormal(model)


B_MEANS = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
X_DATA = torch.tensor([0.3, -1.2, 2.5, 1.0], dtype=torch.float64)


def _pyro_assignments(x):
    import pyro
    import pyro.distributions as dist

    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3, dtype=x.dtype)))
        pyro.sample("x", dist.Normal(B_MEANS[c], 1.0), obs=x)


def test_pyro_program_is_rao_blackwellized_per_datum():
    """From the Pyro program's plate and dependencies: each assignment's score sees only its own
    datum. Unbiased against enumeration both ways; measured trace 3.8 (per datum) against 31.9
    (whole ELBO), 8 particles."""
    model = Model.from_pyro(_pyro_assignments, X_DATA)
    assert model.has_terms and model.term_sites["x"] == {"c"}
    g = torch.Generator().manual_seed(0)
    guide = Categorical(
        model, logits=torch.randn(4, 3, generator=g, dtype=torch.float64), dtype=torch.float64
    )
    logq = torch.log_softmax(guide.raw_logits["c"], -1)
    loglik = torch.distributions.Normal(B_MEANS, 1.0).log_prob(X_DATA[:, None])
    exact_elbo = (logq.exp() * (loglik - torch.log(torch.tensor(3.0)) - logq)).sum()
    exact = exact_loss_gradient(guide, exact_elbo)
    v = {}
    for rb in (True, False):
        s = gradient_samples(
            model, guide, ScoreFunction(rao_blackwellize=rb), num_particles=8, repeats=300, seed=0
        )
        assert_unbiased(s, exact)
        v[rb] = float(s["raw_logits.c"].var(0).sum())
    assert v[True] < 0.5 * v[False], v


def test_scalar_boolean_site_fits_on_the_rao_blackwellized_path():
    """Regression: a 0-d Bernoulli latent crashed with ``reshape() missing 1 required positional
    argument`` (an unbatched draw of a scalar site reshaped to ``reshape(*())``)."""
    import pyro
    import pyro.distributions as dist

    from vipkg.estimators.per_site import PerSite
    from vipkg.guides import Composite, MeanFieldNormal

    def model():
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        b = pyro.sample("b", dist.Bernoulli(p))
        pyro.sample("y", dist.Normal(b, 1.0), obs=torch.tensor(0.7))

    m = vipkg.Model.from_pyro(model)
    assert m.sites["b"].shape == () and m.has_terms
    guide = Composite(m, {"p": MeanFieldNormal, "b": Bernoulli})
    assert guide.sample_and_log_prob(())[0]["b"].shape == ()
    r = vipkg.fit(m, guide, PerSite(), steps=30, progress=False)
    assert torch.isfinite(r.losses).all()
