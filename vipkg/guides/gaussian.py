"""Gaussian families over the unconstrained latent vector."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal

from vipkg.guides.base import Guide, check_positive, inverse_softplus

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
        raise ValueError(f"{name} has NaN or infinite entries (in {dtype}).")
    return t.clone()


def _check_init_scale(init_scale, dtype) -> float:
    if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}.")
    check_positive(torch.tensor(float(init_scale), dtype=dtype), f"init_scale={init_scale!r}")
    return float(init_scale)


def _standard_normal_log_prob(eps: torch.Tensor) -> torch.Tensor:
    return -0.5 * eps.pow(2).sum(-1) - eps.shape[-1] * _HALF_LOG_2PI


def _stopped(log_q: torch.Tensor, z: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """``log q(z)`` at fixed parameters: its value, and ``grad_z`` as its gradient with respect to ``z``.

    Evaluating the density at ``z`` again would recompute the noise as
    ``L^-1 (z - loc)``: in float32 ``z - loc`` cancels, and an ill-conditioned ``L``
    amplifies the rounding into a Mahalanobis term that is far too large, i.e. a
    bound far above the evidence and path gradients that chase it. The noise that
    made ``z`` is known exactly, so the value and the gradient are formed from it.
    """
    return log_q.detach() + (grad_z.detach() * (z - z.detach())).sum(-1)


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
        dtype = dtype or torch.get_default_dtype()
        init_scale = _check_init_scale(init_scale, dtype)
        self.loc = nn.Parameter(_vector(loc, self.dim, "loc", 0.0, dtype))
        s = check_positive(_vector(scale, self.dim, "scale", init_scale, dtype), "scale")
        self.raw_scale = nn.Parameter(inverse_softplus(s))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    def forward(self) -> Independent:
        # validate_args=False: torch's checks are `if not valid.all()`, a host sync per call;
        # the parameterisation (softplus) already keeps them valid.
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1, validate_args=False)

    def _draw(self, shape):
        scale = self.scale
        eps = torch.randn(*shape, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + scale * eps, eps, scale, _standard_normal_log_prob(eps) - scale.log().sum()

    def rsample_and_log_prob(self, shape=()):
        z, _, _, log_q = self._draw(shape)
        return z, log_q

    def rsample_and_stopped_log_prob(self, shape=()):
        z, eps, scale, log_q = self._draw(shape)
        return z, _stopped(log_q, z, -eps / scale)


class FullRankNormal(Guide):
    """Gaussian ``N(loc, L L^T)`` with a dense lower-triangular factor ``L = diag(scale) @ U``.

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
    As in Pyro's and NumPyro's ``AutoMultivariateNormal``, the factor is a positive
    row scale ``scale = softplus(raw_scale)`` times a unit lower-triangular ``U``
    (the strict lower triangle of ``raw_unit_lower``; its diagonal and upper triangle
    are unused). Training the Cholesky entries directly makes an Adam step on an
    off-diagonal entry the same size whatever its row's scale, which on poorly
    conditioned posteriors (correlated regression: 108 reference SDs off, see
    ``tests/guides/test_hard_posteriors.py``) leaves the fit far from the optimum; with
    the row scale factored out the steps on ``U`` are relative to it.
    ``scale_tril`` and ``covariance_matrix`` are differentiable properties, and
    :meth:`set_scale_tril` assigns a factor in place. State dicts of the earlier
    ``raw_scale_tril`` parameterization still load.

    References
    ----------
    .. [1] Titsias, M., Lázaro-Gredilla, M. "Doubly Stochastic Variational Bayes for
       non-Conjugate Inference". ICML (2014).
    .. [2] Bingham, E. et al. "Pyro: Deep Universal Probabilistic Programming".
       JMLR 20 (2019) (``AutoMultivariateNormal``).
    """

    def __init__(self, model, *, loc=None, scale_tril=None, init_scale: float = 0.1, dtype=None):
        super().__init__(model)
        dtype = dtype or torch.get_default_dtype()
        init_scale = _check_init_scale(init_scale, dtype)
        d = self.dim
        self.loc = nn.Parameter(_vector(loc, d, "loc", 0.0, dtype))
        if scale_tril is None:
            L = torch.eye(d, dtype=dtype) * init_scale
        else:
            L = torch.as_tensor(scale_tril, dtype=dtype)
            if L.shape != (d, d):
                raise ValueError(f"scale_tril must have shape ({d}, {d}), got {tuple(L.shape)}.")
            if not bool(torch.isfinite(L).all()):
                raise ValueError(f"scale_tril has NaN or infinite entries (in {dtype}).")
            if not torch.equal(L, L.tril()):
                raise ValueError("scale_tril must be lower triangular.")
            check_positive(L.diagonal(), "diagonal of scale_tril")
        self.raw_scale = nn.Parameter(torch.empty(d, dtype=dtype))
        self.raw_unit_lower = nn.Parameter(torch.empty(d, d, dtype=dtype))
        self.set_scale_tril(L)

    @property
    def scale(self) -> torch.Tensor:
        """Row scales of ``L``: its diagonal."""
        return F.softplus(self.raw_scale)

    @property
    def unit_lower(self) -> torch.Tensor:
        raw = self.raw_unit_lower
        return raw.tril(-1) + torch.eye(self.dim, dtype=raw.dtype, device=raw.device)

    @property
    def scale_tril(self) -> torch.Tensor:
        return self.scale.unsqueeze(-1) * self.unit_lower

    @property
    def covariance_matrix(self) -> torch.Tensor:
        L = self.scale_tril
        return L @ L.T

    @torch.no_grad()
    def set_scale_tril(self, L: torch.Tensor) -> None:
        """Set the factor to the lower-triangular ``L`` (positive diagonal), in place."""
        s = L.diagonal()
        self.raw_scale.copy_(inverse_softplus(s))
        self.raw_unit_lower.copy_((L / s.unsqueeze(-1)).tril(-1))

    def forward(self) -> MultivariateNormal:
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril, validate_args=False)

    def _draw(self, shape):
        scale, U = self.scale, self.unit_lower
        eps = torch.randn(*shape, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + scale * (eps @ U.T)
        return z, eps, scale, U, _standard_normal_log_prob(eps) - scale.log().sum()

    def rsample_and_log_prob(self, shape=()):
        z, _, _, _, log_q = self._draw(shape)
        return z, log_q

    def rsample_and_stopped_log_prob(self, shape=()):
        z, eps, scale, U, log_q = self._draw(shape)
        # d log q / dz = -L^-T eps = -diag(1/scale) U^-T eps: a unit-triangular solve of
        # the O(1) noise, well scaled whatever the row scales are. Row form: x U = eps.
        flat = eps.detach().reshape(-1, self.dim)
        x = torch.linalg.solve_triangular(U.detach(), flat, upper=False, left=False, unitriangular=True)
        return z, _stopped(log_q, z, -x.reshape(eps.shape) / scale.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.pop(prefix + "raw_scale_tril", None)
        if old is not None:  # the parameterization before L = diag(scale) @ U
            L = old.tril(-1) + torch.diag_embed(F.softplus(old.diagonal()))
            state_dict[prefix + "raw_scale"] = old.diagonal().clone()
            state_dict[prefix + "raw_unit_lower"] = (L / L.diagonal().unsqueeze(-1)).tril(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LowRankNormal(Guide):
    """Gaussian with covariance ``W W^T + diag(D)``, W of shape ``[dim, rank]``.

    Parameters
    ----------
    model : vipkg.Model
    rank : int
        Number of columns of the factor W.
    loc, cov_factor, cov_diag : Tensor, optional
        Initial values (defaults: 0, small deterministic W, ``init_scale**2``).
    init_scale : float

    Notes
    -----
    As in Pyro's ``AutoLowRankMultivariateNormal``, ``W = diag(scale) @ raw_cov_factor``
    and ``D = scale^2`` with ``scale = softplus(raw_scale)``: the covariance is
    ``diag(scale) (V V^T + I) diag(scale)``, the same family, with the factor's steps
    relative to each coordinate's scale (the reason is the one given for
    :class:`FullRankNormal`). Draws and log densities are formed from the whitened
    noise ``V e1 + e2`` and an ``rank x rank`` Cholesky factor, never from ``z - loc``.

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
        dtype = dtype or torch.get_default_dtype()
        init_scale = _check_init_scale(init_scale, dtype)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}.")
        d = self.dim
        self.rank = rank
        self.loc = nn.Parameter(_vector(loc, d, "loc", 0.0, dtype))
        D = check_positive(_vector(cov_diag, d, "cov_diag", init_scale**2, dtype), "cov_diag")
        scale = D.sqrt()
        if cov_factor is None:
            # A zero factor is a saddle of the ELBO in W; start slightly off it,
            # deterministically so that construction does not consume the RNG.
            idx = torch.arange(d * rank, dtype=dtype).reshape(d, rank)
            V = 0.01 * torch.cos(1.0 + idx)
        else:
            W = torch.as_tensor(cov_factor, dtype=dtype)
            if W.shape != (d, rank):
                raise ValueError(f"cov_factor must have shape ({d}, {rank}), got {tuple(W.shape)}.")
            if not bool(torch.isfinite(W).all()):
                raise ValueError(f"cov_factor has NaN or infinite entries (in {dtype}).")
            V = W / scale.unsqueeze(-1)
        self.raw_cov_factor = nn.Parameter(V.clone())
        self.raw_scale = nn.Parameter(inverse_softplus(scale))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    @property
    def cov_factor(self) -> torch.Tensor:
        return self.scale.unsqueeze(-1) * self.raw_cov_factor

    @property
    def cov_diag(self) -> torch.Tensor:
        return self.scale.pow(2)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        W = self.cov_factor
        return W @ W.T + torch.diag_embed(self.cov_diag)

    @property
    def scale_tril(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.covariance_matrix)

    def forward(self) -> LowRankMultivariateNormal:
        return LowRankMultivariateNormal(self.loc, self.cov_factor, self.cov_diag, validate_args=False)

    def _draw(self, shape):
        scale, V = self.scale, self.raw_cov_factor
        opts = {"dtype": self.loc.dtype, "device": self.loc.device}
        # Same order of draws as LowRankMultivariateNormal.rsample: factor noise, then diagonal.
        e1 = torch.randn(*shape, self.rank, **opts)
        e2 = torch.randn(*shape, self.dim, **opts)
        x = e1 @ V.T + e2  # whitened: z - loc = scale * x, Cov(x) = V V^T + I
        z = self.loc + scale * x
        # (V V^T + I)^-1 x = x - V C^-1 V^T x with C = I + V^T V (Woodbury), C = Lc Lc^T.
        C = V.T @ V + torch.eye(self.rank, **opts)
        Lc = torch.linalg.cholesky(C)
        Vx = (x @ V).unsqueeze(-1)
        solved = x - (V @ torch.cholesky_solve(Vx, Lc)).squeeze(-1)
        maha = (x * solved).sum(-1)
        log_det = 2 * scale.log().sum() + 2 * Lc.diagonal().log().sum()
        log_q = -0.5 * (maha + log_det) - self.dim * _HALF_LOG_2PI
        return z, solved / scale, log_q

    def rsample_and_log_prob(self, shape=()):
        z, _, log_q = self._draw(shape)
        return z, log_q

    def rsample_and_stopped_log_prob(self, shape=()):
        z, sigma_inv_diff, log_q = self._draw(shape)
        return z, _stopped(log_q, z, -sigma_inv_diff)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.pop(prefix + "cov_factor", None)
        if old is not None:  # the parameterization before W = diag(scale) @ V
            scale = F.softplus(state_dict[prefix + "raw_scale"])
            state_dict[prefix + "raw_cov_factor"] = old / scale.unsqueeze(-1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
