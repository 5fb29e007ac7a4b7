import math

import pytest
import torch

import vipkg
from vipkg.guides import FullRankNormal
from vipkg.models.targets import banana, banana_sample

F64 = torch.float64


@pytest.mark.parametrize("dim", [2, 4])
def test_tensor_and_pyro_forms_agree(dim):
    a = banana(dim, form="tensor", dtype=F64)
    b = banana(dim, form="pyro", dtype=F64)
    assert list(a.sites) == ["x1", "x2"] == list(b.sites)
    u = 10 * torch.randn(7, dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(a.log_joint_unconstrained(u), b.log_joint_unconstrained(u), rtol=1e-12)


def test_density_is_normalized():
    """Grid integral of exp(log p) over a box holding all but ~1e-9 of the mass is 1."""
    model = banana(dtype=F64)
    x1 = torch.linspace(-70, 70, 1401, dtype=F64)
    x2 = torch.linspace(-15, 160, 3501, dtype=F64)
    g1, g2 = torch.meshgrid(x1, x2, indexing="ij")
    lp = model.log_joint({"x1": g1.reshape(-1), "x2": g2.reshape(-1, 1)})
    integral = float(lp.exp().sum() * (x1[1] - x1[0]) * (x2[1] - x2[0]))
    assert abs(integral - 1.0) < 1e-6, integral


def test_reference_moments_match_exact_draws():
    ref = banana(3, dtype=F64).reference
    s = banana_sample(200_000, 3, seed=1, dtype=F64)
    x = torch.cat([s["x1"][:, None], s["x2"]], 1)
    se_mean = ref["cov"].diagonal().sqrt() / math.sqrt(x.shape[0])
    assert ((x.mean(0) - ref["mean"]).abs() < 4 * se_mean).all()
    # variance of the sample variance is (m4 - s^4) / n; 4 standard errors, estimated from the draws
    c = x - x.mean(0)
    se_var = ((c**4).mean(0) - c.var(0) ** 2).sqrt() / math.sqrt(x.shape[0])
    assert ((c.var(0) - ref["cov"].diagonal()).abs() < 4 * se_var).all()


def test_exact_draws_follow_the_density():
    """Untwisting the draws gives independent standard normals (the model's generative story)."""
    s = banana_sample(50_000, 2, scale=10.0, curvature=0.1, seed=2, dtype=F64)
    z1 = s["x1"] / 10.0
    z2 = s["x2"][:, 0] - 0.1 * (s["x1"] ** 2 - 100.0)
    for z in (z1, z2):
        assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())
        assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / z.numel())
    assert abs(float((z1 * z2).mean())) < 4 / math.sqrt(z1.numel())


def test_gaussian_fit_is_a_lower_bound():
    """log Z = 0, so any guide's ELBO is <= 0; a full-rank Gaussian fit comes within 1.5 nats."""
    model = banana(dtype=F64)
    guide = FullRankNormal(model, init_scale=1.0, dtype=F64)
    vipkg.fit(model, guide, vipkg.Reparam(), steps=600, num_particles=8, lr=0.05, progress=False)
    with torch.no_grad():
        z, log_q = guide.rsample_and_log_prob((20_000,))
        log_w = guide.log_joint(model, z) - log_q
    elbo, se = float(log_w.mean()), float(log_w.std()) / math.sqrt(log_w.numel())
    assert elbo < 4 * se
    assert elbo > -1.5, elbo


@pytest.mark.parametrize(
    "kwargs, match", [({"dim": 1}, "dim >= 2"), ({"scale": 0.0}, "scale > 0"), ({"form": "stan"}, "form")]
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        banana(**kwargs)
