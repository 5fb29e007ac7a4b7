"""Variational families: ``torch.nn.Module`` subclasses whose call returns a Distribution."""

from vipkg.guides.amortized import (
    AmortizedBernoulli,
    AmortizedCategorical,
    AmortizedNormal,
    AmortizedOneHotCategorical,
)
from vipkg.guides.base import Guide
from vipkg.guides.composite import Composite
from vipkg.guides.discrete import Bernoulli, Categorical, OneHotCategorical
from vipkg.guides.flow import Flow
from vipkg.guides.gaussian import FullRankNormal, LowRankNormal, MeanFieldNormal
from vipkg.guides.particles import (
    Empirical,
    EntropicBox,
    EntropicOrthant,
    EntropicSimplex,
    MirrorMap,
    Particles,
)
from vipkg.guides.positive import Beta, Dirichlet, Gamma

__all__ = [
    "Guide",
    "MeanFieldNormal",
    "FullRankNormal",
    "LowRankNormal",
    "Gamma",
    "Beta",
    "Dirichlet",
    "Flow",
    "Categorical",
    "OneHotCategorical",
    "Bernoulli",
    "Composite",
    "AmortizedNormal",
    "AmortizedCategorical",
    "AmortizedOneHotCategorical",
    "AmortizedBernoulli",
    "Particles",
    "Empirical",
    "MirrorMap",
    "EntropicSimplex",
    "EntropicBox",
    "EntropicOrthant",
]


def __getattr__(name):
    # Deprecated shim: PerSite is an estimator (vipkg.estimators.per_site); guides may not import it.
    if name == "PerSite":
        from vipkg.guides import composite

        return composite.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
