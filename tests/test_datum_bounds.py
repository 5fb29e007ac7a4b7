"""Bounds that weight each datum's draws (IWAE, Renyi) on minibatches of local latent sites.

The model ``z_i ~ N(theta, 1), x_i ~ N(z_i, 1)`` has only local latents (a learned prior mean
``theta``), fitted 3 data points at a time out of 7. Its full-data IWAE-k bound is
``sum_i E[log (1/k) sum_j w_ij]``: a sum over data points of each one's own bound, so a
minibatch's estimate is ``N / B`` times the sum over its data points. The reference gradient
is the autograd gradient of that sum written out by hand over all 7 data points, averaged over
200,000 groups of draws.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import vipkg
from vipkg.diagnostics import gradient_samples
from vipkg.estimators.base import IncompatibleEstimatorError
from vipkg.guides import MeanFieldNormal
from vipkg.models.vae import categorical_vae_digits, heldout_elbo, vae_digits

F64 = torch.float64
X = torch.tensor([0.3, -1.2, 2.1, 0.8, 1.7, -0.4, 0.9], dtype=F64)
N, B = len(X), 3
LOC = torch.linspace(-0.5, 1.0, N, dtype=F64)
SCALE = torch.linspace(0.4, 0.9, N, dtype=F64)
THETA = 0.5
K = 4


def _local(x, batch=B):
    theta = pyro.param("theta", torch.tensor(THETA, dtype=F64))
    with pyro.plate("data", len(x), subsample_size=batch) as ind:
        z = pyro.sample("z", dist.Normal(theta, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])


def _global_and_local(x):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])


def _model_and_guide():
    model = vipkg.Model.from_pyro(_local, X)
    return model, MeanFieldNormal(model, loc=LOC, scale=SCALE, dtype=F64)


def _reference(k, groups=200_000):
    """``-d/d(loc, raw_scale, theta)`` of the full-data IWAE-k bound, by hand, over ``groups`` draws."""
    theta = torch.tensor(THETA, dtype=F64, requires_grad=True)
    loc = LOC.clone().requires_grad_()
    raw = torch.log(torch.expm1(SCALE)).requires_grad_()
    scale = torch.nn.functional.softplus(raw)
    gen = torch.Generator().manual_seed(12345)
    z = loc + scale * torch.randn(groups, k, N, dtype=F64, generator=gen)
    log_q = torch.distributions.Normal(loc, scale).log_prob(z)
    log_p = torch.distributions.Normal(theta, 1.0).log_prob(z) + torch.distributions.Normal(z, 1.0).log_prob(
        X
    )
    bound = (torch.logsumexp(log_p - log_q, 1) - math.log(k)).sum(-1).mean()
    bound.backward()
    return {"loc": -loc.grad, "raw_scale": -raw.grad, "model.theta": -theta.grad.reshape(())}


@pytest.fixture(scope="module")
def references():
    return {k: _reference(k) for k in (1, K)}


def _z_scores(samples, ref):
    out = {}
    for name, r in ref.items():
        v = samples[name]
        out[name] = ((v.mean(0) - r) / (v.std(0) / math.sqrt(v.shape[0]))).abs().max().item()
    return out


def test_model_factorizes_over_its_data_points():
    model, _ = _model_and_guide()
    assert model.datum_plate == "data"
    assert vipkg.Model.from_pyro(_global_and_local, X).datum_plate is None  # mu couples the data
    assert vipkg.Model.from_pyro(_local, X, None).datum_plate is None  # not subsampled
    mb = model.minibatch(model.subsample_indices(torch.Generator().manual_seed(0)))
    z = {"z": torch.randn(5, B, dtype=F64)}
    per, rest = mb.log_joint_by_datum(z)
    assert per.shape == (5, B) and rest.shape == (5,)
    idx = mb.data["_subsample:data"]
    by_hand = torch.distributions.Normal(THETA, 1.0).log_prob(z["z"]) + torch.distributions.Normal(
        z["z"], 1.0
    ).log_prob(X[idx])
    torch.testing.assert_close(per, by_hand, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rest + N / B * per.sum(-1), mb.log_joint(z), rtol=1e-12, atol=1e-12)
    with pytest.raises(vipkg.ModelError, match="minibatch"):
        model.log_joint_by_datum({"z": torch.randn(5, N, dtype=F64)})


@pytest.mark.parametrize("form", ["tensor", "pyro"])
def test_the_vaes_factorize_over_images(form):
    model = vae_digits(form=form, batch_size=50)
    assert model.datum_plate == "data"
    mb = model.minibatch(model.subsample_indices(torch.Generator().manual_seed(0)))
    z = {"z": torch.randn(3, 50, 4)}
    per, rest = mb.log_joint_by_datum(z)
    torch.testing.assert_close(rest + model.plates["data"].size / 50 * per.sum(-1), mb.log_joint(z))


@pytest.mark.parametrize("estimator", [vipkg.Reparam(), vipkg.DReG(), vipkg.ScoreFunction()], ids=repr)
def test_minibatch_iwae_gradient_is_unbiased_for_the_per_datum_bound(estimator, references):
    model, guide = _model_and_guide()
    repeats = 2000 if estimator.name == "ScoreFunction" else 1500
    samples = gradient_samples(
        model, guide, estimator, objective=vipkg.IWAE(K), num_particles=4, repeats=repeats, seed=1
    )
    # Max over 15 coordinates (7 loc, 7 raw_scale, theta) of |mean - reference| / SE.
    assert max(_z_scores(samples, references[K]).values()) < 4.5
    # Power: the same estimates are far from the ELBO's gradient (IWAE with k = 1).
    assert max(_z_scores(samples, references[1]).values()) > 10


def test_dreg_gives_the_model_the_iwae_gradient_itself():
    # theta's IWAE gradient, sum_j w~_j d log p / d theta, has no score term: DReG's weighting of
    # the guide (w~^2) must not leak into it. Same seed, same draws: equal per estimate.
    model, guide = _model_and_guide()
    kw = dict(objective=vipkg.IWAE(K), num_particles=2, repeats=20, seed=3)
    dreg = gradient_samples(model, guide, vipkg.DReG(), **kw)
    reparam = gradient_samples(model, guide, vipkg.Reparam(), **kw)
    torch.testing.assert_close(dreg["model.theta"], reparam["model.theta"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dreg["loc"], reparam["loc"])
    # Without subsampling (one bound over the joint draws) likewise.
    full = vipkg.Model.from_pyro(_local, X, None)
    g = MeanFieldNormal(full, loc=LOC, scale=SCALE, dtype=F64)
    dreg = gradient_samples(full, g, vipkg.DReG(), **kw)
    reparam = gradient_samples(full, g, vipkg.Reparam(), **kw)
    torch.testing.assert_close(dreg["model.theta"], reparam["model.theta"], rtol=1e-10, atol=1e-12)


def test_encoder_snr_falls_with_k_for_iwae_not_for_dreg():
    # Rainforth et al. (2018): the reparameterized IWAE gradient's SNR for the guide falls like
    # 1/sqrt(k); DReG's (Tucker et al. 2019) does not. Near the posterior, minibatch noise included.
    model = vipkg.Model.from_pyro(_local, X)
    loc = (THETA + X) / 2 + 0.2
    guide = MeanFieldNormal(
        model, loc=loc, scale=torch.full((N,), 0.8 * math.sqrt(0.5), dtype=F64), dtype=F64
    )

    def snr(estimator, k):
        v = gradient_samples(
            model, guide, estimator, objective=vipkg.IWAE(k), num_particles=1, repeats=300, seed=2
        )["loc"]
        return (v.mean(0).abs() / v.std(0)).mean().item()

    iwae = {k: snr(vipkg.Reparam(), k) for k in (2, 64)}
    dreg = {k: snr(vipkg.DReG(), k) for k in (2, 64)}
    assert iwae[64] < 0.7 * iwae[2]  # measured 0.17 -> 0.07
    assert dreg[64] > 0.85 * dreg[2]  # measured 0.44 -> 0.48
    assert dreg[64] > 3 * iwae[64]


def test_bounds_that_need_per_datum_weights_are_refused_where_there_are_none():
    mixed = vipkg.Model.from_pyro(_global_and_local, X)
    from vipkg.guides import Composite

    guide = Composite(mixed, {"mu": MeanFieldNormal, "z": MeanFieldNormal}, dtype=F64)
    with pytest.raises(IncompatibleEstimatorError, match="global latent sites have no per-datum bound"):
        vipkg.fit(mixed, guide, vipkg.Reparam(), objective=vipkg.IWAE(4), steps=2, progress=False)
    # The ELBO of a minibatch is fine there.
    vipkg.fit(mixed, guide, vipkg.Reparam(), steps=2, progress=False)
    cat = categorical_vae_digits(batch_size=50)
    g = cat.default_guide(cat)
    with pytest.raises(IncompatibleEstimatorError, match="does not give log q per data point"):
        vipkg.fit(cat, g, vipkg.GumbelSoftmax(), objective=vipkg.IWAE(4), steps=2, progress=False)


def test_a_vae_fits_the_per_image_iwae_bound_with_dreg():
    torch.manual_seed(0)
    model = vae_digits(batch_size=100)
    guide = model.default_guide(model)
    before = heldout_elbo(model, guide, draws=8, k=8)
    result = vipkg.fit(
        model,
        guide,
        vipkg.DReG(),
        objective=vipkg.IWAE(8),
        steps=150,
        num_particles=1,
        lr=3e-3,
        seed=0,
        progress=False,
    )
    after = heldout_elbo(result.model, result.guide, draws=8, k=8)
    elbo = heldout_elbo(result.model, result.guide, draws=64)
    # 150 steps from -44 nats / image: a large, certain improvement; and the IWAE-8 bound of the
    # fitted pair lies above its ELBO (by far more than both standard errors).
    assert after[0] > before[0] + 10
    assert after[0] > elbo[0] + 5 * (after[1] + elbo[1])
    # The loss is minus the minibatch estimate of the full per-image bound (nats for all images).
    assert result.losses[-1] / model.plates["data"].size == pytest.approx(-after[0], abs=2.0)


def test_dreg_minibatch_fit_resumes_mid_epoch_bit_for_bit(tmp_path):
    def run(steps, resume, path):
        model, guide = _model_and_guide()
        return vipkg.fit(
            model,
            guide,
            vipkg.DReG(),
            objective=vipkg.IWAE(K),
            steps=steps,
            num_particles=2,
            lr=0.05,
            seed=3,
            checkpoint=path,
            checkpoint_every=7,
            resume=resume,
            progress=False,
        )

    full = run(30, False, tmp_path / "full.pt")
    run(16, False, tmp_path / "split.pt")  # 16 steps of 3 of 7 data points: mid-epoch
    resumed = run(30, True, tmp_path / "split.pt")
    assert torch.equal(resumed.losses, full.losses)
    assert float(resumed.model.param_values()["theta"]) == float(full.model.param_values()["theta"])
