"""A guide made of one family per site (or group of sites), each with its own gradient estimator.

``Composite(model, {"mu": (MeanFieldNormal, Reparam()), "c": (Categorical, ScoreFunction(LeaveOneOut()))})``
builds one sub-guide per entry over just those sites, and the :class:`PerSite`
estimator (``composite.estimator()``) combines them in one step:

1. each part draws its sites the way its estimator wants them: reparameterized
   (``Reparam``), without a gradient path (``ScoreFunction``) or relaxed
   (``GumbelSoftmax``);
2. the model's log joint is evaluated once on all the sites together, and
   ``log q`` is the sum of the parts' log densities in the sites' constrained space;
3. the surrogate is minus the bound (pathwise gradients for the reparameterized
   and relaxed parts flow through it) plus, for each score-function part, its
   score term, Rao-Blackwellized per site and per datum when the model exposes
   its terms (``Model.log_joint_terms``) and the objective is the ELBO.

Continuous parts over a subset of sites see a sub-:class:`~vipkg.Model` over
just those sites, so a Gaussian guide's ``dim`` is the dimension of those sites'
unconstrained view; the log-Jacobian of the map to the constrained space is
included in their ``log q``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo, surrogate_backward
from vipkg.estimators.score import ScoreFunction, rao_blackwell_costs
from vipkg.guides.base import Guide
from vipkg.model import Model, ModelError
from vipkg.objectives import ELBO

__all__ = ["Composite", "PerSite"]


def _no_log_joint(latents, data):
    raise ModelError(
        "this sub-model of a Composite guide only describes its sites; the log joint is evaluated "
        "on the full model."
    )


class _CompositeDistribution(Distribution):
    """Draws of a :class:`Composite` guide as a dict of named constrained sites."""

    arg_constraints: dict = {}

    def __init__(self, guide):
        self._guide = guide
        super().__init__(validate_args=False)

    @property
    def has_rsample(self):
        return all(g().has_rsample for g in self._guide.parts)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self._guide.sample_and_log_prob(sample_shape)[0]

    def rsample(self, sample_shape=()):
        return self._guide.rsample_and_log_prob(sample_shape)[0]

    def log_prob(self, value):
        return self._guide.log_prob(value)


class Composite(Guide):
    """One variational family (and gradient estimator) per site or group of sites.

    Parameters
    ----------
    model : vipkg.Model
    parts : dict
        ``{site or tuple of sites: (guide_factory_or_guide, estimator)}``. A
        factory is called with a sub-model over the part's sites (plus ``dtype=``
        when given), e.g. ``MeanFieldNormal`` or ``lambda m: Categorical(m, logits=...)``;
        a ready guide must have been built on such a sub-model (see
        :meth:`sub_model`). Every site of the model must be in exactly one part.
        The estimator is ``Reparam()``, ``RSVI(...)``, ``ScoreFunction(...)`` or ``GumbelSoftmax(...)``.
    dtype : torch.dtype, optional
        Passed to factories.

    Notes
    -----
    Draws are dicts ``{site: Tensor[*batch, *shape]}`` in the constrained space;
    ``log q`` is the sum of the parts' log densities (continuous parts include
    the log-Jacobian of their sites' constraining map). Fit it with
    ``vipkg.fit(model, guide, guide.estimator())``; a plain ``ScoreFunction``
    also works on it (every part scored).

    References
    ----------
    .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    .. [2] Schulman, J., Heess, N., Weber, T., Abbeel, P. "Gradient Estimation
       Using Stochastic Computation Graphs". NeurIPS (2015).
    """

    unconstrained = False

    def __init__(self, model, parts: dict, *, dtype=None):
        nn.Module.__init__(self)
        if not isinstance(parts, dict) or not parts:
            raise ValueError(
                "Composite needs a non-empty dict {site or tuple of sites: (guide_factory, estimator)}, "
                f"got {parts!r}."
            )
        seen: dict[str, object] = {}
        groups, guides, estimators, subs = [], [], [], []
        for key, value in parts.items():
            sites = (key,) if isinstance(key, str) else tuple(key)
            if not sites or not all(isinstance(s, str) for s in sites):
                raise ValueError(f"Composite: key {key!r} must be a site name or a tuple of site names.")
            for s in sites:
                if s not in model.sites:
                    raise ValueError(
                        f"Composite: model {model.name!r} has no site {s!r}; "
                        f"its sites are {list(model.sites)}."
                    )
                if s in seen:
                    raise ValueError(f"Composite: site {s!r} appears in two parts ({seen[s]!r} and {key!r}).")
                seen[s] = key
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ValueError(
                    f"Composite: the value for {key!r} must be a pair (guide_factory_or_guide, estimator), "
                    f"got {value!r}."
                )
            factory, est = value
            if not isinstance(est, Estimator):
                raise ValueError(f"Composite: the estimator for {key!r} must be an Estimator, got {est!r}.")
            ordered = tuple(s for s in model.sites if s in sites)
            sub = self.sub_model(model, ordered)
            if isinstance(factory, Guide):
                guide = factory
            elif callable(factory):
                guide = factory(sub) if dtype is None else factory(sub, dtype=dtype)
            else:
                raise ValueError(
                    f"Composite: {factory!r} for {key!r} is neither a guide nor a guide factory."
                )
            self._check_covers(guide, sub, key)
            groups.append(ordered)
            guides.append(guide)
            estimators.append(est)
            subs.append(sub)
        missing = [s for s in model.sites if s not in seen]
        if missing:
            raise ValueError(
                f"Composite: site(s) {missing} of model {model.name!r} are in no part; every site needs a "
                "family and an estimator."
            )
        self.parts = nn.ModuleList(guides)
        self.part_sites = groups
        self.part_estimators = estimators
        self.sub_models = subs
        self.site_names = list(model.sites)

    @classmethod
    def auto(cls, model, *, discrete_estimator=None, continuous_guide=None, dtype=None) -> Composite:
        """The usual split: one Gaussian (``Reparam``) over every continuous site, and a
        ``Categorical`` / ``Bernoulli`` guide per discrete site with a score-function estimator.

        Parameters
        ----------
        model : vipkg.Model
            With at least one discrete site.
        discrete_estimator : callable, optional
            Makes a fresh estimator per discrete site; default
            ``ScoreFunction(LeaveOneOut())``. ``lambda: GumbelSoftmax(0.5)`` works for
            categorical sites of models that accept one-hot values.
        continuous_guide : callable, optional
            Guide factory for the continuous sites (default ``MeanFieldNormal``).
        dtype : torch.dtype, optional
        """
        from vipkg.estimators.control_variates import LeaveOneOut
        from vipkg.estimators.reparam import Reparam
        from vipkg.guides.discrete import Bernoulli, Categorical, _is_boolean, _is_categorical
        from vipkg.guides.gaussian import MeanFieldNormal

        if model.is_continuous:
            raise ValueError(
                f"Composite.auto: model {model.name!r} has no discrete sites; use a family over the "
                "unconstrained vector (MeanFieldNormal, FullRankNormal, Flow) with Reparam directly."
            )
        make = discrete_estimator or (lambda: ScoreFunction(LeaveOneOut()))
        parts = {}
        continuous = tuple(k for k, s in model.sites.items() if not s.is_discrete)
        if continuous:
            parts[continuous] = (continuous_guide or MeanFieldNormal, Reparam())
        for k, s in model.sites.items():
            if not s.is_discrete:
                continue
            if _is_categorical(s.support):
                parts[k] = (Categorical, make())
            elif _is_boolean(s.support):
                parts[k] = (Bernoulli, make())
            else:
                raise ValueError(
                    f"Composite.auto: discrete site {k!r} has support {s.support}; vipkg has guides for "
                    "categorical (integer 0..K-1) and boolean sites."
                )
        return cls(model, parts, dtype=dtype)

    @staticmethod
    def sub_model(model, sites) -> Model:
        """A model over ``sites`` only (for the families' shapes and unconstrained views)."""
        return Model(
            {s: model.sites[s] for s in sites}, _no_log_joint, name=f"{model.name}[{','.join(sites)}]"
        )

    @staticmethod
    def _check_covers(guide, sub, key):
        if getattr(guide, "unconstrained", True):
            if getattr(guide, "dim", None) != sub.dim:
                raise ValueError(
                    f"Composite: the guide for {key!r} has dim {getattr(guide, 'dim', None)}, but its sites "
                    f"have {sub.dim} unconstrained coordinates; build it on "
                    "Composite.sub_model(model, sites)."
                )
        elif list(getattr(guide, "site_names", [])) != list(sub.sites):
            raise ValueError(
                f"Composite: the guide for {key!r} covers {getattr(guide, 'site_names', None)}, "
                f"expected {list(sub.sites)}."
            )

    def estimator(self) -> PerSite:
        """The estimator that combines the parts' estimators (and checkpoints their state)."""
        return PerSite(self)

    def forward(self) -> _CompositeDistribution:
        return _CompositeDistribution(self)

    # -------------------------------------------------------------- draws
    def part_latents(self, i, z):
        """A part's draws ``z [N, ...]`` as named constrained sites ``[N, *shape]`` and ``log |det J|``.

        The log-Jacobian is ``[N]`` for continuous parts and a scalar zero for
        parts that already live in the sites' space.
        """
        g, sub = self.parts[i], self.sub_models[i]
        if getattr(g, "unconstrained", True):
            return sub._constrain_with_ladj(z)
        return g.constrain(sub, z), torch.zeros((), dtype=self.dtype, device=z.device)

    def _draw(self, shape, reparam):
        shape = torch.Size(shape)
        n = math.prod(shape)
        latents, log_q = {}, 0.0
        for i, g in enumerate(self.parts):
            z, lq = g.rsample_and_log_prob(shape) if reparam else g.sample_and_log_prob(shape)
            if not reparam:
                z = z.detach()
            lat, ladj = self.part_latents(i, z.reshape(n, *z.shape[len(shape) :]))
            latents.update(lat)
            log_q = log_q + lq - (ladj.reshape(shape) if ladj.dim() else ladj)
        return {k: v.reshape(*shape, *v.shape[1:]) for k, v in latents.items()}, log_q

    def sample_and_log_prob(self, shape=()):
        return self._draw(shape, reparam=False)

    def rsample_and_log_prob(self, shape=()):
        return self._draw(shape, reparam=True)

    def _flat(self, z):
        first = self.site_names[0]
        ndim = len(z[first].shape) - len(self._site_shape(first))
        batch = z[first].shape[:ndim]
        n = math.prod(batch)
        return {k: v.reshape(n, *v.shape[ndim:]) for k, v in z.items()}, batch

    def _site_shape(self, site):
        for sub in self.sub_models:
            if site in sub.sites:
                return sub.sites[site].shape
        raise KeyError(site)

    def _raw(self, i, flat):
        """A part's own draw format from named constrained sites ``[N, *shape]``."""
        g, sub = self.parts[i], self.sub_models[i]
        if getattr(g, "unconstrained", True):
            return sub.unconstrain({k: flat[k] for k in sub.sites})
        parts = [flat[k].reshape(flat[k].shape[0], -1) for k in sub.sites]
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def log_prob(self, z):
        """``log q`` of named constrained draws ``{site: Tensor[*batch, *shape]}``; shape ``batch``."""
        flat, batch = self._flat(z)
        total = 0.0
        for i, g in enumerate(self.parts):
            raw = self._raw(i, flat)
            lq = g().log_prob(raw)
            if getattr(g, "unconstrained", True):
                _, ladj = self.sub_models[i]._constrain_with_ladj(raw)
                lq = lq - ladj
            total = total + lq
        return total.reshape(batch)

    def log_joint(self, model, z):
        flat, batch = self._flat(z)
        return model.log_joint(flat).reshape(batch)

    def constrain(self, model, z):
        return z

    def log_prob_parts(self, model, z):
        """Named sites ``[N, *shape]`` and independent factors ``[(sites, log q [N, *local])]``.

        Discrete parts contribute one factor per site (per entry); continuous
        parts one factor over their sites (``[N]``).
        """
        flat, _ = self._flat(z)
        out = []
        for i, g in enumerate(self.parts):
            raw = self._raw(i, flat)
            if callable(getattr(g, "log_prob_parts", None)):
                out.extend(g.log_prob_parts(self.sub_models[i], raw)[1])
            else:
                lq = g().log_prob(raw)
                if getattr(g, "unconstrained", True):
                    lq = lq - self.sub_models[i]._constrain_with_ladj(raw)[1]
                out.append((frozenset(self.sub_models[i].sites), lq))
        return flat, out

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(p for p in self.parameters() if p.is_floating_point()).dtype


class PerSite(Estimator):
    """Combines the estimators of a :class:`Composite` guide's parts in one step.

    Reparameterized and relaxed parts get pathwise gradients through the bound;
    score-function parts add their (control-variate-centred) score terms,
    Rao-Blackwellized per site and per datum when the model exposes its log
    joint's terms and the objective is the ELBO (otherwise they are weighted by
    the per-group bound). See :mod:`vipkg.guides.composite`.

    References
    ----------
    .. [1] Schulman, J., Heess, N., Weber, T., Abbeel, P. "Gradient Estimation
       Using Stochastic Computation Graphs". NeurIPS (2015).
    .. [2] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    """

    def __init__(self, guide: Composite | None = None):
        if guide is not None and not isinstance(guide, Composite):
            raise ValueError(
                f"PerSite(guide) takes the Composite guide it serves, got {type(guide).__name__}."
            )
        self._guide_ref = guide

    def __repr__(self):
        return "PerSite()"

    def check(self, model, guide, objective) -> None:
        if not isinstance(guide, Composite):
            raise IncompatibleEstimatorError(
                f"PerSite combines the parts of a Composite guide, got {type(guide).__name__}; use the "
                "part's own estimator for a single family."
            )
        for sites, g, est in zip(guide.part_sites, guide.parts, guide.part_estimators):
            if isinstance(est, ScoreFunction):
                est.check(Composite.sub_model(model, sites), g, objective)
                if est.control_variate.needs_scores:
                    raise IncompatibleEstimatorError(
                        f"PerSite: the part {sites} uses {est.control_variate!r}, which acts on the whole "
                        "gradient; within a Composite use a baseline (LeaveOneOut, MovingAverage, Learned)."
                    )
            elif callable(getattr(est, "draw_latents", None)):
                est.check(model, g, objective)
            elif callable(getattr(est, "rsample_with_score", None)):  # RSVI
                est.check(Composite.sub_model(model, sites), g, objective)
            elif not g().has_rsample:
                raise IncompatibleEstimatorError(
                    f"PerSite: the part {sites} uses {est!r}, which needs reparameterized draws, but "
                    f"{type(g).__name__} has none; use ScoreFunction (or GumbelSoftmax for Categorical)."
                )

    def estimate(self, model, guide, objective, num_particles):
        # The parts' estimators live on the guide; keep a handle so state_dict can reach them.
        self._guide_ref = guide
        shape = torch.Size(objective.sample_shape(num_particles))
        n = math.prod(shape)
        latents, log_q, scored, corrections = {}, 0.0, [], []
        for i, (g, est) in enumerate(zip(guide.parts, guide.part_estimators)):
            if callable(getattr(est, "draw_latents", None)):
                lat, lq = est.draw_latents(g, shape)
                lat = {k: v.reshape(n, *v.shape[len(shape) :]) for k, v in lat.items()}
                lq = lq.reshape(n)
            else:
                if isinstance(est, ScoreFunction):
                    est.check_particles(num_particles)
                    z, lq = est.draw(g, shape)
                    scored.append(i)
                elif callable(getattr(est, "rsample_with_score", None)):
                    # Pathwise draws whose proposal-noise score corrects the gradient (RSVI).
                    z, log_pi = est.rsample_with_score(g, shape)
                    lq = g().log_prob(z)
                    if log_pi is not None:
                        corrections.append(log_pi.reshape(shape))
                else:
                    z, lq = g.rsample_and_log_prob(shape)
                lat, ladj = guide.part_latents(i, z.reshape(n, *z.shape[len(shape) :]))
                lq = lq.reshape(n) - ladj
            latents.update(lat)
            log_q = log_q + lq
        log_w = (model.log_joint(latents) - log_q).reshape(shape)
        per_group = objective.per_group(log_w)
        loss = -per_group.mean()
        score, extras = 0.0, {}
        for log_pi in corrections:
            score = score + (per_group.detach() * log_pi.sum(-1)).mean()
        if scored:
            rb = getattr(model, "has_terms", False) and type(objective) is ELBO
            detached = {k: v.detach() for k, v in latents.items()}
            for i in scored:
                g, est, sub = guide.parts[i], guide.part_estimators[i], guide.sub_models[i]
                raw = guide._raw(i, detached)
                if rb and callable(getattr(g, "log_prob_parts", None)):
                    factors = g.log_prob_parts(sub, raw)[1]
                else:
                    factors = [(frozenset(sub.sites), g().log_prob(raw))]
                if rb:
                    costs = rao_blackwell_costs(model, detached, factors)
                else:
                    # Without per-site terms the weight of a group is its bound; baselines must
                    # see one cost per group, as no draw of a group is independent of its bound.
                    factors = [(sites, lq.reshape(shape).sum(-1)) for sites, lq in factors]
                    costs = [per_group.detach() for _ in factors]
                for (sites, lq), cost in zip(factors, costs):
                    key = ",".join(sorted(sites))
                    term, e = est.score_term(cost.reshape(lq.shape), lq, key=key)
                    score = score + term
                    extras.update({f"{key}.{k}": v.detach() for k, v in e.items()})
        surrogate = loss if isinstance(score, float) else loss - (score - score.detach())
        surrogate_backward(guide, loss, surrogate)
        for est in guide.part_estimators:
            if callable(getattr(est, "after_step", None)):
                est.after_step()
        return StepInfo(loss=loss.detach(), log_weights=log_w.detach(), extras={"control_variate": extras})

    def state_dict(self) -> dict:
        g = self._guide_ref
        return {} if g is None else {str(i): e.state_dict() for i, e in enumerate(g.part_estimators)}

    def load_state_dict(self, state: dict) -> None:
        g = self._guide_ref
        if g is not None:
            for i, e in enumerate(g.part_estimators):
                e.load_state_dict(state.get(str(i), {}))
