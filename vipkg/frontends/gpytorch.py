"""GPyTorch front-end: sparse variational GPs fitted with any vipkg estimator.

A GPyTorch ``ApproximateGP`` with a whitened ``VariationalStrategy`` becomes a
vipkg (Model, Guide) pair:

- the **model** has one latent site ``u``, the *whitened* inducing values
  ``v = L^{-1} (u - mu_Z)`` with ``K_ZZ = L L^T``, so its prior is ``N(0, I)``
  whatever the kernel. Its log joint is
  ``log N(v; 0, I) + (N / B) sum_{i in batch} E_{p(f_i | v)}[log p(y_i | f_i)]``,
  the inner expectation over the GP conditional ``p(f_i | v)`` by Gauss-Hermite
  quadrature (or one reparameterized draw, ``inner="sample"``);
- the **guide** is q(v), built from the GPyTorch variational distribution's own
  parameters, and it owns the GP (kernel and mean hyper-parameters, inducing
  locations) and the likelihood as sub-modules, so ``vipkg.fit`` trains them
  jointly with q(v). After the fit the GPyTorch model is ready for prediction
  as usual (``guide.predict(X)`` or ``likelihood(gp_model(X))``).

The KL term ``KL(q(v) || p(v))`` is *sampled*: ``log p(v)`` is part of the log
joint and ``log q(v)`` comes from the guide, so every vipkg estimator and
objective (ELBO, IWAE, Rényi) applies unchanged. Since
``E_{q(v)} E_{p(f|v)} = E_{q(f)}``, the expected ELBO equals GPyTorch's
``VariationalELBO`` (times N) up to quadrature error.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, constraints

from vipkg.guides.base import Guide
from vipkg.model import Model, Site
from vipkg.models._common import check_batch_size, minibatch

__all__ = ["SVGP", "SVGPGuide", "approximate_gp", "gpytorch_elbo", "gauss_hermite", "log_ndtr", "INNER"]

INNER = ("quadrature", "sample")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gauss_hermite(num_locs: int = 20, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights for ``E_{N(m, s^2)}[g(f)] ~= sum_j w_j g(m + s x_j)``.

    The physicists' Gauss-Hermite rule (as in GPyTorch's ``GaussHermiteQuadrature1D``)
    rescaled to a standard normal: ``x_j = sqrt(2) t_j``, ``w_j = omega_j / sqrt(pi)``.

    References
    ----------
    .. [1] Golub, G. H., Welsch, J. H. "Calculation of Gauss Quadrature Rules".
       Mathematics of Computation 23 (1969).
    """
    if not isinstance(num_locs, int) or num_locs < 1:
        raise ValueError(f"num_locs must be a positive int, got {num_locs!r}.")
    t, w = np.polynomial.hermite.hermgauss(num_locs)
    dtype = dtype or torch.get_default_dtype()
    nodes = torch.as_tensor(t * math.sqrt(2.0), dtype=dtype)
    return nodes, torch.as_tensor(w / math.sqrt(math.pi), dtype=dtype)


_TAIL = -10.0
_SQRT_HALF = math.sqrt(0.5)


def log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """``log Phi(x)``, the log standard normal CDF, stable in the lower tail.

    ``torch.special.log_ndtr`` costs about twice ``log(erfc(-x / sqrt 2) / 2)`` on CPU
    (forward and backward), and the probit expected log likelihood evaluates it
    ``particles x batch x nodes`` times per step. Above ``x = -10`` the erfc form is
    exact to float precision;
    below, the asymptotic series ``Phi(x) = phi(x) / -x (1 - x^-2 + 3 x^-4 - 15 x^-6 + 105 x^-8)``
    is accurate to 1e-7. Each branch sees clamped inputs so neither produces
    NaN gradients where it is not selected.

    References
    ----------
    .. [1] Abramowitz, M., Stegun, I. A. Handbook of Mathematical Functions, 26.2.12
       (asymptotic expansion of the normal tail) (1964).
    """
    # erfc, not ndtr: torch's ndtr loses the lower tail to cancellation below about -8.
    hi = torch.log(0.5 * torch.special.erfc(x.clamp_min(_TAIL) * -_SQRT_HALF))
    t = x.clamp_max(_TAIL)
    r = t.reciprocal().square()
    series = torch.log1p(r * (-1 + r * (3 + r * (-15 + 105 * r))))
    lo = -0.5 * t.square() - _HALF_LOG_2PI - torch.log(-t) + series
    return torch.where(x > _TAIL, hi, lo)


