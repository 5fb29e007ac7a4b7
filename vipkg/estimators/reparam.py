"""The reparameterization (pathwise) gradient estimator."""

from __future__ import annotations

from vipkg.estimators.base import (
    Draw,
    Estimator,
    IncompatibleEstimatorError,
    Part,
    estimate_parts,
    named_latents,
)

__all__ = ["Reparam"]


class Reparam(Estimator):
    """Pathwise gradient: differentiate the bound through ``z = T(eps; params)``.

    Works with any guide that has reparameterized draws
    (``guide().has_rsample``) and any objective over log-weights. A part
    estimator: it serves one part of a Composite guide through
    :class:`~vipkg.estimators.per_site.PerSite` as well as a whole guide.

    References
    ----------
    .. [1] Kingma, D. P., Welling, M. "Auto-Encoding Variational Bayes". ICLR (2014).
    .. [2] Rezende, D. J., Mohamed, S., Wierstra, D. "Stochastic Backpropagation and
       Approximate Inference in Deep Generative Models". ICML (2014).
    """

    composable = True
    log_q_form = "live"

    def check(self, model, guide, objective) -> None:
        if not guide().has_rsample:
            raise IncompatibleEstimatorError(
                f"Reparam needs reparameterized draws, but {type(guide).__name__} has none. "
                "Use ScoreFunction (any guide), RSVI for Gamma/Beta/Dirichlet, or GumbelSoftmax "
                "for Categorical."
            )

    def draw(self, guide, model, shape) -> Draw:
        """Reparameterized draws and their live ``log q`` (Jacobian of the map to the sites included)."""
        z, log_q = guide.rsample_and_log_prob(shape)
        return Draw(*named_latents(guide, model, z, shape, log_q))

    def estimate(self, model, guide, objective, num_particles):
        return estimate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])
