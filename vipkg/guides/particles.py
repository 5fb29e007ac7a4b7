"""Particle families: a set of points as an empirical distribution, for Stein methods.

:class:`Particles` holds ``n`` points. Without a mirror map they live on the model's
flat unconstrained vector (``particles [n, model.dim]`` is the trained parameter).
With a mirror map (for :class:`~vipkg.estimators.stein.MirroredSVGD`) they live on
the model's constrained support (the simplex, a box, the positive orthant) and the
trained parameter is their dual (mirror) coordinates ``dual [n, d]``; ``particles``
is then read off through the inverse mirror map, so every particle is strictly inside
the support whatever the optimizer does to ``dual``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from vipkg.guides.base import Guide

__all__ = ["Particles", "Empirical", "MirrorMap", "EntropicSimplex", "EntropicBox", "EntropicOrthant"]


def _unwrap(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


# --------------------------------------------------------------------- mirror maps
class MirrorMap:
    """A strictly convex ``psi`` on a constrained set and what mirrored Stein methods need of it.

    Points are handled in *full* constrained coordinates ``x [..., D]`` (what the model
    sees); ``psi`` itself is a function of the map's *primal* coordinates
    ``theta = self.primal(x) [..., d]`` (``d = D - 1`` on the simplex, ``d = D`` on a box),
    and the dual coordinates are ``eta = grad psi(theta) [..., d]``.

    Subclasses give ``to_dual``, ``to_full`` (``grad psi*`` followed by the completion to
    full coordinates), ``dual_score`` and ``inv_hessian`` (``(grad^2 psi)^{-1} =
    diag(a) - b b^T``, the structure every map here has, which keeps the repulsive term of
    mirrored SVGD to matrix products).

    References
    ----------
    .. [1] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    """

    def dual_dim(self, dim: int) -> int:
        """Length of the dual vector for a site with ``dim`` full coordinates."""
        return dim

    def check_support(self, support, where: str) -> None:
        """Raise ``ValueError`` when the site's support is not this map's domain."""

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        """The coordinates ``theta`` that ``psi`` is a function of."""
        return x

    def to_dual(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_full(self, eta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dual_score(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``(grad^2 psi)^{-1} grad_theta log p + div (grad^2 psi)^{-1}`` from ``grad = d log p / dx``.

        This is the gradient of the log density of the dual variable
        ``eta``, i.e. the score that drives the dual update.
        """
        raise NotImplementedError

    def inv_hessian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        """``(a, b)`` with ``(grad^2 psi(theta))^{-1} = diag(a) - b b^T``; ``b`` is ``None`` when zero."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__ + "()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class EntropicSimplex(MirrorMap):
    """Negative entropy ``psi(theta) = sum_{j<=D} x_j log x_j`` with ``x_D = 1 - sum theta`` on the simplex.

    ``theta`` is the first ``D - 1`` coordinates; ``eta_j = log(x_j / x_D)`` and the
    inverse map is a softmax of ``(eta, 0)``, so every particle stays strictly inside.

    References
    ----------
    .. [1] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    .. [2] Beck, A., Teboulle, M. "Mirror descent and nonlinear projected subgradient
       methods for convex optimization". Operations Research Letters 31 (2003).
    """

    def dual_dim(self, dim):
        return dim - 1

    def check_support(self, support, where):
        if not isinstance(_unwrap(support), type(constraints.simplex)):
            raise ValueError(
                f"EntropicSimplex is a mirror map for the simplex, but {where} has support {support}. "
                "Use EntropicBox(lo, hi) for an interval or EntropicOrthant() for positive values."
            )

    def primal(self, x):
        return x[..., :-1]

    def to_dual(self, x):
        return torch.log(x[..., :-1]) - torch.log(x[..., -1:])

    def to_full(self, eta):
        return torch.softmax(torch.cat([eta, eta.new_zeros(*eta.shape[:-1], 1)], -1), -1)

    def dual_score(self, x, grad):
        theta = x[..., :-1]
        # x_D = 1 - sum(theta): the chain rule moves the last coordinate's gradient onto the others.
        g = grad[..., :-1] - grad[..., -1:]
        # (diag(theta) - theta theta^T) g + (1 - D theta), the divergence of the inverse Hessian.
        D = x.shape[-1]
        return theta * g - theta * (theta * g).sum(-1, keepdim=True) + 1.0 - D * theta

    def inv_hessian(self, x):
        theta = x[..., :-1]
        return theta, theta


class EntropicBox(MirrorMap):
    """Fermi-Dirac entropy ``psi = sum (x-lo) log(x-lo) + (hi-x) log(hi-x)`` on the box ``[lo, hi]^D``.

    ``eta = log((x - lo) / (hi - x))``; the inverse is ``lo + (hi - lo) sigmoid(eta)``.

    Parameters
    ----------
    lo, hi : float
        The bounds of every coordinate, ``lo < hi``.

    References
    ----------
    .. [1] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    """

    def __init__(self, lo: float = 0.0, hi: float = 1.0):
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"EntropicBox needs finite bounds lo < hi, got lo={lo}, hi={hi}.")
        self.lo, self.hi = lo, hi

    def check_support(self, support, where):
        s = _unwrap(support)
        lo = getattr(s, "lower_bound", None)
        hi = getattr(s, "upper_bound", None)
        ok = (
            isinstance(s, (constraints.interval, constraints.half_open_interval))
            or s is constraints.unit_interval
        )
        if not ok or not (_same(lo, self.lo) and _same(hi, self.hi)):
            raise ValueError(
                f"EntropicBox({self.lo}, {self.hi}) needs a site with support "
                f"interval({self.lo}, {self.hi}), but {where} has support {support}."
            )

    def to_dual(self, x):
        return torch.log(x - self.lo) - torch.log(self.hi - x)

    def to_full(self, eta):
        return self.lo + (self.hi - self.lo) * torch.sigmoid(eta)

    def dual_score(self, x, grad):
        width = self.hi - self.lo
        return (x - self.lo) * (self.hi - x) / width * grad + (self.hi + self.lo - 2.0 * x) / width

    def inv_hessian(self, x):
        return (x - self.lo) * (self.hi - x) / (self.hi - self.lo), None

    def __repr__(self):
        return f"EntropicBox(lo={self.lo}, hi={self.hi})"


class EntropicOrthant(MirrorMap):
    """``psi = sum x log x - x`` on the positive orthant: ``eta = log x``, ``x = exp(eta)``.

    References
    ----------
    .. [1] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    """

    def check_support(self, support, where):
        s = _unwrap(support)
        if not isinstance(s, constraints.greater_than) or not _same(s.lower_bound, 0.0):
            raise ValueError(
                f"EntropicOrthant is a mirror map for positive values, but {where} has support {support}."
            )

    def to_dual(self, x):
        return torch.log(x)

    def to_full(self, eta):
        return torch.exp(eta)

    def dual_score(self, x, grad):
        return x * grad + 1.0

    def inv_hessian(self, x):
        return x, None


def _same(bound, value) -> bool:
    try:
        return float(bound) == value
    except (TypeError, ValueError):  # tensor bounds with several entries
        return False


def as_mirror_map(mirror) -> MirrorMap:
    """A :class:`MirrorMap` from an instance or the convenience name ``"entropic"`` (the simplex)."""
    if isinstance(mirror, MirrorMap):
        return mirror
    if mirror == "entropic":
        return EntropicSimplex()
    raise ValueError(
        f"unknown mirror map {mirror!r}; pass a MirrorMap such as EntropicSimplex(), EntropicBox(lo, hi) "
        "or EntropicOrthant(), or the name 'entropic' (the simplex)."
    )


# --------------------------------------------------------------- the distribution
class Empirical(Distribution):
    """The uniform mixture of point masses at ``particles [n, dim]``.

    ``sample(shape)`` picks particles uniformly with replacement. There is no density
    (``log_prob`` raises): use :attr:`mean`, :attr:`variance` or draws.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, particles: torch.Tensor, support=constraints.real_vector, validate_args=None):
        if particles.dim() != 2:
            raise ValueError(f"Empirical needs particles of shape [n, dim], got {tuple(particles.shape)}.")
        self.particles = particles
        self._support = support
        super().__init__(torch.Size(), particles.shape[-1:], validate_args=False)

    @property
    def support(self):
        return self._support

    @property
    def num_particles(self) -> int:
        return self.particles.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.particles.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        return self.particles.var(0, unbiased=False)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        c = self.particles - self.mean
        return c.T @ c / self.num_particles

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        idx = torch.randint(self.num_particles, shape, device=self.particles.device)
        return self.particles.detach()[idx]

    def log_prob(self, value):
        raise NotImplementedError(
            "an empirical distribution of particles (point masses) has no density, so log_prob is "
            "undefined. Use .sample(), .mean or .variance, or fit a density family (MeanFieldNormal, "
            "FullRankNormal, Flow) when you need log q."
        )

    def __repr__(self):
        return f"Empirical(num_particles={self.num_particles}, dim={self.event_shape[0]})"


