"""Gaussian families over the unconstrained latent vector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

from vipkg.guides.base import Guide, inverse_softplus

__all__ = ["MeanFieldNormal", "FullRankNormal", "LowRankNormal"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _vector(value, dim, name, default, dtype):
    if value is None:
        return torch.full((dim,), float(default), dtype=dtype)
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0:
        t = t.expand(dim)
    if t.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},) (the model's dim), got {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite entries.")
    return t.clone()


def _positive(t, name):
    if not bool((t > 0).all()):
        raise ValueError(f"{name} must be strictly positive, got min {float(t.min()):.3g}.")
    return t


def _check_init_scale(init_scale) -> float:
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}.")
    return float(init_scale)


def _standard_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    return -0.5 * eps.pow(2).sum(-1) - eps.shape[-1] * _HALF_LOG_2PI


class MeanFieldNormal(Guide):
    """Diagonal Gaussian ``N(loc, diag(scale^2))`` over the unconstrained vector.

    Parameters
    ----------
    model : vipkg.Model
    loc : Tensor or float, optional
        Initial mean (default 0).
    scale : Tensor or float, optional
        Initial standard deviation (default ``init_scale``).
    init_scale : float
        Default initial standard deviation; small so the first steps are stable.

    Notes
    -----
    ``scale = softplus(raw_scale)``: the raw parameter is unconstrained so any
    optimizer keeps the scale positive.

    References
    ----------
    .. [1] Kucukelbir, A. et al. "Automatic Differentiation Variational Inference".
       JMLR 18 (2017).
    """

    def __init__(self, model, *, loc=None, scale=None, init_scale: float = 0.1, dtype=None):
        super().__init__(model)
        init_scale = _check_init_scale(init_scale)
        dtype = dtype or torch.get_default_dtype()
        self.loc = nn.Parameter(_vector(loc, self.dim, "loc", 0.0, dtype))
        s = _positive(_vector(scale, self.dim, "scale", init_scale, dtype), "scale")
        self.raw_scale = nn.Parameter(inverse_softplus(s))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    def forward(self) -> Independent:
        # validate_args=False: torch's checks are `if not valid.all()`, a host sync per call;
        # the parameterisation (softplus, tril + positive diagonal) already keeps them valid.
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1, validate_args=False)

    def rsample_and_log_prob(self, shape=()):
        scale = self.scale
        eps = torch.randn(*shape, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + scale * eps
        return z, _standard_normal_log_prob(eps) - scale.log().sum()


class FullRankNormal(Guide):
    """Gaussian ``N(loc, L L^T)`` with a dense lower-triangular ``scale_tril`` L.

    Parameters
    ----------
    model : vipkg.Model
    loc : Tensor, optional
        Initial mean (default 0).
    scale_tril : Tensor, optional
        Initial lower Cholesky factor with positive diagonal (default ``init_scale * I``).
    init_scale : float

    Notes
    -----
    The diagonal of L is ``softplus`` of a raw parameter; the strict lower
    triangle is free.

    References
    ----------
    .. [1] Titsias, M., Lázaro-Gredilla, M. "Doubly Stochastic Variational Bayes for
       non-Conjugate Inference". ICML (2014).
    """

    def __init__(self, model, *, loc=None, scale_tril=None, init_scale: float = 0.1, dtype=None):
        super().__init__(model)
        init_scale = _check_init_scale(init_scale)
        dtype = dtype or torch.get_default_dtype()
        d = self.dim
        self.loc = nn.Parameter(_vector(loc, d, "loc", 0.0, dtype))
        if scale_tril is None:
            L = torch.eye(d, dtype=dtype) * init_scale
        else:
            L = torch.as_tensor(scale_tril, dtype=dtype)
            if L.shape != (d, d):
                raise ValueError(f"scale_tril must have shape ({d}, {d}), got {tuple(L.shape)}.")
            if not torch.equal(L, L.tril()):
                raise ValueError("scale_tril must be lower triangular.")
            _positive(L.diagonal(), "diagonal of scale_tril")
        raw = L.tril(-1) + torch.diag_embed(inverse_softplus(L.diagonal()))
        self.raw_scale_tril = nn.Parameter(raw.clone())

    @property
    def scale_tril(self) -> torch.Tensor:
        raw = self.raw_scale_tril
        return raw.tril(-1) + torch.diag_embed(F.softplus(raw.diagonal()))

    def forward(self) -> MultivariateNormal:
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril, validate_args=False)

    def rsample_and_log_prob(self, shape=()):
        L = self.scale_tril
        eps = torch.randn(*shape, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + eps @ L.T
        return z, _standard_normal_log_prob(eps) - L.diagonal().log().sum()


class LowRankNormal(Guide):
    """Gaussian with covariance ``W W^T + diag(D)``, W of shape ``[dim, rank]``.

    Parameters
    ----------
    model : vipkg.Model
    rank : int
        Number of columns of the factor W.
    loc, cov_factor, cov_diag : Tensor, optional
        Initial values (defaults: 0, small random W, ``init_scale**2``).
    init_scale : float

    References
    ----------
    .. [1] Ong, V. M.-H., Nott, D. J., Smith, M. S. "Gaussian Variational
       Approximation With a Factor Covariance Structure". JCGS 27 (2018).
    """

    def __init__(
        self,
        model,
        rank: int = 2,
        *,
        loc=None,
        cov_factor=None,
        cov_diag=None,
        init_scale: float = 0.1,
        dtype=None,
    ):
        super().__init__(model)
        init_scale = _check_init_scale(init_scale)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}.")
        dtype = dtype or torch.get_default_dtype()
        d = self.dim
        self.rank = rank
        self.loc = nn.Parameter(_vector(loc, d, "loc", 0.0, dtype))
        if cov_factor is None:
            # A zero factor is a saddle of the ELBO in W; start slightly off it,
            # deterministically so that construction does not consume the RNG.
            idx = torch.arange(d * rank, dtype=dtype).reshape(d, rank)
            W = 0.01 * init_scale * torch.cos(1.0 + idx)
        else:
            W = torch.as_tensor(cov_factor, dtype=dtype)
            if W.shape != (d, rank):
                raise ValueError(f"cov_factor must have shape ({d}, {rank}), got {tuple(W.shape)}.")
        self.cov_factor = nn.Parameter(W.clone())
        D = _positive(_vector(cov_diag, d, "cov_diag", init_scale**2, dtype), "cov_diag")
        self.raw_scale = nn.Parameter(inverse_softplus(D.sqrt()))

    @property
    def cov_diag(self) -> torch.Tensor:
        return F.softplus(self.raw_scale).pow(2)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        W = self.cov_factor
        return W @ W.T + torch.diag_embed(self.cov_diag)

    @property
    def scale_tril(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.covariance_matrix)

    def forward(self) -> LowRankMultivariateNormal:
        return LowRankMultivariateNormal(self.loc, self.cov_factor, self.cov_diag, validate_args=False)
