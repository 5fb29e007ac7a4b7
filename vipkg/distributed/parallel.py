"""Estimators that average over ranks: :class:`DataParallel` (one all-reduce of the gradient per
step) and :class:`ShardedSVGD` (the particles split over the ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vipkg.distributed.group import _comm_device, _rank_world
from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo

__all__ = ["DataParallel", "ShardedSVGD"]


class DataParallel(Estimator):
    """Average an estimator's gradient (and loss) over the ranks before the optimizer step.

    One all-reduce per step of a flat buffer holding every ``.grad`` and the loss.
    Works for every estimator that fills ``.grad`` and leaves the update to the
    optimizer (Reparam, ScoreFunction, RSVI, SVGD, ...); estimators that own their
    update (FBGVI, BWSGD) are refused in :meth:`check`.

    Parameters
    ----------
    estimator : Estimator
    group : ProcessGroup, optional
        Default the world.

    Notes
    -----
    ``StepInfo.loss`` is the mean over ranks (the full-data loss for sharded models);
    ``log_weights`` stay the rank's own.

    References
    ----------
    .. [1] Li, S. et al. "PyTorch Distributed: Experiences on Accelerating Data Parallel
       Training". VLDB 13 (2020).
    """

    def __init__(self, estimator: Estimator, *, group=None):
        if not isinstance(estimator, Estimator):
            raise ValueError(f"DataParallel wraps a vipkg Estimator, got {estimator!r}.")
        self.estimator, self.group = estimator, group

    @property
    def name(self) -> str:
        return self.estimator.name

    def __repr__(self) -> str:
        # Same identity as the wrapped estimator, so checkpoints match across world sizes.
        return repr(self.estimator)

    def check(self, model, guide, objective) -> None:
        self.estimator.check(model, guide, objective)
        if type(self.estimator).step is not Estimator.step:
            raise IncompatibleEstimatorError(
                f"{self.estimator.name} owns its update (it does not go through the optimizer), so "
                "data-parallel fitting cannot average its gradients. Use an estimator that fills .grad "
                "(Reparam, ScoreFunction, RSVI, SVGD) or fit on one process."
            )

    def estimate(self, model, guide, objective, num_particles: int) -> StepInfo:
        info = self.estimator.estimate(model, guide, objective, num_particles)
        # The model's own parameters (variational EM) are averaged like the guide's.
        grads = [p.grad for p in (*guide.parameters(), *model.parameters()) if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [info.loss.reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat = flat / dist.get_world_size(self.group)
        for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        return StepInfo(loss=flat[-1], log_weights=info.log_weights, extras=info.extras)

    @property
    def trains_model_params(self) -> bool:
        return self.estimator.trains_model_params

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)


class ShardedSVGD(Estimator):
    """SVGD with the particles split over the ranks (each rank moves its own block).

    Each rank computes the scores of its particles (on the data its model holds), all
    ranks all-gather ``(particles, scores)`` and each evaluates the Stein direction
    :func:`vipkg.estimators.stein.svgd_direction` at its own particles (``at=``). The
    result equals single-process SVGD on all the particles; the kernel cost per rank
    drops from ``n^2`` to ``n^2 / world``. Use with :func:`shard_particles` and an
    unsharded model (every rank needs full-data scores).

    Parameters
    ----------
    kernel : Kernel, optional
        Default ``RBF()`` (median bandwidth over all the particles).
    group : ProcessGroup, optional
    chunk_size : int, optional

    References
    ----------
    .. [1] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
       Bayesian Inference Algorithm". NeurIPS (2016).
    """

    def __init__(self, kernel=None, *, group=None, chunk_size: int | None = None):
        from vipkg.estimators.stein import RBF, Kernel

        kernel = RBF() if kernel is None else kernel
        if not isinstance(kernel, Kernel):
            raise ValueError(f"kernel must be a vipkg.estimators.stein kernel such as RBF(), got {kernel!r}.")
        self.kernel, self.group, self.chunk_size = kernel, group, chunk_size

    def __repr__(self) -> str:
        return f"ShardedSVGD(kernel={self.kernel!r})"

    def check(self, model, guide, objective) -> None:
        from vipkg.estimators.stein import SVGD

        SVGD(self.kernel).check(model, guide, objective)
        _, world = _rank_world(self.group)
        n = torch.tensor([guide.particles.shape[0]])
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n.to(_comm_device(self.group)), group=self.group)
        if len({int(s) for s in sizes}) != 1:
            raise IncompatibleEstimatorError(
                "ShardedSVGD needs the same number of particles on every rank, got "
                f"{[int(s) for s in sizes]}; split them with vipkg.distributed.shard_particles."
            )

    def estimate(self, model, guide, objective, num_particles: int) -> StepInfo:
        from vipkg.estimators.stein import svgd_direction

        world = dist.get_world_size(self.group)
        p = guide.particles
        x = p.detach().requires_grad_(True)
        with torch.enable_grad():
            log_p = guide.log_joint(model, x)
            (score,) = torch.autograd.grad(log_p.sum(), x)
        both = torch.cat([x.detach(), score], dim=-1)
        gathered = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(gathered, both, group=self.group)
        everything = torch.cat(gathered, 0)
        d = x.shape[-1]
        phi = svgd_direction(
            everything[:, :d], everything[:, d:], self.kernel, at=x.detach(), chunk_size=self.chunk_size
        )
        p.grad = -phi
        loss = -log_p.detach().mean()
        dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=self.group)
        return StepInfo(loss=loss / world, log_weights=log_p.detach()[:, None])
