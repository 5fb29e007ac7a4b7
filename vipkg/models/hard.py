"""Hard posteriors: ill-conditioned, funnel-shaped or high-dimensional targets with reference moments.

Each constructor returns a :class:`vipkg.Model` whose ``reference`` holds the posterior mean
and standard deviation of the flat unconstrained vector and of every constrained site:
closed form for the Gaussian regression, long NUTS runs for the rest (written by
``benchmarks/make_references.py`` into ``vipkg/models/references/``). NUTS references
describe the default arguments only; other arguments give a model without moments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import _HALF_LOG_2PI, check_form, normal_log_prob
from vipkg.models._reference import load_reference
from vipkg.models.eight_schools import eight_schools

__all__ = [
    "correlated_regression",
    "random_walk",
    "eight_schools_centered",
    "ar_series",
    "stochastic_volatility",
    "HARD_POSTERIORS",
]

_LOG_2 = math.log(2.0)


def _half_normal_log_prob(x, scale: float):
    return normal_log_prob(x, 0.0, scale) + _LOG_2


def _with_reference(model: Model, reference: dict) -> Model:
    model.reference = reference
    return model


# ------------------------------------------------------------------------ correlated regression
#: the four measurements whose squares join the ten: in clinical units they are far from
#: zero, where a square is nearly linear in its argument
_SQUARED = ("age", "bmi", "bp", "s5")


def _diabetes_design(column_scale_power: float = 1.0):
    from sklearn.datasets import load_diabetes

    # Unscaled: the bundled scaled copy is centred, and centred squares are nearly
    # uncorrelated with their argument, which would hide the collinearity wanted here.
    raw = load_diabetes(scaled=False)
    X = torch.as_tensor(raw.data, dtype=torch.float64)
    names = list(raw.feature_names)
    cols = [X[:, i] for i in range(X.shape[1])] + [X[:, names.index(n)] ** 2 for n in _SQUARED]
    design = torch.stack(cols, 1)
    design = (design - design.mean(0)) / design.std(0) ** column_scale_power
    y = torch.as_tensor(raw.target, dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    return design, y, names + [f"{n}^2" for n in _SQUARED]


def _gaussian_posterior(X, y, noise_scale: float, prior_scale: float):
    """Mean, covariance and log evidence of ``w`` under ``y ~ N(X w, s^2)``, ``w ~ N(0, t^2)``.

    The evidence comes from the d x d precision (completing the square in ``w``) rather than
    the n x n marginal covariance, so the tests can check it against the latter independently.
    """
    n, d = X.shape
    s2, t2 = noise_scale**2, prior_scale**2
    precision = X.T @ X / s2 + torch.eye(d, dtype=X.dtype) / t2
    L = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve((X.T @ y / s2)[:, None], L)[:, 0]
    cov = torch.cholesky_inverse(L)
    cov = 0.5 * (cov + cov.T)
    log_det_precision = 2 * L.diagonal().log().sum()
    log_evidence = (
        -0.5 * n * math.log(2 * math.pi * s2)
        - 0.5 * d * math.log(t2)
        - 0.5 * log_det_precision
        - 0.5 * y.square().sum() / s2
        + 0.5 * mean @ precision @ mean
    )
    return mean, cov, float(log_evidence)


def correlated_regression(
    *,
    noise_scale: float = 0.7,
    prior_scale: float = 1.0,
    column_scale_power: float = 1.0,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """Linear regression on strongly collinear predictors, with an exactly Gaussian posterior.

    ``y ~ N(X w, noise_scale^2 I)``, ``w ~ N(0, prior_scale^2 I)`` on scikit-learn's bundled
    diabetes data (442 patients; nothing is downloaded). ``X`` holds the ten baseline
    measurements in clinical units plus the squares of age, BMI, blood pressure and s5
    (log triglycerides), each column standardized and nothing decorrelated: 14 weights.
    The squares of variables far from zero are nearly linear in them and the serum
    measurements s1 to s4 are nearly linearly dependent, so ``cond(X^T X)`` is about
    3.6e4 and several pairs of weights have posterior correlations beyond 0.99. The
    response is standardized; ``noise_scale`` 0.7 is about the least-squares residual
    scale, known here so that the posterior is Gaussian.

    Parameters
    ----------
    noise_scale, prior_scale : float
    column_scale_power : float
        Each centred column is divided by its standard deviation to this power: 1
        standardizes (the default), 0.5 leaves the columns on part of their own scales, as
        users often do (posterior SDs from 0.006 to 0.84 and ``cond(X^T X)`` about 1.3e7):
        the target on which a full-rank factor trained entry by entry fails.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        One site ``w [14]``. ``reference`` (closed form, float64 then cast): ``mean``,
        ``cov``, ``log_evidence``, ``unconstrained_mean`` / ``unconstrained_sd``,
        ``site_mean`` / ``site_sd``, ``cond_XtX``, ``max_abs_corr`` (largest posterior
        correlation of two weights), ``feature_names`` and ``source``.

    References
    ----------
    .. [1] Efron, B., Hastie, T., Johnstone, I., Tibshirani, R. "Least Angle Regression".
       Annals of Statistics 32 (2004). (The diabetes data.)
    .. [2] Bishop, C. M. Pattern Recognition and Machine Learning, section 3.3 (2006).
    """
    check_form(form)
    if not noise_scale > 0 or not prior_scale > 0:
        raise ValueError(f"noise_scale and prior_scale must be positive, got {noise_scale}, {prior_scale}.")
    dtype = dtype or torch.get_default_dtype()
    X, y, names = _diabetes_design(column_scale_power)
    mean, cov, log_evidence = _gaussian_posterior(X, y, noise_scale, prior_scale)
    sd = cov.diagonal().sqrt()
    corr = cov / sd[:, None] / sd[None, :]
    eig = torch.linalg.eigvalsh(X.T @ X)
    reference = {
        "mean": mean.to(dtype),
        "cov": cov.to(dtype),
        "log_evidence": log_evidence,
        "unconstrained_mean": mean.to(dtype),
        "unconstrained_sd": sd.to(dtype),
        "site_mean": {"w": mean.to(dtype)},
        "site_sd": {"w": sd.to(dtype)},
        "cond_XtX": float(eig[-1] / eig[0]),
        "max_abs_corr": float((corr - torch.eye(len(sd), dtype=corr.dtype)).abs().max()),
        "feature_names": names,
        "source": "closed form",
    }
    X, y = X.to(dtype), y.to(dtype)
    sn, sp = float(noise_scale), float(prior_scale)
    pyro_args = (X, y, torch.tensor(sn, dtype=dtype), torch.tensor(sp, dtype=dtype))
    if form == "pyro":
        model = Model.from_pyro(_pyro_regression, *pyro_args, name="correlated_regression")
        return _with_reference(model, reference)

    def log_joint(latents, data):
        w = latents["w"]
        resid = data["y"][:, None] - data["X"] @ w.T  # [n, S]
        ll = -0.5 * resid.square().sum(0) / sn**2 - data["y"].shape[0] * (math.log(sn) + _HALF_LOG_2PI)
        return normal_log_prob(w, 0.0, sp).sum(-1) + ll

    def pointwise(latents, data):
        return {"y": normal_log_prob(data["y"], latents["w"] @ data["X"].T, sn)}

    return Model(
        {"w": Site(torch.Size([X.shape[1]]), constraints.real)},
        log_joint,
        data={"X": X, "y": y},
        name="correlated_regression",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_regression, pyro_args, {}),
        observed={"y": y},
        per_datum=("X", "y"),
    )


def _pyro_regression(X, y, noise_scale, prior_scale):
    import pyro
    import pyro.distributions as dist

    w = pyro.sample("w", dist.Normal(torch.zeros_like(X[0]), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), noise_scale), obs=y)


# ----------------------------------------------------------------------------- random walk
def _random_walk_data(T: int, missing: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    sigma_x, sigma_y = 0.5, 0.5
    x = torch.cumsum(sigma_x * torch.randn(T, generator=g, dtype=torch.float64), 0)
    y = x + sigma_y * torch.randn(T, generator=g, dtype=torch.float64)
    # A fixed count rather than independent coin flips: the share missing is what it says.
    observed = torch.ones(T, dtype=torch.bool)
    observed[torch.randperm(T, generator=g)[: round(missing * T)]] = False
    # Missing entries hold a value (data must be finite) that nothing reads: zero, so
    # that a plot of ``y`` does not suggest they were seen.
    y = torch.where(observed, y, torch.zeros_like(y))
    return x, y, observed, {"sigma_x": sigma_x, "sigma_y": sigma_y}


def random_walk(
    T: int = 50, *, missing: float = 0.2, seed: int = 0, form: str = "tensor", dtype=None
) -> Model:
    """A Gaussian random walk seen through noise, with missing observations.

    ``x_t = x_{t-1} + sigma_x eps_t`` (``x_0 = 0``), ``y_t ~ N(x_t, sigma_y)`` for the observed
    ``t`` only; ``sigma_x, sigma_y ~ HalfNormal(1)``. The walk is sampled directly (centred),
    so ``x`` and ``sigma_x`` form a funnel. Synthetic data from a torch generator seeded
    with ``seed``: ``sigma_x = sigma_y = 0.5``, a random ``round(missing * T)`` of the
    observations missing. Missing entries contribute no likelihood; ``data["y"]`` holds zero there
    and ``data["observed"]`` is the mask.

    Parameters
    ----------
    T : int
        Length of the walk (dimension ``T + 2``).
    missing : float
        Share of the observations missing, in [0, 1).
    seed : int
    form : {"tensor", "pyro"}
        The Pyro program writes the walk's prior as the Gaussian with covariance
        ``sigma_x^2 min(s, t)``, an independent check on the increments of the tensor form.

    Returns
    -------
    Model
        Sites ``sigma_x``, ``sigma_y`` (positive) and ``x [T]``. Per-datum log likelihoods
        cover the observed entries only. ``reference``: the true walk and scales and, for the
        default arguments, NUTS moments (see the module docstring).

    References
    ----------
    .. [1] Durbin, J., Koopman, S. J. Time Series Analysis by State Space Methods, 2nd ed.,
       chapter 2 (the local level model) (2012).
    """
    check_form(form)
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"random_walk needs an int T >= 2, got {T!r}.")
    if not 0 <= missing < 1:
        raise ValueError(f"missing must be in [0, 1), got {missing!r}.")
    dtype = dtype or torch.get_default_dtype()
    x_true, y, observed, truth = _random_walk_data(T, missing, seed)
    idx = observed.nonzero()[:, 0]
    reference = {"x_true": x_true.to(dtype), **truth}
    reference.update(load_reference("random_walk", {"T": T, "missing": missing, "seed": seed}, dtype))
    y = y.to(dtype)
    one = torch.tensor(1.0, dtype=dtype)
    if form == "pyro":
        model = Model.from_pyro(_pyro_random_walk, y, observed, one, name="random_walk")
        return _with_reference(model, reference)

    def log_joint(latents, data):
        sx, sy, x = latents["sigma_x"], latents["sigma_y"], latents["x"]
        steps = torch.diff(x, dim=-1, prepend=torch.zeros_like(x[:, :1]))
        lp = _half_normal_log_prob(sx, 1.0) + _half_normal_log_prob(sy, 1.0)
        lp = lp + normal_log_prob(steps, 0.0, sx[:, None]).sum(-1)
        return lp + normal_log_prob(data["y"][data["idx"]], x[:, data["idx"]], sy[:, None]).sum(-1)

    def pointwise(latents, data):
        return {
            "y": normal_log_prob(
                data["y"][data["idx"]], latents["x"][:, data["idx"]], latents["sigma_y"][:, None]
            )
        }

    return Model(
        {
            "sigma_x": Site(torch.Size([]), constraints.positive),
            "sigma_y": Site(torch.Size([]), constraints.positive),
            "x": Site(torch.Size([T]), constraints.real),
        },
        log_joint,
        data={"y": y, "observed": observed, "idx": idx},
        name="random_walk",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_random_walk, (y, observed, one), {}),
        observed={"y": y[idx]},
    )


def _pyro_random_walk(y, observed, one):
    import pyro
    import pyro.distributions as dist
    from pyro.ops.indexing import Vindex

    T = y.shape[0]
    sigma_x = pyro.sample("sigma_x", dist.HalfNormal(one))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(one))
    # cov(x_s, x_t) = sigma_x^2 min(s, t), whose Cholesky factor is sigma_x times a
    # lower triangle of ones.
    ones = torch.ones(T, T, dtype=y.dtype, device=y.device).tril()
    x = pyro.sample(
        "x", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=sigma_x[..., None, None] * ones)
    )
    idx = observed.nonzero()[:, 0]
    with pyro.plate("observed", len(idx)):
        # Vindex lines the selected times up with the plate whatever batch x carries.
        pyro.sample("y", dist.Normal(Vindex(x)[..., idx], sigma_y), obs=y[idx])


# ------------------------------------------------------------------------------ eight schools
def eight_schools_centered(*, form: str = "tensor", dtype=None) -> Model:
    """Rubin's eight schools in the centred parameterization: a funnel in ``(tau, theta)``.

    The same model as ``eight_schools(centered=True)`` (see :func:`vipkg.models.eight_schools`);
    its NUTS reference is drawn in the non-centred parameterization, where NUTS does not
    diverge, and mapped to ``theta = mu + tau theta_tilde``: the same posterior.

    Parameters
    ----------
    form : {"tensor", "pyro"}

    Returns
    -------
    Model

    References
    ----------
    .. [1] Betancourt, M., Girolami, M. "Hamiltonian Monte Carlo for Hierarchical Models".
       In Current Trends in Bayesian Methodology with Applications (2015).
    """
    return eight_schools(centered=True, form=form, dtype=dtype)


# ------------------------------------------------------------------------------- AR(k) series
def _ar_coefficients(k: int) -> torch.Tensor:
    """AR(k) coefficients from partial autocorrelations ``0.9, -0.4, 0.2, ...`` (Durbin-Levinson).

    Every partial autocorrelation inside (-1, 1) gives a stationary process, for any ``k``.
    """
    pacf = [0.9] + [0.4 * (-1) ** (j + 1) / (j - 1) for j in range(2, k + 1)]
    phi: list[float] = []
    for p in pacf:
        phi = [a - p * b for a, b in zip(phi, reversed(phi))] + [p]
    return torch.tensor(phi, dtype=torch.float64)


def _ar_data(k: int, T: int, seed: int, burn_in: int = 500):
    g = torch.Generator().manual_seed(seed)
    alpha, sigma = 1.0, 0.5
    beta = _ar_coefficients(k)
    eps = sigma * torch.randn(burn_in + T, generator=g, dtype=torch.float64)
    mean = alpha / (1 - float(beta.sum()))
    y = [mean] * k
    for e in eps.tolist():
        # most recent lag first: y_t = alpha + beta_1 y_{t-1} + ... + beta_k y_{t-k}
        y.append(alpha + sum(b * v for b, v in zip(beta.tolist(), reversed(y[-k:]))) + e)
    return torch.tensor(y[-T:], dtype=torch.float64), {"alpha": alpha, "beta": beta, "sigma": sigma}


def ar_series(k: int = 5, *, T: int = 200, seed: int = 0, form: str = "tensor", dtype=None) -> Model:
    """An autoregressive series AR(k): ``y_t = alpha + sum_i beta_i y_{t-i} + sigma eps_t``.

    Priors ``alpha ~ N(0, 5)``, ``beta_i ~ N(0, 1)``, ``sigma ~ HalfNormal(1)``; the likelihood
    conditions on the first ``k`` values. Synthetic stationary data from a torch generator
    seeded with ``seed``: ``alpha = 1``, ``sigma = 0.5`` and ``beta`` from the partial
    autocorrelations ``0.9, -0.4, 0.2, -0.13, 0.1, ...``, after a burn-in of 500 steps. The
    series is persistent and its mean (about 9) far from zero, so ``alpha`` and the
    ``beta`` are strongly correlated a posteriori (``alpha`` trades against ``sum beta``).

    Parameters
    ----------
    k : int
        Order of the process (dimension ``k + 2``).
    T : int
        Length of the series.
    seed : int
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        Sites ``alpha``, ``beta [k]``, ``sigma`` (positive). ``reference``: the true values
        and, for the default arguments, NUTS moments.

    References
    ----------
    .. [1] Box, G. E. P., Jenkins, G. M., Reinsel, G. C. Time Series Analysis: Forecasting
       and Control, 4th ed., chapter 3 (2008).
    .. [2] Stan Development Team. Stan User's Guide, section "Autoregressive models".
    """
    check_form(form)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"ar_series needs an int k >= 1, got {k!r}.")
    if not isinstance(T, int) or T < k + 2:
        raise ValueError(f"ar_series needs an int T >= k + 2 = {k + 2}, got {T!r}.")
    dtype = dtype or torch.get_default_dtype()
    series, truth = _ar_data(k, T, seed)
    reference = {**truth, "beta": truth["beta"].to(dtype)}
    reference.update(load_reference("ar_series", {"k": k, "T": T, "seed": seed}, dtype))
    series = series.to(dtype)
    if form == "pyro":
        model = Model.from_pyro(_pyro_ar, series, k, name="ar_series")
        return _with_reference(model, reference)
    # Row t of lags holds (y_{t-1}, ..., y_{t-k}) for the targets y_k ... y_{T-1}.
    lags = series.unfold(0, k, 1)[:-1].flip(-1)
    target = series[k:]

    def log_joint(latents, data):
        alpha, beta, sigma = latents["alpha"], latents["beta"], latents["sigma"]
        lp = normal_log_prob(alpha, 0.0, 5.0) + normal_log_prob(beta, 0.0, 1.0).sum(-1)
        lp = lp + _half_normal_log_prob(sigma, 1.0)
        loc = alpha[:, None] + beta @ data["lags"].T
        return lp + normal_log_prob(data["y"], loc, sigma[:, None]).sum(-1)

    def pointwise(latents, data):
        loc = latents["alpha"][:, None] + latents["beta"] @ data["lags"].T
        return {"y": normal_log_prob(data["y"], loc, latents["sigma"][:, None])}

    return Model(
        {
            "alpha": Site(torch.Size([]), constraints.real),
            "beta": Site(torch.Size([k]), constraints.real),
            "sigma": Site(torch.Size([]), constraints.positive),
        },
        log_joint,
        data={"y": target, "lags": lags},
        name="ar_series",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_ar, (series, k), {}),
        observed={"y": target},
        per_datum=("y", "lags"),
    )


def _pyro_ar(series, k):
    import pyro
    import pyro.distributions as dist

    zero = torch.zeros((), dtype=series.dtype, device=series.device)
    alpha = pyro.sample("alpha", dist.Normal(zero, 5.0))
    beta = pyro.sample("beta", dist.Normal(zero, 1.0).expand([k]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(zero + 1.0))
    T = series.shape[0]
    lags = torch.stack([series[k - i : T - i] for i in range(1, k + 1)], -1)
    with pyro.plate("time", T - k):
        pyro.sample("y", dist.Normal(alpha + (lags * beta).sum(-1), sigma), obs=series[k:])


# ---------------------------------------------------------------------- stochastic volatility
def _sv_data(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu, phi, sigma = -1.0, 0.7, 0.7
    eta = torch.randn(T, generator=g, dtype=torch.float64)
    h = [mu + sigma / math.sqrt(1 - phi**2) * float(eta[0])]
    for e in eta[1:].tolist():
        h.append(mu + phi * (h[-1] - mu) + sigma * e)
    h = torch.tensor(h, dtype=torch.float64)
    y = torch.exp(h / 2) * torch.randn(T, generator=g, dtype=torch.float64)
    return y, {"mu": mu, "phi": phi, "sigma_h": sigma, "h": h}


#: Beta prior on (phi + 1) / 2 (Kastner and Fruehwirth-Schnatter 2014)
_PHI_A, _PHI_B = 5.0, 1.5


def _sv_log_volatility(mu, phi, sigma, h_std):
    """``h [S, T]`` from the standardized innovations by a parallel prefix scan.

    ``h_t - mu = sum_{s <= t} phi^(t - s) c_s h_std_s``; doubling the reach of the sum at
    each pass (Hillis and Steele) takes ``ceil(log2 T)`` vector operations instead of a
    Python loop of ``T`` steps or a ``T x T`` matrix per particle, and the gradient stays
    finite at ``phi = 0`` (no negative powers).
    """
    S, T = h_std.shape
    start = sigma / torch.sqrt(1 - phi.square())
    x = torch.cat([start[:, None], sigma[:, None].expand(S, T - 1)], -1) * h_std
    p, reach = phi[:, None], 1
    while reach < T:
        x = x + p * F.pad(x[:, :-reach], (reach, 0))
        p, reach = p * p, 2 * reach
    return mu[:, None] + x


def stochastic_volatility(T: int = 100, *, seed: int = 0, form: str = "tensor", dtype=None) -> Model:
    """Stochastic volatility: a latent AR(1) log-volatility behind zero-mean returns.

    ``h_t = mu + phi (h_{t-1} - mu) + sigma_h eta_t`` with ``h_1 ~ N(mu, sigma_h / sqrt(1 -
    phi^2))`` (stationary start) and ``y_t ~ N(0, exp(h_t / 2))``. Non-centred as in the Stan
    user's guide: the sites are the standardized innovations ``h_std ~ N(0, 1)``. Priors as
    in the ``stochvol`` package: ``mu ~ N(0, 10)``, ``(phi + 1) / 2 ~ Beta(5, 1.5)``,
    ``sigma_h ~ HalfNormal(1)``; with only ~100 returns the flat Stan priors leave ``mu``
    unidentified as ``phi -> 1``, a funnel on which NUTS diverges. Synthetic returns from a
    torch generator seeded with ``seed``: ``mu = -1``, ``phi = 0.7``, ``sigma_h = 0.7``.

    Parameters
    ----------
    T : int
        Number of time steps (dimension ``T + 3``).
    seed : int
    form : {"tensor", "pyro"}
        The Pyro program runs the recursion step by step; the tensor form runs it as a
        parallel scan, so the two forms check each other.

    Returns
    -------
    Model
        Sites ``mu``, ``phi`` (in (-1, 1)), ``sigma_h`` (positive) and ``h_std [T]``.
        ``reference``: the true values and log-volatilities and, for the default arguments,
        NUTS moments.

    References
    ----------
    .. [1] Kim, S., Shephard, N., Chib, S. "Stochastic Volatility: Likelihood Inference and
       Comparison with ARCH Models". Review of Economic Studies 65 (1998).
    .. [2] Kastner, G., Fruehwirth-Schnatter, S. "Ancillarity-Sufficiency Interweaving
       Strategy (ASIS) for Boosting MCMC Estimation of Stochastic Volatility Models".
       Computational Statistics & Data Analysis 76 (2014).
    .. [3] Stan Development Team. Stan User's Guide, section "Stochastic volatility models".
    """
    check_form(form)
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"stochastic_volatility needs an int T >= 2, got {T!r}.")
    dtype = dtype or torch.get_default_dtype()
    y, truth = _sv_data(T, seed)
    reference = {**truth, "h": truth["h"].to(dtype)}
    reference.update(load_reference("stochastic_volatility", {"T": T, "seed": seed}, dtype))
    y = y.to(dtype)
    if form == "pyro":
        model = Model.from_pyro(_pyro_sv, y, name="stochastic_volatility")
        return _with_reference(model, reference)
    log_beta_norm = math.lgamma(_PHI_A + _PHI_B) - math.lgamma(_PHI_A) - math.lgamma(_PHI_B) - _LOG_2

    def log_returns(latents, data):
        h = _sv_log_volatility(latents["mu"], latents["phi"], latents["sigma_h"], latents["h_std"])
        # N(y | 0, exp(h / 2)) written out: the scale's log is h / 2.
        return -0.5 * data["y"].square() * torch.exp(-h) - 0.5 * h - _HALF_LOG_2PI

    def log_joint(latents, data):
        phi = latents["phi"]
        lp = normal_log_prob(latents["mu"], 0.0, 10.0) + _half_normal_log_prob(latents["sigma_h"], 1.0)
        # log1p keeps both Beta terms accurate for phi near -1 and near 1.
        lp = lp + (_PHI_A - 1) * torch.log1p(phi) + (_PHI_B - 1) * torch.log1p(-phi) + log_beta_norm
        lp = lp - (_PHI_A + _PHI_B - 2) * _LOG_2
        lp = lp + normal_log_prob(latents["h_std"], 0.0, 1.0).sum(-1)
        return lp + log_returns(latents, data).sum(-1)

    return Model(
        {
            "mu": Site(torch.Size([]), constraints.real),
            "phi": Site(torch.Size([]), constraints.interval(-1.0, 1.0)),
            "sigma_h": Site(torch.Size([]), constraints.positive),
            "h_std": Site(torch.Size([T]), constraints.real),
        },
        log_joint,
        data={"y": y},
        name="stochastic_volatility",
        reference=reference,
        pointwise_log_likelihood=lambda latents, data: {"y": log_returns(latents, data)},
        pyro_model=(_pyro_sv, (y,), {}),
        observed={"y": y},
    )


def _pyro_sv(y):
    import pyro
    import pyro.distributions as dist

    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    T = y.shape[0]
    mu = pyro.sample("mu", dist.Normal(zero, 10.0))
    phi = pyro.sample("phi", dist.AffineBeta(zero + _PHI_A, zero + _PHI_B, zero - 1.0, zero + 2.0))
    sigma_h = pyro.sample("sigma_h", dist.HalfNormal(zero + 1.0))
    with pyro.plate("time", T):
        h_std = pyro.sample("h_std", dist.Normal(zero, 1.0))
        # Slices, not indices: they keep the plate dimension that mu, phi and sigma_h
        # broadcast against.
        h = [mu + sigma_h / torch.sqrt(1 - phi**2) * h_std[..., :1]]
        for t in range(1, T):
            h.append(mu + phi * (h[-1] - mu) + sigma_h * h_std[..., t : t + 1])
        pyro.sample("y", dist.Normal(zero, torch.exp(torch.cat(h, -1) / 2)), obs=y)


#: name -> constructor of every hard posterior; each model's ``reference`` carries moments
HARD_POSTERIORS = {
    "correlated_regression": correlated_regression,
    "random_walk": random_walk,
    "eight_schools_centered": eight_schools_centered,
    "ar_series": ar_series,
    "stochastic_volatility": stochastic_volatility,
}
