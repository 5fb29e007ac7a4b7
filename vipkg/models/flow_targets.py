"""Unnormalized and multimodal targets for flow guides: a Gaussian mixture and a lattice phi^4 theory."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import _HALF_LOG_2PI, check_form

__all__ = ["gaussian_mixture", "phi4", "phi4_action"]

_MAX_CORNER_DIM = 12


def _corner_means(dim: int, num_modes: int | None, seed: int, dtype) -> torch.Tensor:
    if num_modes is None:
        if dim > _MAX_CORNER_DIM:
            raise ValueError(
                f"gaussian_mixture: all 2^{dim} corners of the cube are too many modes; "
                f"pass num_modes (e.g. 16) or use dim <= {_MAX_CORNER_DIM}."
            )
        codes = torch.arange(2**dim)
    else:
        if not isinstance(num_modes, int) or num_modes < 1:
            raise ValueError(f"num_modes must be a positive int or None, got {num_modes!r}.")
        if dim <= 20:
            if num_modes > 2**dim:
                raise ValueError(f"num_modes={num_modes} exceeds the 2^{dim} corners of the cube.")
            g = torch.Generator().manual_seed(seed)
            codes = torch.randperm(2**dim, generator=g)[:num_modes]
        else:
            g = torch.Generator().manual_seed(seed)
            bits = torch.randint(0, 2, (num_modes, dim), generator=g)
            return (2.0 * bits - 1.0).to(dtype)
    bits = (codes[:, None] >> torch.arange(dim)) & 1
    return (2.0 * bits - 1.0).to(dtype)


def gaussian_mixture(
    dim: int = 4,
    *,
    num_modes: int | None = None,
    scale: float = 0.4,
    seed: int = 0,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """An equal-weight mixture of isotropic Gaussians at corners of the cube ``{-1, +1}^dim``.

    Parameters
    ----------
    dim : int
        Dimension of the single site ``x``.
    num_modes : int, optional
        ``None`` (default) puts a mode at every one of the ``2^dim`` corners (the
        density then factorizes into bimodal coordinates); an int picks that many
        distinct corners with a seeded generator, which couples the coordinates.
    scale : float
        Standard deviation of each component; below 1 every coordinate is bimodal.
    seed : int
        Seeds the choice of corners.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        Normalized, so ``reference["log_evidence"] = 0`` and the ELBO of a guide is
        minus its KL divergence; ``reference`` also holds ``means`` ``[K, dim]``,
        the exact ``mean`` and ``cov``.

    References
    ----------
    .. [1] Vaitl, L., Winkler, L., Richter, L., Kessel, P. "Fast and Unified Path
       Gradient Estimators for Normalizing Flows". ICLR (2024), section 5.
    """
    check_form(form)
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"gaussian_mixture: dim must be a positive int, got {dim!r}.")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"gaussian_mixture: scale must be positive and finite, got {scale}.")
    dtype = dtype or torch.get_default_dtype()
    means = _corner_means(dim, num_modes, seed, dtype)
    K = means.shape[0]
    centred = means - means.mean(0)
    reference = {
        "means": means,
        "mean": means.mean(0),
        "cov": scale**2 * torch.eye(dim, dtype=dtype) + centred.T @ centred / K,
        "log_evidence": 0.0,
    }
    if form == "pyro":
        model = Model.from_pyro(_pyro_mixture, means, scale, name="gaussian_mixture")
        model.reference = reference
        return model
    const = math.log(K) + dim * (math.log(scale) + _HALF_LOG_2PI)

    def log_joint(latents, data):
        x, m = latents["x"], data["means"]
        # |x - m|^2 expanded: one [S, K] matmul instead of an [S, K, dim] difference.
        sq = x.square().sum(-1, keepdim=True) - 2 * x @ m.T + m.square().sum(-1)
        return torch.logsumexp(sq * (-0.5 / scale**2), dim=-1) - const

    return Model(
        {"x": Site(torch.Size([dim]), constraints.real)},
        log_joint,
        data={"means": means},
        name="gaussian_mixture",
        reference=reference,
        pyro_model=(_pyro_mixture, (means, scale), {}),
    )


def _pyro_mixture(means, scale):
    import pyro
    import pyro.distributions as dist

    K = means.shape[0]
    mix = dist.Categorical(logits=torch.zeros(K, dtype=means.dtype, device=means.device))
    pyro.sample("x", _real_support()(dist.MixtureSameFamily(mix, dist.Normal(means, scale).to_event(1))))


def _real_support():
    import pyro.distributions as dist

    class RealSupport(dist.TorchDistribution):
        """A distribution over real vectors with its support declared as ``real_vector``.

        ``MixtureSameFamily`` reports a support that ``biject_to`` cannot map; the
        mixture of Gaussians lives on all of R^d, so this wrapper says so.
        """

        arg_constraints: dict = {}
        support = constraints.real_vector

        def __init__(self, base, validate_args=None):
            self.base = base
            super().__init__(base.batch_shape, base.event_shape, validate_args=False)

        def expand(self, batch_shape, _instance=None):
            return RealSupport(self.base.expand(batch_shape))

        def sample(self, sample_shape=()):
            return self.base.sample(torch.Size(sample_shape))

        def log_prob(self, value):
            return self.base.log_prob(value)

    return RealSupport


def phi4_action(phi: torch.Tensor, kappa: float, lam: float) -> torch.Tensor:
    """Lattice phi^4 action in the hopping parameterization, periodic boundaries.

    ``S(phi) = sum_x [-2 kappa sum_mu phi_x phi_{x+mu} + (1 - 2 lam) phi_x^2 + lam phi_x^4]``
    over the last two dimensions of ``phi: [..., L, L]``; returns ``[...]``.
    """
    hop = phi * (torch.roll(phi, 1, dims=-1) + torch.roll(phi, 1, dims=-2))
    sq = phi.square()
    local = (1 - 2 * lam) * sq + lam * sq.square()
    return (-2 * kappa * hop + local).sum((-2, -1))


def phi4(L: int = 8, *, kappa: float = 0.3, lam: float = 0.022, form: str = "tensor", dtype=None) -> Model:
    """Scalar phi^4 field theory on a periodic ``L x L`` lattice: ``p(phi) ∝ exp(-S(phi))``.

    Parameters
    ----------
    L : int
        Lattice side; the site ``phi`` has shape ``[L, L]`` (``L^2`` unconstrained dims).
    kappa : float
        Hopping parameter; larger values order the field (two modes, phi -> -phi symmetric).
    lam : float
        Quartic coupling, positive.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        Unnormalized (the log partition function is unknown); ``reference`` holds the
        couplings and the exact symmetry ``E[sum phi] = 0``.

    Notes
    -----
    Defaults are the couplings used for phi^4 flow experiments (Nicoli et al.
    2021; Vaitl et al. 2024, who use larger lattices) on a small lattice that fits
    a CPU. The Pyro form uses a custom distribution whose ``sample`` returns a
    zero field: it only serves Pyro's tracing, never inference.

    References
    ----------
    .. [1] Nicoli, K. A. et al. "Estimation of Thermodynamic Observables in Lattice
       Field Theories with Deep Generative Models". Phys. Rev. Lett. 126 (2021).
    .. [2] Vaitl, L., Winkler, L., Richter, L., Kessel, P. "Fast and Unified Path
       Gradient Estimators for Normalizing Flows". ICLR (2024).
    """
    check_form(form)
    if not isinstance(L, int) or L < 2:
        raise ValueError(f"phi4: L must be an int >= 2 (the lattice side), got {L!r}.")
    kappa, lam = float(kappa), float(lam)
    if not (math.isfinite(kappa) and math.isfinite(lam) and lam > 0):
        raise ValueError(
            f"phi4: need finite kappa and lam > 0 (the action must be bounded below), got {lam}."
        )
    dtype = dtype or torch.get_default_dtype()
    reference = {"L": L, "kappa": kappa, "lam": lam, "magnetization_mean": 0.0}
    if form == "pyro":
        model = Model.from_pyro(_pyro_phi4, L, kappa, lam, torch.zeros((), dtype=dtype), name="phi4")
        model.reference = reference
        return model

    def log_joint(latents, data):
        return -phi4_action(latents["phi"], kappa, lam)

    return Model(
        {"phi": Site(torch.Size([L, L]), constraints.real)},
        log_joint,
        name="phi4",
        reference=reference,
        pyro_model=(_pyro_phi4, (L, kappa, lam, torch.zeros((), dtype=dtype)), {}),
    )


def _phi4_distribution():
    import pyro.distributions as dist

    class Phi4Action(dist.TorchDistribution):
        """Unnormalized density ``exp(-S(phi))`` on an ``L x L`` lattice, for Pyro programs."""

        arg_constraints: dict = {}
        support = constraints.independent(constraints.real, 2)

        def __init__(self, L, kappa, lam, like, validate_args=None):
            self.L, self.kappa, self.lam, self._like = L, kappa, lam, like
            super().__init__(torch.Size(), torch.Size([L, L]), validate_args=validate_args)

        def expand(self, batch_shape, _instance=None):
            new = self._get_checked_instance(Phi4Action, _instance)
            new.L, new.kappa, new.lam, new._like = self.L, self.kappa, self.lam, self._like
            super(Phi4Action, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
            return new

        def sample(self, sample_shape=()):
            # Only Pyro's tracing draws from it; a zero field has the right shape.
            shape = self._extended_shape(torch.Size(sample_shape))
            return self._like.new_zeros(shape)

        def log_prob(self, value):
            return -phi4_action(value, self.kappa, self.lam)

    return Phi4Action


def _pyro_phi4(L, kappa, lam, like):
    import pyro

    pyro.sample("phi", _phi4_distribution()(L, kappa, lam, like))
