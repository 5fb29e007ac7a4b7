"""Variational families: ``torch.nn.Module`` subclasses whose call returns a Distribution."""

from vipkg.guides.base import Guide
from vipkg.guides.composite import Composite, PerSite
from vipkg.guides.discrete import Bernoulli, Categorical
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
    "Bernoulli",
    "Composite",
    "PerSite",
    "Particles",
    "Empirical",
    "MirrorMap",
    "EntropicSimplex",
    "EntropicBox",
    "EntropicOrthant",
]
