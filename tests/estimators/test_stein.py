import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import constraints

import vipkg
from tests.estimators.contract import Case, EstimatorContract
from tests.helpers import assert_unbiased
from vipkg.diagnostics import gradient_samples, gradient_variance
from vipkg.estimators.stein import (
    IMQ,
    RBF,
    SVGD,
    MirroredSVGD,
    mirrored_svgd_direction,
    svgd_direction,
)
from vipkg.guides import MeanFieldNormal
from vipkg.guides.particles import EntropicBox, EntropicSimplex, Particles
from vipkg.models.logistic import load_dataset

F64 = torch.float64


def _rmsprop(lr):
    # The reference SVGD code's "AdaGrad with momentum" is RMSprop with decay 0.9.
    return lambda params: torch.optim.RMSprop(params, lr=lr, alpha=0.9)


def _brute_force(x, scores, kernel, inv_hessian=None):
    """phi(x_i) = mean_j [k(x_j, x_i) s_j + A_j grad_{x_j} k(x_j, x_i)] with autograd, pair by pair."""
    n = x.shape[0]
    h = kernel.h(x)
    out = torch.zeros_like(x)
    for i in range(n):
        for j in range(n):
            xj = x[j].clone().requires_grad_(True)
            k = kernel.profile((xj - x[i]).square().sum(), h)[0]
            (grad,) = torch.autograd.grad(k, xj)
            if inv_hessian is not None:
                a, b = inv_hessian
                grad = a[j] * grad - b[j] * (b[j] @ grad)
            out[i] += k.detach() * scores[j] + grad
    return out / n


# ----------------------------------------------------------------- the kernel step
@pytest.mark.parametrize("kernel", [RBF(), IMQ(), RBF(0.7), IMQ(2.0, beta=-0.3, c=0.5)], ids=repr)
def test_direction_matches_pairwise_autograd(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=F64)
    s = torch.randn(7, 3, generator=g, dtype=F64)
    torch.testing.assert_close(
        svgd_direction(x, s, kernel), _brute_force(x, s, kernel), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("kernel", [IMQ(), RBF(), RBF(0.7)], ids=repr)
def test_mirrored_direction_matches_pairwise_autograd(kernel):
    g = torch.Generator().manual_seed(1)
    m = EntropicSimplex()
    x = m.to_full(torch.randn(6, 4, generator=g, dtype=F64))
    theta, s = m.primal(x), torch.randn(6, 4, generator=g, dtype=F64)
    a, b = m.inv_hessian(x)
    got = mirrored_svgd_direction(theta, s, kernel, (a, b))
    torch.testing.assert_close(got, _brute_force(theta, s, kernel, (a, b)), rtol=1e-10, atol=1e-12)


def test_median_bandwidth_is_med_squared_over_log_n():
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    med = torch.cdist(x, x).reshape(-1).median()
    torch.testing.assert_close(RBF().h(x), med**2 / math.log(30))
    torch.testing.assert_close(IMQ().h(x), med**2)
    # Coincident particles: the median is 0 and the bandwidth falls back to 1, not NaN.
    assert float(RBF().h(torch.zeros(5, 2, dtype=F64))) == 1.0


def test_chunked_kernel_equals_unchunked():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 4, generator=g, dtype=F64)
    s = torch.randn(37, 4, generator=g, dtype=F64)
    for kernel in (RBF(), IMQ()):
        full = svgd_direction(x, s, kernel)
        for chunk in (1, 8, 36):
            torch.testing.assert_close(
                svgd_direction(x, s, kernel, chunk_size=chunk), full, rtol=1e-12, atol=1e-14
            )
        # ``at=`` (for a data-parallel caller) evaluates the same field at a subset.
        torch.testing.assert_close(svgd_direction(x, s, kernel, at=x[5:11], chunk_size=4), full[5:11])
    m = EntropicSimplex()
    xs = m.to_full(torch.randn(37, 4, generator=g, dtype=F64))
    args = (m.primal(xs), s[:, :4], IMQ(), m.inv_hessian(xs))
    torch.testing.assert_close(mirrored_svgd_direction(*args, chunk_size=8), mirrored_svgd_direction(*args))
    est = SVGD(chunk_size=8)
    assert est.chunk_size == 8


