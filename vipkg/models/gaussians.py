"""Targets with known answers: a Gaussian, Neal's funnel, conjugate linear regression."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import _HALF_LOG_2PI, check_form, normal_log_prob

__all__ = ["gaussian", "funnel", "linear_regression_conjugate"]


def _as_matrix(cov, d, dtype):
    cov = torch.as_tensor(cov, dtype=dtype)
    if cov.shape != (d, d):
        raise ValueError(f"cov must have shape ({d}, {d}) to match mean, got {tuple(cov.shape)}.")
    if not torch.allclose(cov, cov.T, atol=1e-6 * float(cov.abs().max())):
        raise ValueError("cov must be symmetric.")
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError("cov must be positive definite (its Cholesky factorisation failed).")
    return cov, L


def _mvn_log_prob(x, mean, L):
    diff = torch.linalg.solve_triangular(L, (x - mean).T, upper=False)  # [d, S]
    return -0.5 * diff.pow(2).sum(0) - L.diagonal().log().sum() - L.shape[0] * _HALF_LOG_2PI


def gaussian(mean=None, cov=None, *, dim: int = 5, form: str = "tensor", dtype=None) -> Model:
    """A normalized Gaussian target ``N(mean, cov)`` over one site ``x``.

    Parameters
    ----------
    mean : Tensor [d], optional
        Default zeros of length ``dim``.
    cov : Tensor [d, d], optional
        Symmetric positive definite; default the identity.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        ``reference`` = ``{"mean", "cov", "log_evidence": 0.0}``: the exact
        posterior; the log normalizer is 0, so the ELBO of the exact full-rank
        guide is 0.

    References
    ----------
    .. [1] Bishop, C. M. Pattern Recognition and Machine Learning, section 2.3 (2006).
    """
    check_form(form)
    dtype = dtype or torch.get_default_dtype()
    mean = torch.zeros(dim, dtype=dtype) if mean is None else torch.as_tensor(mean, dtype=dtype)
    d = mean.shape[-1]
    cov, L = _as_matrix(torch.eye(d) if cov is None else cov, d, dtype)
    reference = {"mean": mean, "cov": cov, "log_evidence": 0.0}
    if form == "pyro":
        model = Model.from_pyro(_pyro_gaussian, mean, L, name="gaussian")
        model.reference = reference
        return model

    def log_joint(latents, data):
        return _mvn_log_prob(latents["x"], data["mean"], data["scale_tril"])

    return Model(
        {"x": Site(torch.Size([d]), constraints.real)},
        log_joint,
        data={"mean": mean, "scale_tril": L},
        name="gaussian",
        reference=reference,
        pyro_model=(_pyro_gaussian, (mean, L), {}),
    )


def _pyro_gaussian(mean, scale_tril):
    import pyro
    import pyro.distributions as dist

    pyro.sample("x", dist.MultivariateNormal(mean, scale_tril=scale_tril))


def funnel(dim: int = 10, *, scale: float = 3.0, form: str = "tensor", dtype=None) -> Model:
    """Neal's funnel: ``v ~ N(0, scale)``, ``x_i ~ N(0, exp(v / 2))``, i < dim.

    Parameters
    ----------
    dim : int
        Total dimension (``v`` plus ``dim - 1`` coordinates of ``x``), at least 2.
    scale : float
        Standard deviation of ``v``.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        ``reference``: ``v`` is exactly ``N(0, scale)`` and ``E[x] = 0``;
        normalized, so ``log_evidence = 0``.

    References
    ----------
    .. [1] Neal, R. M. "Slice Sampling". Annals of Statistics 31 (2003).
    """
    check_form(form)
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"funnel needs dim >= 2, got {dim!r}.")
    dtype = dtype or torch.get_default_dtype()
    reference = {"v_mean": 0.0, "v_std": float(scale), "x_mean": 0.0, "log_evidence": 0.0}
    if form == "pyro":
        model = Model.from_pyro(_pyro_funnel, dim, scale, name="funnel")
        model.reference = reference
        return model
    s = float(scale)

    def log_joint(latents, data):
        v, x = latents["v"], latents["x"]
        # N(x | 0, exp(v/2)) written out: the scale's log is v/2, no exp/log round trip.
        lx = -0.5 * x.pow(2).sum(-1) * torch.exp(-v) - 0.5 * (dim - 1) * v - (dim - 1) * _HALF_LOG_2PI
        return normal_log_prob(v, 0.0, s) + lx

    return Model(
        {"v": Site(torch.Size([]), constraints.real), "x": Site(torch.Size([dim - 1]), constraints.real)},
        log_joint,
        name="funnel",
        reference=reference,
        pyro_model=(_pyro_funnel, (dim, scale), {}),
    )


def _pyro_funnel(dim, scale):
    import pyro
    import pyro.distributions as dist

    v = pyro.sample("v", dist.Normal(0.0, scale))
    zeros = torch.zeros(dim - 1, dtype=v.dtype, device=v.device)
    pyro.sample("x", dist.Normal(zeros, torch.exp(v / 2).unsqueeze(-1)).to_event(1))


def linear_regression_conjugate(
    n: int = 100,
    d: int = 5,
    *,
    noise_scale: float = 1.0,
    prior_scale: float = 1.0,
    seed: int = 0,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """Linear regression with known noise: ``y ~ N(X w, noise^2 I)``, ``w ~ N(0, prior^2 I)``.

    Synthetic data from a seeded torch generator: ``X`` standard normal ``[n, d]``,
    true ``w`` standard normal.

    Returns
    -------
    Model
        One site ``w`` of shape ``[d]``. ``reference`` holds the exact posterior
        ``N(mean, cov)`` with ``cov = (X^T X / noise^2 + I / prior^2)^-1``,
        ``mean = cov X^T y / noise^2``, the true weights, and the exact
        ``log_evidence`` (``y ~ N(0, noise^2 I + prior^2 X X^T)``).

    References
    ----------
    .. [1] Bishop, C. M. Pattern Recognition and Machine Learning, section 3.3 (2006).
    """
    check_form(form)
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + noise_scale * torch.randn(n, generator=g, dtype=torch.float64)
    precision = X.T @ X / noise_scale**2 + torch.eye(d, dtype=torch.float64) / prior_scale**2
    cov = torch.linalg.inv(precision)
    cov = 0.5 * (cov + cov.T)
    mean = cov @ X.T @ y / noise_scale**2
    marginal = noise_scale**2 * torch.eye(n, dtype=torch.float64) + prior_scale**2 * X @ X.T
    log_evidence = torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=torch.float64), marginal
    ).log_prob(y)
    reference = {
        "mean": mean.to(dtype),
        "cov": cov.to(dtype),
        "w_true": w_true.to(dtype),
        "log_evidence": float(log_evidence),
    }
    X, y = X.to(dtype), y.to(dtype)
    if form == "pyro":
        model = Model.from_pyro(
            _pyro_linear, X, y, noise_scale, prior_scale, name="linear_regression_conjugate"
        )
        model.reference = reference
        return model
    sn, sp = float(noise_scale), float(prior_scale)

    def log_joint(latents, data):
        w = latents["w"]
        resid = data["y"][:, None] - data["X"] @ w.T  # [n, S]
        ll = -0.5 * resid.pow(2).sum(0) / sn**2 - data["y"].shape[0] * (math.log(sn) + _HALF_LOG_2PI)
        return normal_log_prob(w, 0.0, sp).sum(-1) + ll

    def pointwise(latents, data):
        return {"y": normal_log_prob(data["y"], latents["w"] @ data["X"].T, sn)}

    return Model(
        {"w": Site(torch.Size([d]), constraints.real)},
        log_joint,
        data={"X": X, "y": y},
        name="linear_regression_conjugate",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_linear, (X, y, noise_scale, prior_scale), {}),
        observed={"y": y},
        per_datum=("X", "y"),
    )


def _pyro_linear(X, y, noise_scale, prior_scale):
    import pyro
    import pyro.distributions as dist

    w = pyro.sample("w", dist.Normal(0.0, prior_scale).expand([X.shape[-1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), noise_scale), obs=y)
