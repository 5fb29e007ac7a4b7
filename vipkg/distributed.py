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

References
----------
.. [1] Li, S. et al. "PyTorch Distributed: Experiences on Accelerating Data Parallel
   Training". VLDB 13 (2020).
.. [2] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
   Bayesian Inference Algorithm". NeurIPS (2016).
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo
from vipkg.model import Model, ModelError

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
    "fit_command",
]


class ShardingError(ModelError):
    """A model cannot be split by data points across ranks."""


def _rank_world(group=None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vipkg.distributed needs an initialized process group: run under torchrun "
            "(`torchrun --nproc_per_node=N -m vipkg fit ... --distributed`), call "
            "vipkg.distributed.init_process_group() in every process, or use vipkg.distributed.launch()."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _per_datum_keys(model) -> tuple[str, ...] | None:
    keys = getattr(model, "per_datum", None)
    if keys:
        return tuple(keys)
    if model.pyro_model is not None and not model.data:
        return None  # a Pyro front-end keeps its data in the program's arguments
    return None


def shard(model: Model, rank: int, world: int) -> Model:
    """The model of rank ``rank`` out of ``world``: ``prior + world * likelihood of its rows``.

    Rows are split into ``world`` contiguous blocks whose sizes differ by at most one.
    Averaged over the ranks, the sharded log joints equal the full log joint exactly,
    whatever the block sizes; each rank's log joint alone is the full-data log joint's
    estimate from its block (the minibatch convention, with scale ``world``).

    Parameters
    ----------
    model : Model
        Implements ``shard(rank, world)`` or names ``per_datum`` data (see the module
        docstring).
    rank, world : int

    Returns
    -------
    Model
        Data sliced to the rank's rows; ``pointwise_log_likelihood`` and ``observed`` are
        those of its rows; it has no Pyro twin.

    Raises
    ------
    ShardingError
        When the model does not say how to split its data, or has fewer rows than ranks.
    """
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}.")
    method = getattr(model, "shard", None)
    if callable(method):
        return method(rank, world)
    keys = _per_datum_keys(model)
    if keys is None:
        raise ShardingError(
            f"model {model.name!r} does not say how to split its data across ranks. Set "
            "`model.per_datum = (<data keys whose first dimension indexes data points>)` when its "
            "log joint is prior + a sum over those rows, or give it a `shard(rank, world)` method; "
            "or fit it without data sharding (vipkg.distributed.fit(..., shard_data=False))."
        )
    missing = [k for k in keys if k not in model.data]
    if missing:
        raise ShardingError(
            f"model {model.name!r}: per_datum names {missing}, which are not in model.data "
            f"(it has {sorted(model.data)})."
        )
    sizes = {k: model.data[k].shape[0] if model.data[k].dim() else None for k in keys}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ShardingError(
            f"model {model.name!r}: the per-datum entries must share their leading dimension, got {sizes}."
        )
    n = next(iter(sizes.values()))
    if n < world:
        raise ShardingError(f"model {model.name!r} has {n} data points, fewer than the {world} ranks.")
    if world == 1:
        return model
    lo, hi = rank * n // world, (rank + 1) * n // world
    local = {k: (v[lo:hi] if k in keys else v) for k, v in model.data.items()}
    fn, w = model._fn, float(world)

    def log_joint(latents, data):
        # The prior is the log joint of zero rows (the protocol's requirement), so
        # w * local - (w - 1) * prior = prior + w * local likelihood.
        empty = {k: (v[:0] if k in keys else v) for k, v in data.items()}
        return w * fn(latents, data) - (w - 1.0) * fn(latents, empty)

    terms = {}
    terms_fn = getattr(model, "_terms_fn", None)
    if terms_fn is not None:

        def log_joint_terms(latents, data):
            # The same identity per term; a per-datum term of zero rows is empty and sums to 0.
            empty = {k: (v[:0] if k in keys else v) for k, v in data.items()}
            full, none = terms_fn(latents, data), terms_fn(latents, empty)
            return {
                t: w * v - (w - 1.0) * none[t] if none[t].shape == v.shape else w * v for t, v in full.items()
            }

        terms = {"log_joint_terms": log_joint_terms, "term_sites": model.term_sites}
    observed = {k: (v[lo:hi] if k in keys else v) for k, v in model.observed.items()}
    new = Model(
        model.sites,
        log_joint,
        data=local,
        name=f"{model.name}[shard {rank}/{world}]",
        reference=model.reference,
        pointwise_log_likelihood=model.pointwise_log_likelihood_fn,
        observed=observed,
        **terms,
    )
    new.per_datum = keys
    return new


