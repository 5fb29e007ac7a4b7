"""FB-GVI and BW-SGD: unbiased ELBO gradients, exact fixed points, stability, convergence."""

import math

import pytest
import torch

import vipkg
from tests.estimators.contract import Case, EstimatorContract
from tests.helpers import assert_unbiased, exact_loss_gradient, gaussian_elbo, random_gaussian_target
from vipkg.diagnostics import gradient_samples, gradient_variance, laplace
from vipkg.estimators.bures import BWSGD, FBGVI, smoothness_constant, smoothness_step_size
from vipkg.guides import FullRankNormal, MeanFieldNormal

F64 = torch.float64

#: the covariance factor's parameters: L = diag(softplus(raw_scale)) @ unit_lower(raw_unit_lower)
COV = ("raw_scale", "raw_unit_lower")


# --------------------------------------------------------------------------- targets and helpers
def _small_gaussian(d=5):
    return random_gaussian_target(d)


def _ill_conditioned(d=10, top=200.0, seed=0):
    """N(mean, cov): cov eigenvalues geometric from 1 to ``top``, random rotation, fixed seed.

    V's Hessian is cov^{-1}, eigenvalues 1/top .. 1, so V is 1-smooth (L = 1).
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    ev = torch.logspace(0, math.log10(top), d, dtype=F64)
    cov = Q @ torch.diag(ev) @ Q.T
    cov = 0.5 * (cov + cov.T)
    mean = torch.randn(d, generator=g, dtype=F64)
    return vipkg.models.gaussian(mean, cov, dtype=F64), Q, ev


def _quartic(d=4):
    """Non-Gaussian target V(x) = 1/2 (x-b)^T P (x-b) + c/4 sum x_i^4 with a closed-form E_q[V]."""
    g = torch.Generator().manual_seed(8)
    A = torch.randn(d, d, generator=g, dtype=F64)
    P = A @ A.T / d + 0.5 * torch.eye(d, dtype=F64)
    b = torch.randn(d, generator=g, dtype=F64)
    c = 0.3

    def log_density(x):
        r = x - b
        return -(0.5 * ((r @ P) * r).sum(-1) + 0.25 * c * x.pow(4).sum(-1))

    def exact_loss(guide):
        m, L = guide.loc, guide.scale_tril
        S = L @ L.T
        s = S.diagonal()
        r = m - b
        ev = 0.5 * (torch.trace(P @ S) + r @ P @ r) + 0.25 * c * (m**4 + 6 * m**2 * s + 3 * s**2).sum()
        entropy = 0.5 * torch.logdet(S) + 0.5 * d * (1 + math.log(2 * math.pi))
        return ev - entropy

    return vipkg.Model.from_log_density(log_density, d, name="quartic"), exact_loss


def _guide(model, seed=5, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    d = model.dim
    L = scale * torch.eye(d, dtype=F64) + 0.2 * torch.randn(d, d, generator=g, dtype=F64).tril(-1)
    return FullRankNormal(model, loc=0.5 * torch.randn(d, generator=g, dtype=F64), scale_tril=L, dtype=F64)


def _exact_gradient(model, guide, exact_loss=None):
    if exact_loss is None:
        return exact_loss_gradient(
            guide, gaussian_elbo(guide, model.reference["mean"], model.reference["cov"])
        )
    return exact_loss_gradient(guide, -exact_loss(guide))


def _kl(guide, model):
    q = torch.distributions.MultivariateNormal(guide.loc.detach(), scale_tril=guide.scale_tril.detach())
    p = torch.distributions.MultivariateNormal(model.reference["mean"], model.reference["cov"])
    return float(torch.distributions.kl_divergence(q, p))


def _run(est, model, guide, steps, num_particles=1):
    kls = [_kl(guide, model)]
    for _ in range(steps):
        est.step(model, guide, vipkg.ELBO(), num_particles, None)
        kls.append(_kl(guide, model))
    return torch.tensor(kls)


def _entropy_term_gradient(guide):
    """What dropping the -Sigma^{-1} (entropy) term would add to each parameter's gradient."""
    L = guide.scale_tril
    prec = torch.cholesky_inverse(L.detach())
    names, params = zip(*guide.named_parameters())
    grads = torch.autograd.grad((0.5 * prec * (L @ L.T)).sum(), params, allow_unused=True)
    return {n: (torch.zeros_like(p) if gr is None else gr) for n, p, gr in zip(names, params, grads)}


