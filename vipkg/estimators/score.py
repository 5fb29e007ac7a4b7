"""The score-function (REINFORCE) gradient estimator, with control variates and Rao-Blackwellization."""

from __future__ import annotations

import torch

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo, surrogate_backward
from vipkg.estimators.control_variates import ControlVariate
from vipkg.objectives import ELBO

__all__ = ["ScoreFunction", "align_term", "rao_blackwell_costs"]


def _detach(z):
    if isinstance(z, dict):
        return {k: v.detach() for k, v in z.items()}
    return z.detach()


def align_term(term: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """A log-joint term ``[N, *a]`` brought to a site's local shape ``[N, *b]``.

    A term whose local shape is a leading part of the site's (``x [N, n]`` for a
    site ``h [N, n, hidden]``) is taken element by element along those leading
    dimensions and broadcast over the rest: the term and the site share their
    plates, so entry ``n`` of the term depends only on entry ``n`` of the site.
    Otherwise the term is summed to ``[N]`` and broadcast, which is always
    correct, only less Rao-Blackwellized.
    """
    if term.shape == target_shape:
        return term
    if term.dim() > 1 and term.shape == target_shape[: term.dim()]:
        return term.reshape(*term.shape, *([1] * (len(target_shape) - term.dim()))).expand(target_shape)
    total = term.reshape(term.shape[0], -1).sum(-1)
    return total.reshape(total.shape[0], *([1] * (len(target_shape) - 1))).expand(target_shape)


def rao_blackwell_costs(model, latents, parts) -> list[torch.Tensor]:
    """Per-part costs: the log-joint terms that depend on the part's sites, minus its log q.

    Parameters
    ----------
    model : vipkg.Model
        With ``has_terms``.
    latents : dict of str to Tensor
        Named constrained sites ``[N, *shape]``.
    parts : list of (frozenset of str, Tensor)
        Sites of each independent guide factor and its log density ``[N, *local]``.

    Returns
    -------
    list of Tensor
        Detached costs ``[N, *local]``, one per part.
    """
    terms = model.log_joint_terms(latents)
    costs = []
    for sites, log_q in parts:
        cost = -log_q.detach()
        for name, term in terms.items():
            if model.term_sites.get(name, frozenset()) & sites:
                cost = cost + align_term(term.detach(), log_q.shape)
        costs.append(cost)
    return costs


def _per_draw_scores(log_q: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``H [S, P]``: the gradient of each ``log_q[s]`` with respect to every parameter, flattened."""
    S = log_q.shape[0]
    eye = torch.eye(S, dtype=log_q.dtype, device=log_q.device)
    grads = torch.autograd.grad(
        log_q, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True
    )
    return torch.cat(
        [
            (torch.zeros(S, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(S, -1))
            for p, g in zip(params, grads)
        ],
        dim=1,
    )


def _blocks(params):
    out, start = [], 0
    for p in params:
        out.append(slice(start, start + p.numel()))
        start += p.numel()
    return out


class ScoreFunction(Estimator):
    """Score-function gradient ``E_q[f(z) grad log q(z)]`` for any guide, discrete ones included.

    The draws carry no gradient path; the surrogate is
    ``-bound(log_w) - mean_s(w_s.detach() * sum_k log q(z_sk))``, where ``w_s``
    is the objective's value on group ``s`` of ``k`` draws, centred by the
    control variate. The first term differentiates only through ``-log q`` in
    the log-weights (its expectation is zero for the ELBO and it is what the
    IWAE gradient needs); the second is the score term. Works for the ELBO,
    ``IWAE(k)`` and ``Renyi``. The surrogate's value is the loss.

    Parameters
    ----------
    control_variate : ControlVariate, optional
        From :mod:`vipkg.estimators.control_variates`: ``MovingAverage``,
        ``LeaveOneOut``, ``OptimalScaling``, ``Learned``, ``Stein`` or a
        ``chain(...)`` of them. ``None`` is plain REINFORCE.
    rao_blackwellize : bool
        Multiply each guide factor's score only by the log-joint terms that
        depend on its sites (see Notes). Applies when the model exposes its terms
        (``model.has_terms``: Pyro programs with discrete sites, zoo models with
        discrete sites), the guide factorizes over named sites
        (``guide.log_prob_parts``: ``Categorical``, ``Bernoulli``, ``Composite``)
        and the objective is the ELBO; otherwise the whole per-draw objective is used.

    Notes
    -----
    Rao-Blackwellization (Ranganath et al. 2014, section 3.1): for a guide
    ``q(z) = prod_i q_i(z_i)`` the score of factor ``i`` only needs
    ``E[grad log q_i(z_i) (log p_i(x, z) - log q_i(z_i))]`` where ``log p_i`` are
    the terms of the log joint that involve ``z_i``; the other terms have zero
    expected product with that score. Terms with the same local shape as the
    factor (a per-datum likelihood and a per-datum assignment in one plate) are
    matched element by element, so each assignment's score sees only its own
    datum, as in Pyro's ``TraceGraph_ELBO``. Gradient-level control variates
    (``OptimalScaling``, ``Stein``) act on the per-draw gradient of the whole
    objective and need ``rao_blackwellize=False``.

    References
    ----------
    .. [1] Williams, R. J. "Simple Statistical Gradient-Following Algorithms for
       Connectionist Reinforcement Learning". Machine Learning 8 (1992).
    .. [2] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    .. [3] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in
       Belief Networks". ICML (2014).
    .. [4] Kool, W., van Hoof, H., Welling, M. "Buy 4 REINFORCE Samples, Get a
       Baseline for Free!". ICLR workshop (2019).
    .. [5] Sun, Z., Barp, A., Briol, F.-X. "Vector-Valued Control Variates". ICML (2023).
    """

    def __init__(self, control_variate: ControlVariate | None = None, *, rao_blackwellize: bool = True):
        if control_variate is not None and not isinstance(control_variate, ControlVariate):
            raise ValueError(
                f"ScoreFunction: control_variate must be None or a ControlVariate from "
                f"vipkg.estimators.control_variates (MovingAverage(), LeaveOneOut(), OptimalScaling(), "
                f"Learned(), Stein(), chain(...)), got {control_variate!r}."
            )
        self.control_variate = control_variate or ControlVariate()
        self._plain = control_variate is None
        self.rao_blackwellize = bool(rao_blackwellize)

    def __repr__(self) -> str:
        if self._plain:
            return "ScoreFunction()"
        return f"ScoreFunction({self.control_variate!r})"

    # ------------------------------------------------------------------ checks
    def _uses_rb(self, model, guide, objective) -> bool:
        return (
            self.rao_blackwellize
            and getattr(model, "has_terms", False)
            and callable(getattr(guide, "log_prob_parts", None))
            and type(objective) is ELBO
        )

    def check(self, model, guide, objective) -> None:
        if not callable(getattr(guide, "sample_and_log_prob", None)):
            raise IncompatibleEstimatorError(
                f"ScoreFunction needs a guide with sample_and_log_prob(shape) (every vipkg guide has "
                f"one), got {type(guide).__name__}."
            )
        cv = self.control_variate
        if cv.needs_scores and self._uses_rb(model, guide, objective):
            raise IncompatibleEstimatorError(
                f"ScoreFunction: {cv!r} acts on the gradient of the whole objective, but this model and "
                f"guide would be Rao-Blackwellized per site; pass rao_blackwellize=False, or use a "
                "baseline (LeaveOneOut, MovingAverage, Learned)."
            )
        if cv.needs_draws and not (getattr(guide, "unconstrained", False) and guide().has_rsample):
            raise IncompatibleEstimatorError(
                f"ScoreFunction: {cv!r} needs continuous draws over the unconstrained vector (Gaussian "
                f"or flow guides) for grad_z log q, but {type(guide).__name__} is not one; use "
                "LeaveOneOut or OptimalScaling."
            )

    def check_particles(self, num_particles: int) -> None:
        """Raise ``ValueError`` when the control variate needs more particle groups."""
        need = self.control_variate.min_particles
        if num_particles < need:
            raise ValueError(
                f"ScoreFunction: {self.control_variate!r} needs num_particles >= {need}, got {num_particles}."
            )

    # ------------------------------------------------------ hooks for PerSite
    def draw(self, guide, shape):
        """Draws of ``shape`` without a gradient path, and their differentiable log density."""
        z, log_q = guide.sample_and_log_prob(shape)
        return _detach(z), log_q

    def score_term(self, cost: torch.Tensor, log_q: torch.Tensor, key: str = "_all"):
        """The score part of a surrogate for one guide factor: ``mean_s sum (cv(cost) * log_q)``.

        ``cost`` and ``log_q`` are ``[S, *local]``; the returned scalar's
        gradient is the score-function estimate of the gradient of the bound.
        """
        w, extras = self.control_variate.center(cost.detach(), key)
        return (w * log_q).reshape(log_q.shape[0], -1).sum(-1).mean(), extras

    # --------------------------------------------------------------- estimate
    def estimate(self, model, guide, objective, num_particles):
        self.check_particles(num_particles)
        shape = objective.sample_shape(num_particles)
        z, log_q = self.draw(guide, shape)
        log_w = guide.log_joint(model, z) - log_q
        per_group = objective.per_group(log_w)
        loss = -per_group.mean()
        extras = {}
        if self._uses_rb(model, guide, objective):
            latents, parts = guide.log_prob_parts(model, z)
            costs = rao_blackwell_costs(model, latents, parts)
            score = 0.0
            for i, ((sites, lq), cost) in enumerate(zip(parts, costs)):
                term, e = self.score_term(cost, lq, key=",".join(sorted(sites)))
                score = score + term
                extras.update({f"{i}.{k}": v for k, v in e.items()})
            surrogate = loss - (score - score.detach())
        else:
            f = per_group.detach()
            w, extras = self.control_variate.center(f, "_all")
            group_log_q = log_q.sum(-1)
            if not self.control_variate.needs_scores:
                score = (w * group_log_q).mean()
                surrogate = loss - (score - score.detach())
            else:
                params = [p for p in guide.parameters() if p.requires_grad]
                H = _per_draw_scores(group_log_q, params)
                draws = None
                if self.control_variate.needs_draws:
                    draws = self._stein_draws(guide, z)
                G, e = self.control_variate.correct(w[:, None] * H, H, _blocks(params), draws)
                extras.update(e)
                est = G.mean(0).detach()
                flat = torch.cat([p.reshape(-1) for p in params])
                surrogate = loss - (est * (flat - flat.detach())).sum()
        surrogate_backward(guide, loss, surrogate)
        return StepInfo(
            loss=loss.detach(),
            log_weights=log_w.detach(),
            extras={"control_variate": {k: v.detach() for k, v in extras.items()}},
        )

    @staticmethod
    def _stein_draws(guide, z):
        S = z.shape[0]
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            lq = guide().log_prob(zz).sum()
            (sz,) = torch.autograd.grad(lq, zz)
        return zz.detach().reshape(S, -1), sz.reshape(S, -1)

    def state_dict(self) -> dict:
        return {"control_variate": self.control_variate.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.control_variate.load_state_dict(state.get("control_variate", {}))
