"""The estimator catalogue: every named configuration (guide family, estimator, objective) in one place.

A configuration is what a user picks from when asking "which estimator?": a label such
as ``"stl-fullrank-elbo"``, a guide factory, an estimator factory, an objective factory
and, where the comparison's learning rate does not suit it, its own ``lr``. Everything
that enumerates "every estimator" reads this list:

- ``vipkg compare`` fits a model with every configuration that fits it (the others are
  reported as skipped, with the reason);
- ``vipkg fit --estimator NAME`` offers every estimator class used here
  (:func:`estimator_classes`);
- the tests (determinism, host syncs, the zoo-wide run) iterate over it, and
  ``tests/estimators/test_catalog.py`` fails when an estimator exported by
  :mod:`vipkg.estimators` has no configuration, or when one does not build.

Each configuration names a small model it is known to fit (:meth:`Config.example_model`),
so that it can be built and stepped without the model zoo.

Models with a default guide of their own (``model.default_guide``, e.g. the amortized
encoders of the zoo's VAEs) get it in place of the factorized families
(:data:`FACTORIZED`: mean-field Normal for continuous sites, the discrete families for
discrete ones, ``Composite.auto`` for any): see :meth:`Config.make_guide`. A model with
local latents in subsampled plates is checked on a minibatch, as ``vipkg.fit`` does, and
update estimators (which own a whole-data step) do not fit it.

Adding an estimator: export it from :mod:`vipkg.estimators` and add at least one
:class:`Config` to :func:`configs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.distributions import constraints

from vipkg.estimators.base import Estimator, check_minibatch_support, check_trains_model
from vipkg.estimators.bures import BWSGD, FBGVI
from vipkg.estimators.control_variates import LeaveOneOut, OptimalScaling
from vipkg.estimators.path import STL, DReG, FastPath
from vipkg.estimators.per_site import PerSite
from vipkg.estimators.relaxed import GumbelSoftmax
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.rsvi import RSVI
from vipkg.estimators.score import ScoreFunction
from vipkg.estimators.stein import SVGD, MirroredSVGD
from vipkg.guides import (
    Bernoulli,
    Beta,
    Categorical,
    Composite,
    Dirichlet,
    Flow,
    FullRankNormal,
    Gamma,
    LowRankNormal,
    MeanFieldNormal,
    OneHotCategorical,
    Particles,
)
from vipkg.model import Model, Site
from vipkg.objectives import ELBO, IWAE

__all__ = ["Config", "configs", "get", "labels", "estimator_classes", "for_estimator", "FACTORIZED"]

#: Guide factories that a model's own default guide (``model.default_guide``) replaces:
#: ``"continuous"`` ones when every site is continuous, ``"discrete"`` ones when every site is
#: discrete, ``"any"`` always.
FACTORIZED = {
    MeanFieldNormal: "continuous",
    Categorical: "discrete",
    OneHotCategorical: "discrete",
    Bernoulli: "discrete",
    Composite.auto: "any",
}


# ---------------------------------------------------------------- example models
def _example(name, sites, log_joint, data, dtype):
    data = {k: torch.as_tensor(v, dtype=dtype or torch.get_default_dtype()) for k, v in data.items()}
    return Model(sites, log_joint, data=data, name=f"example_{name}")


def gaussian_example(dtype=None) -> Model:
    """``x ~ N((0.5, -1, 2), I)``: the default example (every family over a real vector)."""
    return _example(
        "gaussian",
        {"x": Site(torch.Size([3]), constraints.real)},
        lambda z, d: -0.5 * ((z["x"] - d["loc"]) ** 2).sum(-1),
        {"loc": [0.5, -1.0, 2.0]},
        dtype,
    )


def positive_example(dtype=None) -> Model:
    """``x_i ~ Gamma(2, 1)``, three positive entries (Gamma guides)."""
    return _example(
        "positive",
        {"x": Site(torch.Size([3]), constraints.positive)},
        lambda z, d: ((d["a"] - 1) * z["x"].log() - z["x"]).sum(-1),
        {"a": [2.0, 3.0, 4.0]},
        dtype,
    )


def unit_interval_example(dtype=None) -> Model:
    """``x_i ~ Beta(2, 3)``, three entries in (0, 1) (Beta guides)."""
    return _example(
        "unit_interval",
        {"x": Site(torch.Size([3]), constraints.unit_interval)},
        lambda z, d: (d["a"] * z["x"].log() + d["b"] * (1 - z["x"]).log()).sum(-1),
        {"a": 1.0, "b": 2.0},
        dtype,
    )


def simplex_example(dtype=None) -> Model:
    """``x ~ Dirichlet(2, 3, 4)`` on the simplex (Dirichlet guides, mirrored particles)."""
    return _example(
        "simplex",
        {"x": Site(torch.Size([3]), constraints.simplex)},
        lambda z, d: ((d["alpha"] - 1) * z["x"].log()).sum(-1),
        {"alpha": [2.0, 3.0, 4.0]},
        dtype,
    )


def _one_hot(c, k):
    """Integer categories ``[S, n]`` as one-hot ``[S, n, k]``; (relaxed) one-hot values pass through."""
    if c.is_floating_point() and c.dim() == 3:
        return c
    return torch.nn.functional.one_hot(c.long(), k)


def categorical_example(dtype=None) -> Model:
    """Four independent categorical sites with three categories (Categorical guides).

    The log joint accepts integer or (relaxed) one-hot values, as Gumbel-softmax needs.
    """
    return _example(
        "categorical",
        {"c": Site(torch.Size([4]), constraints.integer_interval(0, 2))},
        lambda z, d: (_one_hot(z["c"], 3).to(d["b"].dtype) * d["b"]).flatten(1).sum(-1),
        {"b": torch.linspace(-1.0, 1.0, 12).reshape(4, 3)},
        dtype,
    )


def mixed_example(dtype=None) -> Model:
    """A real vector ``mu [2]`` and four categorical sites whose log joint depends on ``mu``
    (Composite guides: one part per kind of site)."""

    def log_joint(z, d):
        mu, y = z["mu"], _one_hot(z["c"], 3).to(z["mu"].dtype)  # [S, 2], [S, 4, 3]
        logits = (mu @ d["w"].T)[:, None, :] + d["b"]  # [S, 4, 3]
        return -0.5 * (mu**2).sum(-1) + (y * logits).flatten(1).sum(-1)

    return _example(
        "mixed",
        {
            "mu": Site(torch.Size([2]), constraints.real),
            "c": Site(torch.Size([4]), constraints.integer_interval(0, 2)),
        },
        log_joint,
        {"w": [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], "b": torch.linspace(-1.0, 1.0, 12).reshape(4, 3)},
        dtype,
    )


# ---------------------------------------------------------------- configurations
@dataclasses.dataclass(frozen=True)
class Config:
    """One named configuration: a guide family, an estimator and an objective.

    Parameters
    ----------
    label : str
        ``<estimator>-<family>-<objective>``, unique in the catalogue.
    guide : callable
        ``guide(model) -> Guide``.
    estimator : callable
        ``estimator() -> Estimator`` (``estimator(model)`` with ``per_model``), a fresh one per call.
    objective : callable
        ``objective() -> Objective``.
    lr : float, optional
        Overrides the comparison's learning rate for this configuration (estimators
        that own their update, such as FB-GVI, ignore it).
    example : callable, optional
        ``example(dtype=None) -> Model``: a small model this configuration fits, for
        tests and documentation; default :func:`gaussian_example`.
    per_model : bool
        The estimator factory takes the model, ``estimator(model)``: for estimators that
        name the model's sites (a :class:`~vipkg.estimators.per_site.PerSite` with
        chosen part estimators).
    """

    label: str
    guide: Callable
    estimator: Callable
    objective: Callable
    lr: float | None = None
    example: Callable | None = None
    per_model: bool = False

    def build(self, model, num_particles: int | None = None):
        """``(guide, estimator, objective)`` for ``model``, checked.

        Raises
        ------
        IncompatibleEstimatorError, ModelError, ValueError
            When the family or the estimator does not fit ``model`` (or ``num_particles``).
        """
        guide, estimator, objective = self.make_guide(model), self.make_estimator(model), self.objective()
        if model.is_subsampled:
            # As vipkg.fit does: an update estimator cannot step on minibatches, and the estimator
            # sees minibatches only, so check it on one (drawn off the caller's RNG stream).
            from vipkg._rng import seeded
            from vipkg.guides.minibatch import draw_minibatch

            check_minibatch_support(estimator, model, objective)
            with seeded(0):
                estimator.check(*draw_minibatch(model, guide), objective)
        else:
            estimator.check(model, guide, objective)
        if model.has_parameters:
            check_trains_model(estimator, model)
        if num_particles is not None:
            estimator.check_particles(num_particles)
        return guide, estimator, objective

    def uses_default_guide(self, model) -> bool:
        """Whether ``model``'s own default guide (``model.default_guide``) replaces this configuration's
        family: it has one, and the family is a factorized one of the matching kind (:data:`FACTORIZED`)."""
        if not callable(getattr(model, "default_guide", None)):
            return False
        try:
            kind = FACTORIZED.get(self.guide)
        except TypeError:  # an unhashable factory
            return False
        discrete = [s.is_discrete for s in model.sites.values()]
        return (
            kind == "any"
            or (kind == "continuous" and not any(discrete))
            or (kind == "discrete" and all(discrete))
        )

    def make_guide(self, model):
        """This configuration's guide for ``model``: the model's default guide where
        :meth:`uses_default_guide` (as the one part of a Composite in place of ``Composite.auto``,
        for estimators that combine parts), else ``self.guide(model)``."""
        if not self.uses_default_guide(model):
            return self.guide(model)
        guide = model.default_guide(model)
        if FACTORIZED[self.guide] == "any":
            guide = Composite(model, {tuple(model.sites): guide})
        return guide

    def make_estimator(self, model) -> Estimator:
        """A fresh estimator of this configuration for ``model``."""
        return self.estimator(model) if self.per_model else self.estimator()

    def example_model(self, dtype=None) -> Model:
        """The small model this configuration is known to fit."""
        return (self.example or gaussian_example)(dtype=dtype)

    @property
    def estimator_class(self) -> type:
        """The class of the estimator this configuration builds."""
        return type(self.make_estimator(self.example_model()) if self.per_model else self.estimator())


def _rsvi1():
    return RSVI(boost=1)


def _iwae8():
    return IWAE(8)


def _realnvp(model):
    return Flow.real_nvp(model, layers=4, hidden=32)


def _lowrank2(model):
    return LowRankNormal(model, rank=2)


def _gumbel_per_site(model):
    """Gumbel-softmax (straight-through) for every discrete site; Reparam for the continuous part."""
    return PerSite({k: GumbelSoftmax(0.5, hard=True) for k, s in model.sites.items() if s.is_discrete})


def _particles100(model):
    return Particles(model, n=100, init_scale=0.1)


def _mirrored_particles100(model):
    return Particles(model, n=100, mirror="entropic")


def configs() -> list[Config]:
    """Every named configuration, in the order ``vipkg compare`` reports them."""
    return [
        Config("reparam-meanfield-elbo", MeanFieldNormal, Reparam, ELBO),
        Config("reparam-fullrank-elbo", FullRankNormal, Reparam, ELBO),
        Config("reparam-lowrank2-elbo", _lowrank2, Reparam, ELBO),
        Config("reparam-meanfield-iwae8", MeanFieldNormal, Reparam, _iwae8),
        Config("reparam-fullrank-iwae8", FullRankNormal, Reparam, _iwae8),
        Config("stl-meanfield-elbo", MeanFieldNormal, STL, ELBO),
        Config("stl-fullrank-elbo", FullRankNormal, STL, ELBO),
        Config("dreg-fullrank-iwae8", FullRankNormal, DReG, _iwae8),
        # The one DReG configuration that also guides local latents (a VAE's codes, per image).
        Config("dreg-meanfield-iwae8", MeanFieldNormal, DReG, _iwae8),
        Config("reparam-realnvp4-elbo", _realnvp, Reparam, ELBO),
        Config("fastpath-realnvp4-elbo", _realnvp, FastPath, ELBO),
        Config("score-meanfield-elbo", MeanFieldNormal, ScoreFunction, ELBO),
        Config("score-loo-meanfield-elbo", MeanFieldNormal, lambda: ScoreFunction(LeaveOneOut()), ELBO),
        Config(
            "score-optscale-meanfield-elbo",
            MeanFieldNormal,
            lambda: ScoreFunction(OptimalScaling(), rao_blackwellize=False),
            ELBO,
        ),
        # Bures-Wasserstein steps own their update; their step comes from each target's smoothness
        # and adapts (a fixed 0.005, tuned on breast cancer, diverged on funnels; issue 22).
        Config("fbgvi-elbo", FullRankNormal, FBGVI, ELBO),
        Config("fbgvi-stein-elbo", FullRankNormal, lambda: FBGVI(hessian="stein"), ELBO),
        Config("bwsgd-elbo", FullRankNormal, BWSGD, ELBO),
        # Gamma / Beta / Dirichlet families over the named constrained sites.
        Config("rsvi1-gamma-elbo", Gamma, _rsvi1, ELBO, example=positive_example),
        Config("rsvi1-beta-elbo", Beta, _rsvi1, ELBO, example=unit_interval_example),
        Config("rsvi1-dirichlet-elbo", Dirichlet, _rsvi1, ELBO, example=simplex_example),
        Config("rsvi1-dirichlet-iwae8", Dirichlet, _rsvi1, _iwae8, example=simplex_example),
        Config("implicit-gamma-elbo", Gamma, Reparam, ELBO, example=positive_example),
        Config("implicit-dirichlet-elbo", Dirichlet, Reparam, ELBO, example=simplex_example),
        Config("score-gamma-elbo", Gamma, ScoreFunction, ELBO, example=positive_example),
        Config("score-dirichlet-elbo", Dirichlet, ScoreFunction, ELBO, example=simplex_example),
        # Discrete sites: a score-function or Gumbel-softmax part next to Reparam parts.
        Config(
            "persite-reparam+score-loo-elbo", Composite.auto, PerSite, ELBO, lr=0.05, example=mixed_example
        ),
        Config(
            "persite-reparam+gumbel-elbo",
            Composite.auto,
            _gumbel_per_site,
            ELBO,
            lr=0.05,
            example=mixed_example,
            per_model=True,
        ),
        # Every site categorical, relaxed as a whole (models that accept one-hot values).
        Config(
            "gumbel-categorical-elbo",
            Categorical,
            lambda: GumbelSoftmax(0.5),
            ELBO,
            lr=0.05,
            example=categorical_example,
        ),
        # 100 particles moved by SVGD: no density, so the loss and k-hat columns are nan.
        Config("svgd-particles100", _particles100, SVGD, ELBO, lr=0.05),
        # Particles on the simplex moved in the entropic mirror's dual space.
        Config(
            "mirrored-svgd-particles100",
            _mirrored_particles100,
            MirroredSVGD,
            ELBO,
            lr=0.05,
            example=simplex_example,
        ),
    ]


def labels() -> list[str]:
    """The labels of :func:`configs`, in order."""
    return [c.label for c in configs()]


def get(label: str) -> Config:
    """The configuration called ``label``.

    Raises
    ------
    KeyError
        Naming the labels there are.
    """
    for c in configs():
        if c.label == label:
            return c
    raise KeyError(f"no estimator configuration {label!r} in the catalogue; choose one of {labels()}.")


def estimator_classes() -> list[type]:
    """Every estimator class some configuration uses, in catalogue order (each once)."""
    out: list[type] = []
    for c in configs():
        cls = c.estimator_class
        if cls not in out:
            out.append(cls)
    return out


def for_estimator(cls: type) -> Config:
    """The first configuration whose estimator is exactly ``cls``.

    Raises
    ------
    KeyError
        When no configuration uses ``cls`` (add one to :func:`configs`).
    """
    for c in configs():
        if c.estimator_class is cls:
            return c
    raise KeyError(
        f"the catalogue has no configuration for {cls.__name__}; add one to vipkg.estimators.catalog."
    )
