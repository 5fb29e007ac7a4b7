"""Log-density front-end: a plain log density over one vector as a :class:`vipkg.Model`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions import constraints

from vipkg.model import Model, ModelError, Site

__all__ = ["log_density_model"]


def log_density_model(
    cls: type[Model],
    fn: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    support: constraints.Constraint = constraints.real,
    *,
    name: str = "log_density",
    site: str = "x",
    params=None,
) -> Model:
    """What :meth:`vipkg.Model.from_log_density` returns: one site ``site`` of shape ``(dim,)``.

    ``cls`` is the class to build (``Model`` or a subclass the classmethod was called on).
    """
    if not isinstance(dim, int) or dim < 1:
        raise ModelError(f"from_log_density: dim must be a positive int, got {dim!r}.")
    shape = torch.Size([dim])

    def log_joint(latents, data):
        return fn(latents[site])

    return cls({site: Site(shape, support)}, log_joint, name=name, params=params)
