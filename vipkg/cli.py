"""The ``vipkg`` command: ``vipkg compare`` fits one model with every estimator and reports."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from vipkg._io import atomic_save, atomic_write_bytes
from vipkg._rng import seeded

__all__ = ["main", "compare", "Config"]


@dataclasses.dataclass(frozen=True)
class Config:
    """One line of the comparison: a guide family, an estimator and an objective.

    ``lr`` overrides the comparison's learning rate for this line (estimators that
    own their update, such as FB-GVI, ignore it). A line whose guide or estimator
    does not fit the model is skipped and reported with the reason.
    """

    label: str
    guide: Callable
    estimator: Callable
    objective: Callable
    lr: float | None = None


def _configs():
    import vipkg
    from vipkg.estimators import (
        BWSGD,
        FBGVI,
        RSVI,
        STL,
        SVGD,
        DReG,
        FastPath,
        GumbelSoftmax,
        LeaveOneOut,
        OptimalScaling,
        ScoreFunction,
    )
    from vipkg.guides import (
        Beta,
        Composite,
        Dirichlet,
        Flow,
        FullRankNormal,
        Gamma,
        LowRankNormal,
        MeanFieldNormal,
        Particles,
        PerSite,
    )

    def rsvi1():
        return RSVI(boost=1)

    def iwae8():
        return vipkg.IWAE(8)

    def realnvp(model):
        return Flow.real_nvp(model, layers=4, hidden=32)

    return [
        Config("reparam-meanfield-elbo", MeanFieldNormal, vipkg.Reparam, vipkg.ELBO),
        Config("reparam-fullrank-elbo", FullRankNormal, vipkg.Reparam, vipkg.ELBO),
        Config("reparam-lowrank2-elbo", lambda m: LowRankNormal(m, rank=2), vipkg.Reparam, vipkg.ELBO),
        Config("reparam-meanfield-iwae8", MeanFieldNormal, vipkg.Reparam, iwae8),
        Config("reparam-fullrank-iwae8", FullRankNormal, vipkg.Reparam, iwae8),
        Config("stl-meanfield-elbo", MeanFieldNormal, STL, vipkg.ELBO),
        Config("stl-fullrank-elbo", FullRankNormal, STL, vipkg.ELBO),
        Config("dreg-fullrank-iwae8", FullRankNormal, DReG, iwae8),
        Config("reparam-realnvp4-elbo", realnvp, vipkg.Reparam, vipkg.ELBO),
        Config("fastpath-realnvp4-elbo", realnvp, FastPath, vipkg.ELBO),
        Config("score-meanfield-elbo", MeanFieldNormal, ScoreFunction, vipkg.ELBO),
        Config("score-loo-meanfield-elbo", MeanFieldNormal, lambda: ScoreFunction(LeaveOneOut()), vipkg.ELBO),
        Config(
            "score-optscale-meanfield-elbo",
            MeanFieldNormal,
            lambda: ScoreFunction(OptimalScaling(), rao_blackwellize=False),
            vipkg.ELBO,
        ),
        # Bures-Wasserstein steps own their update; eta ~ 0.5 / L near the breast-cancer MAP.
        Config("fbgvi-elbo", FullRankNormal, lambda: FBGVI(0.005), vipkg.ELBO),
        Config("fbgvi-stein-elbo", FullRankNormal, lambda: FBGVI(0.005, hessian="stein"), vipkg.ELBO),
        Config("bwsgd-elbo", FullRankNormal, lambda: BWSGD(0.005), vipkg.ELBO),
        # Gamma / Beta / Dirichlet families over the named constrained sites.
        Config("rsvi1-gamma-elbo", Gamma, rsvi1, vipkg.ELBO),
        Config("rsvi1-beta-elbo", Beta, rsvi1, vipkg.ELBO),
        Config("rsvi1-dirichlet-elbo", Dirichlet, rsvi1, vipkg.ELBO),
        Config("rsvi1-dirichlet-iwae8", Dirichlet, rsvi1, iwae8),
        Config("implicit-gamma-elbo", Gamma, vipkg.Reparam, vipkg.ELBO),
        Config("implicit-dirichlet-elbo", Dirichlet, vipkg.Reparam, vipkg.ELBO),
        Config("score-gamma-elbo", Gamma, ScoreFunction, vipkg.ELBO),
        Config("score-dirichlet-elbo", Dirichlet, ScoreFunction, vipkg.ELBO),
        # Discrete sites: a score-function or Gumbel-softmax part next to Reparam parts.
        Config("persite-reparam+score-loo-elbo", Composite.auto, PerSite, vipkg.ELBO, lr=0.05),
        Config(
            "persite-reparam+gumbel-elbo",
            lambda m: Composite.auto(m, discrete_estimator=lambda: GumbelSoftmax(0.5, hard=True)),
            PerSite,
            vipkg.ELBO,
            lr=0.05,
        ),
        # 100 particles moved by SVGD: no density, so the loss and k-hat columns are nan.
        Config("svgd-particles100", lambda m: Particles(m, n=100, init_scale=0.1), SVGD, vipkg.ELBO, lr=0.05),
    ]


def _build(cfg: Config, model, num_particles: int):
    """The (guide, estimator, objective) of a line, or the reason it does not fit ``model``."""
    from vipkg.estimators import IncompatibleEstimatorError
    from vipkg.model import ModelError

    try:
        guide, estimator, objective = cfg.guide(model), cfg.estimator(), cfg.objective()
        estimator.check(model, guide, objective)
        estimator.check_particles(num_particles)
    except (IncompatibleEstimatorError, ModelError, ValueError) as err:
        return None, str(err)
    return (guide, estimator, objective), None


@torch.no_grad()
def _final_bound(result, draws: int, seed: int) -> tuple[float, float]:
    """The fitted guide's bound on many fresh draws: mean and standard error of the loss."""
    if getattr(result.guide, "is_empirical", False):
        return math.nan, math.nan  # particles carry no density, so there is no bound
    S, K = result.objective.sample_shape(draws)
    with seeded(seed, result.guide.device):
        z, log_q = result.guide.sample_and_log_prob((S, K))  # works for discrete guides too
    per = -result.objective.per_group(result.guide.log_joint(result.model, z) - log_q).double()
    return float(per.mean()), float(per.std() / math.sqrt(per.numel()))


