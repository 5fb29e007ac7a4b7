"""Variational bounds over log-weights ``[S, K]``.

``S`` independent groups of ``K`` importance samples each; every objective maps
the log-weights ``log p(x, z) - log q(z)`` to an estimate of its bound on
``log p(x)``. The loss handed to optimizers is always minus that bound, in nats,
for the full data set. :func:`importance_ess` is the effective sample size of the
same log-weights (one number per group of draws).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Objective", "ELBO", "IWAE", "Renyi", "importance_ess"]


class Objective:
    """A bound on ``log p(x)`` estimated from log-weights ``[S, K]``."""

    #: inner importance samples per group
    k: int = 1

    def sample_shape(self, num_particles: int) -> tuple[int, int]:
        """``(S, K)``: ``num_particles`` groups of ``k`` draws each."""
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}.")
        return num_particles, self.k

    def per_group(self, log_weights: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The bound estimated from each group: ``[S, K] -> [S]``."""
        raise NotImplementedError

    def __call__(self, log_weights: torch.Tensor) -> torch.Tensor:
        """The bound, averaged over groups: ``[S, K] -> scalar``."""
        return self.per_group(log_weights).mean()

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


class ELBO(Objective):
    """The evidence lower bound ``E_q[log p(x, z) - log q(z)]``.

    References
    ----------
    .. [1] Jordan, M. I., Ghahramani, Z., Jaakkola, T. S., Saul, L. K. "An
       Introduction to Variational Methods for Graphical Models". Machine
       Learning 37 (1999).
    """

    def per_group(self, log_weights):
        if log_weights.shape[-1] == 1:
            # One draw per group (the ELBO's shape): a view, not a reduction and its backward.
            return log_weights.squeeze(-1)
        return log_weights.mean(-1)


class IWAE(Objective):
    """The importance-weighted bound ``E[log (1/k) sum_i w_i]``; tighter as ``k`` grows.

    Parameters
    ----------
    k : int
        Importance samples per bound estimate (``k = 1`` is the ELBO).

    References
    ----------
    .. [1] Burda, Y., Grosse, R., Salakhutdinov, R. "Importance Weighted
       Autoencoders". ICLR (2016).
    """

    def __init__(self, k: int = 8):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"IWAE needs k >= 1 importance samples (an int), got {k!r}.")
        self.k = k

    def per_group(self, log_weights):
        return torch.logsumexp(log_weights, dim=-1) - math.log(log_weights.shape[-1])

    def __repr__(self):
        return f"IWAE(k={self.k})"


class Renyi(Objective):
    """The variational Rényi bound ``1/(1-alpha) log E[w^(1-alpha)]`` with ``k`` samples.

    ``alpha = 0`` is the IWAE bound, ``alpha -> 1`` the ELBO; ``alpha < 0`` gives
    an upper-bound-seeking, mass-covering objective.

    Parameters
    ----------
    alpha : float
        Order of the divergence (``alpha != 1``; use :class:`ELBO` for 1).
    k : int
        Importance samples per estimate.

    References
    ----------
    .. [1] Li, Y., Turner, R. E. "Rényi Divergence Variational Inference".
       NeurIPS (2016).
    """

    def __init__(self, alpha: float = 0.5, k: int = 8):
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha == 1.0:
            raise ValueError(
                f"Renyi needs a finite alpha != 1 (alpha = 1 is the ELBO: use ELBO()), got {alpha}."
            )
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Renyi needs k >= 1 importance samples (an int), got {k!r}.")
        self.alpha, self.k = alpha, k

    def per_group(self, log_weights):
        a = 1.0 - self.alpha
        return (torch.logsumexp(a * log_weights, dim=-1) - math.log(log_weights.shape[-1])) / a

    def __repr__(self):
        return f"Renyi(alpha={self.alpha}, k={self.k})"


def importance_ess(log_weights: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Effective sample size of self-normalized importance weights, ``(sum w)^2 / sum w^2``.

    Parameters
    ----------
    log_weights : Tensor ``[..., n]``
        ``log p(x, z) - log q(z)`` of ``n`` draws from q (the normalizer of p does not matter).
    normalized : bool
        Divide by ``n``: the efficiency in ``(0, 1]``, 1 when q is proportional to p
        (the form the normalizing-flow literature reports).

    Returns
    -------
    Tensor ``[...]``: between 1 and ``n`` (or ``1/n`` and 1 when normalized).

    References
    ----------
    .. [1] Kish, L. Survey Sampling. Wiley (1965).
    .. [2] Kong, A. "A Note on Importance Sampling Using Standardized Weights".
       Technical report 348, University of Chicago (1992).
    """
    lw = log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)
    ess = torch.exp(-torch.logsumexp(2 * lw, dim=-1))
    return ess / log_weights.shape[-1] if normalized else ess
