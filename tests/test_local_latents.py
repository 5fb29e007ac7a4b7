"""Local latent sites in subsampled plates: minibatch models, guide views, unbiased estimates."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import vipkg
from vipkg.diagnostics import gradient_samples
from vipkg.estimators.control_variates import Learned, LeaveOneOut
from vipkg.estimators.per_site import PerSite
from vipkg.guides import Bernoulli, Composite, MeanFieldNormal
from vipkg.guides.minibatch import draw_minibatch, minibatch_guide

F64 = torch.float64
X = torch.tensor([0.3, -1.2, 2.1, 0.8, 1.7, -0.4, 0.9], dtype=F64)
N, B = len(X), 3
LOG2PI = math.log(2 * math.pi)


def _hierarchical(x):
    """mu ~ N(0, 1); z_i ~ N(mu, 1); x_i ~ N(z_i, 1), the plate subsampled (local z)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])


def _mixture(x):
    """mu ~ N(0, 1); z_i ~ Bernoulli(0.3); x_i ~ N(mu + 2 z_i, 1): a discrete local site."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
    with pyro.plate("data", len(x), subsample_size=B) as ind:
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
        pyro.sample("x", dist.Normal(mu + 2.0 * z, 1.0), obs=x[ind])


def _gaussian_guide(model):
    loc = {"mu": torch.tensor([0.4]), "z": torch.linspace(-0.5, 1.0, N)}
    scale = {"mu": torch.tensor([0.7]), "z": torch.linspace(0.4, 0.9, N)}
    return Composite(
        model,
        {s: (lambda sub, s=s, **kw: MeanFieldNormal(sub, loc=loc[s], scale=scale[s], **kw)) for s in loc},
        dtype=F64,
    )


def _exact_hierarchical_loss(guide):
    """-ELBO in closed form from the guide's parameters (Gaussian expectations)."""
    m, s = guide.parts[0].loc[0], guide.parts[0].scale[0]
    l, t = guide.parts[1].loc, guide.parts[1].scale
    e_prior = -0.5 * LOG2PI - 0.5 * (m**2 + s**2)
    e_z = (-0.5 * LOG2PI - 0.5 * ((l - m) ** 2 + t**2 + s**2)).sum()
    e_x = (-0.5 * LOG2PI - 0.5 * ((X - l) ** 2 + t**2)).sum()
    entropy = (
        0.5 * torch.log(2 * math.pi * math.e * s**2) + (0.5 * torch.log(2 * math.pi * math.e * t**2)).sum()
    )
    return -(e_prior + e_z + e_x + entropy)


def _exact_mixture_loss(guide):
    m, s = guide.parts[0].loc[0], guide.parts[0].scale[0]
    q1 = torch.sigmoid(guide.parts[1].logits)
    elbo = -0.5 * LOG2PI - 0.5 * (m**2 + s**2) + 0.5 * torch.log(2 * math.pi * math.e * s**2)
    for z, qz, prior in ((1.0, q1, 0.3), (0.0, 1 - q1, 0.7)):
        e_lik = -0.5 * LOG2PI - 0.5 * ((X - m - 2.0 * z) ** 2 + s**2)
        elbo = elbo + (qz * (math.log(prior) - torch.log(qz) + e_lik)).sum()
    return -elbo


def _exact_grads(guide, loss_fn):
    params = dict(guide.named_parameters())
    grads = torch.autograd.grad(loss_fn(guide), list(params.values()))
    return dict(zip(params, grads))


def _assert_unbiased(samples, exact, max_z=4.5):
    for name, g in samples.items():
        se = g.std(0) / math.sqrt(g.shape[0])
        z = ((g.mean(0) - exact[name]) / se).abs()
        # 4.5 standard errors per coordinate: with ~20 coordinates a false failure about once
        # in 10^4 runs; an estimator off by the minibatch scale is off by tens of them.
        assert float(z.max()) < max_z, (name, g.mean(0), exact[name], se)


