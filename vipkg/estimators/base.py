"""The estimator protocol shared by every gradient estimator."""

from __future__ import annotations

import abc
import dataclasses

import torch

__all__ = ["Estimator", "StepInfo", "IncompatibleEstimatorError"]


class IncompatibleEstimatorError(TypeError):
    """An estimator was paired with a guide or objective it cannot handle."""


@dataclasses.dataclass
class StepInfo:
    """What one estimate produced; every tensor is detached and stays on its device.

    Attributes
    ----------
    loss : Tensor
        Scalar, minus the bound estimate, in nats.
    log_weights : Tensor
        ``[S, K]`` log p(x, z) - log q(z) of the draws used.
    extras : dict
        Per-particle terms an estimator finds cheap to report.
    """

    loss: torch.Tensor
    log_weights: torch.Tensor
    extras: dict = dataclasses.field(default_factory=dict)


class Estimator(abc.ABC):
    """A gradient estimator: fills ``.grad`` of a guide's parameters.

    Subclasses implement :meth:`estimate`; :meth:`check` raises
    :class:`IncompatibleEstimatorError` saying what would fit. Nothing in a
    step reads a tensor's value on the host.
    """

    def check(self, model, guide, objective) -> None:
        """Raise :class:`IncompatibleEstimatorError` when this estimator cannot serve the triple."""

    def check_particles(self, num_particles: int) -> None:
        """Raise ``ValueError`` when ``num_particles`` is too few for this estimator (e.g. a
        leave-one-out baseline needs two); every count is fine by default."""

    @abc.abstractmethod
    def estimate(self, model, guide, objective, num_particles: int) -> StepInfo:
        """Write a gradient estimate of the loss into ``.grad``; no optimizer step."""

    def step(self, model, guide, objective, num_particles: int, optimizer) -> StepInfo:
        """One optimisation step: :meth:`estimate` (which replaces ``.grad``), then ``optimizer.step()``."""
        info = self.estimate(model, guide, objective, num_particles)
        optimizer.step()
        return info

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.name + "()"

    def state_dict(self) -> dict:
        """Estimator state to checkpoint (running averages, step sizes); empty by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def surrogate_backward(guide, loss: torch.Tensor, surrogate: torch.Tensor | None = None) -> None:
    """Backpropagate ``surrogate`` (default ``loss``) into the guide's ``.grad``, replacing it.

    The guide's gradients are reset first so that :meth:`Estimator.estimate`
    always leaves exactly one estimate behind, whatever was there before.
    """
    for p in guide.parameters():
        p.grad = None
    (loss if surrogate is None else surrogate).backward()
