"""``vipkg fit``: one model, one guide, one estimator by name; data-parallel with ``--distributed``.

Writes ``summary.json`` and ``posterior.nc``. Under ``torchrun`` with ``--distributed`` every
process fits its share of the data (:mod:`vipkg.distributed`) and rank 0 writes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import warnings
from pathlib import Path

from vipkg._io import atomic_save, atomic_write_bytes, writable_dir
from vipkg.cli._help import HelpFormatter

# torch, the estimators, the zoo and torch.distributed load inside the functions that use them:
# `vipkg --help` and `vipkg fit --help` must not pay their import time (more than a second).

__all__ = ["fit_command", "estimator_classes", "guide_classes", "add_parser", "run"]


def __getattr__(name):
    if name == "fit_one":  # the fitting function, looked up here so that tests can stand in for it
        from vipkg.fit import fit

        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve_model(spec: str, kwargs: dict):
    from vipkg.model import Model
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
    """``--estimator`` choices: every estimator class of the catalogue (lower case), plus ``score``.

    The catalogue (:mod:`vipkg.estimators.catalog`) has a configuration for every estimator
    that :mod:`vipkg.estimators` exports (its tests check that), so new ones are choices too.
    """
    from vipkg.estimators import catalog

    table = {cls.__name__.lower(): cls for cls in catalog.estimator_classes()}
    table["score"] = table["scorefunction"]
    return table


def guide_classes() -> dict:
    """``--guide`` choices: every guide class in ``vipkg.guides.__all__`` plus short names."""
    import vipkg.guides
    from vipkg.guides.base import Guide

    return _by_name(
        vipkg.guides,
        Guide,
        {"meanfield": "meanfieldnormal", "fullrank": "fullranknormal", "lowrank": "lowranknormal"},
    )


#: The draws per group of ``--objective iwae`` and ``renyi:ALPHA`` when no K is given (IWAE's default).
DEFAULT_K = 8
OBJECTIVE_HELP = (
    f"elbo, iwae:K (K draws per group; plain 'iwae' is iwae:{DEFAULT_K}) or renyi:ALPHA[:K] "
    f"(plain 'renyi' is renyi:0.5:{DEFAULT_K})"
)


def _objective(spec: str):
    from vipkg.objectives import ELBO, IWAE, Renyi

    name, _, rest = spec.lower().partition(":")
    args = rest.split(":") if rest else []
    usage = f"use 'elbo', 'iwae:K' (e.g. iwae:{DEFAULT_K}) or 'renyi:ALPHA[:K]' (e.g. renyi:0.5:{DEFAULT_K})."

    def k_of(text):
        try:
            k = int(text)
        except ValueError:
            raise SystemExit(
                f"--objective {spec!r}: K must be a positive integer, got {text!r}; {usage}"
            ) from None
        if k < 1:
            raise SystemExit(f"--objective {spec!r}: K must be a positive integer, got {k}; {usage}")
        return k

    try:
        if name == "elbo" and not args:
            return ELBO()
        if name == "iwae" and len(args) <= 1:
            return IWAE(k_of(args[0]) if args else DEFAULT_K)
        if name == "renyi" and len(args) <= 2:
            alpha = float(args[0]) if args else 0.5
            return Renyi(alpha, k_of(args[1]) if len(args) > 1 else DEFAULT_K)
    except ValueError as err:
        raise SystemExit(f"--objective {spec!r}: {err}") from None
    raise SystemExit(f"--objective {spec!r}: {usage}")


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
    overwrite: bool = False,
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
    ``distributed``). ``out`` is created and checked writable before anything is fitted.
    """
    import torch.distributed as dist

    from vipkg.distributed import fit as distributed_fit
    from vipkg.distributed import init_process_group
    from vipkg.distributed.group import _rank_world

    fit_one = globals().get("fit_one") or __getattr__("fit_one")
    estimators, guides = estimator_classes(), guide_classes()
    if estimator.lower() not in estimators:
        raise SystemExit(f"--estimator {estimator!r}: choose one of {sorted(estimators)}.")
    if guide.lower() not in guides:
        raise SystemExit(f"--guide {guide!r}: choose one of {sorted(guides)}.")
    if out is not None and (not distributed or int(os.environ.get("RANK", "0")) == 0):
        # Before any fitting: an output path that cannot be written must not cost the whole fit.
        writable_dir(out, "--out directory")
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
        overwrite=overwrite,
        progress=progress,
    )
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
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
        result = distributed_fit(m, g, est, particles=particles, device=device, **settings)
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