def test_minibatch_log_joint_is_pyros_at_the_same_subsample():
    model = vipkg.Model.from_pyro(_hierarchical, X)
    assert model.is_subsampled and model.local_sites == {"z": ("data", 0)}
    assert model.sites["z"].shape == (N,)
    with pytest.raises(vipkg.ModelError, match="evaluated on a minibatch"):
        model.log_joint({"mu": torch.zeros(2, dtype=F64), "z": torch.zeros(2, N, dtype=F64)})
    idx = torch.tensor([5, 0, 3])
    mb = model.minibatch({"data": idx})
    assert mb.sites["z"].shape == (B,)
    lat = {"mu": torch.randn(4, dtype=F64), "z": torch.randn(4, B, dtype=F64)}
    ref = [
        poutine.trace(
            poutine.condition(_hierarchical, data={"mu": lat["mu"][i], "z": lat["z"][i], "data": idx})
        )
        .get_trace(X)
        .log_prob_sum()
        for i in range(4)
    ]
    torch.testing.assert_close(mb.log_joint(lat), torch.stack(ref))
    with pytest.raises(vipkg.ModelError, match="takes 3 integer indices"):
        model.minibatch({"data": torch.tensor([1, 2])})


@pytest.mark.parametrize(
    "parts",
    [
        {"mu": vipkg.Reparam(), "z": vipkg.Reparam()},
        {"mu": vipkg.STL(), "z": vipkg.STL()},
        {"mu": vipkg.Reparam(), "z": vipkg.ScoreFunction(LeaveOneOut())},
    ],
    ids=["reparam", "stl", "score"],
)
def test_minibatch_gradient_is_unbiased_for_the_full_data(parts):
    model = vipkg.Model.from_pyro(_hierarchical, X)
    guide = _gaussian_guide(model)
    exact = _exact_grads(guide, _exact_hierarchical_loss)
    samples = gradient_samples(model, guide, PerSite(parts), num_particles=8, repeats=1500, seed=0)
    _assert_unbiased(samples, exact)


def _mixture_guide(model):
    return Composite(
        model,
        {
            "mu": lambda sub, **kw: MeanFieldNormal(
                sub, loc=torch.tensor([0.2]), scale=torch.tensor([0.6]), **kw
            ),
            "z": lambda sub, **kw: Bernoulli(sub, logits=torch.linspace(-1.0, 1.0, N), **kw),
        },
        dtype=F64,
    )


def test_discrete_local_site_gradient_is_unbiased():
    model = vipkg.Model.from_pyro(_mixture, X)
    guide = _mixture_guide(model)
    exact = _exact_grads(guide, _exact_mixture_loss)
    est = PerSite({"mu": vipkg.Reparam(), "z": vipkg.ScoreFunction(LeaveOneOut())})
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=1500, seed=0)
    _assert_unbiased(samples, exact)


