"""Amortized families: log q is torch's density at the encoder's outputs, minibatch gradients of the
encoder (and of a decoder weight) are unbiased for the closed-form full-data ELBO, fits reach the
exact (mean-field) posterior."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints, transforms

import vipkg
from tests.helpers import assert_unbiased
from vipkg.diagnostics import gradient_samples
from vipkg.estimators.control_variates import Learned, LeaveOneOut
from vipkg.estimators.per_site import PerSite
from vipkg.guides import (
    AmortizedBernoulli,
    AmortizedCategorical,
    AmortizedNormal,
    AmortizedOneHotCategorical,
    Composite,
    MeanFieldNormal,
)
from vipkg.guides.minibatch import draw_minibatch
from vipkg.model import Model, Plate, Site

F64 = torch.float64
X = torch.tensor([0.3, -1.2, 2.1, 0.8, 1.7, -0.4, 0.9], dtype=F64)
N, B = len(X), 3
LOG2PI = math.log(2 * math.pi)


class Linear(nn.Module):
    """``x [B] -> (a x + b, c x + d)``: an encoder that can represent the exact mean-field optimum."""

    def __init__(self, w=(0.4, -0.2, 0.3, -0.5)):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=F64))

    def forward(self, x):
        a, b, c, d = self.w
        return a * x + b, c * x + d


class Wrap1(nn.Module):
    """``x [B] -> Linear(1, k)(x[:, None])``."""

    def __init__(self, k):
        super().__init__()
        self.lin = nn.Linear(1, k, dtype=F64)

    def forward(self, x):
        return self.lin(x[:, None])


# --------------------------------------------------------------------------- models
def _hierarchical(x):
    """mu ~ N(0, 1); z_i ~ N(mu, 1); x_i ~ N(z_i, 1), the plate subsampled (local z)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])


def _decoder(x):
    """z_i ~ N(0, 1); x_i ~ N(w z_i, 1) with a learned weight w: a linear VAE, local sites only."""
    w = pyro.param("w", torch.tensor(0.7, dtype=F64))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        pyro.sample("x", dist.Normal(w * z, 1.0), obs=x[ind])


def _mixture(x):
    """mu ~ N(0, 1); z_i ~ Bernoulli(0.3); x_i ~ N(mu + 2 z_i, 1): a discrete local site."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
        pyro.sample("x", dist.Normal(mu + 2.0 * z, 1.0), obs=x[ind])


CENTRES = torch.tensor([-2.0, 0.0, 2.0], dtype=F64)
PRIOR3 = torch.tensor([0.2, 0.5, 0.3], dtype=F64)


def _one_hot_mixture(x):
    """mu ~ N(0, 1); z_i ~ OneHotCategorical(PRIOR3); x_i ~ N(mu + c . z_i, 1)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.OneHotCategorical(PRIOR3, validate_args=False))
        pyro.sample("x", dist.Normal(mu + (z * CENTRES).sum(-1), 1.0), obs=x[ind])


def _categorical_mixture(x):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Categorical(PRIOR3))
        pyro.sample("x", dist.Normal(mu + CENTRES[z], 1.0), obs=x[ind])


def _mu_part(sub, **kw):
    return MeanFieldNormal(sub, loc=torch.tensor([0.4]), scale=torch.tensor([0.7]), **kw)


def _gaussian_stats(enc, x):
    loc, raw = enc(x)
    return loc, F.softplus(raw)


# --------------------------------------------------------------------------- log q
def _site_model(shape, support, data):
    n = shape[0]
    return Model(
        {"z": Site(torch.Size(shape), support)},
        lambda z, d: torch.zeros(next(iter(z.values())).shape[0]),
        data={"x": data},
        plates={"data": Plate(n, 2)},
        local_sites={"z": ("data", 0)},
    )