# ----------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("hessian", ["autograd", "stein"])
@pytest.mark.parametrize("target", ["gaussian", "quartic"])
def test_estimate_unbiased_against_closed_form(hessian, target):
    if target == "gaussian":
        model, exact_loss = _small_gaussian(), None
    else:
        model, exact_loss = _quartic()
    guide = _guide(model)
    exact = _exact_gradient(model, guide, exact_loss)
    samples = gradient_samples(
        model, guide, FBGVI(0.1, hessian=hessian), num_particles=4, repeats=400, seed=11
    )
    assert set(samples) == {"loc", *COV}
    worst = assert_unbiased(samples, exact)
    assert worst["loc"] > 0.0
    if target == "gaussian" and hessian == "autograd":
        # Price's theorem with a constant Hessian: the covariance gradient is exact, no noise.
        assert all(float(samples[n].var(0).max()) < 1e-20 for n in COV)
    else:
        assert all(worst[n] > 0.0 for n in COV)


@pytest.mark.parametrize("hessian", ["autograd", "stein"])
def test_unbiasedness_check_rejects_dropping_the_entropy_term(hessian):
    """A variant without -Sigma^{-1} in dLoss/dSigma (a constant offset per coordinate) is rejected."""
    model, exact_loss = _quartic()
    guide = _guide(model)
    exact = _exact_gradient(model, guide, exact_loss)
    samples = gradient_samples(
        model, guide, FBGVI(0.1, hessian=hessian), num_particles=4, repeats=400, seed=11
    )
    offset = _entropy_term_gradient(guide)
    biased = {k: v + offset[k] for k, v in samples.items()}
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(biased, exact)


def test_mean_mode_is_exact_for_gaussian_target():
    """expectation='mean' evaluates grad V and Hess V at m: the exact expectations for quadratic V."""
    model = _small_gaussian()
    guide = _guide(model)
    exact = _exact_gradient(model, guide)
    samples = gradient_samples(
        model, guide, FBGVI(0.1, expectation="mean"), num_particles=4, repeats=2, seed=0
    )
    for k, v in samples.items():
        assert torch.allclose(v, exact[k].expand_as(v), atol=1e-10, rtol=0)
    info = FBGVI(0.1, expectation="mean").estimate(model, guide, vipkg.ELBO(), 1)
    elbo = gaussian_elbo(guide, model.reference["mean"], model.reference["cov"])
    assert abs(float(info.loss + elbo.detach())) < 1e-10  # the delta-method loss is the exact -ELBO here


def test_variance_autograd_vs_stein_and_one_over_particles():
    """On a Gaussian target both modes use the same draws for the mean gradient (identical
    loc rows); the Hessian-free Stein covariance gradient pays with noise, the autograd one
    has none; Stein's variance falls as 1/S."""
    model = _small_gaussian()
    guide = _guide(model)
    auto = gradient_samples(model, guide, FBGVI(0.1), num_particles=4, repeats=200, seed=1)
    stein = gradient_samples(model, guide, FBGVI(0.1, hessian="stein"), num_particles=4, repeats=200, seed=1)
    assert torch.allclose(auto["loc"], stein["loc"], atol=1e-12)
    assert sum(float(auto[n].var(0).sum()) for n in COV) < 1e-20
    assert sum(float(stein[n].var(0).sum()) for n in COV) > 1e-3
    v4 = gradient_variance(model, guide, FBGVI(0.1, hessian="stein"), num_particles=4, repeats=300, seed=2)
    v16 = gradient_variance(model, guide, FBGVI(0.1, hessian="stein"), num_particles=16, repeats=300, seed=3)
    # The leave-one-out baseline makes the S = 4 estimate slightly noisier than 4x S = 16.
    assert 3.0 < v4.total_trace / v16.total_trace < 6.0


# ----------------------------------------------------------------------- exact-expectation dynamics
@pytest.mark.parametrize("cls", [FBGVI, BWSGD])
@pytest.mark.parametrize("eta", [0.01, 0.3, 1.0])
def test_target_is_a_fixed_point(cls, eta):
    """With exact expectations the target is a fixed point for every eta <= 1/L (L = 1 here)."""
    model, _, _ = _ill_conditioned()
    mean, cov = model.reference["mean"], model.reference["cov"]
    guide = FullRankNormal(model, loc=mean, scale_tril=torch.linalg.cholesky(cov), dtype=F64)
    cls(eta, expectation="mean").step(model, guide, vipkg.ELBO(), 1, None)
    L = guide.scale_tril.detach()
    assert float((guide.loc.detach() - mean).abs().max()) < 1e-10
    assert float((L @ L.T - cov).abs().max()) < 1e-10


