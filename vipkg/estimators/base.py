"""The estimator protocol shared by every gradient estimator, and the one surrogate builder over parts.

There are two kinds of estimator (``Estimator.composable`` says which):

* a **part estimator** (``composable = True``: :class:`~vipkg.estimators.reparam.Reparam`,
  :class:`~vipkg.estimators.path.STL`, :class:`~vipkg.estimators.rsvi.RSVI`,
  :class:`~vipkg.estimators.score.ScoreFunction`, :class:`~vipkg.estimators.relaxed.GumbelSoftmax`)
  turns one family into a :class:`Draw` (:meth:`Estimator.draw`). :func:`estimate_parts` takes the
  Draws of one or several families, evaluates the model once, forms the costs of their score terms
  (Rao-Blackwellized where it can), centres them with each part's control variate
  (:meth:`Estimator.center`) and backpropagates one surrogate whose value is the loss. A single
  family is the one-part case; :class:`~vipkg.estimators.per_site.PerSite` is the many-part case;
* an **update estimator** (``composable = False``: SVGD, FB-GVI, DReG, FastPath, ...) owns its whole
  step and cannot serve one site of a :class:`~vipkg.guides.composite.Composite` guide.

Writing a new part estimator is one class with ``composable = True`` and a :meth:`Estimator.draw`
(plus :meth:`~Estimator.center` if it has a control variate); it then works on a single family and
per site with no further code.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import NamedTuple

import torch

from vipkg.objectives import ELBO

__all__ = [
    "Estimator",
    "StepInfo",
    "IncompatibleEstimatorError",
    "Draw",
    "ScoreTerm",
    "Part",
    "estimate_parts",
    "surrogate_parts",
    "named_latents",
    "align_term",
    "surrogate_backward",
    "check_trains_model",
    "check_minibatch_support",
]


class IncompatibleEstimatorError(TypeError):
    """An estimator was paired with a guide or objective it cannot handle."""


@dataclasses.dataclass
class StepInfo:
    """What one estimate produced; every tensor is detached and stays on its device.

    Attributes
    ----------
    loss : Tensor
        Scalar, minus the bound estimate, in nats.
    log_weights : Tensor
        ``[S, K]`` log p(x, z) - log q(z) of the draws used.
    extras : dict
        Per-particle terms an estimator finds cheap to report.
    """

    loss: torch.Tensor
    log_weights: torch.Tensor
    extras: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ScoreTerm:
    """A log density whose gradient multiplies a cost in the surrogate.

    Attributes
    ----------
    log_prob : Tensor ``[N, *local]``
        Differentiable in the family's parameters, at draws that carry no gradient path:
        REINFORCE's ``log q(z)`` of one independent factor, RSVI's ``log pi(eps)``.
    log_q : Tensor ``[N, *local]``
        The log density (in the sites' constrained space, Jacobian included) of the draws
        this factor covers, which its Rao-Blackwellized cost subtracts. For REINFORCE it is
        ``log_prob`` (up to a Jacobian that does not depend on the parameters); for RSVI
        it is the part's ``log q(z)``.
    sites : frozenset of str
        The sites whose draws the factor moves: its Rao-Blackwellized cost is the
        log-joint terms that involve them, minus ``log_q``.
    rao_blackwellize : bool
        Whether the cost may be Rao-Blackwellized (when the model exposes its terms and
        the objective is the ELBO); otherwise it is the per-group bound.
    """

    log_prob: torch.Tensor
    log_q: torch.Tensor
    sites: frozenset
    rao_blackwellize: bool = True


@dataclasses.dataclass
class Draw:
    """What a part estimator makes of one family for one step.

    Attributes
    ----------
    latents : dict of str to Tensor
        Named constrained sites ``[N, *site_shape]``, ``N`` the flattened sample shape
        ``(S, K)``; they carry whatever gradient path the estimator wants (pathwise,
        relaxed, none).
    log_q : Tensor ``[N]``
        Their log density under the family in the sites' constrained space (the Jacobian of
        the family's map included), differentiable as the estimator wants (live, stopped).
    score_terms : tuple of ScoreTerm
        Score-function terms the surrogate adds, each multiplied by its cost.
    """

    latents: dict
    log_q: torch.Tensor
    score_terms: tuple = ()


class Part(NamedTuple):
    """One family in :func:`estimate_parts`: its part estimator, the family, the (sub-)model
    over its sites, and the name under which its control variate keeps a whole-bound cost."""

    estimator: Estimator
    family: object
    model: object
    key: str = "_all"


class Estimator(abc.ABC):
    """A gradient estimator: fills ``.grad`` of a guide's parameters.

    Subclasses implement :meth:`estimate`; :meth:`check` raises
    :class:`IncompatibleEstimatorError` saying what would fit. Nothing in a
    step reads a tensor's value on the host.

    Part estimators set ``composable = True`` and implement :meth:`draw`; their
    :meth:`estimate` is the one-part call of :func:`estimate_parts`, and
    :class:`~vipkg.estimators.per_site.PerSite` can use them on any part of a
    :class:`~vipkg.guides.composite.Composite` guide. Update estimators, which own
    their whole step, leave ``composable = False``.

    References
    ----------
    .. [1] Schulman, J., Heess, N., Weber, T., Abbeel, P. "Gradient Estimation
       Using Stochastic Computation Graphs". NeurIPS (2015).
    """

    #: ``True`` for part estimators (they implement :meth:`draw` and compose per site);
    #: ``False`` for update estimators, which own their step.
    composable: bool = False

    #: How a part estimator's ``log q`` reads per data point, for bounds that weight each datum's
    #: draws on a minibatch (:func:`estimate_parts`): ``"live"`` (its gradient reaches the family's
    #: parameters directly), ``"stopped"`` (only through the draws), or None (it cannot say).
    log_q_form: str | None = None

    def check(self, model, guide, objective) -> None:
        """Raise :class:`IncompatibleEstimatorError` when this estimator cannot serve the triple."""

    def check_part(self, model, guide, objective) -> None:
        """Like :meth:`check`, for one part of a Composite guide (``model`` is the part's
        sub-model); by default the same checks."""
        self.check(model, guide, objective)

    def draw(self, guide, model, shape) -> Draw:
        """A part estimator's :class:`Draw` of ``guide`` (over ``model``'s sites) for sample ``shape``.

        Called once per estimate. Update estimators have none.
        """
        raise IncompatibleEstimatorError(
            f"{self!r} is an update estimator (it owns its whole step) and makes no per-part draws; "
            "per site use a part estimator: Reparam, STL, RSVI, ScoreFunction or GumbelSoftmax."
        )

    def center(self, cost: torch.Tensor, key: str) -> tuple[torch.Tensor, dict]:
        """The control variate of this part's score terms: ``cost - baseline`` and detached extras.

        ``cost [N, *local]`` (Rao-Blackwellized) or ``[S]`` (per-group bound) is detached;
        ``key`` names it so stateful baselines keep one state per cost. No baseline by default.
        """
        return cost, {}

    def after_step(self) -> None:
        """Called once at the end of every estimate that used :meth:`draw` (schedules, clocks)."""

    def check_particles(self, num_particles: int) -> None:
        """Raise ``ValueError`` when ``num_particles`` is too few for this estimator (e.g. a
        leave-one-out baseline needs two); every count is fine by default."""

    @abc.abstractmethod
    def estimate(self, model, guide, objective, num_particles: int) -> StepInfo:
        """Write a gradient estimate of the loss into ``.grad``; no optimizer step."""

    def step(self, model, guide, objective, num_particles: int, optimizer) -> StepInfo:
        """One optimisation step: :meth:`estimate` (which replaces ``.grad``), then ``optimizer.step()``."""
        info = self.estimate(model, guide, objective, num_particles)
        optimizer.step()
        return info

    @property
    def trains_model_params(self) -> bool:
        """Whether :meth:`estimate` also writes the gradient of the model's own parameters, and can
        run on minibatches of local sites: true for part estimators, whose one surrogate carries the
        model's log joint (and each part's scaled log q); update estimators own a step for the guide."""
        return self.composable

    @property
    def functional(self) -> bool:
        """Whether :meth:`surrogate` is a pure function of the parameters (no state changes inside a
        step), so that ``fit(compile=True)`` can compile the step as one function of the parameters
        and the optimizer state (:mod:`vipkg._compiled`). Part estimators are, unless their state
        moves every step (a control variate's running average, an annealing clock)."""
        return self.composable

    def surrogate(self, model, guide, objective, num_particles: int):
        """``(loss, surrogate, StepInfo)`` of one step without a backward pass: the surrogate's
        gradient is the estimate. Part estimators build it with :func:`surrogate_parts`."""
        if not self.composable:
            raise NotImplementedError(f"{self!r} owns its step; it has no surrogate of its own.")
        return surrogate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])

    @property
    def per_datum_bounds(self) -> bool:
        """Whether the estimator serves bounds that weight each data point's draws on its own
        (IWAE or Renyi on minibatches of a model that factorizes over its data points)."""
        return self.log_q_form is not None

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.name + "()"

    def state_dict(self) -> dict:
        """Estimator state to checkpoint (running averages, step sizes); empty by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_trains_model(estimator, model) -> None:
    """Refuse an estimator that cannot learn ``model``'s own parameters with the guide."""
    if not estimator.trains_model_params:
        names = [k for k, _ in model.named_parameters()]
        raise IncompatibleEstimatorError(
            f"model {model.name!r} has parameters of its own {names}, and {estimator!r} does not "
            "estimate their gradient (it updates the guide only). Use an estimator that learns the "
            "model with the guide (Reparam, STL, ScoreFunction, RSVI, GumbelSoftmax, PerSite, or IWAE "
            "with Reparam), or make the parameters latent sites."
        )