class Affine(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.lin = nn.Linear(din, dout, dtype=F64)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize(
    "support, shape, urow, transform",
    [
        (constraints.real, (5,), (), None),
        (constraints.independent(constraints.real, 1), (5, 2), (2,), None),
        (constraints.positive, (5, 2), (2,), transforms.ExpTransform()),
        (constraints.simplex, (5, 3), (2,), transforms.StickBreakingTransform()),
    ],
    ids=["real", "real_vector", "positive", "simplex"],
)
def test_normal_log_q_is_torchs_density_at_the_encoder_outputs(support, shape, urow, transform):
    """``urow``: a row's unconstrained shape (the stick-breaking map takes K - 1 coordinates)."""
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    model = _site_model(shape, support, x)
    m = math.prod(urow)
    enc = Affine(4, 2 * m)
    guide = AmortizedNormal(model, enc, data="x")

    def torch_q(rows):
        loc, raw = enc(rows).chunk(2, -1)
        base = dist.Normal(loc.reshape(-1, *urow), F.softplus(raw).reshape(-1, *urow))
        base = torch.distributions.Independent(base, len(urow) + 1)
        return base if transform is None else torch.distributions.TransformedDistribution(base, [transform])

    for g, rows in ((guide, x), (None, None)):
        if g is None:  # the minibatch view: the encoder on the minibatch's rows only
            idx = torch.tensor([3, 1])
            g = guide.minibatch_view(idx, model.data)
            rows = x[idx]
            assert g.inputs().shape == (2, 4) and torch.equal(g.inputs(), rows)
        z, lq = g.rsample_and_log_prob((6,))
        latents = g.constrain(model, z)
        ref = torch_q(rows).log_prob(latents["z"])
        torch.testing.assert_close(lq, ref)
        torch.testing.assert_close(g().log_prob(z), ref)
        z2, lq2 = g.sample_and_log_prob((6,))
        torch.testing.assert_close(lq2, torch_q(rows).log_prob(g.constrain(model, z2)["z"]))
        lat, parts = g.log_prob_parts(model, z)
        assert [s for s, _ in parts] == [frozenset({"z"})] and parts[0][1].shape == (6, rows.shape[0])
        torch.testing.assert_close(parts[0][1].sum(-1), ref)
        # STL: the same value; its gradient is the path term only (the encoder's outputs stopped).
        torch.manual_seed(5)
        zs, lqs = g.rsample_and_stopped_log_prob((6,))
        torch.manual_seed(5)
        zr, _ = g.rsample_and_log_prob((6,))
        torch.testing.assert_close(zs, zr)
        torch.testing.assert_close(lqs, torch_q(rows).log_prob(g.constrain(model, zs)["z"]))
        (got,) = torch.autograd.grad(lqs.sum(), [enc.lin.weight])
        with torch.no_grad():
            loc, raw = enc(rows).chunk(2, -1)
        frozen = dist.Normal(loc.reshape(-1, *urow), F.softplus(raw).reshape(-1, *urow))
        frozen = torch.distributions.Independent(frozen, len(urow) + 1)
        if transform is not None:
            frozen = torch.distributions.TransformedDistribution(frozen, [transform])
        (want,) = torch.autograd.grad(frozen.log_prob(g.constrain(model, zr)["z"]).sum(), [enc.lin.weight])
        torch.testing.assert_close(got, want)
    # The full family on every row: what FitResult.sample and to_arviz draw.
    assert guide().sample((3,)).shape == (3, math.prod(shape))


@pytest.mark.parametrize("family", ["categorical", "one_hot", "bernoulli"])
def test_discrete_log_q_is_torchs_density_at_the_encoder_outputs(family):
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    if family == "categorical":
        model = _site_model((5, 2), constraints.integer_interval(0, 2), x)
        enc = Affine(4, 6)
        guide = AmortizedCategorical(model, enc, data="x")

        def q(rows):
            return torch.distributions.Categorical(logits=enc(rows).reshape(-1, 2, 3))

    elif family == "one_hot":
        model = _site_model((5, 2, 3), constraints.one_hot, x)
        enc = Affine(4, 6)
        guide = AmortizedOneHotCategorical(model, enc, data="x")

        def q(rows):
            return torch.distributions.OneHotCategorical(logits=enc(rows).reshape(-1, 2, 3))

    else:
        model = _site_model((5, 2), constraints.boolean, x)
        enc = Affine(4, 2)
        guide = AmortizedBernoulli(model, enc, data="x")

        def q(rows):
            return torch.distributions.Bernoulli(logits=enc(rows))

    idx = torch.tensor([4, 0])
    for g, rows in ((guide, x), (guide.minibatch_view(idx, model.data), x[idx])):
        z, lq = g.sample_and_log_prob((50,))
        latents = g.constrain(model, z)["z"]
        ref = q(rows).log_prob(latents).reshape(50, -1).sum(-1)
        torch.testing.assert_close(lq, ref)
        torch.testing.assert_close(g().log_prob(z), ref)
        _, parts = g.log_prob_parts(model, z)
        torch.testing.assert_close(parts[0][1], q(rows).log_prob(latents))
        assert not g().has_rsample
        if family != "bernoulli":
            torch.testing.assert_close(g.entropy(), q(rows).entropy().sum())
            shape = (rows.shape[0], 2, 3)
            assert g.site_logits()["z"].shape == shape
        # draws' frequencies are the encoder's probabilities
        z = g().sample((20000,))
        freq = g.constrain(model, z)["z"].double()
        if family == "categorical":
            freq = F.one_hot(freq.long(), 3).double()
        probs = q(rows).probs.detach()
        assert float((freq.mean(0) - probs).abs().max()) < 5 * math.sqrt(0.25 / 20000)


# --------------------------------------------------------------------------- views
def test_minibatch_view_shares_the_encoder_and_scales_log_q():
    model = vipkg.Model.from_pyro(_hierarchical, X)
    enc = Linear()
    guide = Composite(model, {"mu": _mu_part, "z": lambda sub, **kw: AmortizedNormal(sub, enc)}, dtype=F64)
    torch.manual_seed(0)
    mb, gb = draw_minibatch(model, guide)
    idx = mb.data["_subsample:data"]
    view = gb.parts[1]
    assert [id(p) for p in gb.parameters()] == [id(p) for p in guide.parameters()]
    assert view.log_q_scale == N / B and view.minibatch_of is guide.parts[1]
    assert torch.equal(view.index, idx) and torch.equal(view.inputs(), X[idx])
    loc, scale = view.loc_scale()["z"]
    full_loc, full_scale = guide.parts[1].loc_scale()["z"]
    torch.testing.assert_close(loc, full_loc[idx])
    torch.testing.assert_close(scale, full_scale[idx])
    assert guide.parts[1].site_shapes["z"] == (N,) and view.site_shapes["z"] == (B,)
    vipkg.Reparam().estimate(mb, gb, vipkg.ELBO(), 4)
    assert enc.w.grad is not None and bool((enc.w.grad != 0).all())


def test_errors_name_what_fits():
    model = vipkg.Model.from_pyro(_hierarchical, X)
    with pytest.raises(vipkg.ModelError, match="local sites of one"):
        AmortizedNormal(model, Linear())
    with pytest.raises(ValueError, match="not an entry"):
        Composite(model, {"mu": MeanFieldNormal, "z": lambda sub, **kw: AmortizedNormal(sub, Linear(), "y")})
    with pytest.raises(ValueError, match="encoder must be a torch.nn.Module"):
        Composite(model, {"mu": MeanFieldNormal, "z": lambda sub, **kw: AmortizedNormal(sub, lambda x: x)})

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(3, dtype=F64))

        def forward(self, x):
            return self.b.expand(x.shape[0], 3), self.b.expand(x.shape[0], 3)

    g = Composite(
        model, {"mu": MeanFieldNormal, "z": lambda sub, **kw: AmortizedNormal(sub, Wide())}, dtype=F64
    )
    with pytest.raises(ValueError, match=r"expected \[3\]"):
        vipkg.fit(model, g, vipkg.Reparam(), steps=1, progress=False)
    mix = vipkg.Model.from_pyro(_mixture, X)
    g = Composite(mix, {"mu": MeanFieldNormal, "z": lambda sub, **kw: AmortizedBernoulli(sub, Wrap1(1))})
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="reparameterized"):
        vipkg.fit(mix, g, PerSite({"mu": vipkg.Reparam(), "z": vipkg.Reparam()}), steps=1, progress=False)


