"""The reparameterization (pathwise) gradient estimator."""

from __future__ import annotations

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo, surrogate_backward

__all__ = ["Reparam"]


class Reparam(Estimator):
    """Pathwise gradient: differentiate the bound through ``z = T(eps; params)``.

    Works with any guide that has reparameterized draws
    (``guide().has_rsample``) and any objective over log-weights.

    References
    ----------
    .. [1] Kingma, D. P., Welling, M. "Auto-Encoding Variational Bayes". ICLR (2014).
    .. [2] Rezende, D. J., Mohamed, S., Wierstra, D. "Stochastic Backpropagation and
       Approximate Inference in Deep Generative Models". ICML (2014).
    """

    def check(self, model, guide, objective) -> None:
        if not guide().has_rsample:
            raise IncompatibleEstimatorError(
                f"Reparam needs reparameterized draws, but {type(guide).__name__} has none. "
                "Use ScoreFunction (any guide) or, for Gamma/Beta/Dirichlet, RSVI."
            )

    def estimate(self, model, guide, objective, num_particles):
        shape = objective.sample_shape(num_particles)
        z, log_q = guide.rsample_and_log_prob(shape)
        log_w = guide.log_joint(model, z) - log_q
        loss = -objective(log_w)
        surrogate_backward(guide, loss)
        return StepInfo(loss=loss.detach(), log_weights=log_w.detach())