def test_many_particles_use_a_strided_subset_for_the_median():
    """Above MEDIAN_SUBSET particles the bandwidth needs O(MEDIAN_SUBSET^2) memory, not O(n^2),
    and chunked and unchunked steps share it."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1100, 2, generator=g, dtype=F64)
    s = torch.randn(1100, 2, generator=g, dtype=F64)
    sub = x[::2]
    med = torch.cdist(sub, sub).reshape(-1).median()
    torch.testing.assert_close(RBF().h(x), med**2 / math.log(1100))
    torch.testing.assert_close(svgd_direction(x, s, RBF(), chunk_size=300), svgd_direction(x, s, RBF()))


def test_float32_far_from_origin_keeps_the_kernel_accurate():
    """Distances are computed after centring: particles at 1e3 in float32 see the same field."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 2, generator=g, dtype=F64)
    s = torch.randn(20, 2, generator=g, dtype=F64)
    ref = svgd_direction(x, s, RBF())
    got = svgd_direction((x + 1e3).float(), s.float(), RBF()).double()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------- the fits
def _mixture_model():
    def log_density(x):
        x = x[:, 0]
        a = math.log(1 / 3) - 0.5 * (x + 2) ** 2
        b = math.log(2 / 3) - 0.5 * (x - 2) ** 2
        return torch.logaddexp(a, b) - 0.5 * math.log(2 * math.pi)

    return vipkg.Model.from_log_density(log_density, 1, name="mixture")


def test_mixture_1d_from_far_init_matches_moments():
    """Liu & Wang's figure 1: 100 particles from N(-10, 1) cover 1/3 N(-2, 1) + 2/3 N(2, 1).

    Which mode a particle reaches is chaotic in its start (a rounding change moves one or two
    particles), so the moments are averaged over four starts: over ten starts the single-start
    mean ranged over 0.61-0.72 (sd ~0.035), the four-start average has sd ~0.02; 0.05 is ~2.5 sd
    and a wrong mode split (1/2 gives a mean of 0) is ~30 sd away.
    """
    model = _mixture_model()
    means, squares = [], []
    for seed in range(4):
        x0 = -10 + torch.randn(100, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)
        guide = Particles(model, particles=x0)
        vipkg.fit(model, guide, SVGD(), steps=1000, optimizer=_rmsprop(0.1), progress=False)
        x = guide.particles.detach()[:, 0]
        means.append(float(x.mean()))
        squares.append(float(x.square().mean()))
        # both modes are populated in about the right proportion, from every start
        assert 0.25 < float((x < 0).double().mean()) < 0.42, seed
    # exact: E[x] = -2/3 + 4/3 = 2/3, E[x^2] = 1 + 4 = 5
    assert abs(sum(means) / 4 - 2 / 3) < 0.05, means
    assert abs(sum(squares) / 4 - 5.0) < 0.15, squares


def test_correlated_gaussian_2d():
    mean = torch.tensor([1.0, -0.5], dtype=F64)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.5]], dtype=F64)
    model = vipkg.models.gaussian(mean, cov, dtype=F64)
    guide = Particles(model, n=100, dtype=F64)
    vipkg.fit(model, guide, SVGD(), steps=500, optimizer=_rmsprop(0.05), progress=False)
    q = guide()
    assert float((q.mean.detach() - mean).abs().max()) < 0.05
    assert float((q.covariance_matrix.detach() - cov).norm() / cov.norm()) < 0.15


def test_one_particle_is_gradient_ascent_to_the_mode():
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    cov = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=F64)
    model = vipkg.models.gaussian(mean, cov, dtype=F64)
    x = torch.tensor([[0.3, 0.1, -1.0]], dtype=F64)
    score = -torch.linalg.solve(cov, (x - mean).T).T
    for kernel in (RBF(), IMQ(), RBF(0.3)):
        # k(x, x) = 1 and the repulsive term vanishes: phi is exactly grad log p.
        torch.testing.assert_close(svgd_direction(x, score, kernel), score, rtol=0, atol=0)
    guide = Particles(model, particles=x)
    info = SVGD().estimate(model, guide, vipkg.ELBO(), 1)
    torch.testing.assert_close(guide.particles.grad, -score)
    assert info.log_weights.shape == (1, 1)
    vipkg.fit(model, guide, SVGD(), steps=1500, optimizer="sgd", lr=0.2, progress=False)
    torch.testing.assert_close(guide.particles.detach()[0], mean, rtol=0, atol=1e-6)