# --------------------------------------------------------------------------- unbiasedness
def _exact_hierarchical_loss(guide):
    """-ELBO in closed form: q(mu) = N(m, s^2), q(z_i | x_i) = N(l_i, t_i^2) from the encoder."""
    m, s = guide.parts[0].loc[0], guide.parts[0].scale[0]
    l, t = _gaussian_stats(guide.parts[1].encoder, X)
    e_prior = -0.5 * LOG2PI - 0.5 * (m**2 + s**2)
    e_z = (-0.5 * LOG2PI - 0.5 * ((l - m) ** 2 + t**2 + s**2)).sum()
    e_x = (-0.5 * LOG2PI - 0.5 * ((X - l) ** 2 + t**2)).sum()
    entropy = (
        0.5 * torch.log(2 * math.pi * math.e * s**2) + (0.5 * torch.log(2 * math.pi * math.e * t**2)).sum()
    )
    return -(e_prior + e_z + e_x + entropy)


def _exact(params: dict, loss):
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


@pytest.mark.parametrize(
    "z_estimator",
    [vipkg.Reparam(), vipkg.STL(), vipkg.ScoreFunction(LeaveOneOut()), vipkg.ScoreFunction(Learned())],
    ids=["reparam", "stl", "score_loo", "score_nvil"],
)
def test_encoder_gradient_on_minibatches_is_unbiased_in_a_composite(z_estimator):
    model = vipkg.Model.from_pyro(_hierarchical, X)
    guide = Composite(
        model, {"mu": _mu_part, "z": lambda sub, **kw: AmortizedNormal(sub, Linear())}, dtype=F64
    )
    exact = _exact(dict(guide.named_parameters()), _exact_hierarchical_loss(guide))
    est = PerSite({"mu": vipkg.Reparam(), "z": z_estimator})
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=1500, seed=0)
    assert_unbiased(samples, exact, n_se=4.5)


