"""``vipkg.distributed.fit``: :func:`vipkg.fit` on every rank of a process group, data-parallel."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from vipkg.distributed.group import _rank_world, broadcast_guide
from vipkg.distributed.parallel import DataParallel, ShardedSVGD
from vipkg.distributed.sharding import shard

__all__ = ["fit"]


def _rank_path(path, rank: int) -> str:
    if rank == 0:
        return str(path)
    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))


def _check_checkpoints(checkpoint, resume, overwrite, world, group) -> None:
    """Every rank's checkpoint must be usable before any rank starts: a rank that refused its own
    (it exists and this is a fresh fit; it is damaged) while the others went on would leave them
    waiting in their first collective. With ``resume``, all ranks must resume from the same step,
    or their collectives would not pair up."""
    from vipkg.checkpoint import CheckpointError, check_target, load_checkpoint

    step, error = -1, None
    try:
        check_target(checkpoint, resume, overwrite)
        if resume and os.path.exists(checkpoint):
            step = int(load_checkpoint(checkpoint)["step"])
    except (CheckpointError, OSError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"
    reports = [None] * world
    dist.all_gather_object(reports, (step, error), group=group)
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(reports) if e is not None]
    if errors:
        raise CheckpointError("; ".join(errors))
    if not resume:
        return
    steps = [s for s, _ in reports]
    if len(set(steps)) != 1:
        raise CheckpointError(
            f"the ranks' checkpoints are at different steps {steps} (-1: missing), so they cannot resume "
            f"together; a run was probably killed between writes. Pass overwrite=True to start afresh "
            f"(replacing {str(checkpoint)!r} and its .rankN siblings)."
        )


def fit(
    model,
    guide,
    estimator,
    *,
    shard_data: bool = True,
    particles: str = "shared",
    group=None,
    seed: int = 0,
    device=None,
    checkpoint=None,
    resume: bool = False,
    progress: bool | None = None,
    **kwargs,
):
    """:func:`vipkg.fit` on every rank of a process group, data-parallel.

    Call it in every process with the same arguments (same full model, same guide
    construction). It shards the data (:func:`shard`), broadcasts rank 0's guide,
    wraps the estimator in :class:`DataParallel` and fits.

    Parameters
    ----------
    model, guide, estimator
        As for :func:`vipkg.fit`; ``model`` is the full-data model.
    shard_data : bool
        Split the data over the ranks (default). ``False`` keeps the full data on every
        rank (then only ``particles="per_rank"`` gains anything).
    particles : {"shared", "per_rank"}
        ``"shared"``: every rank uses ``seed`` and the fit equals one process on the full
        data. ``"per_rank"``: rank ``r`` uses ``seed + r`` (independent draws, ``world``
        times as many per step).
    seed, device, checkpoint, resume, progress, **kwargs
        As for :func:`vipkg.fit`; ``device="cuda"`` means ``cuda:LOCAL_RANK``. Rank 0
        checkpoints to ``checkpoint``, rank ``r`` to ``<stem>.rank<r><suffix>`` beside it;
        only rank 0 shows a progress bar.

    Returns
    -------
    FitResult
        With ``model`` the full-data model and ``estimator`` the one passed in; the
        losses are the full-data losses (averaged over ranks).

    References
    ----------
    .. [1] Li, S. et al. "PyTorch Distributed: Experiences on Accelerating Data Parallel
       Training". VLDB 13 (2020).
    """
    from vipkg.fit import fit as _fit

    rank, world = _rank_world(group)
    if particles not in ("shared", "per_rank"):
        raise ValueError(f"particles must be 'shared' or 'per_rank', got {particles!r}.")
    split_particles = isinstance(estimator, ShardedSVGD)
    if split_particles and shard_data:
        raise ValueError(
            "ShardedSVGD splits the particles, so every rank needs the full data for their scores: "
            "pass shard_data=False (and each rank's block from shard_particles as the guide)."
        )
    local = shard(model, rank, world) if shard_data else model
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # one GPU per rank
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        guide.to(device)
    if not split_particles:  # each rank's block of particles is its own
        broadcast_guide(guide, 0, group, model=model)
    wrapped = (
        estimator
        if isinstance(estimator, (DataParallel, ShardedSVGD))
        else DataParallel(estimator, group=group)
    )
    ckpt = None if checkpoint is None else _rank_path(checkpoint, rank)
    if ckpt is not None:
        _check_checkpoints(ckpt, resume, kwargs.get("overwrite", False), world, group)
    result = _fit(
        local,
        guide,
        wrapped,
        seed=seed if particles == "shared" else seed + rank,
        checkpoint=ckpt,
        resume=resume,
        progress=progress if rank == 0 else False,
        **kwargs,
    )
    full = model.to(device=guide.device, dtype=guide.dtype)
    return dataclasses.replace(result, model=full, estimator=estimator)
