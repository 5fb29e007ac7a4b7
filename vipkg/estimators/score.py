"""The score-function (REINFORCE) gradient estimator."""

from __future__ import annotations

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo, surrogate_backward

__all__ = ["ScoreFunction"]


class ScoreFunction(Estimator):
    """Score-function gradient ``E_q[f(z) grad log q(z)]`` for any guide, discrete ones included.

    The draws carry no gradient path; the surrogate is
    ``-bound(log_w) - mean_s(bound_s.detach() * sum_k log q(z_sk))``, where
    ``bound_s`` is the objective's value on group ``s`` of ``k`` draws. The first
    term differentiates only through ``-log q`` in the log-weights (its
    expectation is zero for the ELBO and it is what the IWAE gradient needs);
    the second is the score term. Works for the ELBO, ``IWAE(k)`` and ``Renyi``.
    The surrogate's value is the loss.

    Parameters
    ----------
    control_variate : None
        Reserved for control variates (moving average, leave-one-out, ...); only
        ``None`` (plain REINFORCE) is accepted for now.

    Notes
    -----
    This is the plain estimator, without control variates or Rao-Blackwellization:
    its variance grows with the number of latent dimensions and with ``|f|``,
    which is why it is the baseline the other estimators are measured against.

    References
    ----------
    .. [1] Williams, R. J. "Simple Statistical Gradient-Following Algorithms for
       Connectionist Reinforcement Learning". Machine Learning 8 (1992).
    .. [2] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    """

    def __init__(self, control_variate=None):
        if control_variate is not None:
            raise ValueError(
                f"ScoreFunction: control_variate={control_variate!r} is not available yet; "
                "use control_variate=None (plain REINFORCE)."
            )
        self.control_variate = control_variate

    def __repr__(self) -> str:
        return "ScoreFunction()"

    def check(self, model, guide, objective) -> None:
        if not callable(getattr(guide, "sample_and_log_prob", None)):
            raise IncompatibleEstimatorError(
                f"ScoreFunction needs a guide with sample_and_log_prob(shape) (every vipkg guide has "
                f"one), got {type(guide).__name__}."
            )

    def estimate(self, model, guide, objective, num_particles):
        shape = objective.sample_shape(num_particles)
        z, log_q = guide.sample_and_log_prob(shape)
        z = z.detach()
        log_w = guide.log_joint(model, z) - log_q
        per_group = objective.per_group(log_w)
        loss = -per_group.mean()
        score = (per_group.detach() * log_q.sum(-1)).mean()
        surrogate = loss - (score - score.detach())
        surrogate_backward(guide, loss, surrogate)
        return StepInfo(loss=loss.detach(), log_weights=log_w.detach())