def _exact_decoder_loss(encoder, w):
    l, t = _gaussian_stats(encoder, X)
    e_z = (-0.5 * LOG2PI - 0.5 * (l**2 + t**2)).sum()
    e_x = (-0.5 * LOG2PI - 0.5 * ((X - w * l) ** 2 + w**2 * t**2)).sum()
    entropy = (0.5 * torch.log(2 * math.pi * math.e * t**2)).sum()
    return -(e_z + e_x + entropy)


@pytest.mark.parametrize(
    "estimator",
    [vipkg.Reparam(), vipkg.STL(), vipkg.ScoreFunction(LeaveOneOut())],
    ids=["reparam", "stl", "score_loo"],
)
def test_encoder_and_decoder_gradients_are_unbiased_for_an_amortized_family_alone(estimator):
    """A linear VAE: every latent site local, a learned decoder weight; the family is the whole guide."""
    model = vipkg.Model.from_pyro(_decoder, X)
    guide = AmortizedNormal(model, Linear())
    params = {**dict(guide.named_parameters()), **{f"model.{k}": p for k, p in model.named_parameters()}}
    exact = _exact(params, _exact_decoder_loss(guide.encoder, model.named_parameters()[0][1]))
    samples = gradient_samples(model, guide, estimator, num_particles=8, repeats=1500, seed=1)
    assert set(samples) == {"encoder.w", "model.w"}
    assert_unbiased(samples, exact, n_se=4.5)


def _exact_mixture_loss(guide, prior, centres, probs_fn):
    m, s = guide.parts[0].loc[0], guide.parts[0].scale[0]
    probs = probs_fn(guide.parts[1].encoder(X))  # [N, K]
    elbo = -0.5 * LOG2PI - 0.5 * (m**2 + s**2) + 0.5 * torch.log(2 * math.pi * math.e * s**2)
    for k in range(len(centres)):
        e_lik = -0.5 * LOG2PI - 0.5 * ((X - m - centres[k]) ** 2 + s**2)
        qk = probs[:, k]
        elbo = elbo + (qk * (math.log(prior[k]) - torch.log(qk) + e_lik)).sum()
    return -elbo


@pytest.mark.parametrize("family", ["bernoulli", "categorical", "one_hot"])
def test_discrete_encoder_gradient_is_unbiased(family):
    """A discrete local code whose probabilities a linear encoder computes from each datum; ScoreFunction
    with a leave-one-out baseline, on minibatches, against the closed-form full-data ELBO."""
    torch.manual_seed(0)
    if family == "bernoulli":
        program, fam, enc = _mixture, AmortizedBernoulli, Wrap1(1)
        prior, centres = (0.7, 0.3), (0.0, 2.0)

        def probs_fn(out):
            p1 = torch.sigmoid(out[:, 0])
            return torch.stack([1 - p1, p1], -1)

    else:
        program = _categorical_mixture if family == "categorical" else _one_hot_mixture
        fam = AmortizedCategorical if family == "categorical" else AmortizedOneHotCategorical
        enc, prior, centres = Wrap1(3), PRIOR3.tolist(), CENTRES.tolist()

        def probs_fn(out):
            return torch.softmax(out, -1)

    model = vipkg.Model.from_pyro(program, X)
    guide = Composite(model, {"mu": _mu_part, "z": lambda sub, **kw: fam(sub, enc)}, dtype=F64)
    exact = _exact(dict(guide.named_parameters()), _exact_mixture_loss(guide, prior, centres, probs_fn))
    est = PerSite({"mu": vipkg.Reparam(), "z": vipkg.ScoreFunction(LeaveOneOut())})
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=1500, seed=2)
    assert_unbiased(samples, exact, n_se=4.5)


