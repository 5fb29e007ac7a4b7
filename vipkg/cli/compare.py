"""``vipkg compare``: fit one model with every configuration of the catalogue and evaluate each fit.

The configurations are :func:`vipkg.estimators.catalog.configs`; the report (table,
figures, netCDF) is written by :func:`vipkg.diagnostics.report.write_compare`.
"""

from __future__ import annotations

import math
import os
import sys

from vipkg._io import writable_dir
from vipkg.cli._help import HelpFormatter

# torch, the estimators, the zoo and ArviZ load inside the functions that use them: `vipkg --help`
# and `vipkg compare --help` must not pay their import time (more than a second).

__all__ = ["compare", "Config", "add_parser", "run"]  # noqa: F822 - Config: module __getattr__


def __getattr__(name):
    if name == "Config":  # the old import path of the catalogue's Config
        from vipkg.estimators.catalog import Config

        return Config
    if name == "fit":  # the fitting function, looked up here so that tests can stand in for it
        from vipkg.fit import fit

        return fit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(cfg, model, num_particles: int):
    """The (guide, estimator, objective) of a line, or the reason it does not fit ``model``."""
    from vipkg.estimators import IncompatibleEstimatorError
    from vipkg.model import ModelError

    try:
        built = cfg.build(model, num_particles)
    except (IncompatibleEstimatorError, ModelError, ValueError) as err:
        return None, str(err)
    return built, None


def _final_bound(result, draws: int, seed: int) -> tuple[float, float]:
    """The fitted guide's bound on many fresh draws: mean and standard error of the loss."""
    import torch

    if getattr(result.guide, "is_empirical", False):
        return math.nan, math.nan  # particles carry no density, so there is no bound
    with torch.no_grad():
        bound, se = result.bound(draws, seed, objective=result.objective)
    return -bound, se


#: Minibatches averaged by the bound of a subsampled model without a held-out bound of its own.
MINIBATCHES = 20


def _scaled_draw(guide, shape):
    """Draws of a minibatch view and their ``log q`` scaled like the model's minibatch terms
    (each local part's by its ``log_q_scale``), as the estimators' surrogate scales it."""
    from vipkg.guides.composite import Composite

    if not isinstance(guide, Composite):
        z, log_q = guide.sample_and_log_prob(shape)
        return z, log_q * (getattr(guide, "log_q_scale", None) or 1.0)
    n = math.prod(shape)
    latents, log_q = {}, 0.0
    for i, part in enumerate(guide.parts):
        z, lq = part.sample_and_log_prob(shape)
        lat, ladj = guide.part_latents(i, z.detach().reshape(n, *z.shape[len(shape) :]))
        latents.update(lat)
        lq = lq - (ladj.reshape(shape) if ladj.dim() else ladj)
        log_q = log_q + lq * (getattr(part, "log_q_scale", None) or 1.0)
    return {k: v.reshape(shape + v.shape[1:]) for k, v in latents.items()}, log_q


def _subsampled_bound(result, draws: int, seed: int) -> tuple[float, float, str]:
    """The bound of a fit of a model with local latents (whose full-data log joint does not exist
    at once): the model's held-out bound when it has one (the zoo's VAEs: minus the test ELBO per
    image), else minus the mean minibatch bound over :data:`MINIBATCHES` minibatches (unbiased for
    the full-data bound). Mean, standard error and what it is."""
    import torch

    with torch.no_grad():
        return _subsampled_bound_no_grad(result, draws, seed)