def check_minibatch_support(estimator, model, objective=None) -> None:
    """Refuse an estimator (and objective) that cannot step on minibatches of ``model``'s local sites.

    The ELBO of a minibatch is an unbiased estimate of the full one. A bound with several
    importance samples (IWAE, Renyi) is not a sum over data points, so on a minibatch it is the
    sum of each data point's own bound (each weighting only its own draws): that needs a model
    that factorizes over its data points (:attr:`vipkg.Model.datum_plate`) and an estimator that
    gives ``log q`` per data point (:attr:`Estimator.per_datum_bounds`).
    """
    where = (
        f"model {model.name!r} has local latent sites {sorted(model.local_sites)} in subsampled "
        f"plate(s) {sorted(model.plates)}, fitted one minibatch at a time"
    )
    if not estimator.trains_model_params:
        raise IncompatibleEstimatorError(
            f"{where}; {estimator!r} owns a whole-data step and cannot. Use Reparam, STL, ScoreFunction, "
            "RSVI, GumbelSoftmax, DReG (with IWAE) or PerSite."
        )
    if objective is None or type(objective) is ELBO:
        return
    if model.datum_plate is None:
        raise IncompatibleEstimatorError(
            f"{where}; {objective!r} weights draws per data point there, which needs every latent site "
            "local to one plate and the model's terms with their plates (Pyro programs and the zoo's "
            "VAEs have them; global latent sites have no per-datum bound). Use ELBO() on this model."
        )
    if not estimator.per_datum_bounds:
        raise IncompatibleEstimatorError(
            f"{where}; {objective!r} weights each data point's draws, and {estimator!r} does not give "
            "log q per data point. Use Reparam, DReG, ScoreFunction or STL(allow_biased=True) with it, "
            "or ELBO()."
        )


