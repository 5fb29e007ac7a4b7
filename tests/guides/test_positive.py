import pytest
import torch
from torch.distributions import constraints

import vipkg
from vipkg.guides.positive import Beta, Dirichlet, Gamma
from vipkg.model import Model, Site
from vipkg.models.conjugate import dirichlet_multinomial, gamma_poisson

F64 = torch.float64


def _two_positive_sites():
    sites = {
        "a": Site(torch.Size([2, 3]), constraints.positive),
        "b": Site(torch.Size([]), constraints.positive),
    }

    def lj(lat, data):
        return -lat["a"].sum((-1, -2)) - 2.0 * lat["b"]

    return Model(sites, lj, name="two_sites")


def _mixed_model():
    sites = {
        "p": Site(torch.Size([2]), constraints.unit_interval),
        "x": Site(torch.Size([]), constraints.real),
    }
    return Model(sites, lambda lat, data: lat["x"] * 0 + lat["p"].sum(-1), name="mixed")


def test_gamma_guide_flattens_sites_and_constrains_back():
    model = _two_positive_sites()
    conc = {"a": torch.full((2, 3), 2.0), "b": torch.tensor(0.5)}
    guide = Gamma(model, concentration=conc, rate=3.0, dtype=F64)
    assert guide.numel == 7 and not guide.unconstrained
    assert torch.allclose(guide.concentration, torch.tensor([2.0] * 6 + [0.5], dtype=F64))
    assert torch.allclose(guide.rate, torch.full((7,), 3.0, dtype=F64))
    z, log_q = guide.rsample_and_log_prob((5, 2))
    assert z.shape == (5, 2, 7) and log_q.shape == (5, 2) and z.requires_grad
    assert torch.allclose(log_q, guide().log_prob(z))
    lj = guide.log_joint(model, z)
    assert lj.shape == (5, 2)
    sites = guide.constrain(model, z.reshape(10, 7))
    assert sites["a"].shape == (10, 2, 3) and sites["b"].shape == (10,)
    assert torch.allclose(lj.reshape(-1), model.log_joint(sites))


def test_properties_are_differentiable_and_positive():
    model = _two_positive_sites()
    g = Gamma(model)
    (g.concentration.sum() + g.rate.sum()).backward()
    assert g.raw_concentration.grad is not None and g.raw_rate.grad is not None
    beta = Beta(Model.from_log_density(lambda x: x.sum(-1), 3, constraints.unit_interval))
    (beta.concentration1 * beta.concentration0).sum().backward()
    assert beta.raw_concentration1.grad is not None


@pytest.mark.parametrize("family", ["gamma", "beta", "dirichlet"])
def test_transform_of_standard_gammas_has_the_guide_law(family):
    """The map RSVI differentiates through gives draws with the guide's mean and variance."""
    if family == "gamma":
        guide = Gamma(gamma_poisson(), concentration=torch.tensor([0.5, 2.0, 7.0]), rate=2.0, dtype=F64)
    elif family == "beta":
        model = Model.from_log_density(lambda x: x.sum(-1), 2, constraints.unit_interval)
        guide = Beta(
            model, concentration1=torch.tensor([0.5, 3.0]), concentration0=torch.tensor([2.0, 1.0]), dtype=F64
        )
    else:
        guide = Dirichlet(
            dirichlet_multinomial(4), concentration=torch.tensor([0.5, 1.0, 2.0, 4.0]), dtype=F64
        )
    n = 40_000
    with torch.no_grad():
        a = guide.gamma_concentration()
        g = torch._standard_gamma(a.expand(n, *a.shape).contiguous())
        z = guide.transform_log_gamma(g.log())
        q = guide()
        mean, var = q.mean, q.variance
    assert z.shape == (n, *q.event_shape)
    assert ((z.mean(0) - mean).abs() < 4 * (var / n).sqrt()).all()
    assert torch.allclose(z.var(0), var, rtol=0.08)


def test_dirichlet_batch_of_simplices():
    model = Model(
        {"theta": Site(torch.Size([3, 4]), constraints.simplex)},
        lambda lat, data: lat["theta"].log().sum((-1, -2)),
        name="batched_simplex",
    )
    guide = Dirichlet(model, concentration=2.0, dtype=F64)
    assert guide.concentration.shape == (3, 4)
    z, log_q = guide.rsample_and_log_prob((5, 2))
    assert z.shape == (5, 2, 3, 4) and log_q.shape == (5, 2)
    assert torch.allclose(z.sum(-1), torch.ones(5, 2, 3, dtype=F64))
    assert guide.log_joint(model, z).shape == (5, 2)
    assert guide.constrain(model, z[:, 0])["theta"].shape == (5, 3, 4)


def test_fit_sample_and_arviz_work_with_named_site_guides():
    model = dirichlet_multinomial(dtype=F64)
    guide = Dirichlet(model, dtype=F64)
    r = vipkg.fit(model, guide, vipkg.Reparam(), steps=5, progress=False)
    s = r.sample(10, seed=0)
    assert s["theta"].shape == (10, 5)
    idata = r.to_arviz(20)
    assert idata.posterior["theta"].shape[:2] == (1, 20)
    assert "counts" in idata.log_likelihood


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: Gamma(dirichlet_multinomial()),
            r"positive sites, but model 'dirichlet_multinomial'.*Dirichlet",
        ),
        (lambda: Gamma(gamma_poisson(), sites="mu"), r"no site 'mu'.*\['lam'\]"),
        (lambda: Dirichlet(gamma_poisson(), site="lam"), r"site 'lam'.*support.*use Gamma"),
        (lambda: Beta(_mixed_model()), r"covers \['p'\].*'x'.*MeanFieldNormal.*Composite"),
        (
            lambda: Gamma(gamma_poisson(), concentration=-1.0),
            "concentration must be finite and strictly positive",
        ),
        (lambda: Gamma(gamma_poisson(), rate=torch.ones(4)), r"rate must be a scalar or have shape \(3,\)"),
        (lambda: Gamma(_two_positive_sites(), concentration={"a": 1.0}), "exactly the sites"),
        (lambda: Dirichlet(dirichlet_multinomial(), concentration=torch.ones(3)), r"shape \(5,\)"),
        (lambda: Dirichlet(dirichlet_multinomial(), concentration={"theta": 1.0}), "not a dict"),
        (
            lambda: Gamma(_two_positive_sites(), concentration={"a": torch.ones(4), "b": 1.0}),
            r"concentration\['a'\] must be a scalar or have the site's shape \(2, 3\)",
        ),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_pyro_supports_are_recognized():
    """Pyro reports Gamma's support as nonnegative and wraps it in independent(...)."""
    guide = Gamma(Model.from_pyro(_pyro_gamma))
    assert guide.numel == 3


def _pyro_gamma():
    import pyro
    import pyro.distributions as dist

    pyro.sample("lam", dist.Gamma(torch.ones(3), 1.0).to_event(1))
