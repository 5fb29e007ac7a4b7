"""Rejection-sampling variational inference (RSVI): reparameterization through Marsaglia-Tsang."""

from __future__ import annotations

import math

import torch

from vipkg.estimators.base import (
    Draw,
    Estimator,
    IncompatibleEstimatorError,
    Part,
    ScoreTerm,
    estimate_parts,
    named_latents,
)

__all__ = ["RSVI", "marsaglia_tsang_h", "marsaglia_tsang_h_inverse"]

_LOG3 = math.log(3.0)


def marsaglia_tsang_h(eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The Marsaglia-Tsang proposal ``h(eps, a) = (a - 1/3) (1 + eps / sqrt(9a - 3))^3``.

    With ``eps ~ N(0, 1)`` and the accept step it yields ``Gamma(a, 1)`` for ``a >= 1``.

    References
    ----------
    .. [1] Marsaglia, G., Tsang, W. W. "A Simple Method for Generating Gamma
       Variables". ACM TOMS 26 (2000).
    """
    c = a - 1.0 / 3.0
    return c * (1.0 + eps / torch.sqrt(9.0 * c)).pow(3)


def marsaglia_tsang_h_inverse(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The ``eps`` with ``h(eps, a) = g``: ``((g / (a - 1/3))^(1/3) - 1) sqrt(9a - 3)``.

    ``h`` is increasing on ``eps > -sqrt(9a - 3)`` and maps that half-line onto
    ``(0, inf)``, so this inverse is exact for every ``g > 0``.
    """
    c = a - 1.0 / 3.0
    return ((g / c).pow(1.0 / 3.0) - 1.0) * torch.sqrt(9.0 * c)


class RSVI(Estimator):
    """Reparameterization gradients through the Marsaglia-Tsang Gamma rejection sampler.

    For guides that are deterministic maps of independent standard Gamma draws
    (:class:`~vipkg.guides.positive.Gamma`, :class:`~vipkg.guides.positive.Beta`,
    :class:`~vipkg.guides.positive.Dirichlet`). Each ``g ~ Gamma(a + B, 1)`` is
    written as ``h(eps, a + B)`` where ``eps`` is the *accepted* proposal noise,
    whose density is ``pi(eps; a) = Gamma(h(eps, a); a, 1) |dh/deps|``. The
    gradient of the objective is

    ``E_pi[grad f(h(eps, a))] + E_pi[f(h(eps, a)) grad_a log pi(eps; a)]``,

    a pathwise term plus a score-function *correction* on ``eps``, which is
    small because ``pi`` is close to a Gaussian that does not depend on ``a``
    for large shapes. Shape augmentation with ``B`` uniforms,
    ``Gamma(a) = Gamma(a + B) prod_{i=1}^{B} U_i^{1/(a + i - 1)}``, makes the
    sampler valid for ``a < 1`` and shrinks the correction term further.

    Parameters
    ----------
    boost : int
        ``B``, the number of shape-augmentation uniforms (default 1). ``B = 0``
        needs every shape ``a >= 1``.
    correction : bool
        Include the score-function correction (default ``True``). Without it the
        estimator is the biased "g_rep only" gradient of the paper's Fig. 1; it
        exists for comparison.

    Notes
    -----
    The accepted ``eps`` is not drawn by running the rejection loop: an exact
    ``Gamma(a + B, 1)`` draw (torch's sampler, no gradient) is mapped through
    ``h^{-1}``. Since ``h`` is a bijection from ``{eps > -sqrt(9a - 3)}`` onto the
    positive reals, ``h^{-1}(g)`` has density ``pi(eps; a)``; the draw is
    vectorized with no data-dependent loop. ``eps`` then stays fixed and
    ``h(eps, a + B)`` is rebuilt with a gradient path to ``a``.

    The surrogate is ``-bound(log_w) - mean_s(bound_s.detach() * sum_k log pi_sk)``
    where ``bound_s`` is the objective's value on group ``s``; it works for the
    ELBO and for ``IWAE(k)``. Its value is the loss. As one part of a Composite guide
    under the ELBO, on a model that exposes its terms, ``bound_s`` is replaced by the
    terms that involve the part's sites minus the part's ``log q`` (the other terms'
    product with the correction has mean zero).

    ``a >= 1`` with ``boost=0`` is checked in :meth:`check` (which :func:`vipkg.fit`
    calls once), not inside the step, so that the step never reads tensors on the
    host. If shapes drift below ``1/3`` during a ``boost=0`` fit, ``h`` is
    undefined and the step's loss is NaN; use ``boost >= 1`` for shapes near or
    below 1.

    References
    ----------
    .. [1] Naesseth, C. A., Ruiz, F. J. R., Linderman, S. W., Blei, D. M.
       "Reparameterization Gradients through Acceptance-Rejection Sampling
       Algorithms". AISTATS (2017).
    .. [2] Marsaglia, G., Tsang, W. W. "A Simple Method for Generating Gamma
       Variables". ACM TOMS 26 (2000).
    """

    #: A part estimator: it serves one part of a Composite guide as well as a whole guide.
    composable = True

    def __init__(self, boost: int = 1, correction: bool = True):
        if isinstance(boost, bool) or not isinstance(boost, int) or boost < 0:
            raise ValueError(f"RSVI: boost must be an int >= 0 (shape-augmentation uniforms), got {boost!r}.")
        if not isinstance(correction, bool):
            raise ValueError(f"RSVI: correction must be True or False, got {correction!r}.")
        self.boost = boost
        self.correction = correction

    def __repr__(self) -> str:
        return f"RSVI(boost={self.boost}, correction={self.correction})"

    def check(self, model, guide, objective) -> None:
        if not (hasattr(guide, "gamma_concentration") and hasattr(guide, "transform_log_gamma")):
            raise IncompatibleEstimatorError(
                f"RSVI needs a guide built from Gamma draws (vipkg Gamma, Beta or Dirichlet), got "
                f"{type(guide).__name__}. Use Reparam for Gaussian or flow guides, ScoreFunction for any."
            )
        if self.boost == 0:
            with torch.no_grad():
                a = guide.gamma_concentration()
                low = float(a.min())
            if low < 1.0:
                raise IncompatibleEstimatorError(
                    f"RSVI(boost=0) needs every Gamma shape >= 1 (the Marsaglia-Tsang sampler's range), "
                    f"but {type(guide).__name__} has a shape of {low:.3g}. Use RSVI(boost=1) or larger: "
                    "shape augmentation covers shapes below 1."
                )

    def rsample(self, guide, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws of ``guide`` of batch ``shape`` with their ``log pi(eps)`` summed per draw.

        Returns
        -------
        z : Tensor
            Draws with a pathwise gradient to the guide's parameters.
        log_pi : Tensor ``shape``
            Log density of the accepted proposal noise, differentiable in the shapes.
        """
        a = guide.gamma_concentration()
        B = self.boost
        shape = torch.Size(shape)
        aB = a + B if B else a
        with torch.no_grad():
            g = torch._standard_gamma(aB.detach().expand(shape + a.shape).contiguous())
            # A float underflow to 0 would put eps at -sqrt(9a - 3) where log h is -inf.
            g = g.clamp_min(torch.finfo(g.dtype).tiny)
            eps = marsaglia_tsang_h_inverse(g, aB.detach())
        c = aB - 1.0 / 3.0
        sq = torch.sqrt(9.0 * c)
        log_c = torch.log(c)
        log_v = torch.log1p(eps / sq)
        log_h = log_c + 3.0 * log_v  # log h(eps, a + B), differentiable in a
        log_g = log_h
        if B:
            u = torch.rand(shape + a.shape + (B,), dtype=a.dtype, device=a.device)
            offsets = a.unsqueeze(-1) + torch.arange(B, dtype=a.dtype, device=a.device)
            log_g = log_h + (torch.log(u) / offsets).sum(-1)
        z = guide.transform_log_gamma(log_g)
        # log pi(eps; a) = log Gamma(h; a, 1) + log |dh/deps|, dh/deps = 3 c v^2 / sqrt(9c)
        log_pi = (aB - 1.0) * log_h - torch.exp(log_h) - torch.lgamma(aB) + log_c + _LOG3 + 2.0 * log_v
        log_pi = log_pi - torch.log(sq)
        return z, log_pi.reshape(*shape, -1).sum(-1)

    def draw(self, guide, model, shape) -> Draw:
        """Draws with a pathwise gradient, and ``log pi(eps)`` as a score term whose cost is the
        bound (or, Rao-Blackwellized, the log-joint terms of the part's sites minus its ``log q``)."""
        z, log_pi = self.rsample(guide, shape)
        latents, log_q = named_latents(guide, model, z, shape, guide().log_prob(z))
        terms = ()
        if self.correction:
            terms = (ScoreTerm(log_pi.reshape(-1), log_q, frozenset(latents)),)
        return Draw(latents, log_q, terms)

    def estimate(self, model, guide, objective, num_particles):
        return estimate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])