def add_parser(sub) -> None:
    """The ``fit`` subcommand's arguments."""
    f = sub.add_parser(
        "fit",
        help="fit one model with one guide and estimator; summary JSON and ArviZ netCDF",
        description="Fit one model. Data-parallel under torchrun with --distributed "
        "(torchrun --nproc_per_node=N -m vipkg fit ... --distributed).",
        formatter_class=HelpFormatter,
    )
    f.add_argument(
        "--model", required=True, help="zoo name (vipkg models) or module:function returning a Model"
    )
    f.add_argument(
        "--model-kwargs", default="{}", help='JSON keyword arguments, e.g. \'{"dataset": "synthetic"}\''
    )
    f.add_argument(
        "--guide", default="meanfield", help="meanfield, fullrank, lowrank or a vipkg.guides class"
    )
    f.add_argument("--guide-kwargs", default="{}", help="JSON, e.g. '{\"rank\": 3}' for lowrank")
    f.add_argument("--estimator", default="reparam", help="a vipkg.estimators class name, any case")
    f.add_argument(
        "--estimator-kwargs",
        default="{}",
        help='JSON, e.g. \'{"hessian": "stein"}\' for fbgvi (its step comes from the target unless '
        "step_size is given)",
    )
    f.add_argument("--objective", default="elbo", help=OBJECTIVE_HELP + "; default: elbo")
    f.add_argument("--steps", type=int, default=1000, help="optimisation steps")
    f.add_argument("--num-particles", type=int, default=16, help="draws (groups of draws) per step")
    f.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    f.add_argument("--seed", type=int, default=0, help="seed of the fit's draws")
    f.add_argument(
        "--device",
        default=None,
        help="cpu, cuda (cuda:LOCAL_RANK under --distributed); default: the guide's device",
    )
    f.add_argument("--compile", action="store_true", help="torch.compile the whole step (default: eager)")
    f.add_argument(
        "--checkpoint", default=None, help="checkpoint file (ranks > 0 write .rankN siblings); default: none"
    )
    f.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    f.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint when it exists (default: refuse an existing one)",
    )
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even though --checkpoint exists (replaces it; default: refuse)",
    )
    f.add_argument(
        "--out", default=None, help="directory for summary.json and posterior.nc; default: write nothing"
    )
    f.add_argument("--draws", type=int, default=1000, help="guide draws in posterior.nc")
    f.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over a torchrun process group (default: one process)",
    )
    f.add_argument(
        "--particles",
        default="shared",
        choices=["shared", "per_rank"],
        help="with --distributed: same draws on every rank (= one process) or seed + rank",
    )
    f.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)"
    )


def run(parser, args) -> int:
    """``vipkg fit``: check the arguments, fit, report on rank 0."""
    kwargs = {}
    for flag in ("model_kwargs", "guide_kwargs", "estimator_kwargs"):
        try:
            kwargs[flag] = json.loads(getattr(args, flag))
        except json.JSONDecodeError as err:
            parser.error(f"--{flag.replace('_', '-')} must be a JSON object: {err}")
        if not isinstance(kwargs[flag], dict):
            parser.error(f"--{flag.replace('_', '-')} must be a JSON object, got {getattr(args, flag)!r}")
    if args.steps < 1 or args.num_particles < 1 or args.lr <= 0 or args.draws < 1:
        parser.error("--steps, --num-particles, --draws and --lr must be positive")
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint FILE")
    if args.overwrite and args.checkpoint is None:
        parser.error("--overwrite needs --checkpoint FILE")
    if args.overwrite and args.resume:
        parser.error("--resume continues --checkpoint and --overwrite replaces it; pass one")
    summary = fit_command(
        model=args.model,
        guide=args.guide,
        estimator=args.estimator,
        objective=args.objective,
        steps=args.steps,
        num_particles=args.num_particles,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        overwrite=args.overwrite,
        out=args.out,
        draws=args.draws,
        distributed=args.distributed,
        particles=args.particles,
        progress=False if args.no_progress else None,
        **kwargs,
    )
    if summary.get("rank", 0) == 0:  # one report under torchrun
        if args.out is not None:
            print(f"wrote {Path(args.out) / 'summary.json'}, {Path(args.out) / 'posterior.nc'}")
        print(
            f"{summary['model']}: {summary['estimator']} on {summary['guide']}, {summary['steps']} steps "
            f"on {summary['world_size']} process(es): loss {summary['first_loss']:.4g} -> "
            f"{summary['final_loss']:.4g}, {summary['ms_per_step']:.3f} ms/step"
        )
    return 0