# --------------------------------------------------------------------------- fits
W = torch.tensor([[1.0, 0.5], [-0.3, 1.2], [0.8, -0.7]], dtype=F64)  # x_i = W z_i + noise


def _linear_vae(x):
    with pyro.plate("data", x.shape[0], subsample_size=10) as ind:
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=F64), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, 0.5).to_event(1), obs=x[ind])


def test_fit_reaches_the_exact_posterior_means_and_mean_field_scales():
    """z_i ~ N(0, I), x_i ~ N(W z_i, 0.25 I): the posterior of z_i is Gaussian with a mean linear in
    x_i and a fixed precision P; a linear encoder represents the mean-field optimum exactly (the exact
    means, scales 1 / sqrt(diag P))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, dtype=F64, generator=g) @ W.T + 0.5 * torch.randn(40, 3, dtype=F64, generator=g)
    model = vipkg.Model.from_pyro(_linear_vae, x)
    enc = Affine(3, 4)
    guide = AmortizedNormal(model, enc, data="x")
    sched = lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.999)  # noqa: E731
    result = vipkg.fit(
        model, guide, vipkg.STL(), steps=3000, lr=0.03, scheduler=sched, seed=0, progress=False
    )
    P = torch.eye(2, dtype=F64) + W.T @ W / 0.25
    mean = torch.linalg.solve(P, (W.T @ x.T) / 0.25).T
    with torch.no_grad():
        loc, scale = guide.loc_scale()["z"]
    torch.testing.assert_close(loc, mean, atol=0.03, rtol=0)
    torch.testing.assert_close(scale, (1 / P.diagonal().sqrt()).expand(40, 2), atol=0.02, rtol=0)
    draws = result.sample(500, seed=0)
    assert draws["z"].shape == (500, 40, 2)
    assert set(result.to_arviz(n=50).posterior.data_vars) == {"z"}


def test_gumbel_softmax_and_nvil_fit_a_one_hot_code_in_a_composite():
    """Well-separated clusters: straight-through Gumbel-softmax and the score function with a learned
    baseline both learn an encoder that puts each point in its cluster."""
    g = torch.Generator().manual_seed(3)
    truth = torch.randint(0, 3, (30,), generator=g)
    x = 0.3 + 3 * CENTRES[truth] + 0.3 * torch.randn(30, dtype=F64, generator=g)

    def program(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        with pyro.plate("data", len(x), subsample_size=10) as ind:
            z = pyro.sample("z", dist.OneHotCategorical(PRIOR3, validate_args=False))
            pyro.sample("x", dist.Normal(mu + 3 * (z * CENTRES).sum(-1), 0.5), obs=x[ind])

    for z_est in (vipkg.GumbelSoftmax(temperature=0.5, hard=True), vipkg.ScoreFunction(Learned())):
        model = vipkg.Model.from_pyro(program, x)
        torch.manual_seed(0)
        guide = Composite(
            model,
            {"mu": MeanFieldNormal, "z": lambda sub, **kw: AmortizedOneHotCategorical(sub, Wrap1(3))},
            dtype=F64,
        )
        vipkg.fit(
            model, guide, PerSite({"mu": vipkg.Reparam(), "z": z_est}), steps=600, lr=0.05, progress=False
        )
        with torch.no_grad():
            probs = guide.parts[1].probs["z"]
        assert float(probs[torch.arange(30), truth].min()) > 0.9, z_est


def test_fit_with_an_encoder_and_a_decoder_resumes_bit_for_bit(tmp_path):
    def run(steps, resume, path):
        model = vipkg.Model.from_pyro(_decoder, X)
        guide = AmortizedNormal(model, Linear())
        result = vipkg.fit(
            model,
            guide,
            vipkg.ScoreFunction(Learned()),
            steps=steps,
            num_particles=2,
            lr=0.05,
            seed=3,
            checkpoint=path,
            checkpoint_every=10,
            resume=resume,
            progress=False,
        )
        return result, guide

    full, g_full = run(50, False, tmp_path / "full.pt")
    run(25, False, tmp_path / "split.pt")  # its last checkpoint is at step 25, mid-epoch
    resumed, g_resumed = run(50, True, tmp_path / "split.pt")
    assert torch.equal(resumed.losses, full.losses)
    assert torch.equal(g_resumed.encoder.w, g_full.encoder.w)
    assert torch.equal(resumed.model.param_values()["w"], full.model.param_values()["w"])