def _subsampled_bound_no_grad(result, draws: int, seed: int) -> tuple[float, float, str]:
    import torch

    from vipkg._rng import seeded
    from vipkg.guides.minibatch import draw_minibatch

    model, guide = result.model, result.guide
    parts = getattr(guide, "parts", None)
    # An amortized guide, alone or as the one part of a Composite (over every site).
    amortized = parts[0] if parts is not None and len(parts) == 1 else guide
    if getattr(model, "vae", None) is not None and callable(getattr(amortized, "with_model", None)):
        from vipkg.models.vae import heldout_elbo

        bound, se = heldout_elbo(model, amortized, draws=max(2, min(draws, 200)), seed=seed)
        return -bound, se, "minus the held-out ELBO per test image (vipkg.models.heldout_elbo)"
    S, K = result.objective.sample_shape(max(draws // MINIBATCHES, 2))
    per = []
    with seeded(seed, guide.device):
        for _ in range(MINIBATCHES):
            model_b, guide_b = draw_minibatch(model, guide)
            z, log_q = _scaled_draw(guide_b, (S, K))
            per.append(-result.objective.per_group(guide_b.log_joint(model_b, z) - log_q).double())
    per = torch.cat(per)
    what = f"minus the full-data bound estimated on {MINIBATCHES} minibatches"
    return float(per.mean()), float(per.std() / math.sqrt(per.numel())), what


def _khat(result, draws, seed) -> float:
    """k-hat of a fitted guide, NaN for guides without a density (particles)."""
    from vipkg.diagnostics import psis_khat

    if getattr(result.guide, "is_empirical", False) or result.model.is_subsampled:
        return math.nan  # no density, or no full-data log joint to weight draws with
    try:
        return psis_khat(result.model, result.guide, max(draws, 100), seed=seed).khat
    except FloatingPointError:
        return math.inf


def _ksd(result, seed) -> float | None:
    """Kernel Stein discrepancy of the fit (100 draws or the particles); None where it cannot be had."""
    from vipkg.diagnostics.ksd import guide_ksd

    if result.model.is_subsampled:
        return None  # the score needs the full-data log joint
    try:
        return guide_ksd(result.model, result.guide, 100, seed=seed)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None  # e.g. discrete sites: no score in an unconstrained space


def _reference(model, reference: str, seed: int):
    """Reference posterior draws for ``posterior.png``, or None."""
    from vipkg.diagnostics import reference_draws

    if reference == "nuts":
        return reference_draws(model, 1000, method="nuts", seed=seed)
    if reference == "auto":
        try:  # closed form only: NUTS is opt-in because it can take minutes
            return reference_draws(model, 1000, method="exact", seed=seed)
        except ValueError:
            return None
    return None


def _check_only(only, labels: list[str]) -> None:
    """Every entry of ``only`` must pick some label: one that picks none is a typo, not a filter."""
    if not only:
        return
    unmatched = [prefix for prefix in only if not any(label.startswith(prefix) for label in labels)]
    if unmatched:
        raise ValueError(
            f"--only {','.join(unmatched)!r} matches no configuration label (an entry picks the labels that "
            f"start with it); the labels are: {', '.join(labels)}."
        )


def _notes(model, loss_note, guides) -> list[str]:
    """The table's notes for a subsampled model or one with a default guide of its own."""
    notes = []
    if loss_note is not None:
        notes.append(f"Final loss: {loss_note}; PSIS k-hat is nan (no full-data log joint).")
    if guides:
        notes.append(
            f"Guide: the model's default guide ({', '.join(sorted(guides))}) in place of the factorized "
            "families (mean-field, categorical, Composite.auto) of the labels."
        )
    return notes


def _particle_notes(results) -> list[str]:
    """Why a particle fit's loss and k-hat are nan: say it in the table, not only by a bare nan."""
    labels = [label for label, r in results.items() if getattr(r.guide, "is_empirical", False)]
    if not labels:
        return []
    return [
        f"{', '.join(labels)}: particles are point masses without a density, so there is no bound and no "
        "importance ratio (no k-hat); their line in loss_traces.png is minus the mean log joint of the "
        "particles, not a bound. The KSD column compares them with the other fits."
    ]


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
    ``compare`` group) and ``loss_traces.png``. Returns the table rows.
    ``configs`` defaults to the catalogue (:func:`vipkg.estimators.catalog.configs`);
    ``only`` keeps the configurations whose label starts with one of its strings;
    configurations that do not fit the model are listed as skipped, with the reason.
    Also writes ``grad_variance.png`` (trace over steps), ``khat.png`` (PSIS k-hat
    per configuration) and, when a reference posterior exists (``reference``:
    ``"auto"`` for a closed form, ``"nuts"`` to run Pyro's NUTS, ``"none"``),
    ``posterior.png``.

    A model with local latents in subsampled plates (e.g. ``vae_digits``) is checked on a
    minibatch, gets its own default guide (``model.default_guide``, the zoo's amortized
    encoders) in place of the factorized families, and is scored by its held-out bound when it
    has one (:func:`vipkg.models.heldout_elbo`, nats per test image) or else by the mean
    minibatch bound; k-hat is NaN for it. The table says which.
    """
    from vipkg.diagnostics import GradientVariance, gradient_variance
    from vipkg.diagnostics.report import write_compare
    from vipkg.estimators import catalog
    from vipkg.fit import NonFiniteLossError, progress_label
    from vipkg.models import ZOO

    fit = globals().get("fit") or __getattr__("fit")

    stream = stream or sys.stdout
    if model_name not in ZOO:
        raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(ZOO)} (vipkg models).")
    configs = list(configs or catalog.configs())
    _check_only(only, [cfg.label for cfg in configs])
    # Before any fitting: an output path that cannot be written must not cost the whole run.
    writable_dir(out, "output directory")
    model = ZOO[model_name]()
    rows, results = [], {}
    skipped = []
    loss_note = None  # the default: minus the bound on fresh draws
    guides = set()  # the model's default guides used in place of the factorized families
    for cfg in configs:
        if only and not any(cfg.label.startswith(prefix) for prefix in only):
            continue
        built, reason = _build(cfg, model, num_particles)
        if built is None:
            skipped.append((cfg.label, reason))
            continue
        guide, estimator, objective = built
        try:
            with progress_label(cfg.label):  # the bar names the configuration, not only its estimator
                result = fit(
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
        if model.is_subsampled:
            loss, se, loss_note = _subsampled_bound(result, eval_draws, seed + 1)
        else:
            loss, se = _final_bound(result, eval_draws, seed + 1)
        khat = _khat(result, eval_draws, seed + 3)
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
                "ksd": _ksd(result, seed + 4),
                "particles": bool(getattr(result.guide, "is_empirical", False)),
            }
        )
        results[cfg.label] = result
        if cfg.uses_default_guide(model):
            guides.add(getattr(model.default_guide, "func", model.default_guide).__name__)
        ksd = rows[-1]["ksd"]
        tail = f"  KSD {ksd:.3g}" if ksd is not None else ""
        if rows[-1]["particles"]:
            line = f"  {cfg.label:<26} no bound (particles have no density){tail}"
        else:
            line = f"  {cfg.label:<26} loss {loss:10.3f} ± {se:.3f}  k-hat {khat:5.2f}{tail}"
        print(line, file=stream, flush=True)

    if not rows:
        reasons = "; ".join(f"{label}: {reason}" for label, reason in skipped)
        raise ValueError(f"no estimator configuration fits model {model.name!r} (or all diverged): {reasons}")
    table, written = write_compare(
        out,
        model.name,
        rows,
        results,
        steps=steps,
        num_particles=num_particles,
        skipped=skipped,
        reference=_reference(model, reference, seed),
        seed=seed,
        notes=_notes(model, loss_note, guides) + _particle_notes(results),
    )
    print(table, file=stream)
    print("wrote " + ", ".join(str(p) for p in written), file=stream)
    return rows


def add_parser(sub) -> None:
    """The ``compare`` subcommand's arguments."""
    p = sub.add_parser(
        "compare",
        help="fit one model with every estimator; table, netCDF and plot",
        description="Fit one zoo model with every estimator configuration that fits it and compare them: "
        "writes compare.md (the table), compare.nc (ArviZ netCDF), loss_traces.png, grad_variance.png, "
        "khat.png and, with a reference posterior, posterior.png into --out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        default="logistic_regression",
        metavar="NAME",
        # No choices=: the zoo's names would import it (and torch) for --help; compare() checks.
        help="zoo model to fit (vipkg models lists them)",
    )
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps per configuration")
    p.add_argument("--num-particles", type=int, default=16, help="draws (groups of draws) per step")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (configurations may set their own)")
    p.add_argument("--seed", type=int, default=0, help="seed of every fit and evaluation")
    p.add_argument("--repeats", type=int, default=32, help="gradient estimates for the variance column")
    p.add_argument("--out", default="vipkg-out", help="directory for the report (created; checked first)")
    p.add_argument(
        "--reference",
        default="auto",
        choices=["auto", "nuts", "none"],
        help="reference posterior for posterior.png: closed form when known (auto), Pyro NUTS, or none",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated label prefixes to run (e.g. 'reparam-fullrank,stl'); default: every "
        "configuration that fits the model",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)"
    )


def run(parser, args) -> int:
    """``vipkg compare``: check the arguments and compare."""
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
