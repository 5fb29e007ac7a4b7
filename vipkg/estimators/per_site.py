"""One part estimator per part of a Composite guide, combined in one surrogate.

``PerSite({"mu": Reparam(), "c": ScoreFunction(LeaveOneOut())})`` is the
estimator of ``Composite(model, {"mu": MeanFieldNormal, "c": Categorical})``:
each part's estimator turns its family into a :class:`~vipkg.estimators.base.Draw`
and :func:`~vipkg.estimators.base.estimate_parts` evaluates the model once,
forms the score terms' costs (Rao-Blackwellized per site and per datum when the
model exposes its terms and the objective is the ELBO, from one evaluation of
``model.log_joint_terms``), centres them with each part's control variate and
backpropagates one surrogate. Any part estimator (``composable = True``) works
per site; update estimators (SVGD, FB-GVI, DReG, FastPath, ...) are refused.

Parts without an estimator in the mapping get the default: :class:`Reparam`
when the family has reparameterized draws, ``ScoreFunction(LeaveOneOut())``
otherwise. ``repr`` lists every part and its estimator once the estimator has
met its guide (``check`` or the first ``estimate``), so a checkpoint written with
one configuration is refused by a fit with another.
"""

from __future__ import annotations

import warnings

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, Part, estimate_parts, surrogate_parts
from vipkg.estimators.control_variates import LeaveOneOut
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.score import ScoreFunction
from vipkg.guides.composite import Composite

__all__ = ["PerSite", "auto", "default_part_estimator"]


def _sites(key) -> tuple[str, ...]:
    sites = (key,) if isinstance(key, str) else tuple(key)
    if not sites or not all(isinstance(s, str) for s in sites):
        raise ValueError(f"PerSite: key {key!r} must be a site name or a tuple of site names.")
    return sites


def _name(sites) -> str:
    return ",".join(sorted(sites))


def _key_repr(sites) -> str:
    return repr(sites[0]) if len(sites) == 1 else repr(tuple(sites))


def _require_part_estimator(est, where: str) -> None:
    if not isinstance(est, Estimator):
        raise ValueError(f"PerSite: the estimator for {where} must be an Estimator, got {est!r}.")
    if not est.composable:
        raise IncompatibleEstimatorError(
            f"PerSite: the part {where} uses {est!r}, an update estimator that owns its whole step; it "
            "cannot serve one part of a Composite guide. Per site use a part estimator: Reparam, STL, "
            "RSVI, ScoreFunction or GumbelSoftmax (or fit a single family with it)."
        )


def default_part_estimator(family) -> Estimator:
    """``Reparam()`` for a family with reparameterized draws, ``ScoreFunction(LeaveOneOut())`` otherwise."""
    return Reparam() if family().has_rsample else ScoreFunction(LeaveOneOut())


