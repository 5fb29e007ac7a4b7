"""The score-function (REINFORCE) gradient estimator, with control variates and Rao-Blackwellization."""

from __future__ import annotations

import torch

from vipkg.estimators.base import (
    Draw,
    Estimator,
    IncompatibleEstimatorError,
    Part,
    ScoreTerm,
    StepInfo,
    align_term,
    estimate_parts,
    named_latents,
    rao_blackwell_cost,
    surrogate_backward,
    terms_by_site,
)
from vipkg.estimators.control_variates import ControlVariate
from vipkg.objectives import ELBO

__all__ = ["ScoreFunction", "align_term", "rao_blackwell_costs"]


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
        Detached costs ``[N, *local]``, one per part, from one evaluation of the terms.

    References
    ----------
    .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014), section 3.1.
    """
    terms = model.log_joint_terms(latents)
    by_site = terms_by_site(model, terms)
    return [rao_blackwell_cost(model, terms, sites, log_q, by_site) for sites, log_q in parts]


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
        discrete sites) and the objective is the ELBO; otherwise the whole per-draw
        objective is used. Guides that factorize over named sites
        (``guide.log_prob_parts``: ``Categorical``, ``Bernoulli``, ``Composite``) get
        one cost per site and entry, others one cost over their sites.

    Notes
    -----
    Rao-Blackwellization (Ranganath et al. 2014, section 3.1): for a guide
    ``q(z) = prod_i q_i(z_i)`` the score of factor ``i`` only needs
    ``E[grad log q_i(z_i) (log p_i(x, z) - log q_i(z_i))]`` where ``log p_i`` are
    the terms of the log joint that involve ``z_i``; the other terms have zero
    expected product with that score. Terms with the same local shape as the
    factor (a per-datum likelihood and a per-datum assignment in one plate) are
    matched element by element, so each assignment's score sees only its own
    datum, as in Pyro's ``TraceGraph_ELBO``.

    ScoreFunction is a part estimator: with a baseline (or none) its estimate is
    the one-part call of :func:`~vipkg.estimators.base.estimate_parts`, and it
    serves any part of a Composite guide through
    :class:`~vipkg.estimators.per_site.PerSite`. Gradient-level control variates
    (``OptimalScaling``, ``Stein``) act on the per-draw gradient of the whole
    objective: they keep their own path on a single guide, need
    ``rao_blackwellize=False`` where the guide would be Rao-Blackwellized, and are
    refused per site.

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

    #: A part estimator (with a baseline control variate it serves one part of a Composite guide);
    #: gradient-level control variates need the whole gradient and keep their own single-guide path.
    composable = True
    log_q_form = "live"

    def __repr__(self) -> str:
        rb = "" if self.rao_blackwellize else "rao_blackwellize=False"
        if self._plain:
            return f"ScoreFunction({rb})"
        return f"ScoreFunction({self.control_variate!r}{', ' + rb if rb else ''})"

    # ------------------------------------------------------------------ checks
    def _uses_rb(self, model, guide, objective) -> bool:
        return (
            self.rao_blackwellize
            and model.has_terms
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
        if cv.needs_draws and not (guide.unconstrained and guide().has_rsample):
            raise IncompatibleEstimatorError(
                f"ScoreFunction: {cv!r} needs continuous draws over the unconstrained vector (Gaussian "
                f"or flow guides) for grad_z log q, but {type(guide).__name__} is not one; use "
                "LeaveOneOut or OptimalScaling."
            )

    def check_part(self, model, guide, objective) -> None:
        """:meth:`check`, and refuse gradient-level control variates, which need the whole gradient."""
        self.check(model, guide, objective)
        if self.control_variate.needs_scores:
            raise IncompatibleEstimatorError(
                f"ScoreFunction: {self.control_variate!r} acts on the whole gradient of a single guide; "
                "within a Composite use a baseline (LeaveOneOut, MovingAverage, Learned)."
            )

    def check_particles(self, num_particles: int) -> None:
        """Raise ``ValueError`` when the control variate needs more particle groups."""
        need = self.control_variate.min_particles
        if num_particles < need:
            raise ValueError(
                f"ScoreFunction: {self.control_variate!r} needs num_particles >= {need}, got {num_particles}."
            )

    # ------------------------------------------------------------ part protocol
    def draw(self, guide, model, shape) -> Draw:
        """Draws without a gradient path, their differentiable ``log q``, and one score term per
        independent factor of the guide (per site and entry where it exposes ``log_prob_parts``)."""
        self.control_variate.bind(model)  # baselines that read the (minibatch's) data
        z, log_q = guide.sample_and_log_prob(shape)
        z = {k: v.detach() for k, v in z.items()} if isinstance(z, dict) else z.detach()
        latents, log_q = named_latents(guide, model, z, shape, log_q)
        rb = self.rao_blackwellize
        if callable(getattr(guide, "log_prob_parts", None)):
            factors = guide.log_prob_parts(model, z)[1]
            terms = tuple(ScoreTerm(lq, lq, frozenset(sites), rb) for sites, lq in factors)
        else:
            terms = (ScoreTerm(log_q, log_q, frozenset(latents), rb),)
        return Draw(latents, log_q, terms)

    def center(self, cost, key):
        """The control variate's baseline: ``cost - b`` and its extras."""
        return self.control_variate.center(cost.detach(), key)

    @property
    def functional(self) -> bool:
        # Gradient-level control variates need per-draw gradients; stateful baselines move a state.
        return not self.control_variate.needs_scores and self.control_variate.stateless

    # --------------------------------------------------------------- estimate
    def estimate(self, model, guide, objective, num_particles):
        if not self.control_variate.needs_scores:
            return estimate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])
        # Gradient-level control variates act on the per-draw gradients of the whole objective.
        self.check_particles(num_particles)
        self.control_variate.bind(model)
        shape = objective.sample_shape(num_particles)
        z, log_q = guide.sample_and_log_prob(shape)
        z = {k: v.detach() for k, v in z.items()} if isinstance(z, dict) else z.detach()
        log_w = guide.log_joint(model, z) - log_q
        per_group = objective.per_group(log_w)
        loss = -per_group.mean()
        w, extras = self.control_variate.center(per_group.detach(), "_all")
        params = [p for p in guide.parameters() if p.requires_grad]
        H = _per_draw_scores(log_q.sum(-1), params)
        draws = self._stein_draws(guide, z) if self.control_variate.needs_draws else None
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