def shard_particles(model, guide, rank: int, world: int):
    """Rank ``rank``'s block of a :class:`~vipkg.guides.particles.Particles` guide (contiguous rows).

    Every rank must get the same number of particles (the all-gather of
    :class:`ShardedSVGD` needs equal blocks): ``n`` must be a multiple of ``world``.
    """
    from vipkg.guides.particles import Particles

    if not isinstance(guide, Particles) or guide.mirror is not None:
        raise ValueError(
            f"shard_particles needs a Particles guide without a mirror map, got {type(guide).__name__}."
        )
    x = guide.particles.detach()
    n = x.shape[0]
    if n % world:
        raise ValueError(f"{n} particles do not split evenly over {world} ranks; use a multiple of {world}.")
    return Particles(model, particles=x[rank * n // world : (rank + 1) * n // world], dtype=x.dtype)


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
        grads = [p.grad for p in guide.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [info.loss.reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat = flat / dist.get_world_size(self.group)
        for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        return StepInfo(loss=flat[-1], log_weights=info.log_weights, extras=info.extras)

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


def _comm_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_guide(guide, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s guide parameters and buffers to every rank (in place)."""
    for t in list(guide.parameters()) + list(guide.buffers()):
        dist.broadcast(t.data, src=src, group=group)


def init_process_group(device=None, *, backend: str | None = None, **kwargs) -> torch.device:
    """Join the process group that torchrun (or the ``MASTER_ADDR`` / ``RANK`` ... variables) describes.

    The backend is NCCL when ``device`` is CUDA and gloo otherwise. A CUDA device
    becomes ``cuda:LOCAL_RANK``. Returns the device this rank should fit on; a no-op
    when the group is already initialized.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing and "init_method" not in kwargs:
            raise RuntimeError(
                f"cannot join a process group: environment variable(s) {missing} are not set. "
                "Launch with `torchrun --nproc_per_node=N -m vipkg fit ... --distributed` or use "
                "vipkg.distributed.launch()."
            )
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), **kwargs)
    return device


def _rank_path(path, rank: int) -> str:
    if rank == 0:
        return str(path)
    p = Path(path)
    return str(p.with_name(f"{p.stem}.rank{rank}{p.suffix}"))


def _check_resume_steps(checkpoint, rank, world, group) -> None:
    """All ranks must resume from the same step, or their collectives would not pair up."""
    from vipkg.checkpoint import CheckpointError, load_checkpoint

    step = int(load_checkpoint(checkpoint)["step"]) if os.path.exists(checkpoint) else -1
    steps = [None] * world
    dist.all_gather_object(steps, step, group=group)
    if len(set(steps)) != 1:
        raise CheckpointError(
            f"the ranks' checkpoints are at different steps {steps} (-1: missing), so they cannot resume "
            f"together; a run was probably killed between writes. Delete {str(checkpoint)!r} and its "
            ".rankN siblings to start afresh."
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
        broadcast_guide(guide, 0, group)
    wrapped = (
        estimator
        if isinstance(estimator, (DataParallel, ShardedSVGD))
        else DataParallel(estimator, group=group)
    )
    ckpt = None if checkpoint is None else _rank_path(checkpoint, rank)
    if resume and ckpt is not None:
        _check_resume_steps(ckpt, rank, world, group)
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


# ------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world, port, backend, threads, args, queue):
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors: the worker exits before the read
        queue.put((rank, buf.getvalue(), None))
    except BaseException as err:
        queue.put((rank, None, f"{type(err).__name__}: {err}"))
        raise
    finally:
        dist.destroy_process_group()


def launch(
    fn, world_size: int, *args, backend: str = "gloo", threads: int = 1, timeout: float = 300.0
) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by a process group.

    For one machine without torchrun (tests, notebooks, benchmarks). ``fn`` must be
    importable (a module-level function); its return values (tensors, numbers, dicts)
    come back as a list indexed by rank. ``threads`` sets ``torch.set_num_threads`` in
    each process, so that ``world_size`` processes do not oversubscribe the cores.
    """
    import torch.multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, fn, world_size, port, backend, threads, args, queue), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    import time

    deadline = time.monotonic() + timeout
    received = 0
    while received < world_size:
        if not queue.empty():
            rank, payload, err = queue.get()
            received += 1
            if err is not None:
                errors.append(f"rank {rank}: {err}")
                break
            else:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            continue
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if (dead and queue.empty()) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if errors or received < world_size:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        codes = [p.exitcode for p in procs]
        raise RuntimeError(
            f"vipkg.distributed.launch: {'; '.join(errors) or 'a process died without a result'} "
            f"(exit codes {codes})."
        )
    for p in procs:
        p.join(timeout)
    return results


# ------------------------------------------------------------------ `vipkg fit`
def _resolve_model(spec: str, kwargs: dict):
    import importlib

    from vipkg.models import ZOO

    if spec in ZOO:
        fn = ZOO[spec]
    elif ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise SystemExit(
                f"--model {spec!r}: cannot load {attr!r} from module {module!r} ({err})."
            ) from None
    else:
        raise SystemExit(f"--model {spec!r} is neither a zoo model ({sorted(ZOO)}) nor 'module:function'.")
    if not callable(fn):
        raise SystemExit(f"--model {spec!r} is not callable; name a function that returns a vipkg.Model.")
    try:
        model = fn(**kwargs)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--model {spec!r} with --model-kwargs {kwargs}: {err}") from None
    if not isinstance(model, Model):
        raise SystemExit(f"--model {spec!r} returned {type(model).__name__}, not a vipkg.Model.")
    return model


def _by_name(module, base, aliases: dict) -> dict:
    """Lower-case name -> class for every concrete subclass of ``base`` that ``module`` exports."""
    import inspect

    table = {}
    for name in module.__all__:
        obj = getattr(module, name, None)
        if inspect.isclass(obj) and issubclass(obj, base) and not inspect.isabstract(obj) and obj is not base:
            table[name.lower()] = obj
    for alias, target in aliases.items():
        if target in table:
            table[alias] = table[target]
    return table


def estimator_classes() -> dict:
    """``--estimator`` choices: every estimator class in ``vipkg.estimators.__all__`` (lower case)."""
    import vipkg.estimators as est

    return _by_name(est, Estimator, {"score": "scorefunction"})


def guide_classes() -> dict:
    """``--guide`` choices: every guide class in ``vipkg.guides.__all__`` plus short names."""
    import vipkg.guides as guides
    from vipkg.guides.base import Guide

    return _by_name(
        guides,
        Guide,
        {"meanfield": "meanfieldnormal", "fullrank": "fullranknormal", "lowrank": "lowranknormal"},
    )


def _objective(spec: str):
    from vipkg.objectives import ELBO, IWAE, Renyi

    name, _, arg = spec.lower().partition(":")
    try:
        if name == "elbo" and not arg:
            return ELBO()
        if name == "iwae":
            return IWAE(int(arg or 8))
        if name == "renyi":
            return Renyi(float(arg or 0.5))
    except ValueError as err:
        raise SystemExit(f"--objective {spec!r}: {err}") from None
    raise SystemExit(f"--objective {spec!r}: use 'elbo', 'iwae:K' (e.g. iwae:8) or 'renyi:ALPHA'.")


def fit_command(
    *,
    model: str,
    model_kwargs: dict | None = None,
    guide: str = "meanfield",
    guide_kwargs: dict | None = None,
    estimator: str = "reparam",
    estimator_kwargs: dict | None = None,
    objective: str = "elbo",
    steps: int = 1000,
    num_particles: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    device: str | None = None,
    compile: bool = False,
    checkpoint: str | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    out: str | os.PathLike | None = None,
    distributed: bool = False,
    particles: str = "shared",
    draws: int = 1000,
    progress: bool | None = None,
) -> dict:
    """What ``vipkg fit`` does: build the triple by name, fit (data-parallel with ``distributed``), write.

    Writes ``summary.json`` (settings, losses, posterior means and standard deviations
    per site) and ``posterior.nc`` (ArviZ netCDF of ``draws`` guide draws) into ``out``;
    under ``distributed`` only rank 0 writes. Returns the summary (with ``"rank"`` under
    ``distributed``).
    """
    from vipkg.fit import fit as fit_one

    estimators, guides = estimator_classes(), guide_classes()
    if estimator.lower() not in estimators:
        raise SystemExit(f"--estimator {estimator!r}: choose one of {sorted(estimators)}.")
    if guide.lower() not in guides:
        raise SystemExit(f"--guide {guide!r}: choose one of {sorted(guides)}.")
    m = _resolve_model(model, model_kwargs or {})
    try:
        g = guides[guide.lower()](m, **(guide_kwargs or {}))
        est = estimators[estimator.lower()](**(estimator_kwargs or {}))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"cannot build guide {guide!r} / estimator {estimator!r}: {err}") from None
    settings = dict(
        objective=_objective(objective),
        steps=steps,
        num_particles=num_particles,
        lr=lr,
        seed=seed,
        compile=compile,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
    )
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import warnings

        warnings.warn(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun?) but --distributed was not given: every "
            "process fits the whole data set on its own. Add --distributed to split the data.",
            RuntimeWarning,
            stacklevel=2,
        )
    if not distributed:
        result = fit_one(m, g, est, device=device, **settings)
        return _summarize(result, settings, world=1, particles=None, out=out, draws=draws)
    owns_group = not dist.is_initialized()
    device = init_process_group(device)
    try:
        result = fit(m, g, est, particles=particles, device=device, **settings)
        rank, world = _rank_world()
        summary = _summarize(
            result, settings, world=world, particles=particles, out=out if rank == 0 else None, draws=draws
        )
        return {**summary, "rank": rank}
    finally:
        if owns_group:
            dist.destroy_process_group()


def _summarize(result, settings: dict, *, world, particles, out, draws) -> dict:
    """The summary dict; with ``out``, also ``summary.json`` and ``posterior.nc`` written there."""
    import json
    import warnings

    from vipkg._io import atomic_save, atomic_write_bytes

    losses = result.losses.double()
    steps = losses.shape[0]
    summary = {
        "model": result.model.name,
        "guide": type(result.guide).__name__,
        "estimator": repr(result.estimator),
        "objective": repr(settings["objective"]),
        **{k: settings[k] for k in ("steps", "num_particles", "lr", "seed", "compile")},
        "device": str(result.guide.device),
        "world_size": world,
        "particles": particles,
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-max(1, steps // 10) :].mean()),  # mean of the last 10%
        "elapsed_s": result.elapsed,
        "ms_per_step": result.ms_per_step,
        "skipped_steps": result.skipped_steps,
    }
    if out is None:
        return summary
    out = Path(out)
    idata = result.to_arviz(draws, seed=settings["seed"])
    post = {}
    for site, da in idata.posterior.data_vars.items():
        v = da.values.reshape(-1, *da.shape[2:])
        post[site] = {"mean": v.mean(0).tolist(), "sd": v.std(0).tolist()}
    summary["posterior"] = post
    # json writes non-finite floats as NaN / Infinity, which Python's json reads back.
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # netCDF4 / xarray chatter about encodings
        atomic_save(out / "posterior.nc", lambda p: idata.to_netcdf(p))
    return summary