class PerSite(Estimator):
    """One part estimator per part of a :class:`~vipkg.guides.composite.Composite` guide.

    Parameters
    ----------
    parts : dict, optional
        ``{site or tuple of sites: part estimator}``; each key names one part of
        the Composite guide (a tuple key in any order). Parts left out get
        :func:`default_part_estimator` (for the deprecated pair form of
        ``Composite``, the estimator kept on the guide).

    Notes
    -----
    Reparameterized and relaxed parts get pathwise gradients through the bound;
    score-function parts (and RSVI's correction) add their
    control-variate-centred score terms, Rao-Blackwellized per site and per datum
    when the model exposes its log joint's terms and the objective is the ELBO,
    otherwise weighted by the per-group bound. The state of every part's
    estimator (baselines, annealing clocks) is checkpointed under the part's
    sites, e.g. ``"W,b"``.

    References
    ----------
    .. [1] Schulman, J., Heess, N., Weber, T., Abbeel, P. "Gradient Estimation
       Using Stochastic Computation Graphs". NeurIPS (2015).
    .. [2] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    """

    #: The combiner of parts owns the step; it is not itself a part.
    composable = False
    #: Its one surrogate carries the model's log joint, so model parameters get their gradient.
    trains_model_params = True

    def __init__(self, parts: dict | None = None):
        if isinstance(parts, Composite):
            warnings.warn(
                "PerSite(guide) is deprecated: PerSite takes {site: part estimator}; "
                "the guide is given to fit.",
                DeprecationWarning,
                stacklevel=2,
            )
            parts = None
        if parts is None:
            parts = {}
        if not isinstance(parts, dict):
            raise ValueError(
                f"PerSite takes a dict {{site or tuple of sites: part estimator}}, got {parts!r}."
            )
        given: dict[tuple[str, ...], Estimator] = {}
        seen: dict[str, tuple] = {}
        for key, est in parts.items():
            sites = _sites(key)
            _require_part_estimator(est, _key_repr(sites))
            for s in sites:
                if s in seen:
                    raise ValueError(f"PerSite: site {s!r} appears in two keys ({seen[s]!r} and {key!r}).")
                seen[s] = key
            given[sites] = est
        self._given = given
        self._bound = None  # (id(guide), [(sites, estimator)]) once the guide is known
        self._pending: dict[str, dict] = {}

    @classmethod
    def auto(cls, model, **kwargs) -> tuple[Composite, PerSite]:
        """:func:`auto`: the usual Composite guide for ``model`` and its PerSite estimator."""
        return auto(model, **kwargs)

    # ------------------------------------------------------------- the parts
    def _resolve(self, guide) -> list[tuple[tuple[str, ...], Estimator]]:
        if not isinstance(guide, Composite):
            raise IncompatibleEstimatorError(
                f"PerSite combines the parts of a Composite guide, got {type(guide).__name__}; use the "
                "part's own estimator for a single family."
            )
        # A minibatch view stands for its guide: the part estimators (and their state) are the guide's.
        base = getattr(guide, "minibatch_of", None) or guide
        if self._bound is not None and self._bound[0] == id(base):
            return self._bound[1]
        by_set = {frozenset(sites): i for i, sites in enumerate(guide.part_sites)}
        chosen: dict[int, Estimator] = {}
        for sites, est in self._given.items():
            i = by_set.get(frozenset(sites))
            if i is None:
                raise IncompatibleEstimatorError(
                    f"PerSite: {_key_repr(sites)} is not a part of this Composite guide; its parts are "
                    f"{', '.join(_key_repr(s) for s in guide.part_sites)}."
                )
            chosen[i] = est
        resolved = []
        for i, (sites, family) in enumerate(zip(guide.part_sites, guide.parts)):
            est = chosen.get(i)
            if est is None:
                est = guide.part_estimators[i]
                if est is not None:
                    _require_part_estimator(est, _key_repr(sites))
            if est is None:
                est = default_part_estimator(family)
            resolved.append((tuple(sites), est))
        self._bound = (id(base), resolved)
        for sites, est in resolved:
            state = self._pending.pop(_name(sites), None)
            if state is not None:
                est.load_state_dict(state)
        return resolved

    def _estimators(self) -> list[tuple[tuple[str, ...], Estimator]]:
        return self._bound[1] if self._bound is not None else list(self._given.items())

    def _every(self, attr: str) -> bool:
        # Default parts (those the guide's families choose) are resolved only with the guide.
        ests = [est for _, est in self._estimators()]
        return bool(ests) and all(getattr(est, attr) for est in ests)

    @property
    def per_datum_bounds(self) -> bool:
        return self._every("per_datum_bounds")

    def __repr__(self) -> str:
        inner = ", ".join(f"{_key_repr(sites)}: {est!r}" for sites, est in self._estimators())
        return f"PerSite({{{inner}}})"

    # ------------------------------------------------------------ estimator
    def check(self, model, guide, objective) -> None:
        for i, (_, est) in enumerate(self._resolve(guide)):
            est.check_part(guide.sub_models[i], guide.parts[i], objective)

    def check_particles(self, num_particles: int) -> None:
        for _, est in self._estimators():
            est.check_particles(num_particles)

    @property
    def functional(self) -> bool:
        return self._every("functional")

    def _parts(self, guide) -> list[Part]:
        return [
            Part(est, family, sub, _name(sites))
            for (sites, est), family, sub in zip(self._resolve(guide), guide.parts, guide.sub_models)
        ]

    def surrogate(self, model, guide, objective, num_particles):
        return surrogate_parts(model, guide, objective, num_particles, self._parts(guide))

    def after_step(self) -> None:
        """Each part's :meth:`Estimator.after_step` (``estimate`` calls them through ``estimate_parts``;
        a functional step calls this)."""
        for _, est in self._estimators():
            est.after_step()

    def estimate(self, model, guide, objective, num_particles):
        return estimate_parts(model, guide, objective, num_particles, self._parts(guide))

    def state_dict(self) -> dict:
        out = {_name(sites): est.state_dict() for sites, est in self._estimators()}
        return {**self._pending, **out}

    def load_state_dict(self, state: dict) -> None:
        known = {_name(sites): est for sites, est in self._estimators()}
        for name, part_state in state.items():
            if name in known:
                known[name].load_state_dict(part_state)
            else:
                # A default part estimator exists only once the guide is known.
                self._pending[name] = part_state


def auto(model, *, discrete_estimator=None, continuous_guide=None, dtype=None) -> tuple[Composite, PerSite]:
    """The usual split and its estimator: a Gaussian (``Reparam``) over every continuous site and a
    ``Categorical``, ``OneHotCategorical`` or ``Bernoulli`` family per discrete site with a
    score-function estimator.

    Parameters
    ----------
    model : vipkg.Model
        With at least one discrete site.
    discrete_estimator : callable, optional
        Makes a fresh part estimator per discrete site; default
        ``ScoreFunction(LeaveOneOut())``. ``lambda: GumbelSoftmax(0.5)`` works for
        one-hot sites (Pyro's ``OneHotCategorical``) and for categorical sites of
        models that accept one-hot values.
    continuous_guide : callable, optional
        Guide factory for the continuous sites (default ``MeanFieldNormal``).
    dtype : torch.dtype, optional

    Returns
    -------
    (Composite, PerSite)

    References
    ----------
    .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    .. [2] Kool, W., van Hoof, H., Welling, M. "Buy 4 REINFORCE Samples, Get a
       Baseline for Free!". ICLR workshop (2019).
    """
    guide = Composite.auto(model, continuous_guide=continuous_guide, dtype=dtype)
    make = discrete_estimator or (lambda: ScoreFunction(LeaveOneOut()))
    parts = {}
    for sites in guide.part_sites:
        discrete = all(model.sites[s].is_discrete for s in sites)
        key = sites[0] if len(sites) == 1 else tuple(sites)
        parts[key] = make() if discrete else Reparam()
    return guide, PerSite(parts)