def datum_bound(objective, log_weights: torch.Tensor, rest: torch.Tensor, scale: float):
    """A minibatch's estimate of the full per-datum bound: ``(per group [S], joint log-weights [S, K])``.

    ``log_weights [S, K, B]`` are each datum's own, unscaled; ``rest [S, K]`` the log-joint terms
    outside the plate. Each datum's bound weights its own ``K`` draws, and the estimate is
    ``scale = N / B`` times their sum.
    """
    per_group = scale * objective.per_group(log_weights.transpose(-1, -2)).sum(-1) + rest.mean(-1)
    return per_group, scale * log_weights.sum(-1) + rest


def datum_scale(model) -> float | None:
    """``N / B`` of a minibatch model that factorizes over its data points, else None."""
    if model.minibatch_of is None:
        return None
    plate = model.datum_plate
    if plate is None:
        return None
    p = model.plates[plate]
    return p.size / p.subsample_size


def surrogate_backward(guide, loss: torch.Tensor, surrogate: torch.Tensor | None = None) -> None:
    """Backpropagate ``surrogate`` (default ``loss``) into the guide's ``.grad``, replacing it.

    The guide's gradients are reset first so that :meth:`Estimator.estimate`
    always leaves exactly one estimate behind, whatever was there before.
    """
    for p in guide.parameters():
        p.grad = None
    (loss if surrogate is None else surrogate).backward()


def named_latents(guide, model, z, shape, log_q) -> tuple[dict, torch.Tensor]:
    """A family's draws ``z`` of batch ``shape`` as named constrained sites ``[N, *site_shape]``,
    and their ``log_q`` (the family's density, batch ``shape``) as ``[N]`` in the sites' space.

    ``z`` is a flat unconstrained vector for ``guide.unconstrained`` families (``log |det J|``
    of the map to the sites is subtracted from ``log_q``), the family's own layout otherwise,
    or already a dict of sites. Models whose sites are all real take no Jacobian, and no
    kernel is spent on a zero one: this is the hot path of every single-family step.
    """
    shape = torch.Size(shape)
    n = math.prod(shape)
    if len(shape) == 1:
        # Already flat (one draw per group): no reshape, whose view and backward node every
        # step would pay for.
        if isinstance(z, dict):
            return z, log_q
        flat = z
    else:
        log_q = log_q.reshape(n)
        if isinstance(z, dict):
            return {k: v.reshape(n, *v.shape[len(shape) :]) for k, v in z.items()}, log_q
        flat = z.reshape(n, *z.shape[len(shape) :])
    if not guide.unconstrained:
        return guide.constrain(model, flat), log_q
    if model._identity:
        return model.constrain(flat), log_q
    latents, ladj = model._constrain_with_ladj(flat)
    return latents, log_q - ladj