def test_fbgvi_fixed_point_is_biased_above_one_over_l():
    """Above 1/L the forward map I - eta A is no longer monotone, so it is not the optimal
    transport map and the target stops being a fixed point: one step from the target
    sends each eigen-direction with eta * a > 1 to variance eta^2 a (a = 1/cov eigenvalue)."""
    model, Q, ev = _ill_conditioned()
    mean, cov = model.reference["mean"], model.reference["cov"]
    eta = 1.5
    guide = FullRankNormal(model, loc=mean, scale_tril=torch.linalg.cholesky(cov), dtype=F64)
    FBGVI(eta, expectation="mean").step(model, guide, vipkg.ELBO(), 1, None)
    a = 1.0 / ev
    expected = torch.where(eta * a <= 1, ev, eta**2 * a)
    L = guide.scale_tril.detach()
    assert float((L @ L.T - Q @ torch.diag(expected) @ Q.T).abs().max()) < 1e-10
    assert int((eta * a > 1).sum()) == 1  # only the top direction moves


@pytest.mark.parametrize("cls", [FBGVI, BWSGD])
def test_gaussian_target_eta_one_kl_monotone_and_small(cls):
    """d = 10, cov eigenvalues 1..200, start N(0, I), eta = 1 = 1/L, exact expectations."""
    model, _, _ = _ill_conditioned()
    guide = FullRankNormal(model, init_scale=1.0, dtype=F64)
    kls = _run(cls(1.0, expectation="mean"), model, guide, 200)
    assert bool((kls.diff() <= 1e-12).all()), "KL increased"
    assert float(kls[-1]) < 1e-2, float(kls[-1])
    assert float(kls[0]) > 5.0


@pytest.mark.parametrize("init_var", [1.0, 0.5])
def test_eta_1_11_fbgvi_stable_bwsgd_not(init_var):
    """eta = 1.11 > 1/L. BW-SGD's covariance map has multiplier 1 - 2 eta a at the target in
    each eigen-direction: -1.22 in the top one (a = 1), so the fixed point repels. From
    N(0, I) that direction starts exactly on its fixed point and only round-off (amplified
    1.22x per step) pushes it off, which takes ~150-200 steps; from N(0, 0.5 I) it is off
    from the start. FB-GVI's implicit entropy step stays stable: KL keeps decreasing and
    settles at the biased fixed point (top variance eta^2 instead of 1: KL ~ 0.012)."""
    model, _, _ = _ill_conditioned()
    fb = FullRankNormal(model, init_scale=math.sqrt(init_var), dtype=F64)
    bw = FullRankNormal(model, init_scale=math.sqrt(init_var), dtype=F64)
    kl_fb = _run(FBGVI(1.11, expectation="mean"), model, fb, 400)
    kl_bw = _run(BWSGD(1.11, expectation="mean"), model, bw, 400)
    assert bool((kl_fb.diff() <= 1e-12).all())
    assert float(kl_fb[-1]) < 0.02
    bias = 0.5 * (1.11**2 - 1 - math.log(1.11**2))  # top direction at variance eta^2
    assert float(kl_fb[-1]) > bias
    late_bw = kl_bw[250:]
    assert float(torch.nan_to_num(late_bw, nan=math.inf).max()) > 50 * float(kl_fb[-1])
    assert not bool((kl_bw.diff() <= 1e-12).all())


# ------------------------------------------------------------------------------- stochastic runs
@pytest.mark.parametrize(("hessian", "num_particles", "limit"), [("autograd", 16, 0.05), ("stein", 64, 0.08)])
def test_stochastic_fbgvi_converges(hessian, num_particles, limit):
    """Draws instead of exact expectations: over three seeds the KL falls from ~6 to a small
    noise floor (d = 10, cov eigenvalues 1..20, eta = 0.2, 400 steps). With exact Hessians
    only the mean is noisy (stationary KL ~ sum_a eta a / (2 S (2 - eta a)) ~ 0.01 at S = 16);
    Stein's Hessian is noisier, so it gets 64 draws."""
    model, _, _ = _ill_conditioned(top=20.0)
    finals = []
    for seed in range(3):
        guide = FullRankNormal(model, init_scale=1.0, dtype=F64)
        result = vipkg.fit(
            model,
            guide,
            FBGVI(0.2, hessian=hessian),
            steps=400,
            num_particles=num_particles,
            seed=seed,
            progress=False,
        )
        assert result.losses.shape == (400,)
        finals.append(_kl(guide, model))
    initial = _kl(FullRankNormal(model, init_scale=1.0, dtype=F64), model)
    mean_final = sum(finals) / len(finals)
    assert mean_final < limit, (finals, initial)
    assert initial > 50 * mean_final