def test_estimate_writes_minus_phi_and_reports_log_p():
    model = vipkg.models.gaussian(dim=3, dtype=F64)
    guide = Particles(model, n=10, dtype=F64)
    x = guide.particles.detach().clone()
    guide.particles.grad = torch.full_like(x, 7.0)  # replaced, not accumulated
    info = SVGD().estimate(model, guide, vipkg.ELBO(), 4)
    phi = svgd_direction(x, -x, RBF())  # standard normal: score = -x
    torch.testing.assert_close(guide.particles.grad, -phi)
    log_p = model.log_joint_unconstrained(x)
    torch.testing.assert_close(info.log_weights, log_p[:, None])
    torch.testing.assert_close(info.loss, -log_p.mean())
    opt = torch.optim.SGD(guide.parameters(), lr=0.1)
    opt.step()
    torch.testing.assert_close(guide.particles.detach(), x + 0.1 * phi)


# --------------------------------------------------------------- unbiasedness
def _logistic(batch_size):
    return vipkg.models.logistic_regression("synthetic", n=400, d=4, batch_size=batch_size, dtype=F64)


def _logistic_guide(model):
    return Particles(model, n=12, init_scale=0.5, dtype=F64, seed=3)


def test_minibatch_direction_is_unbiased_for_the_full_data_direction():
    full, mini = _logistic(None), _logistic(40)
    guide = _logistic_guide(full)
    SVGD().estimate(full, guide, vipkg.ELBO(), 1)
    exact = {"particles": guide.particles.grad.clone()}
    samples = gradient_samples(mini, guide, SVGD(), repeats=300, seed=5)
    assert set(samples) == {"particles"}
    worst = assert_unbiased(samples, exact)
    assert worst["particles"] > 0.0


def test_minibatch_variance_follows_the_finite_population_factor():
    """phi is linear in the scores, so its covariance is that of the N/B-scaled minibatch sum:
    proportional to 1/B - 1/N. From B = 40 to B = 160 of N = 400 the trace falls by
    (1/40 - 1/400) / (1/160 - 1/400) = 6 (sampling error about +-20% at 300 repeats)."""
    guide = _logistic_guide(_logistic(None))
    v40 = gradient_variance(_logistic(40), guide, SVGD(), repeats=300, seed=1).total_trace
    v160 = gradient_variance(_logistic(160), guide, SVGD(), repeats=300, seed=2).total_trace
    assert 4.5 < v40 / v160 < 8.0
    assert gradient_variance(_logistic(None), guide, SVGD(), repeats=4, seed=3).total_trace < 1e-20


class _UnscaledSVGD(SVGD):
    """A biased variant: minibatch scores without the N / batch factor."""

    def estimate(self, model, guide, objective, num_particles):
        info = super().estimate(model, guide, objective, num_particles)
        x = guide.particles.detach().requires_grad_(True)
        (score,) = torch.autograd.grad(guide.log_joint(model, x).sum(), x)
        guide.particles.grad = -svgd_direction(x.detach(), score * (40 / 400), self.kernel)
        return info


def test_unbiasedness_check_has_power():
    full, mini = _logistic(None), _logistic(40)
    guide = _logistic_guide(full)
    SVGD().estimate(full, guide, vipkg.ELBO(), 1)
    exact = {"particles": guide.particles.grad.clone()}
    biased = gradient_samples(mini, guide, _UnscaledSVGD(), repeats=300, seed=5)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(biased, exact)
    # a different kernel's full-data field is rejected too
    SVGD(RBF(bandwidth=0.5)).estimate(full, guide, vipkg.ELBO(), 1)
    other = {"particles": guide.particles.grad.clone()}
    samples = gradient_samples(mini, guide, SVGD(), repeats=300, seed=5)
    with pytest.raises(AssertionError, match="standard errors"):
        assert_unbiased(samples, other)


# ------------------------------------------------------------------ mirrored SVGD
def _energy_distance(x, y):
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def _project_to_simplex(v):
    # Euclidean projection of each row onto the simplex (Duchi et al. 2008).
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = ((u - css / k) > 0).cumsum(-1).argmax(-1, keepdim=True)
    tau = css.gather(-1, rho) / (rho + 1)
    return (v - tau).clamp_min(0)


def _projected_svgd(alpha, x, steps, lr):
    """Euclidean SVGD on the first D-1 coordinates, projected back onto the simplex after each step."""
    theta = x[:, :-1].clone().requires_grad_(True)
    opt = _rmsprop(lr)([theta])
    for _ in range(steps):
        t = theta.detach()
        full = torch.cat([t, 1 - t.sum(-1, keepdim=True)], -1)
        g = (alpha - 1) / full.clamp_min(1e-32)  # the reference code's safe reciprocal
        theta.grad = -svgd_direction(t, g[:, :-1] - g[:, -1:], IMQ())
        opt.step()
        with torch.no_grad():
            theta.copy_(_project_to_simplex(torch.cat([theta, 1 - theta.sum(-1, keepdim=True)], -1))[:, :-1])
    t = theta.detach()
    return torch.cat([t, 1 - t.sum(-1, keepdim=True)], -1)