class _PerDatum(torch.nn.Module):
    """A per-datum baseline ``b(x_i) = a x_i + c`` that records the rows it is called on."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1, dtype=F64)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.linear(x[:, None])  # [B, 1]: one baseline per datum of the minibatch


@pytest.mark.parametrize("inputs", ["x", lambda m: m.data["x"][m.data["_subsample:data"]]])
def test_per_datum_learned_baseline_reads_the_minibatchs_rows(inputs):
    """NVIL's b(x_i) under subsampling: the network sees the minibatch's rows of x, one baseline per
    datum of the per-datum cost [S, B]."""
    model = vipkg.Model.from_pyro(_mixture, X)
    guide = _mixture_guide(model)
    net = _PerDatum()
    est = PerSite({"mu": vipkg.Reparam(), "z": vipkg.ScoreFunction(Learned(net, inputs=inputs))})
    for seed in range(3):
        torch.manual_seed(seed)
        idx = model.subsample_indices()
        model_b = model.minibatch(idx)
        info = est.estimate(model_b, minibatch_guide(guide, model, model_b, idx), vipkg.ELBO(), 8)
        assert torch.equal(net.seen[-1], X[idx["data"]])
        assert torch.isfinite(info.loss)
    assert len({tuple(s.tolist()) for s in net.seen}) == 3  # a different minibatch each time


def test_per_datum_learned_baseline_keeps_the_minibatch_gradient_unbiased():
    model = vipkg.Model.from_pyro(_mixture, X)
    guide = _mixture_guide(model)
    exact = _exact_grads(guide, _exact_mixture_loss)
    net = _PerDatum()
    est = PerSite({"mu": vipkg.Reparam(), "z": vipkg.ScoreFunction(Learned(net, inputs="x", lr=0.05))})
    samples = gradient_samples(model, guide, est, num_particles=8, repeats=1500, seed=0)
    _assert_unbiased(samples, exact)
    assert len(net.seen) >= 1500 and all(s.shape == (B,) for s in net.seen)
    assert float(net.linear.weight.detach().abs()) > 0  # trained on the per-datum costs


def test_minibatch_views_share_the_guides_parameters():
    model = vipkg.Model.from_pyro(_hierarchical, X)
    guide = _gaussian_guide(model)
    torch.manual_seed(0)
    mb, gb = draw_minibatch(model, guide)
    assert [id(p) for p in gb.parameters()] == [id(p) for p in guide.parameters()]
    idx = mb.data["_subsample:data"]
    torch.testing.assert_close(gb.parts[1].loc, guide.parts[1].loc[idx])
    assert gb.parts[1].log_q_scale == N / B and not hasattr(gb.parts[0], "log_q_scale")
    vipkg.Reparam().estimate(mb, gb, vipkg.ELBO(), 4)
    grad = guide.parts[1].loc.grad
    outside = torch.ones(N, dtype=torch.bool)
    outside[idx] = False
    assert bool((grad[outside] == 0).all()) and bool((grad[idx] != 0).all())


def test_fit_on_minibatches_reaches_the_exact_posterior_and_resumes_bit_for_bit(tmp_path):
    model = vipkg.Model.from_pyro(_hierarchical, X)
    guide, est = vipkg.estimators.per_site.auto(model, dtype=F64)
    sched = lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.999)  # noqa: E731
    result = vipkg.fit(model, guide, est, steps=3000, lr=0.05, scheduler=sched, seed=1, progress=False)
    # Exact posterior means: the joint is Gaussian with precision P and P @ mean = b.
    P = torch.zeros(N + 1, N + 1, dtype=F64)
    P[0, 0] = 1 + N
    P[0, 1:] = P[1:, 0] = -1
    P[1:, 1:] = 2 * torch.eye(N, dtype=F64)
    mean = torch.linalg.solve(P, torch.cat([torch.zeros(1, dtype=F64), X]))
    draws = result.sample(4000, seed=0)
    torch.testing.assert_close(draws["z"].mean(0), mean[1:], atol=0.12, rtol=0)
    assert abs(float(draws["mu"].mean()) - float(mean[0])) < 0.12
    assert set(result.to_arviz(n=100).posterior.data_vars) == {"mu", "z"}

    def run(steps, resume, path):
        m = vipkg.Model.from_pyro(_hierarchical, X)
        g, e = vipkg.estimators.per_site.auto(m, dtype=F64)
        return vipkg.fit(
            m,
            g,
            e,
            steps=steps,
            lr=0.05,
            seed=3,
            checkpoint=path,
            checkpoint_every=10,
            resume=resume,
            progress=False,
        )

    full = run(50, False, tmp_path / "full.pt")
    run(25, False, tmp_path / "split.pt")  # stops between checkpoints: its last is at step 25, the end
    resumed = run(50, True, tmp_path / "split.pt")
    assert torch.equal(resumed.losses, full.losses)


def test_whole_data_estimators_refuse_local_sites():
    model = vipkg.Model.from_pyro(_hierarchical, X)
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="one minibatch at a time"):
        vipkg.fit(model, vipkg.guides.Particles(model, n=8), vipkg.SVGD(), steps=2, progress=False)
    with pytest.raises(vipkg.ModelError, match="mixing local sites"):
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=2, progress=False)
