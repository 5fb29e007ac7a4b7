"""Data-parallel fitting on ``torch.distributed``: gloo on CPU, NCCL on GPU.

Each process (rank) holds the same guide and a shard of the data. Its model's log
joint is ``prior + world * local likelihood`` (:func:`shard`), so the mean over
ranks of the per-rank log joints is exactly the full-data log joint, and the mean
over ranks of the per-rank gradient estimates (one all-reduce per step,
:class:`DataParallel`) is the gradient of one process on the full data with the same
draws. Launch with ``torchrun``::

    torchrun --nproc_per_node=2 -m vipkg fit --model logistic_regression --distributed

or from Python, inside every process of an initialized process group::

    result = vipkg.distributed.fit(model, guide, estimator, steps=2000)

or, for a single machine without torchrun, :func:`launch` (spawns the processes).

Seeds. By default every rank uses the same ``seed`` (``particles="shared"``): the
ranks draw the same particles, so a run on ``W`` processes follows the trajectory of
one process on the full data (up to the float rounding of the all-reduce).
``particles="per_rank"`` seeds rank ``r`` with ``seed + r``: the ranks draw
independent particles and the averaged gradient uses ``W`` times as many draws
(lower variance, a different trajectory than one process).

Sharding protocol. A model is shardable when (a) it has a ``shard(rank, world)``
method returning the rank's model, or (b) it names its per-datum data:
``model.per_datum = ("X", "y")`` lists the entries of ``model.data`` whose leading
dimension indexes data points, and its log joint is ``prior + sum over those rows``
(so that zero rows give the prior alone) with global latent sites only: a latent per
data point (a mixture's assignments) would have to be split too, which (b) does not
do. The zoo's regression models are known to follow (b). Everything else gets a
:class:`ShardingError` that says how to fix it.

Layout: :mod:`~vipkg.distributed.group` (process group), :mod:`~vipkg.distributed.sharding`
(data and particle shards), :mod:`~vipkg.distributed.parallel` (the rank-averaging
estimators), :mod:`~vipkg.distributed.fitting` (:func:`fit`) and
:mod:`~vipkg.distributed.launching` (:func:`launch`). The ``vipkg fit`` command lives in
:mod:`vipkg.cli.fit`.

References
----------
.. [1] Li, S. et al. "PyTorch Distributed: Experiences on Accelerating Data Parallel
   Training". VLDB 13 (2020).
.. [2] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
   Bayesian Inference Algorithm". NeurIPS (2016).
"""

from vipkg.distributed.fitting import fit
from vipkg.distributed.group import broadcast_guide, init_process_group
from vipkg.distributed.launching import launch
from vipkg.distributed.parallel import DataParallel, ShardedSVGD
from vipkg.distributed.sharding import ShardingError, shard, shard_particles

__all__ = [
    "ShardingError",
    "shard",
    "shard_particles",
    "DataParallel",
    "ShardedSVGD",
    "broadcast_guide",
    "init_process_group",
    "fit",
    "launch",
]

#: Old home of the ``vipkg fit`` command's pieces, still importable from here (now in vipkg.cli.fit).
_MOVED_TO_CLI = ("fit_command", "estimator_classes", "guide_classes")


def __getattr__(name):
    # Deferred: the CLI imports this package, so it cannot be imported here at module level.
    if name in _MOVED_TO_CLI:
        from vipkg.cli import fit as cli_fit

        return getattr(cli_fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