def test_mirrored_svgd_samples_a_sparse_dirichlet_where_projection_fails():
    """Shi et al. (2022), figure 2: D = 20, alpha = 0.1 + (90, 5, 5, 0, ...)."""
    D = 20
    alpha = torch.full((D,), 0.1, dtype=F64)
    alpha[:3] += torch.tensor([90.0, 5.0, 5.0], dtype=F64)
    model = vipkg.Model.from_log_density(
        lambda x: torch.xlogy(alpha - 1, x).sum(-1), D, support=constraints.simplex, name="dirichlet"
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exact = torch.distributions.Dirichlet(alpha).sample((1000,))
    guide = Particles(model, n=50, mirror="entropic", dtype=F64)
    x0 = guide.particles.detach().clone()
    vipkg.fit(model, guide, MirroredSVGD("entropic"), steps=300, optimizer=_rmsprop(0.1), progress=False)
    x = guide.particles.detach()
    assert bool((x > 0).all()) and float((x.sum(-1) - 1).abs().max()) < 1e-12
    ed_msvgd = float(_energy_distance(x, exact))
    assert ed_msvgd < 0.01
    proj = _projected_svgd(alpha, x0, steps=300, lr=0.1)
    ed_proj = float(_energy_distance(proj, exact))
    on_boundary = float((proj <= 0).any(-1).double().mean())
    assert ed_proj > 20 * ed_msvgd or on_boundary > 0.5


def test_mirrored_svgd_on_a_box():
    """Independent Beta(2, 5) and Beta(3, 3) on [0, 1]^2 through the entropic box map."""
    a = torch.tensor([2.0, 3.0], dtype=F64)
    b = torch.tensor([5.0, 3.0], dtype=F64)
    target = torch.distributions.Beta(a, b)
    model = vipkg.Model.from_log_density(
        lambda x: target.log_prob(x).sum(-1), 2, support=constraints.unit_interval
    )
    guide = Particles(model, n=100, mirror=EntropicBox(0.0, 1.0), dtype=F64)
    vipkg.fit(model, guide, MirroredSVGD(), steps=500, optimizer=_rmsprop(0.05), progress=False)
    x = guide.particles.detach()
    assert bool(((x > 0) & (x < 1)).all())
    assert float((x.mean(0) - target.mean).abs().max()) < 0.02
    assert float((x.std(0) / target.stddev - 1).abs().max()) < 0.15


# ------------------------------------------------------------ logistic regression
@pytest.fixture(scope="module")
def breast_cancer_split():
    X, y = load_dataset("breast_cancer", dtype=F64)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = int(0.3 * X.shape[0])
    return X[perm[n_test:]], y[perm[n_test:]], X[perm[:n_test]], y[perm[:n_test]]


def test_bayesian_logistic_regression_held_out_accuracy(breast_cancer_split):
    X, y, X_test, y_test = breast_cancer_split

    def log_joint(w):
        logits = w[:, :1] + w[:, 1:] @ X.T
        return (y * logits - F.softplus(logits)).sum(-1) - 0.5 * w.square().sum(-1)

    model = vipkg.Model.from_log_density(log_joint, X.shape[1] + 1, name="breast_cancer_train")
    guide = Particles(model, n=50, init_scale=0.1, dtype=F64)
    result = vipkg.fit(model, guide, SVGD(), steps=200, optimizer=_rmsprop(0.05), progress=False)
    w = guide.particles.detach()
    prob = torch.sigmoid(w[:, :1] + w[:, 1:] @ X_test.T).mean(0)
    accuracy = float(((prob > 0.5).to(F64) == y_test).to(F64).mean())
    assert accuracy >= 0.9
    assert result.losses[-1] < result.losses[0]


# ------------------------------------------------------------------------ checks
def test_check_rejects_what_does_not_fit():
    model = vipkg.models.gaussian(dim=2)
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="Particles"):
        SVGD().check(model, MeanFieldNormal(model), vipkg.ELBO())
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="KL"):
        SVGD().check(model, Particles(model, n=4), vipkg.IWAE(4))
    simplex = vipkg.Model.from_log_density(lambda x: x.sum(-1), 3, support=constraints.simplex)
    mirrored = Particles(simplex, n=4, mirror="entropic")
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="MirroredSVGD"):
        SVGD().check(simplex, mirrored, vipkg.ELBO())
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="mirror="):
        MirroredSVGD().check(model, Particles(model, n=4), vipkg.ELBO())
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="agree"):
        MirroredSVGD(EntropicBox(0, 1)).check(simplex, mirrored, vipkg.ELBO())
    with pytest.raises(vipkg.IncompatibleEstimatorError, match="KL"):
        MirroredSVGD().check(simplex, mirrored, vipkg.Renyi(0.5))
    MirroredSVGD("entropic").check(simplex, mirrored, vipkg.ELBO())
    with pytest.raises(vipkg.IncompatibleEstimatorError):
        vipkg.fit(model, MeanFieldNormal(model), SVGD(), steps=2, progress=False)