def _strategy_parts(gp_model):
    """The whitened strategy and its variational distribution, or a clear error."""
    import gpytorch

    strategy = getattr(gp_model, "variational_strategy", None)
    if not isinstance(gp_model, gpytorch.models.ApproximateGP) or strategy is None:
        raise ValueError(
            f"SVGP needs a gpytorch.models.ApproximateGP with a variational_strategy, got "
            f"{type(gp_model).__name__}."
        )
    if type(strategy) is not gpytorch.variational.VariationalStrategy:
        raise ValueError(
            f"SVGP supports gpytorch.variational.VariationalStrategy (whitened, single output), got "
            f"{type(strategy).__name__}; wrap a single-output model with VariationalStrategy("
            "model, inducing_points, CholeskyVariationalDistribution(M), learn_inducing_locations=True)."
        )
    q = strategy._variational_distribution
    families = (
        gpytorch.variational.CholeskyVariationalDistribution,
        gpytorch.variational.MeanFieldVariationalDistribution,
    )
    if not isinstance(q, families):
        raise ValueError(
            f"SVGP supports CholeskyVariationalDistribution and MeanFieldVariationalDistribution, got "
            f"{type(q).__name__}."
        )
    if q.variational_mean.dim() != 1:
        raise ValueError(
            f"SVGP supports a single GP (variational batch shape ()), got variational_mean of shape "
            f"{tuple(q.variational_mean.shape)}."
        )
    return strategy, q


def _conditional(gp_model, strategy, X: torch.Tensor):
    """``p(f | v)`` at ``X [B, D]``: prior mean ``[B]``, ``A = L^{-1} K_ZX [M, B]``, variance ``[B]``.

    Mirrors ``VariationalStrategy.forward`` (same jitter on K_ZZ and on the data
    variances), but keeps only the diagonal of the data covariance.
    """
    Z = strategy.inducing_points
    M = Z.shape[-2]
    jitter = strategy.jitter_val
    full = gp_model.forward(torch.cat([Z, X], dim=-2))
    covar = full.lazy_covariance_matrix
    Kzz = covar[..., :M, :M].to_dense()
    Kzx = covar[..., :M, M:].to_dense()
    kxx = covar[..., M:, M:].diagonal(dim1=-2, dim2=-1)
    eye = torch.eye(M, dtype=Kzz.dtype, device=Kzz.device)
    L, info = torch.linalg.cholesky_ex(Kzz + jitter * eye)
    # A failed factorisation must surface as a non-finite loss (fit names the step)
    # rather than as a host sync on `info` inside the step.
    L = torch.where(info.eq(0), L, torch.full_like(L, math.nan))
    A = torch.linalg.solve_triangular(L, Kzx, upper=False)
    var = (kxx + jitter - A.pow(2).sum(-2)).clamp_min(1e-10)
    return full.mean[..., M:], A, var


