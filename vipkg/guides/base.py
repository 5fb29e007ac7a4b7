"""The guide protocol: a ``torch.nn.Module`` whose call returns a Distribution."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution
from torch.func import functional_call

__all__ = ["Guide", "inverse_softplus", "check_positive", "stopped_log_prob"]


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``softplus``, stable for small and large ``x``."""
    return x + torch.log(-torch.expm1(-x))


def check_positive(t: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse initial values that are not finite, not positive, or below the dtype's smallest normal.

    A subnormal value (say ``1e-40`` in float32) keeps only a few significant bits and
    its logarithm or inverse softplus is off or infinite, so a guide built from it would
    start from parameters that are not what the user asked for.
    """
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite and strictly positive; it has NaN or infinite entries.")
    if not bool((t > 0).all()):
        raise ValueError(f"{name} must be finite and strictly positive, got min {float(t.min()):.3g}.")
    tiny = torch.finfo(t.dtype).tiny
    if bool((t < tiny).any()):
        raise ValueError(
            f"{name} has entries down to {float(t.min()):.3g}, below the smallest normal {t.dtype} "
            f"number ({tiny:.3g}): they underflow. Use values >= {tiny:.3g}, or dtype=torch.float64."
        )
    return t


class _GuideLogProb(nn.Module):
    # functional_call swaps parameters only while the module it is given runs, so
    # building the distribution *and* evaluating log_prob must happen inside one call.
    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def forward(self, z):
        return self.guide().log_prob(z)


def stopped_log_prob(guide, z: torch.Tensor) -> torch.Tensor:
    """``log q(z)`` with the guide's parameters held constant: gradients reach only ``z``.

    Uses :func:`torch.func.functional_call` with detached copies of the
    parameters, so no ``requires_grad`` flag is toggled (safe under
    ``torch.compile`` and with other users of the guide).
    """
    params = {"guide." + n: p.detach() for n, p in guide.named_parameters()}
    return functional_call(_GuideLogProb(guide), params, (z,))


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

    def rsample_and_stopped_log_prob(
        self, shape: torch.Size | tuple = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized draws and ``log q(z)`` whose gradient reaches only ``z``, not the parameters.

        This is what path-gradient estimators (STL, DReG) need. The generic form
        re-evaluates the density at the draw with detached parameters; families with
        an explicit location-scale map override it with a form that never recomputes
        the noise from ``z`` (see :class:`~vipkg.guides.FullRankNormal`).
        """
        z, _ = self.rsample_and_log_prob(shape)
        return z, stopped_log_prob(self, z)

    def sample_and_log_prob(self, shape: torch.Size | tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws without a path to the parameters, with their (differentiable) log density."""
        q = self()
        z = q.sample(torch.Size(shape))
        return z, q.log_prob(z)

    def log_joint(self, model, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) of the model for draws ``z: [*batch, dim]`` of this guide; shape ``batch``."""
        if z.dim() == 2:
            # Already [n, dim]: no reshapes, whose views and backward nodes every score would pay.
            return model.log_joint_unconstrained(z)
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