# ------------------------------------------------------------------------- guide
class Particles(Guide):
    """``n`` particles as an empirical distribution, trained by Stein variational methods.

    Parameters
    ----------
    model : vipkg.Model
    n : int, optional
        Number of particles (default 100, or the rows of ``particles``).
    particles : Tensor, optional
        Initial particles ``[n, dim]``: unconstrained vectors (``model.dim``) without a
        mirror map, points of the site's support (full coordinates) with one.
    init : {"normal", "uniform"}
        Random initialisation when ``particles`` is not given: ``init_scale *`` standard
        normal, or uniform on ``[-init_scale, init_scale]``, in the unconstrained space
        (in dual coordinates with a mirror map).
    init_scale : float
    mirror : MirrorMap or "entropic", optional
        Put the particles on the constrained support of a one-site model, parameterised by
        their dual coordinates (for :class:`~vipkg.estimators.stein.MirroredSVGD`).
    seed : int
        Seed of the initialisation's own generator, so that construction is reproducible
        and does not consume the global RNG.
    dtype : torch.dtype, optional

    Attributes
    ----------
    particles : Tensor
        ``[n, dim]``: the trained ``nn.Parameter`` without a mirror map; with one, a
        differentiable view ``mirror.to_full(dual)`` of the trained parameter ``dual``.

    Notes
    -----
    ``guide()`` is an :class:`Empirical` distribution: draws pick particles with
    replacement and there is no ``log_prob``. :func:`vipkg.diagnostics.to_arviz` exports
    the particles themselves as draws.

    References
    ----------
    .. [1] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
       Bayesian Inference Algorithm". NeurIPS (2016).
    .. [2] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    """

    #: read by the ArviZ export: draws are the particles themselves
    is_empirical = True

    def __init__(
        self,
        model,
        n: int | None = None,
        particles=None,
        *,
        init: str = "normal",
        init_scale: float = 1.0,
        mirror=None,
        seed: int = 0,
        dtype=None,
    ):
        super().__init__(model)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n (the number of particles) must be a positive int, got {n!r}.")
        if init not in ("normal", "uniform"):
            raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}; pass particles= for others.")
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}.")
        dtype = dtype or (
            particles.dtype
            if isinstance(particles, torch.Tensor) and particles.is_floating_point()
            else torch.get_default_dtype()
        )
        self.mirror = None if mirror is None else as_mirror_map(mirror)
        if self.mirror is not None:
            if len(model.sites) != 1:
                raise ValueError(
                    f"Particles with a mirror map need a model with one latent site, but model "
                    f"{model.name!r} has {list(model.sites)}; use Particles without a mirror map "
                    "(unconstrained) instead."
                )
            ((self.site, s),) = model.sites.items()
            if len(s.shape) != 1:
                raise ValueError(
                    f"Particles with a mirror map need a vector site, but site {self.site!r} has shape "
                    f"{tuple(s.shape)}."
                )
            self.mirror.check_support(s.support, f"site {self.site!r} of model {model.name!r}")
            self.dim = s.shape[0]
            self._support = s.support
            free = self.mirror.dual_dim(self.dim)
        else:
            self._support = constraints.real_vector
            free = self.dim
        if particles is None:
            n = 100 if n is None else n
            g = torch.Generator().manual_seed(int(seed))
            if init == "normal":
                start = init_scale * torch.randn(n, free, generator=g, dtype=torch.float64)
            else:
                start = init_scale * (2 * torch.rand(n, free, generator=g, dtype=torch.float64) - 1)
            start = start.to(dtype)
        else:
            x = torch.as_tensor(particles, dtype=dtype)
            if x.dim() != 2 or x.shape[-1] != self.dim:
                raise ValueError(
                    f"particles must have shape [n, {self.dim}] "
                    f"({'points of the support' if self.mirror else 'the model dim'}), got {tuple(x.shape)}."
                )
            if n is not None and x.shape[0] != n:
                raise ValueError(f"n={n} but particles has {x.shape[0]} rows; give one or make them agree.")
            if not bool(torch.isfinite(x).all()):
                raise ValueError("particles has NaN or infinite entries.")
            if self.mirror is not None:
                dual = self.mirror.to_dual(x.double())
                inside = bool(torch.isfinite(dual).all())
                # The round trip also catches points off the set (a simplex row not summing to 1).
                if not inside or not torch.allclose(self.mirror.to_full(dual), x.double(), atol=1e-6):
                    raise ValueError(
                        f"every particle must lie strictly inside the support of site {self.site!r} "
                        f"for the mirror map {self.mirror!r}; some are on its boundary or outside."
                    )
                start = dual.to(dtype)
            else:
                start = x
        start = start.detach().clone()
        if self.mirror is None:
            self.particles = nn.Parameter(start)
        else:
            self.dual = nn.Parameter(start)

    def __getattr__(self, name):
        # Without a mirror map ``particles`` is the registered parameter itself (so it keeps
        # that name in ``named_parameters``); with one it is a view of ``dual``.
        if name == "particles":
            params = self.__dict__["_parameters"]
            if "dual" in params:
                return self.__dict__["mirror"].to_full(params["dual"])
        return super().__getattr__(name)

    @property
    def parameter(self) -> nn.Parameter:
        """The trained tensor: ``particles`` (unconstrained) or ``dual`` (mirrored)."""
        return self.particles if self.mirror is None else self.dual

    @property
    def num_particles(self) -> int:
        return self.parameter.shape[0]

    @property
    def unconstrained(self) -> bool:  # type: ignore[override]
        return self.mirror is None

    def forward(self) -> Empirical:
        return Empirical(self.particles, self._support)

    def rsample_and_log_prob(self, shape=()):
        raise NotImplementedError(
            "Particles has no reparameterized draws or density; fit it with SVGD or MirroredSVGD "
            "(vipkg.estimators.stein), not with a density-based estimator."
        )

    def sample_and_log_prob(self, shape=()):
        self.rsample_and_log_prob(shape)

    def log_joint(self, model, z):
        if self.mirror is None:
            return super().log_joint(model, z)
        batch = z.shape[:-1]
        flat = z.reshape(-1, z.shape[-1])
        return model.log_joint({self.site: flat}).reshape(batch)

    def constrain(self, model, z):
        if self.mirror is None:
            return model.constrain(z)
        return {self.site: z}

    def extra_repr(self) -> str:
        m = "" if self.mirror is None else f", mirror={self.mirror!r}"
        return f"n={self.num_particles}, dim={self.dim}{m}"