def _log_lik(likelihood, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``log p(y | f)`` elementwise, in log space for the two classic links."""
    import gpytorch

    if isinstance(likelihood, gpytorch.likelihoods.BernoulliLikelihood):
        # probit link, as GPyTorch: log Phi((2y - 1) f) without the underflow of log(Phi(.))
        return log_ndtr((2 * y - 1) * f)
    if isinstance(likelihood, gpytorch.likelihoods.PoissonLikelihood):
        rate = torch.nn.functional.softplus(f)
        # log softplus(f) = f + O(e^f) far left, where softplus underflows to 0 (-inf * y);
        # each branch sees clamped inputs so the unused one cannot produce NaN gradients.
        log_rate = torch.where(
            f < -20, f.clamp_max(-20), torch.log(torch.nn.functional.softplus(f.clamp_min(-20)))
        )
        return y * log_rate - rate - torch.lgamma(y + 1)
    return likelihood.forward(f).log_prob(y)


def _expected_log_lik(likelihood, y, mean, var, nodes, weights, inner):
    """``E_{N(f; mean, var)}[log p(y | f)]`` per particle and datum: ``[S, B]``."""
    import gpytorch

    std = var.sqrt()
    if inner == "sample":
        f = mean + std * torch.randn_like(mean)
        return _log_lik(likelihood, y, f)
    lk = gpytorch.likelihoods
    if isinstance(likelihood, (lk.BernoulliLikelihood, lk.PoissonLikelihood)):
        f = mean.unsqueeze(-1) + std.unsqueeze(-1) * nodes  # [S, B, J]
        return _log_lik(likelihood, y.unsqueeze(-1), f) @ weights
    # Other likelihoods know their own expectation (analytic for Gaussian, quadrature otherwise);
    # they expect GPyTorch's MultivariateNormal, here with the diagonal covariance of p(f | v).
    from linear_operator.operators import DiagLinearOperator

    f_dist = gpytorch.distributions.MultivariateNormal(mean, DiagLinearOperator(var.expand_as(mean)))
    return likelihood.expected_log_prob(y, f_dist)


def SVGP(
    gp_model,
    likelihood,
    X,
    y,
    *,
    batch_size: int | None = None,
    inner: str = "quadrature",
    num_quadrature: int = 20,
    name: str = "svgp",
) -> tuple[Model, SVGPGuide]:
    """A sparse variational GP as a vipkg (Model, Guide) pair.

    Parameters
    ----------
    gp_model : gpytorch.models.ApproximateGP
        With a ``gpytorch.variational.VariationalStrategy`` (whitened) and a
        ``CholeskyVariationalDistribution`` or ``MeanFieldVariationalDistribution``;
        learned or fixed inducing points. Its parameters' dtype sets the data's.
    likelihood : gpytorch.likelihoods.Likelihood
        ``BernoulliLikelihood`` (probit) and ``PoissonLikelihood`` (softplus rate)
        are evaluated in log space by vipkg; any other one-dimensional likelihood
        through its own ``expected_log_prob`` / ``forward``.
    X : Tensor ``[N, D]``
    y : Tensor ``[N]``
    batch_size : int, optional
        Minibatch size; the expected log likelihood of a batch is scaled by
        ``N / batch_size`` so estimates stay unbiased for the full-data ELBO.
    inner : {"quadrature", "sample"}
        How ``E_{p(f_i | v)} log p(y_i | f_i)`` is computed: Gauss-Hermite
        quadrature with ``num_quadrature`` nodes (deterministic given ``v``, the
        default) or one reparameterized draw of ``f_i`` per particle.
    num_quadrature : int
    name : str

    Returns
    -------
    model : vipkg.Model
        One site ``u`` of shape ``[M]``, the whitened inducing values, prior ``N(0, I)``.
    guide : SVGPGuide
        q(v) plus the GP's and the likelihood's parameters, all trained by ``vipkg.fit``.

    Notes
    -----
    The model closes over ``gp_model`` and ``likelihood``: its log joint uses their
    current hyper-parameters. With another guide (``MeanFieldNormal(model)``) the
    hyper-parameters stay fixed, because only the guide's parameters are optimised.
    GPyTorch initialises q(u) from the prior on its first training call; this
    function marks the strategy initialised (q(v) as constructed: mean 0,
    covariance I) so that a later GPyTorch call does not overwrite a vipkg fit.

    References
    ----------
    .. [1] Hensman, J., Matthews, A., Ghahramani, Z. "Scalable Variational Gaussian
       Process Classification". AISTATS (2015).
    .. [2] Titsias, M. "Variational Learning of Inducing Variables in Sparse Gaussian
       Processes". AISTATS (2009).
    .. [3] Gardner, J. et al. "GPyTorch: Blackbox Matrix-Matrix Gaussian Process
       Inference with GPU Acceleration". NeurIPS (2018).
    """
    strategy, q = _strategy_parts(gp_model)
    if inner not in INNER:
        raise ValueError(f"inner must be one of {INNER}, got {inner!r}.")
    dtype = q.variational_mean.dtype
    device = q.variational_mean.device
    X = torch.as_tensor(X, dtype=dtype, device=device)
    y = torch.as_tensor(y, dtype=dtype, device=device)
    if X.dim() == 1:
        X = X.unsqueeze(-1)
    if X.dim() != 2 or y.shape != X.shape[:1]:
        raise ValueError(
            f"SVGP needs X of shape [N, D] and y of shape [N], got X {tuple(X.shape)} and y {tuple(y.shape)}."
        )
    Z = strategy.inducing_points
    if Z.shape[-1] != X.shape[-1]:
        raise ValueError(
            f"X has {X.shape[-1]} feature(s) but the inducing points have {Z.shape[-1]}; they must match."
        )
    N = X.shape[0]
    check_batch_size(batch_size, N)
    nodes, weights = gauss_hermite(num_quadrature, dtype)
    M = q.variational_mean.shape[-1]
    strategy.variational_params_initialized.fill_(1)

    def log_joint(latents, data):
        v = latents["u"]
        Xb, yb = data["X"], data["y"]
        idx, scale = minibatch(Xb.shape[0], batch_size, Xb.device)
        if idx is not None:
            Xb, yb = Xb[idx], yb[idx]
        prior_mean, A, var = _conditional(gp_model, strategy, Xb)
        mean = prior_mean + v @ A  # [S, B]
        ell = _expected_log_lik(likelihood, yb, mean, var, data["gh_nodes"], data["gh_weights"], inner)
        log_prior = -0.5 * v.pow(2).sum(-1) - M * _HALF_LOG_2PI
        return log_prior + scale * ell.sum(-1)

    model = Model(
        {"u": Site(torch.Size([M]), constraints.real)},
        log_joint,
        data={"X": X, "y": y, "gh_nodes": nodes, "gh_weights": weights},
        name=name,
        observed={"y": y},
    )
    return model, SVGPGuide(model, gp_model, likelihood)


class SVGPGuide(Guide):
    """q(v) of a GPyTorch sparse variational GP, owning the GP and likelihood parameters.

    The Gaussian is built from the GPyTorch variational distribution's own
    parameters (``variational_mean``, ``chol_variational_covar`` or
    ``_variational_stddev``), so a vipkg fit leaves the GPyTorch model fitted.

    Parameters
    ----------
    model : vipkg.Model
        The model returned by :func:`SVGP` for the same ``gp_model``.
    gp_model : gpytorch.models.ApproximateGP
    likelihood : gpytorch.likelihoods.Likelihood

    Attributes
    ----------
    loc : Tensor ``[M]``
    scale_tril : Tensor ``[M, M]``
        Lower Cholesky factor with positive diagonal: GPyTorch's factor may hold
        negative diagonal entries, so columns are flipped to positive (same covariance).

    References
    ----------
    .. [1] Hensman, J., Matthews, A., Ghahramani, Z. "Scalable Variational Gaussian
       Process Classification". AISTATS (2015).
    """

    def __init__(self, model, gp_model, likelihood):
        super().__init__(model)
        _, q = _strategy_parts(gp_model)
        M = q.variational_mean.shape[-1]
        if list(model.sites) != ["u"] or model.sites["u"].shape != (M,):
            raise ValueError(
                f"SVGPGuide needs the model from vipkg.gp.SVGP (one site 'u' of shape ({M},)), got "
                f"sites {[(k, tuple(s.shape)) for k, s in model.sites.items()]}."
            )
        self.gp = gp_model
        self.likelihood = likelihood
        self._mean_field = not hasattr(q, "chol_variational_covar")

    @property
    def _q(self):
        return self.gp.variational_strategy._variational_distribution

    @property
    def loc(self) -> torch.Tensor:
        return self._q.variational_mean

    @property
    def scale(self) -> torch.Tensor:
        """Standard deviations (mean-field) or the diagonal of ``scale_tril``."""
        if self._mean_field:
            return self._q._variational_stddev.abs().clamp_min(1e-8)
        return self.scale_tril.diagonal()

    @property
    def scale_tril(self) -> torch.Tensor:
        if self._mean_field:
            return torch.diag_embed(self.scale)
        L = self._q.chol_variational_covar.tril()
        sign = torch.where(L.diagonal() < 0, -1.0, 1.0).to(L)
        return L * sign

    @property
    def covariance_matrix(self) -> torch.Tensor:
        L = self.scale_tril
        return L @ L.T

    def forward(self):
        if self._mean_field:
            return Independent(Normal(self.loc, self.scale), 1)
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    def rsample_and_log_prob(self, shape=()):
        loc = self.loc
        eps = torch.randn(*shape, loc.shape[-1], dtype=loc.dtype, device=loc.device)
        log_std = -0.5 * eps.pow(2).sum(-1) - loc.shape[-1] * _HALF_LOG_2PI
        if self._mean_field:
            scale = self.scale
            return loc + scale * eps, log_std - scale.log().sum()
        L = self.scale_tril
        return loc + eps @ L.T, log_std - L.diagonal().log().sum()

    @torch.no_grad()
    def predict(self, X):
        """GPyTorch's predictive distribution of ``y`` at ``X`` (``likelihood(gp(X))`` in eval mode)."""
        X = torch.as_tensor(X, dtype=self.dtype, device=self.device)
        modes = (self.gp.training, self.likelihood.training)
        # train() clears GPyTorch's prediction caches, which may be stale after a fit.
        self.gp.train()
        self.gp.eval()
        self.likelihood.eval()
        try:
            return self.likelihood(self.gp(X))
        finally:
            self.gp.train(modes[0])
            self.likelihood.train(modes[1])


def approximate_gp(
    inducing_points, *, mean_field: bool = False, ard: bool = True, learn_inducing: bool = True
):
    """A standard single-output GPyTorch SVGP: constant mean, scaled RBF kernel, whitened strategy.

    Parameters
    ----------
    inducing_points : Tensor ``[M, D]``
        Initial inducing inputs (their dtype is the model's).
    mean_field : bool
        ``MeanFieldVariationalDistribution`` instead of ``CholeskyVariationalDistribution``.
    ard : bool
        One lengthscale per input dimension.
    learn_inducing : bool
        Train the inducing inputs with the other hyper-parameters.

    Returns
    -------
    gpytorch.models.ApproximateGP

    References
    ----------
    .. [1] Hensman, J., Matthews, A., Ghahramani, Z. "Scalable Variational Gaussian
       Process Classification". AISTATS (2015).
    """
    import gpytorch

    Z = torch.as_tensor(inducing_points)
    if Z.dim() != 2 or not Z.is_floating_point():
        raise ValueError(f"inducing_points must be a float tensor [M, D], got shape {tuple(Z.shape)}.")
    family = (
        gpytorch.variational.MeanFieldVariationalDistribution
        if mean_field
        else gpytorch.variational.CholeskyVariationalDistribution
    )

    class _SVGP(gpytorch.models.ApproximateGP):
        def __init__(self):
            q = family(Z.shape[0])
            strategy = gpytorch.variational.VariationalStrategy(
                self, Z.clone(), q, learn_inducing_locations=learn_inducing
            )
            super().__init__(strategy)
            self.mean_module = gpytorch.means.ConstantMean()
            kernel = gpytorch.kernels.RBFKernel(ard_num_dims=Z.shape[1] if ard else None)
            self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    return _SVGP().to(Z.dtype)


def gpytorch_elbo(gp_model, likelihood, X, y, *, num_data: int | None = None) -> torch.Tensor:
    """GPyTorch's own ``VariationalELBO`` on ``(X, y)``, times ``num_data``: the ELBO in nats.

    For ``BernoulliLikelihood`` GPyTorch integrates the expected log likelihood
    over the marginal q(f) by Gauss-Hermite quadrature and takes the KL term in
    closed form; the vipkg estimate of the same model has this as its mean.

    References
    ----------
    .. [1] Hensman, J., Matthews, A., Ghahramani, Z. "Scalable Variational Gaussian
       Process Classification". AISTATS (2015).
    """
    import gpytorch

    dtype = next(gp_model.parameters()).dtype
    X = torch.as_tensor(X, dtype=dtype)
    y = torch.as_tensor(y, dtype=dtype)
    num_data = X.shape[0] if num_data is None else num_data
    gp_model.train()
    likelihood.train()
    mll = gpytorch.mlls.VariationalELBO(likelihood, gp_model, num_data=num_data)
    return mll(gp_model(X), y) * num_data
