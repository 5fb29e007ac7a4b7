import numpy as np
import pytest
import torch
from torch.distributions import constraints

import vipkg
from vipkg.estimators.stein import SVGD, MirroredSVGD
from vipkg.guides.particles import (
    Empirical,
    EntropicBox,
    EntropicOrthant,
    EntropicSimplex,
    Particles,
    as_mirror_map,
)

F64 = torch.float64


def _simplex_model(D=4):
    alpha = torch.arange(1.0, D + 1, dtype=F64)
    return vipkg.Model.from_log_density(
        lambda x: torch.xlogy(alpha - 1, x).sum(-1), D, support=constraints.simplex, name="dirichlet"
    )


# --------------------------------------------------------------------- construction
def test_construction_from_n_or_particles():
    model = vipkg.models.gaussian(dim=3, dtype=F64)
    g = Particles(model, dtype=F64)
    assert g.particles.shape == (100, 3) and isinstance(g.particles, torch.nn.Parameter)
    assert [n for n, _ in g.named_parameters()] == ["particles"]
    x = torch.randn(7, 3, dtype=F64)
    g = Particles(model, particles=x)
    torch.testing.assert_close(g.particles.detach(), x)
    assert g.num_particles == 7 and g.dtype == F64
    # the guide owns a copy
    x.zero_()
    assert bool((g.particles != 0).any())


def test_construction_is_seeded_and_leaves_the_global_rng_alone():
    model = vipkg.models.gaussian(dim=2)
    state = torch.get_rng_state()
    a = Particles(model, n=5, seed=1).particles.detach()
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(Particles(model, n=5, seed=1).particles.detach(), a)
    assert not torch.equal(Particles(model, n=5, seed=2).particles.detach(), a)
    u = Particles(model, n=50, init="uniform", init_scale=0.5).particles.detach()
    assert float(u.abs().max()) <= 0.5


def test_construction_errors_say_what_fits():
    model = vipkg.models.gaussian(dim=3)
    with pytest.raises(ValueError, match=r"shape \[n, 3\]"):
        Particles(model, particles=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="agree"):
        Particles(model, n=5, particles=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="positive int"):
        Particles(model, n=0)
    with pytest.raises(ValueError, match="NaN"):
        Particles(model, particles=torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="init"):
        Particles(model, init="prior")
    with pytest.raises(ValueError, match="EntropicBox"):
        Particles(model, mirror="entropic")
    with pytest.raises(ValueError, match="one latent site"):
        Particles(vipkg.models.eight_schools(), mirror=EntropicOrthant())
    with pytest.raises(ValueError, match="strictly inside"):
        Particles(_simplex_model(3), particles=torch.tensor([[0.5, 0.5, 0.0]]), mirror="entropic")
    with pytest.raises(ValueError, match="strictly inside"):
        Particles(_simplex_model(3), particles=torch.tensor([[0.5, 0.5, 0.5]]), mirror="entropic")
    with pytest.raises(ValueError, match="interval"):
        Particles(_simplex_model(3), mirror=EntropicBox(0, 1))


# -------------------------------------------------------------------- distribution
def test_empirical_distribution_samples_particles_and_has_no_density():
    model = vipkg.models.gaussian(dim=2, dtype=F64)
    g = Particles(model, n=6, dtype=F64)
    q = g()
    assert isinstance(q, Empirical) and not q.has_rsample
    z = q.sample((4, 50))
    assert z.shape == (4, 50, 2) and not z.requires_grad
    rows = {tuple(r.tolist()) for r in g.particles.detach()}
    assert {tuple(r.tolist()) for r in z.reshape(-1, 2)} <= rows
    torch.testing.assert_close(q.mean, g.particles.mean(0))
    torch.testing.assert_close(q.variance, g.particles.var(0, unbiased=False))
    with pytest.raises(NotImplementedError, match="no density"):
        q.log_prob(z)
    with pytest.raises(NotImplementedError, match="SVGD"):
        g.rsample_and_log_prob((3,))
    with pytest.raises(vipkg.IncompatibleEstimatorError):
        vipkg.Reparam().check(model, g, vipkg.ELBO())