def log_dtype(t: torch.Tensor) -> torch.dtype:
    """The floating dtype for log densities of draws ``t`` (integer draws: the default dtype)."""
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


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


def terms_by_site(model, terms=None) -> dict[str, list[str]]:
    """For each latent site, the names of the log-joint terms that depend on it.

    With ``terms`` (an evaluation of ``model.log_joint_terms``) the lists hold the evaluated terms
    that ``model.term_sites`` knows, in the order of ``terms``, which is the order
    :func:`rao_blackwell_cost` adds them in; without, every term of ``model.term_sites`` in its order.
    """
    names = model.term_sites if terms is None else [n for n in terms if n in model.term_sites]
    out: dict[str, list[str]] = {}
    for name in names:
        for s in model.term_sites[name]:
            out.setdefault(s, []).append(name)
    return out


def rao_blackwell_cost(model, terms, sites, log_q, by_site=None) -> torch.Tensor:
    """Detached cost ``[N, *local]`` of one guide factor: the log-joint ``terms`` that depend on
    ``sites``, minus the factor's ``log_q`` (Ranganath et al. 2014, section 3.1).

    The terms are added in the order of ``terms``. ``by_site`` is ``terms_by_site(model, terms)``,
    computed once per evaluation by callers that cost many factors: a factor over one site then
    costs only its own terms, where scanning every term per factor made a chain of ``T`` sites
    ``O(T^2)`` per step.
    """
    by_site = terms_by_site(model, terms) if by_site is None else by_site
    if len(sites) == 1:
        names = by_site.get(next(iter(sites)), ())
    else:
        wanted = {n for s in sites for n in by_site.get(s, ())}
        names = [n for n in terms if n in wanted]
    cost = -log_q.detach()
    for name in names:
        cost = cost + align_term(terms[name].detach(), log_q.shape)
    return cost


def _named_extras(key: str, extras: dict) -> dict:
    if key == "_all":
        return {k: v.detach() for k, v in extras.items()}
    return {f"{key}.{k}": v.detach() for k, v in extras.items()}


def _scaled(family, draw: Draw) -> Draw:
    """A minibatch view's draw with its ``log q`` scaled like the model's minibatch terms.

    The views of :mod:`vipkg.guides.minibatch` report ``log_q_scale = size / subsample_size``.
    The bound's ``log q`` and each score term's cost are scaled; the score's own ``log_prob`` is
    not, so a local factor's gradient is ``scale * grad log q_i * (its unscaled cost)``, the
    unbiased estimate for the full data (each data point is in a minibatch with probability
    ``1 / scale``).
    """
    c = getattr(family, "log_q_scale", None)
    if c is None:
        return draw
    terms = tuple(dataclasses.replace(t, log_q=t.log_q * c) for t in draw.score_terms)
    return Draw(draw.latents, draw.log_q * c, terms)


def estimate_parts(model, guide, objective, num_particles: int, parts) -> StepInfo:
    """The gradient of the loss from the Draws of one or more families, into ``guide``'s ``.grad``:
    :func:`surrogate_parts`, its backward pass, and each part's :meth:`Estimator.after_step`."""
    loss, surrogate, info = surrogate_parts(model, guide, objective, num_particles, parts)
    surrogate_backward(guide, loss, surrogate)
    for p in parts:
        p.estimator.after_step()
    return info