# --------------------------------------------------------------------- Bayesian logistic regression
def _map_and_laplace(model):
    xmap, cov = laplace(model, max_iter=200)
    return xmap, cov.diagonal().sqrt()


@torch.no_grad()
def _elbo(model, guide, n=20000, seed=99):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, model.dim, generator=g, dtype=F64)  # common random numbers across guides
    L = guide.scale_tril
    z = guide.loc + eps @ L.T
    log_q = guide().log_prob(z)
    return float((guide.log_joint(model, z) - log_q).mean())


def test_logistic_regression_fbgvi_near_map_and_beats_reparam():
    """Synthetic logistic regression (N = 200, D = 5 + intercept). 100 steps x 16 draws for
    every method: the same number of grad V evaluations (FB-GVI autograd also evaluates
    Hessians; the Stein mode uses gradients only)."""
    model = vipkg.models.logistic_regression("synthetic", n=200, d=5, dtype=F64)
    xmap, sd = _map_and_laplace(model)
    eta = smoothness_step_size(model, FullRankNormal(model, dtype=F64), safety=0.25)
    steps, S = 100, 16
    elbos = {}
    for label, est, lr in [
        ("fb-autograd", FBGVI(eta), 1e-2),
        ("fb-stein", FBGVI(eta, hessian="stein"), 1e-2),
        ("reparam-lr1e-2", vipkg.Reparam(), 1e-2),
        ("reparam-lr5e-2", vipkg.Reparam(), 5e-2),
    ]:
        guide = FullRankNormal(model, dtype=F64)
        vipkg.fit(model, guide, est, steps=steps, num_particles=S, lr=lr, seed=0, progress=False)
        elbos[label] = _elbo(model, guide)
        if label.startswith("fb"):
            # Gaussian VI's mean is within a fraction of a posterior sd of the MAP here.
            assert float(((guide.loc.detach() - xmap) / sd).abs().max()) < 0.5, label
    best_reparam = max(elbos["reparam-lr1e-2"], elbos["reparam-lr5e-2"])
    assert elbos["fb-autograd"] > best_reparam, elbos
    assert elbos["fb-stein"] > best_reparam - 0.05, elbos


# --------------------------------------------------------------------------- plumbing and errors
def test_fit_writes_guide_in_place_and_ignores_optimizer():
    model = _small_gaussian()
    guide = FullRankNormal(model, dtype=F64)
    result = vipkg.fit(model, guide, FBGVI(0.5, expectation="mean"), steps=60, lr=123.0, progress=False)
    assert torch.allclose(guide.loc.detach(), model.reference["mean"], atol=1e-6)
    L = guide.scale_tril.detach()
    assert torch.allclose(L @ L.T, model.reference["cov"], atol=1e-6)
    assert float(result.losses[-1]) == pytest.approx(0.0, abs=1e-6)  # log Z = 0: -ELBO -> 0
    info = FBGVI(0.5, num_samples=7).step(model, guide, vipkg.ELBO(), 3, None)
    assert info.log_weights.shape == (7, 1)
    assert info.loss.shape == () and not info.loss.requires_grad


def test_stepinfo_loss_is_minus_elbo_of_the_draws():
    model = _small_gaussian()
    guide = _guide(model)
    torch.manual_seed(0)
    info = BWSGD(0.1).estimate(model, guide, vipkg.ELBO(), 64)
    assert torch.allclose(info.loss, -info.log_weights.mean())
    exact = -float(gaussian_elbo(guide, model.reference["mean"], model.reference["cov"]).detach())
    assert abs(float(info.loss) - exact) < 5 * float(info.log_weights.std()) / 8


