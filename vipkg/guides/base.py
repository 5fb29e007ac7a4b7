"""The guide protocol: a ``torch.nn.Module`` whose call returns a Distribution."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

__all__ = ["Guide", "inverse_softplus"]


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``softplus``, stable for small and large ``x``."""
    return x + torch.log(-torch.expm1(-x))


class Guide(nn.Module):
    """Base class of variational families.

    A guide is an ``nn.Module``; calling it returns a ``torch.distributions``
    Distribution. Guides over the flat unconstrained vector of a model (Gaussian,
    flow and particle families) use :meth:`log_joint` and :meth:`constrain` as
    given here; guides over named constrained sites override them.
    """

    #: ``True`` when draws are flat unconstrained vectors ``[..., model.dim]``.
    unconstrained: bool = True

    def __init__(self, model):
        super().__init__()
        if not model.is_continuous:
            discrete = [k for k, s in model.sites.items() if s.is_discrete]
            raise ValueError(
                f"{type(self).__name__} is a density over the unconstrained vector and cannot "
                f"represent the discrete site(s) {discrete} of model {model.name!r}."
            )
        self.dim = model.dim

    def forward(self) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def rsample_and_log_prob(self, shape: torch.Size | tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized draws of ``shape`` and their log density under the guide."""
        q = self()
        z = q.rsample(torch.Size(shape))
        return z, q.log_prob(z)

    def sample_and_log_prob(self, shape: torch.Size | tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws without a path to the parameters, with their (differentiable) log density."""
        q = self()
        z = q.sample(torch.Size(shape))
        return z, q.log_prob(z)

    def log_joint(self, model, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) of the model for draws ``z: [*batch, dim]`` of this guide; shape ``batch``."""
        batch = z.shape[:-1]
        return model.log_joint_unconstrained(z.reshape(-1, z.shape[-1])).reshape(batch)

    def constrain(self, model, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named constrained sites for flat draws ``z: [n, dim]``."""
        return model.constrain(z)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
