"""vipkg: variational inference in PyTorch with pluggable gradient estimators.

The public names load on first use (PEP 562): ``import vipkg`` alone, and so ``vipkg --help``,
does not import torch, Pyro or ArviZ (about 1.5 s on a laptop CPU). ``from vipkg import fit`` or
``vipkg.fit`` imports what that name needs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module that defines it (a module itself where the name is a subpackage)
_LAZY = {
    "Model": "vipkg.model",
    "Site": "vipkg.model",
    "ModelError": "vipkg.model",
    "fit": "vipkg.fit",
    "FitResult": "vipkg.fit",
    "NonFiniteLossError": "vipkg.fit",
    "ELBO": "vipkg.objectives",
    "IWAE": "vipkg.objectives",
    "Renyi": "vipkg.objectives",
    "Estimator": "vipkg.estimators",
    "StepInfo": "vipkg.estimators",
    "IncompatibleEstimatorError": "vipkg.estimators",
    "Reparam": "vipkg.estimators",
    "STL": "vipkg.estimators",
    "DReG": "vipkg.estimators",
    "FastPath": "vipkg.estimators",
    "GumbelSoftmax": "vipkg.estimators",
    "RSVI": "vipkg.estimators",
    "ScoreFunction": "vipkg.estimators",
    "FBGVI": "vipkg.estimators",
    "BWSGD": "vipkg.estimators",
    "SVGD": "vipkg.estimators",
    "MirroredSVGD": "vipkg.estimators",
    "GradientVariance": "vipkg.diagnostics",
    "to_arviz": "vipkg.diagnostics",
}
_SUBPACKAGES = ("guides", "estimators", "objectives", "diagnostics", "models", "frontends", "gp")

__all__ = [*_LAZY, *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        value = importlib.import_module(f"vipkg.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'vipkg' has no attribute {name!r}")
    # Cached as a plain attribute: the next access does not come back here. (A subpackage's
    # import binds it already; `fit` must be rebound, since importing vipkg.fit binds the module.)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The ``vipkg`` module, with one rule: ``vipkg.fit`` is the function, never the module.

    Importing the submodule ``vipkg.fit`` (``from vipkg.fit import FitResult``) makes the import
    system bind it as the package's attribute ``fit``; an eager ``__init__`` rebound the function
    after that, and a lazy one must do it here so ``vipkg.fit(...)`` keeps working in any order.
    """

    def __setattr__(self, name, value):
        if name == "fit" and isinstance(value, types.ModuleType) and hasattr(value, "fit"):
            value = value.fit
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from vipkg import diagnostics, estimators, frontends, gp, guides, models, objectives  # noqa: F401
    from vipkg.diagnostics import GradientVariance, to_arviz  # noqa: F401
    from vipkg.estimators import (  # noqa: F401
        BWSGD,
        FBGVI,
        RSVI,
        STL,
        SVGD,
        DReG,
        Estimator,
        FastPath,
        GumbelSoftmax,
        IncompatibleEstimatorError,
        MirroredSVGD,
        Reparam,
        ScoreFunction,
        StepInfo,
    )
    from vipkg.fit import FitResult, NonFiniteLossError, fit  # noqa: F401
    from vipkg.model import Model, ModelError, Site  # noqa: F401
    from vipkg.objectives import ELBO, IWAE, Renyi  # noqa: F401