def test_fit_result_sample_and_arviz_export_the_particles():
    model = vipkg.models.eight_schools()
    guide = Particles(model, n=30, init_scale=0.5)
    result = vipkg.fit(model, guide, SVGD(), steps=20, progress=False)
    draws = result.sample(200)
    assert draws["theta_tilde"].shape == (200, 8) and bool((draws["tau"] > 0).all())
    idata = result.to_arviz(1000)
    assert idata.posterior["theta_tilde"].shape == (1, 30, 8)  # the particles themselves
    np.testing.assert_allclose(
        idata.posterior["mu"].values[0], model.constrain(guide.particles.detach())["mu"].numpy(), rtol=1e-6
    )
    assert "log_p" in idata.sample_stats and "log_q" not in idata.sample_stats
    assert "log_likelihood" in idata.groups()
    assert str(idata.optimization["estimator"].values) == "SVGD"


# ---------------------------------------------------------------------- mirrored
def test_mirrored_particles_live_on_the_simplex():
    model = _simplex_model(4)
    g = Particles(model, n=8, mirror="entropic", dtype=F64)
    assert [n for n, _ in g.named_parameters()] == ["dual"] and g.dual.shape == (8, 3)
    x = g.particles
    assert x.shape == (8, 4) and x.requires_grad
    torch.testing.assert_close(x.sum(-1).detach(), torch.ones(8, dtype=F64))
    x0 = torch.distributions.Dirichlet(torch.ones(4, dtype=F64)).sample((5,))
    g = Particles(model, particles=x0, mirror=EntropicSimplex())
    torch.testing.assert_close(g.particles.detach(), x0)
    result = vipkg.fit(model, g, MirroredSVGD(), steps=5, progress=False)
    assert result.sample(10)["x"].shape == (10, 4)
    idata = result.to_arviz()
    assert idata.posterior["x"].shape == (1, 5, 4)


@pytest.mark.parametrize("mirror", [EntropicSimplex(), EntropicBox(-1.0, 2.0), EntropicOrthant()], ids=repr)
def test_dual_score_is_the_score_of_the_dual_variable(mirror):
    """``dual_score`` = grad_eta [log p(x(eta)) + log |det dtheta/deta|], by a change of variables."""
    g = torch.Generator().manual_seed(0)
    d = 4
    eta = torch.randn(5, d, generator=g, dtype=F64)
    w = torch.randn(d + (1 if isinstance(mirror, EntropicSimplex) else 0), generator=g, dtype=F64)

    def log_p(x):
        return (w * x).sum(-1) - x.square().sum(-1)

    def log_p_dual(e):
        theta_of = lambda v: mirror.primal(mirror.to_full(v))  # noqa: E731
        jac = torch.func.vmap(torch.func.jacrev(theta_of))(e)
        return log_p(mirror.to_full(e)) + torch.linalg.slogdet(jac)[1]

    e = eta.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(log_p_dual(e).sum(), e)
    x = mirror.to_full(eta).requires_grad_(True)
    (grad,) = torch.autograd.grad(log_p(x).sum(), x)
    torch.testing.assert_close(mirror.dual_score(x.detach(), grad), expected)
    torch.testing.assert_close(mirror.to_dual(mirror.to_full(eta)), eta)
    # (grad^2 psi)^{-1} = diag(a) - b b^T is the Jacobian of theta(eta)
    a, b = mirror.inv_hessian(mirror.to_full(eta))
    H_inv = torch.diag_embed(a) - (0 if b is None else b[:, :, None] * b[:, None, :])
    jac = torch.func.vmap(torch.func.jacrev(lambda v: mirror.primal(mirror.to_full(v))))(eta)
    torch.testing.assert_close(H_inv, jac)


def test_mirror_maps_validate():
    assert isinstance(as_mirror_map("entropic"), EntropicSimplex)
    with pytest.raises(ValueError, match="unknown mirror map"):
        as_mirror_map("logbarrier")
    with pytest.raises(ValueError, match="lo < hi"):
        EntropicBox(1.0, 0.0)
    assert EntropicBox(0, 1) == EntropicBox(0.0, 1.0) != EntropicBox(0, 2)
    box = vipkg.Model.from_log_density(lambda x: -x.sum(-1), 2, support=constraints.interval(0.0, 2.0))
    Particles(box, n=3, mirror=EntropicBox(0, 2))
    with pytest.raises(ValueError, match=r"interval\(0.0, 1.0\)"):
        Particles(box, n=3, mirror=EntropicBox(0, 1))
    pos = vipkg.Model.from_log_density(lambda x: -x.sum(-1), 2, support=constraints.positive)
    g = Particles(pos, n=3, mirror=EntropicOrthant())
    assert bool((g.particles > 0).all())