def surrogate_parts(model, guide, objective, num_particles: int, parts):
    """The one surrogate builder: the scalar whose gradient is the estimate, from the Draws of one
    or more families (no backward pass: :func:`estimate_parts` takes it, a functional step
    differentiates it with ``torch.func``).

    Each part's estimator draws its family (:meth:`Estimator.draw`); the model's log joint
    is evaluated once on all sites together and ``log q`` is the sum of the parts'. The
    surrogate is minus the bound (pathwise gradients of reparameterized and relaxed parts
    flow through it) plus, for every score term, ``mean(centre(cost) * log_prob)`` with
    the part's control variate (:meth:`Estimator.center`). Costs are Rao-Blackwellized,
    per site and per datum, when the model exposes its terms (``model.has_terms``), the
    objective is the ELBO and the term allows it: then ``model.log_joint_terms`` is
    evaluated once per step and their sum is the log joint. Otherwise every score term of
    a part is summed over its group of ``K`` draws and weighted by the per-group bound.
    The surrogate's value is the loss.

    Parameters
    ----------
    model : vipkg.Model
        The full model.
    guide : torch.nn.Module
        The module whose parameters receive ``.grad`` (replaced).
    objective : vipkg.objectives.Objective
    num_particles : int
    parts : sequence of Part

    Returns
    -------
    (loss, surrogate, StepInfo)
        The loss (minus the bound) and the surrogate (same value; its gradient is the estimate);
        ``extras["control_variate"]`` of the StepInfo holds the control variates' extras when
        any part has score terms.

    References
    ----------
    .. [1] Schulman, J., Heess, N., Weber, T., Abbeel, P. "Gradient Estimation
       Using Stochastic Computation Graphs". NeurIPS (2015).
    .. [2] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    """
    shape = torch.Size(objective.sample_shape(num_particles))
    n = math.prod(shape)
    for p in parts:
        p.estimator.check_particles(num_particles)
    # One draw per group is drawn flat, [S] not [S, 1] (the same random numbers in the same
    # order): no reshape to [N] and back, each a view and a backward node every step.
    flat = shape[-1] == 1
    drawn = shape[:-1] if flat else shape
    draws = [_scaled(p.family, p.estimator.draw(p.family, p.model, drawn)) for p in parts]
    latents, log_q = {}, None
    for d in draws:
        latents.update(d.latents)
        log_q = d.log_q if log_q is None else log_q + d.log_q
    scored = any(d.score_terms for d in draws)
    rb = (
        type(objective) is ELBO
        and model.has_terms
        and any(t.rao_blackwellize for d in draws for t in d.score_terms)
    )
    datum = None if type(objective) is ELBO else datum_scale(model)
    if rb:
        # One evaluation serves both the bound and every cost: the terms sum to the log joint.
        terms = model.log_joint_terms(latents)
        log_p = sum(v.reshape(v.shape[0], -1).sum(-1) for v in terms.values())
        by_site = terms_by_site(model, terms)
    elif datum is None:
        log_p = model.log_joint(latents)
    if datum is not None:
        # Each data point's bound weights its own K draws: [S, K, B] log-weights, unscaled per
        # datum, and the minibatch's estimate of the full bound is N / B times their sum.
        from vipkg.guides.minibatch import datum_log_q

        lp_d, rest = model.log_joint_by_datum(latents)
        lq_d = sum(
            datum_log_q(p.family, p.model, model, d.latents, stopped=p.estimator.log_q_form == "stopped")
            for p, d in zip(parts, draws)
        )
        per_group, log_w = datum_bound(
            objective, (lp_d - lq_d).reshape(*shape, -1), rest.reshape(shape), datum
        )
        log_w = log_w.detach()
    elif flat and type(objective) is ELBO:
        # The ELBO of one draw per group is its log-weight.
        per_group = log_p - log_q
        log_w = per_group.detach().unsqueeze(-1)
    else:
        log_w = (log_p - log_q).reshape(shape)
        per_group = objective.per_group(log_w)
    loss = -per_group.mean()
    score, extras = None, {}
    for p, d in zip(parts, draws):
        whole = None
        for t in d.score_terms:
            if rb and t.rao_blackwellize:
                key = ",".join(sorted(t.sites))
                cost = rao_blackwell_cost(model, terms, t.sites, t.log_q, by_site)
                w, e = p.estimator.center(cost, key)
                term = (w * t.log_prob).reshape(n, -1).sum(-1).mean()
                score = term if score is None else score + term
                extras.update(_named_extras(key, e))
            else:
                # No draw of a group is independent of its bound: one cost per group and part.
                lp = t.log_prob.reshape(n, -1).sum(-1).reshape(shape).sum(-1)
                whole = lp if whole is None else whole + lp
        if whole is not None:
            w, e = p.estimator.center(per_group.detach(), p.key)
            term = (w * whole).mean()
            score = term if score is None else score + term
            extras.update(_named_extras(p.key, e))
    surrogate = loss if score is None else loss - (score - score.detach())
    info = StepInfo(
        loss=loss.detach(),
        log_weights=log_w.detach(),
        extras={"control_variate": extras} if scored else {},
    )
    return loss, surrogate, info
