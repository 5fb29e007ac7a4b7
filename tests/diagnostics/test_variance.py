import pytest
import torch

import vipkg
from vipkg.diagnostics import GradientVariance, gradient_samples, gradient_variance
from vipkg.guides import FullRankNormal, MeanFieldNormal


def test_gradient_samples_leaves_guide_and_rng_unchanged():
    model = vipkg.models.eight_schools()
    guide = FullRankNormal(model, init_scale=0.5)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    guide.loc.grad = torch.full_like(guide.loc, 7.0)
    rng = torch.get_rng_state()
    out = gradient_samples(model, guide, vipkg.Reparam(), num_particles=3, repeats=5, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in guide.named_parameters():
        assert torch.equal(p.detach(), before[n])
        assert out[n].shape == (5, *p.shape)
    assert torch.equal(guide.loc.grad, torch.full_like(guide.loc, 7.0))
    assert guide.raw_scale.grad is None and guide.raw_unit_lower.grad is None


def test_gradient_samples_are_independent_and_seeded():
    model = vipkg.models.gaussian(dim=3)
    guide = MeanFieldNormal(model, loc=torch.ones(3))
    a = gradient_samples(model, guide, vipkg.Reparam(), num_particles=2, repeats=4, seed=1)
    b = gradient_samples(model, guide, vipkg.Reparam(), num_particles=2, repeats=4, seed=1)
    c = gradient_samples(model, guide, vipkg.Reparam(), num_particles=2, repeats=4, seed=2)
    assert torch.equal(a["loc"], b["loc"])
    assert not torch.equal(a["loc"], c["loc"])
    assert not torch.equal(a["loc"][0], a["loc"][1])


def test_each_sample_equals_one_estimate():
    model = vipkg.models.gaussian(dim=3)
    guide = MeanFieldNormal(model, loc=torch.ones(3))
    out = gradient_samples(model, guide, vipkg.Reparam(), num_particles=2, repeats=2, seed=5)
    torch.manual_seed(5)
    vipkg.Reparam().estimate(model, guide, vipkg.ELBO(), 2)
    assert torch.equal(out["loc"][0], guide.loc.grad)


def test_gradient_variance_summary_matches_samples():
    model = vipkg.models.gaussian(dim=4)
    guide = MeanFieldNormal(model, loc=torch.ones(4), init_scale=0.5)
    res = gradient_variance(model, guide, vipkg.Reparam(), num_particles=2, repeats=50, seed=3)
    g = gradient_samples(model, guide, vipkg.Reparam(), num_particles=2, repeats=50, seed=3)
    assert abs(res.trace["loc"] - float(g["loc"].double().var(0).sum())) < 1e-9
    assert res.total_trace == pytest.approx(sum(res.trace.values()))
    assert torch.allclose(res.snr["loc"], res.mean["loc"].abs() / res.variance["loc"].sqrt())
    assert res.repeats == 50 and res.mean_snr > 0


def test_mean_field_loc_gradient_variance_closed_form():
    """For N(0, I) target and q = N(m, s^2 I), one-sample Reparam loc-gradient is
    -(m + s*eps) + ... = (z - 0) -> its variance per coordinate is s^2 / S."""
    model = vipkg.models.gaussian(dim=3, dtype=torch.float64)
    s = 0.8
    guide = MeanFieldNormal(model, loc=torch.full((3,), 0.5), scale=s, dtype=torch.float64)
    res = gradient_variance(model, guide, vipkg.Reparam(), num_particles=4, repeats=4000, seed=0)
    # loc-gradient of -ELBO = -mean_s grad log p(z_s) = mean_s z_s, variance s^2 / 4
    assert torch.allclose(res.variance["loc"], torch.full((3,), s**2 / 4, dtype=torch.float64), rtol=0.08)


def test_fit_records_gradient_variance_without_changing_trajectory():
    model = vipkg.models.eight_schools()
    plain = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=120, progress=False)
    diag = vipkg.fit(
        model,
        MeanFieldNormal(model),
        vipkg.Reparam(),
        steps=120,
        progress=False,
        diagnostics=GradientVariance(every=50, repeats=8),
    )
    assert torch.equal(plain.losses, diag.losses)
    assert diag.diagnostics["steps"] == [0, 50, 100, 120]
    assert len(diag.diagnostics["gradient_variance"]) == 4


def test_recorded_variance_belongs_to_its_step():
    """A record at step 30 (not a multiple of the host-read period) equals a direct
    measurement on a guide fitted for exactly 30 steps."""
    model = vipkg.models.eight_schools()
    rec = vipkg.fit(
        model,
        MeanFieldNormal(model),
        vipkg.Reparam(),
        steps=40,
        progress=False,
        diagnostics=GradientVariance(every=30, repeats=4),
    )
    assert rec.diagnostics["steps"] == [0, 30, 40]
    guide = MeanFieldNormal(model)
    vipkg.fit(model, guide, vipkg.Reparam(), steps=30, progress=False)
    direct = GradientVariance(every=30, repeats=4).measure(
        model, guide, vipkg.Reparam(), vipkg.ELBO(), 16, seed=0 * 1_000_003 + 30
    )
    assert rec.diagnostics["gradient_variance"][1].total_trace == pytest.approx(direct.total_trace, rel=1e-5)


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"repeats": 1}])
def test_gradient_variance_config_validation(kwargs):
    with pytest.raises(ValueError):
        GradientVariance(**kwargs)