def compare(
    model_name: str = "logistic_regression",
    *,
    steps: int = 1000,
    num_particles: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    out: str | os.PathLike = "vipkg-out",
    repeats: int = 32,
    eval_draws: int = 2000,
    configs=None,
    only=None,
    reference: str = "auto",
    progress: bool | None = None,
    stream=None,
) -> list[dict]:
    """Fit ``model_name`` with every available estimator and write a report to ``out``.

    Writes ``compare.md`` (the table), ``compare.nc`` (ArviZ netCDF of the
    first configuration's fit, with every configuration's loss trace in its
    ``optimization`` group) and ``loss_traces.png``. Returns the table rows.
    ``only`` keeps the configurations whose label starts with one of its strings;
    configurations that do not fit the model are listed as skipped, with the reason.
    Also writes ``grad_variance.png`` (trace over steps), ``khat.png`` (PSIS k-hat
    per configuration) and, when a reference posterior exists (``reference``:
    ``"auto"`` for a closed form, ``"nuts"`` to run Pyro's NUTS, ``"none"``),
    ``posterior.png``.
    """
    import vipkg
    from vipkg.diagnostics import (
        GradientVariance,
        gradient_variance,
        plot_gradient_variance,
        plot_khat,
        plot_losses,
        plot_posteriors,
        psis_khat,
        reference_draws,
    )
    from vipkg.fit import NonFiniteLossError
    from vipkg.models import ZOO

    stream = stream or sys.stdout
    if model_name not in ZOO:
        raise SystemExit(f"unknown model {model_name!r}; choose one of {sorted(ZOO)}")
    model = ZOO[model_name]()
    out = Path(out)
    rows, results = [], {}
    skipped = []
    for cfg in configs or _configs():
        if only and not any(cfg.label.startswith(prefix) for prefix in only):
            continue
        built, reason = _build(cfg, model, num_particles)
        if built is None:
            skipped.append((cfg.label, reason))
            continue
        guide, estimator, objective = built
        try:
            result = vipkg.fit(
                model,
                guide,
                estimator,
                objective=objective,
                steps=steps,
                num_particles=num_particles,
                lr=cfg.lr or lr,
                seed=seed,
                progress=progress,
                # ~8 estimates per 10% of the run: about 8% extra work for the variance-over-steps plot.
                diagnostics=GradientVariance(every=max(steps // 10, 1), repeats=8),
            )
        except NonFiniteLossError as err:
            # One diverging configuration is a result, not a reason to lose the others.
            skipped.append((cfg.label, f"diverged: {err}"))
            print(f"  {cfg.label:<26} diverged", file=stream, flush=True)
            continue
        loss, se = _final_bound(result, eval_draws, seed + 1)
        khat = _khat(psis_khat, result, eval_draws, seed + 3)
        gv = gradient_variance(
            result.model,
            guide,
            estimator,
            objective=objective,
            num_particles=num_particles,
            repeats=repeats,
            seed=seed + 2,
        )
        rows.append(
            {
                "estimator": cfg.label,
                "loss": loss,
                "loss_se": se,
                "ms_per_step": result.ms_per_step,
                "grad_trace_var": gv.total_trace,
                "khat": khat,
            }
        )
        results[cfg.label] = result
        print(f"  {cfg.label:<26} loss {loss:10.3f} ± {se:.3f}  k-hat {khat:5.2f}", file=stream, flush=True)

    if not rows:
        raise SystemExit(f"no estimator configuration fits model {model.name!r}: {skipped}")
    table = _format_table(model.name, rows, steps, num_particles, skipped)
    print(table, file=stream)
    atomic_write_bytes(out / "compare.md", table.encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save_figure(name, draw):
        fig = plt.figure(figsize=(8, 4.5))
        draw(fig)
        fig.tight_layout()
        atomic_save(out / name, lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)

    def losses_fig(fig):
        ax = plot_losses(results, ax=fig.add_subplot())
        ax.set_title(f"{model.name}: loss per step")

    def variance_fig(fig):
        ax = plot_gradient_variance(results, ax=fig.add_subplot())
        ax.set_title(f"{model.name}: gradient variance over the fit")

    def khat_fig(fig):
        ax = plot_khat({r["estimator"]: r["khat"] for r in rows}, ax=fig.add_subplot())
        ax.set_title(f"{model.name}: PSIS k-hat of each fitted guide")

    save_figure("loss_traces.png", losses_fig)
    save_figure("grad_variance.png", variance_fig)
    save_figure("khat.png", khat_fig)
    written = ["compare.md", "compare.nc", "loss_traces.png", "grad_variance.png", "khat.png"]
    ref = None
    if reference == "nuts":
        ref = reference_draws(model, 1000, method="nuts", seed=seed)
    elif reference == "auto":
        try:  # closed form only: NUTS is opt-in because it can take minutes
            ref = reference_draws(model, 1000, method="exact", seed=seed)
        except ValueError:
            ref = None
    if ref is not None:
        axes = plot_posteriors(results, reference=ref, n=1000, seed=seed)
        fig = axes.flat[0].figure
        atomic_save(out / "posterior.png", lambda p: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
        written.append("posterior.png")

    first = next(iter(results.values()))
    idata = first.to_arviz(1000, seed=seed)
    import xarray as xr

    traces = xr.Dataset(
        {
            f"loss__{label}": xr.DataArray(r.losses.double().numpy(), dims=["step"])
            for label, r in results.items()
        }
    )
    idata.add_groups({"compare": traces})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_save(out / "compare.nc", lambda p: idata.to_netcdf(p))
    print("wrote " + ", ".join(str(out / w) for w in written), file=stream)
    return rows


def _khat(psis_khat, result, draws, seed) -> float:
    """k-hat of a fitted guide, NaN for guides without a density (particles)."""
    if getattr(result.guide, "is_empirical", False):
        return math.nan
    try:
        return psis_khat(result.model, result.guide, max(draws, 100), seed=seed).khat
    except FloatingPointError:
        return math.inf


def _format_table(name, rows, steps, num_particles, skipped=()) -> str:
    lines = [
        f"# vipkg compare: {name}",
        "",
        f"{steps} steps, {num_particles} particles per step, Adam. Loss = minus the bound on fresh draws "
        "(± standard error); gradient variance = trace of the covariance of the loss gradient at the end; "
        "PSIS k-hat of the fitted guide (< 0.5 good, > 0.7 unreliable; Yao et al. 2018).",
        "",
        "| estimator | final loss | ± se | ms/step | grad trace-variance | PSIS k-hat |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['estimator']} | {r['loss']:.3f} | {r['loss_se']:.3f} | {r['ms_per_step']:.3f} "
            f"| {r['grad_trace_var']:.4g} | {r['khat']:.2f} |"
        )
    if skipped:
        lines += ["", "Not run, or diverged, on this model:", ""]
        lines += [f"- {label}: {reason}" for label, reason in skipped]
    return "\n".join(lines) + "\n"


def _add_fit_parser(sub) -> None:
    f = sub.add_parser(
        "fit",
        help="fit one model with one guide and estimator; summary JSON and ArviZ netCDF",
        description="Fit one model. Data-parallel under torchrun with --distributed "
        "(torchrun --nproc_per_node=N -m vipkg fit ... --distributed).",
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
    f.add_argument("--estimator-kwargs", default="{}", help="JSON, e.g. '{\"step_size\": 0.005}' for fbgvi")
    f.add_argument("--objective", default="elbo", help="elbo, iwae:K or renyi:ALPHA")
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--num-particles", type=int, default=16)
    f.add_argument("--lr", type=float, default=1e-2)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default=None, help="cpu, cuda (cuda:LOCAL_RANK under --distributed)")
    f.add_argument("--compile", action="store_true", help="torch.compile the whole step")
    f.add_argument("--checkpoint", default=None, help="checkpoint file (ranks > 0 write .rankN siblings)")
    f.add_argument("--checkpoint-every", type=int, default=500)
    f.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    f.add_argument("--out", default=None, help="directory for summary.json and posterior.nc")
    f.add_argument("--draws", type=int, default=1000, help="guide draws in posterior.nc")
    f.add_argument("--distributed", action="store_true", help="data-parallel over a torchrun process group")
    f.add_argument(
        "--particles",
        default="shared",
        choices=["shared", "per_rank"],
        help="with --distributed: same draws on every rank (= one process) or seed + rank",
    )
    f.add_argument("--no-progress", action="store_true")


def _fit_main(parser, args) -> int:
    import json

    from vipkg.distributed import fit_command

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


def main(argv=None) -> int:
    from vipkg.models import ZOO

    parser = argparse.ArgumentParser(
        prog="vipkg", description="Variational inference with pluggable estimators."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="fit one model with every estimator; table, netCDF and plot")
    p.add_argument("--model", default="logistic_regression", choices=sorted(ZOO))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--num-particles", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=32, help="gradient estimates for the variance column")
    p.add_argument("--out", default="vipkg-out")
    p.add_argument(
        "--reference",
        default="auto",
        choices=["auto", "nuts", "none"],
        help="reference posterior for posterior.png: closed form when known (auto), Pyro NUTS, or none",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated label prefixes to run (e.g. 'reparam-fullrank,stl'); default all that fit",
    )
    p.add_argument("--no-progress", action="store_true")
    sub.add_parser("models", help="list the model zoo")
    _add_fit_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "fit":
        return _fit_main(parser, args)
    if args.command == "models":
        for name, fn in ZOO.items():
            doc = (fn.__doc__ or "").strip().splitlines()[0]
            print(f"{name:<30} {doc}")
        return 0
    if args.steps < 1 or args.num_particles < 1 or args.lr <= 0 or args.repeats < 2:
        parser.error("--steps, --num-particles and --lr must be positive; --repeats at least 2")
    compare(
        args.model,
        steps=args.steps,
        num_particles=args.num_particles,
        lr=args.lr,
        seed=args.seed,
        out=args.out,
        repeats=args.repeats,
        reference=args.reference,
        only=[x.strip() for x in args.only.split(",") if x.strip()] if args.only else None,
        progress=False if args.no_progress else None,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