def test_pyro_model_matches_tensor_model():
    """The Pyro front-end (Hessians through Pyro's log densities) gives the same step."""
    mean = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    cov = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=F64)
    out = []
    for form in ("tensor", "pyro"):
        model = vipkg.models.gaussian(mean, cov, form=form, dtype=F64)
        guide = FullRankNormal(model, init_scale=1.0, dtype=F64)
        torch.manual_seed(0)
        FBGVI(0.3, num_samples=5).step(model, guide, vipkg.ELBO(), 1, None)
        out.append(torch.cat([guide.loc.detach(), guide.scale_tril.detach().flatten()]))
    assert torch.allclose(out[0], out[1], atol=1e-10)


def test_smoothness_step_size():
    model, _, _ = _ill_conditioned()
    guide = FullRankNormal(model, init_scale=1.0, dtype=F64)
    assert smoothness_constant(model, guide) == pytest.approx(1.0, rel=1e-10)
    assert smoothness_step_size(model, guide, safety=0.5) == pytest.approx(0.5, rel=1e-10)
    L_power = smoothness_constant(model, torch.zeros(3, 10, dtype=F64), method="power", power_iterations=500)
    assert L_power == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="shape"):
        smoothness_constant(model, torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="safety"):
        smoothness_step_size(model, guide, safety=0.0)


def test_check_and_constructor_errors():
    model = _small_gaussian()
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="FullRankNormal"):
        FBGVI(0.1).check(model, MeanFieldNormal(model), vipkg.ELBO())
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="ELBO"):
        BWSGD(0.1).check(model, FullRankNormal(model), vipkg.IWAE(4))
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="FullRankNormal"):
        vipkg.fit(model, MeanFieldNormal(model), FBGVI(0.1), steps=2, progress=False)
    for bad in (0.0, -1.0, math.inf, "1"):
        with pytest.raises(ValueError, match="step_size"):
            FBGVI(bad)
    with pytest.raises(ValueError, match="num_samples"):
        BWSGD(0.1, num_samples=0)
    with pytest.raises(ValueError, match="hessian"):
        FBGVI(0.1, hessian="bfgs")
    with pytest.raises(ValueError, match="expectation"):
        FBGVI(0.1, expectation="median")
    with pytest.raises(ValueError, match="autograd"):
        FBGVI(0.1, hessian="stein", expectation="mean")
    assert "FBGVI(step_size=0.1" in repr(FBGVI(0.1))


def test_hessian_falls_back_to_row_loop_without_vmap(monkeypatch):
    """Log densities whose ops have no vmap rule still get exact Hessians (one pass per row)."""
    from vipkg.estimators import bures

    model, _ = _quartic()
    x = torch.randn(3, model.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    _, _, batched = bures._potential(model, x, hessian=True)
    original = torch.autograd.grad
    calls = {"batched": 0}

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls["batched"] += 1
            raise RuntimeError("no batching rule")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    _, _, looped = bures._potential(model, x, hessian=True)
    assert calls["batched"] == 1
    assert torch.allclose(looped, batched, atol=1e-12)
    assert torch.allclose(batched[0], batched[0].T)


# ------------------------------------------------------------------ the estimator contract
class _DropsEntropy(FBGVI):
    """A biased variant: the estimate without -Sigma^{-1} in dLoss/dSigma (the entropy term)."""

    def estimate(self, model, guide, objective, num_particles):
        info = super().estimate(model, guide, objective, num_particles)
        offset = _entropy_term_gradient(guide)
        for name, p in guide.named_parameters():
            p.grad = p.grad + offset[name]
        return info


def _quartic_gradient(model, guide):
    return _exact_gradient(model, guide, _quartic()[1])


class TestBuresContract(EstimatorContract):
    """FB-GVI (exact and Stein Hessians) and BW-SGD: the gradient their estimate writes is the
    ELBO's, against a non-Gaussian (quartic) target with a closed-form E_q[V]; biased variant:
    the entropy term dropped. Their own steps ignore the optimizer (the fits check determinism)."""

    cases = [
        Case(
            f"{name}-quartic",
            model=lambda: _quartic()[0],
            guide=_guide,
            estimator=make,
            exact=_quartic_gradient,
            biased=lambda: _DropsEntropy(0.1),
            shift=shift,
            seed=11,
        )
        for name, make, shift in [
            ("fbgvi", lambda: FBGVI(0.1), 0.1),
            ("fbgvi-stein", lambda: FBGVI(0.1, hessian="stein"), 0.25),  # Stein's Hessian: SE 0.03-0.07
            ("bwsgd", lambda: BWSGD(0.1), 0.1),
        ]
    ]
