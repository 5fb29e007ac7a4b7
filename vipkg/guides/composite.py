"""A guide made of one variational family per site (or group of sites).

``Composite(model, {"mu": MeanFieldNormal, "c": Categorical})`` builds one
sub-guide per entry over just those sites. It is a pure family: its draws are
dicts of named constrained sites and ``log q`` is the sum of the parts' log
densities (continuous parts include the log-Jacobian of the map to their
sites). Which gradient estimator each part uses is the estimator's business:
``vipkg.estimators.per_site.PerSite({"mu": Reparam(), "c": ScoreFunction(LeaveOneOut())})``
combines part estimators in one step (``vipkg.estimators.per_site.auto(model)``
builds the usual pair).

Continuous parts over a subset of sites see a sub-:class:`~vipkg.Model` over
just those sites, so a Gaussian guide's ``dim`` is the dimension of those sites'
unconstrained view.

Guides never import estimators; the deprecated pair form
``{site: (family, estimator)}`` keeps the estimator objects as plain attributes
(``part_estimators``) for :class:`~vipkg.estimators.per_site.PerSite` to read.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch import nn
from torch.distributions import Distribution

from vipkg.guides.base import Guide
from vipkg.model import Model, ModelError

__all__ = ["Composite"]


def __getattr__(name):
    # Deprecated shim: PerSite moved to vipkg.estimators.per_site; guides may not import
    # estimators, so the class is looked up where `import vipkg` has already loaded it.
    if name == "PerSite":
        warnings.warn(
            "vipkg.guides.composite.PerSite moved to vipkg.estimators.per_site.PerSite "
            "(also vipkg.estimators.PerSite).",
            DeprecationWarning,
            stacklevel=2,
        )
        return sys.modules["vipkg.estimators.per_site"].PerSite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """One variational family per site or group of sites.

    Parameters
    ----------
    model : vipkg.Model
    parts : dict
        ``{site or tuple of sites: guide_factory_or_guide}``. A factory is called
        with a sub-model over the part's sites (plus ``dtype=`` when given), e.g.
        ``MeanFieldNormal`` or ``lambda m: Categorical(m, logits=...)``; a ready
        guide must have been built on such a sub-model (see :meth:`sub_model`).
        Every site of the model must be in exactly one part. The pair form
        ``{site: (family, estimator)}`` is deprecated: give the estimators to
        ``vipkg.estimators.per_site.PerSite`` instead.
    dtype : torch.dtype, optional
        Passed to factories.

    Notes
    -----
    Draws are dicts ``{site: Tensor[*batch, *shape]}`` in the constrained space;
    ``log q`` is the sum of the parts' log densities (continuous parts include
    the log-Jacobian of their sites' constraining map). Fit it with
    ``vipkg.fit(model, guide, PerSite({...}))``; a plain ``ScoreFunction`` (every
    part scored) or ``Reparam`` (every part reparameterizable) also works on it.

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
                "Composite needs a non-empty dict {site or tuple of sites: guide_factory_or_guide}, "
                f"got {parts!r}."
            )
        seen: dict[str, object] = {}
        groups, guides, estimators, subs = [], [], [], []
        paired = []
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
            est = None
            if isinstance(value, tuple):
                if len(value) != 2:
                    raise ValueError(
                        f"Composite: the value for {key!r} must be a guide factory or a guide (or, "
                        f"deprecated, a pair (family, estimator)), got {value!r}."
                    )
                value, est = value
                paired.append(key)
            ordered = tuple(s for s in model.sites if s in sites)
            sub = self.sub_model(model, ordered)
            if isinstance(value, Guide):
                guide = value
            elif callable(value):
                guide = value(sub) if dtype is None else value(sub, dtype=dtype)
                if not isinstance(guide, Guide):
                    raise ValueError(
                        f"Composite: the factory for {key!r} returned {type(guide).__name__}, not a guide."
                    )
            else:
                raise ValueError(f"Composite: {value!r} for {key!r} is neither a guide nor a guide factory.")
            self._check_covers(guide, sub, key)
            groups.append(ordered)
            guides.append(guide)
            estimators.append(est)
            subs.append(sub)
        missing = [s for s in model.sites if s not in seen]
        if missing:
            raise ValueError(
                f"Composite: site(s) {missing} of model {model.name!r} are in no part; every site needs a "
                "family."
            )
        if paired:
            warnings.warn(
                "Composite(model, {site: (family, estimator)}) is deprecated: give Composite the families "
                "only and the estimators to vipkg.estimators.per_site.PerSite({site: estimator}) "
                f"(pairs given for {paired}).",
                DeprecationWarning,
                stacklevel=2,
            )
        self.parts = nn.ModuleList(guides)
        self.part_sites = groups
        #: Deprecated: the estimators of the pair form (None where none was given), kept as plain
        #: objects for ``PerSite()`` to use; a guide does not build or run estimators.
        self.part_estimators = estimators
        self.sub_models = subs
        self.site_names = list(model.sites)

    @classmethod
    def auto(cls, model, *, discrete_estimator=None, continuous_guide=None, dtype=None) -> Composite:
        """The usual split: one Gaussian over every continuous site, and a ``Categorical``,
        ``OneHotCategorical`` or ``Bernoulli`` guide per discrete site (by its support).

        Parameters
        ----------
        model : vipkg.Model
            With at least one discrete site.
        discrete_estimator : callable, optional
            Deprecated: makes an estimator per discrete site, kept on the guide for
            ``PerSite()``; use ``vipkg.estimators.per_site.auto(model, discrete_estimator=...)``,
            which returns the guide and its ``PerSite`` estimator.
        continuous_guide : callable, optional
            Guide factory for the continuous sites (default ``MeanFieldNormal``).
        dtype : torch.dtype, optional

        References
        ----------
        .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
           Inference". AISTATS (2014).
        """
        from vipkg.guides.discrete import (
            Bernoulli,
            Categorical,
            OneHotCategorical,
            _is_boolean,
            _is_categorical,
            _is_one_hot,
        )
        from vipkg.guides.gaussian import MeanFieldNormal

        if model.is_continuous and not getattr(model, "local_sites", None):
            raise ValueError(
                f"Composite.auto: model {model.name!r} has no discrete sites; use a family over the "
                "unconstrained vector (MeanFieldNormal, FullRankNormal, Flow) with Reparam directly."
            )
        parts = {}
        local = getattr(model, "local_sites", {})
        continuous = tuple(k for k, s in model.sites.items() if not s.is_discrete and k not in local)
        if continuous:
            parts[continuous] = continuous_guide or MeanFieldNormal
        for plate in getattr(model, "plates", {}):
            # Local sites of a subsampled plate get a mean-field part of their own, which a
            # minibatch view can index (see vipkg.guides.minibatch).
            mine = tuple(
                k for k, s in model.sites.items() if not s.is_discrete and local.get(k, ("",))[0] == plate
            )
            if mine:
                parts[mine] = MeanFieldNormal
        for k, s in model.sites.items():
            if not s.is_discrete:
                continue
            if _is_categorical(s.support):
                parts[k] = Categorical
            elif _is_one_hot(s.support):
                parts[k] = OneHotCategorical
            elif _is_boolean(s.support):
                parts[k] = Bernoulli
            else:
                raise ValueError(
                    f"Composite.auto: discrete site {k!r} has support {s.support}; vipkg has guides for "
                    "categorical (integer 0..K-1), one-hot categorical and boolean sites."
                )
        guide = cls(model, parts, dtype=dtype)
        if discrete_estimator is not None:
            warnings.warn(
                "Composite.auto(model, discrete_estimator=...) is deprecated: use "
                "vipkg.estimators.per_site.auto(model, discrete_estimator=...), which returns "
                "(guide, PerSite estimator).",
                DeprecationWarning,
                stacklevel=2,
            )
            guide.part_estimators = [
                discrete_estimator() if all(model.sites[s].is_discrete for s in sites) else None
                for sites in guide.part_sites
            ]
        return guide

    @staticmethod
    def sub_model(model, sites) -> Model:
        """A model over ``sites`` only (for the families' shapes and unconstrained views).

        It keeps the subsampled plates of those sites (``plates``, ``local_sites``) and
        shares the model's ``data``, which amortized families read their inputs from.
        """
        local = {s: model.local_sites[s] for s in sites if s in getattr(model, "local_sites", {})}
        sub = Model(
            {s: model.sites[s] for s in sites},
            _no_log_joint,
            name=f"{model.name}[{','.join(sites)}]",
            plates={p: model.plates[p] for p, _ in local.values()},
            local_sites=local,
        )
        # The model's own (already checked) data, shared: no copy and no check per call.
        sub.data = model.data
        return sub

    @staticmethod
    def _check_covers(guide, sub, key):
        if guide.unconstrained:
            if guide.dim != sub.dim:
                raise ValueError(
                    f"Composite: the guide for {key!r} has dim {guide.dim}, but its sites have {sub.dim} "
                    "unconstrained coordinates; build it on Composite.sub_model(model, sites)."
                )
        elif list(guide.site_names) != list(sub.sites):
            raise ValueError(
                f"Composite: the guide for {key!r} covers {guide.site_names}, expected {list(sub.sites)}."
            )

    def estimator(self):
        """Deprecated: the :class:`~vipkg.estimators.per_site.PerSite` estimator of the pair form.

        Use ``vipkg.estimators.per_site.PerSite({site: estimator})`` (or
        ``vipkg.estimators.per_site.auto(model)``) instead.
        """
        warnings.warn(
            "Composite.estimator() is deprecated: pass vipkg.estimators.per_site.PerSite({site: "
            "estimator}) to fit, or build both with vipkg.estimators.per_site.auto(model).",
            DeprecationWarning,
            stacklevel=2,
        )
        # Guides may not import estimators; this deprecated shim is the only reason to reach the
        # class, which `import vipkg` always loads.
        per_site = sys.modules["vipkg.estimators.per_site"]
        given = {
            (sites[0] if len(sites) == 1 else sites): est
            for sites, est in zip(self.part_sites, self.part_estimators)
            if est is not None
        }
        return per_site.PerSite(given)

    def forward(self) -> _CompositeDistribution:
        return _CompositeDistribution(self)

    # -------------------------------------------------------------- draws
    def part_latents(self, i, z):
        """A part's draws ``z [N, ...]`` as named constrained sites ``[N, *shape]`` and ``log |det J|``.

        The log-Jacobian is ``[N]`` for continuous parts and a scalar zero for
        parts that already live in the sites' space.
        """
        g, sub = self.parts[i], self.sub_models[i]
        if g.unconstrained:
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
        return {k: v.reshape(shape + v.shape[1:]) for k, v in latents.items()}, log_q

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
        if g.unconstrained:
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
            if g.unconstrained:
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
            # Families over named discrete sites factorize per site and entry (finer Rao-Blackwellization).
            if callable(getattr(g, "log_prob_parts", None)):
                out.extend(g.log_prob_parts(self.sub_models[i], raw)[1])
            else:
                lq = g().log_prob(raw)
                if g.unconstrained:
                    lq = lq - self.sub_models[i]._constrain_with_ladj(raw)[1]
                out.append((frozenset(self.sub_models[i].sites), lq))
        return flat, out

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(p for p in self.parameters() if p.is_floating_point()).dtype