def test_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match="bandwidth"):
        RBF("silverman")
    with pytest.raises(ValueError, match="bandwidth"):
        RBF(-1.0)
    with pytest.raises(ValueError, match="beta"):
        IMQ(beta=0.5)
    with pytest.raises(ValueError, match="c > 0"):
        IMQ(c=0.0)
    with pytest.raises(ValueError, match="kernel"):
        SVGD(kernel="rbf")
    with pytest.raises(ValueError, match="chunk_size"):
        SVGD(chunk_size=0)
    with pytest.raises(ValueError, match="mirror map"):
        MirroredSVGD("logbarrier")
    with pytest.raises(ValueError, match="scores"):
        svgd_direction(torch.zeros(3, 2), torch.zeros(3, 1), RBF())


# ------------------------------------------------------------------ the estimator contract
def _full_svgd_gradient(model, guide):
    """What SVGD writes into ``.grad`` on the full data: minus the Stein direction at the particles,
    with scores by autograd of the full-data log joint (in closed form given the scores)."""
    x = guide.particles.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(guide.log_joint(_logistic(None), x).sum(), x)
    return {"particles": -svgd_direction(x.detach(), score, RBF())}


ALPHA_SIMPLEX = torch.tensor([2.0, 1.5, 3.0], dtype=F64)


def _simplex_model(batch_size=None, n=200):
    """theta ~ Dirichlet(2, 1.5, 3) on the simplex, y_i ~ Categorical(theta) for 200 draws (one-hot);
    with ``batch_size`` the likelihood is a minibatch scaled by N / batch, unbiased for the full data."""
    from vipkg.models._common import minibatch

    g = torch.Generator().manual_seed(0)
    Y = F.one_hot(torch.multinomial(torch.tensor([0.2, 0.3, 0.5]), n, True, generator=g), 3).to(F64)

    def log_joint(latents, data):
        theta, Y = latents["theta"], data["Y"]
        idx, scale = minibatch(Y.shape[0], batch_size, Y.device)
        ll = (Y if idx is None else Y[idx]) @ torch.log(theta).T  # [B, S]
        return ((data["alpha"] - 1) * torch.log(theta)).sum(-1) + scale * ll.sum(0)

    sites = {"theta": vipkg.model.Site(torch.Size([3]), constraints.simplex)}
    return vipkg.Model(sites, log_joint, data={"Y": Y, "alpha": ALPHA_SIMPLEX}, name="dirichlet_categorical")


def _full_mirrored_gradient(model, guide):
    """MirroredSVGD's write on the full data (its direction is checked against pairwise autograd above)."""
    saved = guide.dual.grad
    MirroredSVGD().estimate(_simplex_model(None), guide, vipkg.ELBO(), 1)
    out, guide.dual.grad = {"dual": guide.dual.grad.clone()}, saved
    return out


class TestSteinContract(EstimatorContract):
    """SVGD's update is no loss gradient: what it guarantees is that the minibatch direction is
    unbiased for the full-data Stein direction, its exact value here (biased variants: minibatch
    scores without the N / batch factor; another kernel's field). Both are stateless."""

    cases = [
        Case(
            "svgd-minibatch-logistic",
            model=lambda: _logistic(40),
            guide=_logistic_guide,
            estimator=SVGD,
            num_particles=1,
            exact=_full_svgd_gradient,
            biased=_UnscaledSVGD,
            shift=2.0,  # standard errors 0.2 to 0.7; entries up to 27
            seed=5,
            lr=0.05,
        ),
        Case(
            "mirrored-svgd-minibatch-simplex",
            model=lambda: _simplex_model(20),
            guide=lambda m: Particles(m, n=12, mirror="entropic", dtype=F64, seed=3),
            estimator=MirroredSVGD,
            num_particles=1,
            exact=_full_mirrored_gradient,
            biased=lambda: MirroredSVGD(kernel=RBF()),
            shift=4.0,  # standard errors 0.6 to 0.9; entries up to 36
            seed=5,
            lr=0.05,
        ),
    ]
