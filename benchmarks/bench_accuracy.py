"""Accuracy of variational families on hard posteriors: vipkg against Pyro's autoguides.

Targets: ``vipkg.models.hard.HARD_POSTERIORS`` (collinear regression with an exact
Gaussian posterior; a noisy random walk with missing data; centred eight schools; an
AR(5) series; stochastic volatility), each with reference moments of the flat
unconstrained vector (closed form or long NUTS runs, ``model.reference``). A target whose
reference file does not exist yet is skipped with a note.

Methods, all at the same steps, Adam learning rate, particles per step and dtype:

* vipkg ``fit(model, guide, Reparam())`` with ``MeanFieldNormal``, ``FullRankNormal``,
  ``LowRankNormal(rank)`` and a RealNVP flow (``Flow.real_nvp``); SVGD
  (``Particles(model, n)`` with ``SVGD()``, its own learning rate; no density);
* Pyro ``AutoNormal`` and ``AutoMultivariateNormal`` on the model's Pyro program
  (``model.pyro_model``), ``SVI`` with ``Trace_ELBO(num_particles, vectorize_particles=True)``,
  plus a control: ``AutoMultivariateNormal`` started where vipkg's guides start
  (``init_to_feasible``, 0 in the unconstrained space, instead of its ``init_to_median``);
* NumPyro's autoguides only where ``import numpyro`` works.

Metrics per (target, method, seed), from the fitted guide in the unconstrained space:
max and mean over coordinates of ``|mean_q - ref_mean| / ref_sd``, the mean of
``sd_q / ref_sd``, ``-ELBO`` (``log p(x, z) + log|J| - log q(z)`` on the same vipkg log
joint for every method, from a fixed number of draws), PSIS k-hat, wall time. Medians
over seeds are reported with their spread.

How to run::

    python benchmarks/bench_accuracy.py            # full run (~20 min on one core)
    python benchmarks/bench_accuracy.py --quick    # smoke run, < 1 min
    python benchmarks/bench_accuracy.py --save-runs /tmp/runs.pt    # keep every run's moments
    python benchmarks/bench_accuracy.py --from-runs /tmp/runs.pt    # re-report against new references

Writes ``benchmarks/results/accuracy.md`` and ``accuracy.png``. Threads:
``VIPKG_BENCH_THREADS`` (default 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings

THREADS_ENV = "VIPKG_BENCH_THREADS"
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402

from vipkg._io import atomic_save, atomic_write_bytes  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET_TEXT = (
    "vipkg's full-rank error no worse than the best peer (Pyro AutoMVN, NumPyro AutoMVN if present) "
    "on any target, and better on at least two"
)
#: a difference in median max |mean err| / sd counts only beyond this factor and this absolute amount
#: (or the reference's own largest Monte Carlo standard error of a mean, in sds, where that is larger)
TIE_FACTOR = 1.1
TIE_ABS = 0.02


@dataclasses.dataclass
class Settings:
    seeds: tuple
    steps: int
    particles: int
    lr: float
    rank: int
    flow_layers: int
    flow_hidden: int
    svgd_n: int
    svgd_lr: float
    eval_draws: int
    pyro_check_particles: int


FULL = Settings(
    seeds=(0, 1, 2),
    steps=3000,
    particles=16,
    lr=1e-2,
    rank=5,
    flow_layers=4,
    flow_hidden=32,
    svgd_n=100,
    svgd_lr=5e-2,
    eval_draws=4000,
    pyro_check_particles=4000,
)
QUICK = Settings(
    seeds=(0,),
    steps=40,
    particles=4,
    lr=1e-2,
    rank=2,
    flow_layers=2,
    flow_hidden=8,
    svgd_n=20,
    svgd_lr=5e-2,
    eval_draws=200,
    pyro_check_particles=200,
)

VIPKG_METHODS = [
    "vipkg MeanField",
    "vipkg FullRank",
    "vipkg FullRank STL",
    "vipkg LowRank",
    "vipkg RealNVP",
    "vipkg SVGD",
]
#: vipkg's full-rank configurations, each judged against the best peer full-rank guide
FULL_RANK = ["vipkg FullRank", "vipkg FullRank STL"]
#: "init 0" is a control: AutoMVN started, like vipkg's guides, at 0 in the unconstrained space
PYRO_METHODS = ["Pyro AutoNormal", "Pyro AutoMVN", "Pyro AutoMVN init 0"]
CONTROL = "Pyro AutoMVN init 0"
NUMPYRO_METHODS = ["NumPyro AutoNormal", "NumPyro AutoMVN"]


def _numpyro_available() -> bool:
    try:
        import numpyro  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


# ------------------------------------------------------------------------------ metrics
def _moment_errors(mean_q, sd_q, ref) -> dict:
    ref_mean = ref["unconstrained_mean"].double()
    ref_sd = ref["unconstrained_sd"].double()
    err = (mean_q.double() - ref_mean).abs() / ref_sd
    return {
        "mean_q": mean_q.detach().double().cpu(),
        "sd_q": sd_q.detach().double().cpu(),
        "err_max": float(err.max()),
        "err_mean": float(err.mean()),
        "sd_ratio": float((sd_q.double() / ref_sd).mean()),
        "worst_coord": int(err.argmax()),
    }


def _elbo_stats(log_w: torch.Tensor) -> dict:
    """-ELBO and its Monte Carlo standard error from log weights (non-finite ones counted, dropped)."""
    finite = torch.isfinite(log_w)
    lw = log_w[finite]
    return {
        "neg_elbo": float(-lw.mean()),
        "neg_elbo_se": float(lw.std() / math.sqrt(lw.numel())),
        "nonfinite": int((~finite).sum()),
    }


def _khat(log_w: torch.Tensor) -> float:
    from vipkg.diagnostics.arviz_adapter import psislw

    lw = log_w[torch.isfinite(log_w)].double().numpy()
    return psislw(lw)[1]


# --------------------------------------------------------------------------------- vipkg
def _vipkg_guide(method: str, model, s: Settings, seed: int):
    from vipkg.guides import Flow, FullRankNormal, LowRankNormal, MeanFieldNormal, Particles

    if method == "vipkg MeanField":
        return MeanFieldNormal(model)
    if method in ("vipkg FullRank", "vipkg FullRank STL"):
        return FullRankNormal(model)
    if method == "vipkg LowRank":
        return LowRankNormal(model, rank=min(s.rank, model.dim - 1))
    if method == "vipkg RealNVP":
        torch.manual_seed(seed)  # the conditioner nets' initial weights
        return Flow.real_nvp(model, layers=s.flow_layers, hidden=s.flow_hidden)
    if method == "vipkg SVGD":
        return Particles(model, n=s.svgd_n, seed=seed)
    raise ValueError(method)


@torch.no_grad()
def _gaussian_moments(guide):
    """Exact mean and marginal sd of a Gaussian guide, or None for other families."""
    from vipkg.guides import FullRankNormal, LowRankNormal, MeanFieldNormal

    if isinstance(guide, MeanFieldNormal):
        return guide.loc.detach(), guide.scale.detach()
    if isinstance(guide, (FullRankNormal, LowRankNormal)):
        return guide.loc.detach(), guide.covariance_matrix.detach().diagonal().sqrt()
    return None


def run_vipkg(method: str, model, s: Settings, seed: int) -> dict:
    import vipkg
    from vipkg._rng import seeded
    from vipkg.diagnostics import psis_khat

    guide = _vipkg_guide(method, model, s, seed)
    svgd = method == "vipkg SVGD"
    estimator = vipkg.SVGD() if svgd else vipkg.STL() if method.endswith("STL") else vipkg.Reparam()
    lr = s.svgd_lr if svgd else s.lr
    t0 = time.perf_counter()
    r = vipkg.fit(
        model, guide, estimator, steps=s.steps, lr=lr, num_particles=s.particles, seed=seed, progress=False
    )
    wall = time.perf_counter() - t0
    out = {"time": wall, "final_loss": float(r.losses[-max(1, s.steps // 20) :].mean())}
    with torch.no_grad():
        if svgd:
            p = guide.particles.detach()
            out.update(_moment_errors(p.mean(0), p.std(0), model.reference))
            out.update(neg_elbo=math.nan, neg_elbo_se=math.nan, khat=math.nan, nonfinite=0)
            return out
        with seeded(10_000 + seed):
            z, log_q = guide.rsample_and_log_prob((s.eval_draws,))
        log_w = model.log_joint_unconstrained(z).double() - log_q.double()
        moments = _gaussian_moments(guide) or (z.double().mean(0), z.double().std(0))
        out.update(_moment_errors(*moments, model.reference))
        out.update(_elbo_stats(log_w))
        try:
            out["khat"] = psis_khat(model, guide, s.eval_draws, seed=20_000 + seed).khat
        except FloatingPointError:  # non-finite ratios: fall back to the finite draws above
            out["khat"] = _khat(log_w)
        out["khat_own"] = _khat(log_w)  # same draws as the ELBO, to cross-check psis_khat
    return out


# ---------------------------------------------------------------------------------- Pyro
def _pyro_sites(guide):
    """(name, unconstrained numel) in the order of the guide's prototype trace."""
    from torch.distributions import biject_to

    return [
        (name, biject_to(site["fn"].support).inv(site["value"]).numel())
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    ]


def _pyro_q(method: str, guide, model):
    """The fitted Pyro guide as a float64 distribution over vipkg's flat unconstrained vector."""
    sites = _pyro_sites(guide)  # Pyro's order may differ from vipkg's: map by name
    offsets, pos = {}, 0
    for name in model.sites:
        size = model._ushapes[name].numel()
        offsets[name] = torch.arange(pos, pos + size)
        pos += size
    pyro_sizes = dict(sites)
    if any(pyro_sizes[n] != offsets[n].numel() for n in model.sites):
        raise ValueError(f"Pyro and vipkg disagree on site sizes: {pyro_sizes}")
    if method == "Pyro AutoNormal":  # the other methods are AutoMultivariateNormal
        locs, scales = [], []
        for name in model.sites:
            loc, scale = guide._get_loc_and_scale(name)
            locs.append(loc.detach().double().reshape(-1))
            scales.append(scale.detach().double().reshape(-1))
        q = torch.distributions.Independent(torch.distributions.Normal(torch.cat(locs), torch.cat(scales)), 1)
        return q, q.mean, q.stddev
    post = guide.get_posterior()
    perm = torch.cat([offsets[n] for n, _ in sites])  # pyro position i holds vipkg coordinate perm[i]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    loc = post.loc.detach().double()[inv]
    cov = post.covariance_matrix.detach().double()[inv][:, inv]
    q = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)
    return q, loc, cov.diagonal().sqrt()


def run_pyro(method: str, model, s: Settings, seed: int) -> dict:
    import pyro
    from pyro.infer import SVI, Predictive, Trace_ELBO
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_feasible, init_to_median

    fn, args, kwargs = model.pyro_model
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)

    def guide_cls(fn, init_scale):
        if method == "Pyro AutoNormal":  # its default init_to_feasible: 0 in the unconstrained space
            return AutoNormal(fn, init_scale=init_scale)
        init = init_to_feasible if method == CONTROL else init_to_median  # the latter AutoMVN's default
        return AutoMultivariateNormal(fn, init_loc_fn=init, init_scale=init_scale)

    guide = guide_cls(fn, init_scale=0.1)
    note = ""
    t0 = time.perf_counter()
    svi = SVI(fn, guide, pyro.optim.Adam({"lr": s.lr}), Trace_ELBO(s.particles, vectorize_particles=True))
    losses = []
    try:
        losses.append(svi.step(*args, **kwargs))
    except Exception as err:  # noqa: BLE001 - not vectorizable: the plain particle loop
        note = f"not vectorizable ({type(err).__name__}); sequential particles"
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = guide_cls(fn, init_scale=0.1)
        svi = SVI(fn, guide, pyro.optim.Adam({"lr": s.lr}), Trace_ELBO(s.particles))
        losses.append(svi.step(*args, **kwargs))
    for _ in range(s.steps - 1):
        losses.append(svi.step(*args, **kwargs))
    wall = time.perf_counter() - t0
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite loss from step {bad[0]} on ({len(bad)} steps)")
    out = {"time": wall, "final_loss": statistics.fmean(losses[-max(1, s.steps // 20) :]), "note": note}
    with torch.no_grad():
        q, mean_q, sd_q = _pyro_q(method, guide, model)
        out.update(_moment_errors(mean_q, sd_q, model.reference))
        # Draws as a user would take them, mapped into vipkg's unconstrained vector; log q of
        # that vector under the guide (float64), log p + log|J| from the same vipkg log joint.
        pyro.set_rng_seed(10_000 + seed)
        names = list(model.sites)
        try:
            draws = Predictive(fn, guide=guide, num_samples=s.eval_draws, return_sites=names, parallel=True)(
                *args, **kwargs
            )
        except Exception:  # noqa: BLE001 - not vectorizable
            draws = Predictive(fn, guide=guide, num_samples=s.eval_draws, return_sites=names)(*args, **kwargs)
        latents = {k: draws[k].reshape(s.eval_draws, *model.sites[k].shape) for k in names}
        z = model.unconstrain(latents)
        log_w = model.log_joint_unconstrained(z).double() - q.log_prob(z.double())
        out.update(_elbo_stats(log_w))
        out["khat"] = _khat(log_w)
        # Pyro's own estimate of the same quantity, on the Pyro program: a check of the two.
        pyro.set_rng_seed(30_000 + seed)
        try:
            check = Trace_ELBO(s.pyro_check_particles, vectorize_particles=True)
            out["pyro_neg_elbo"] = check.loss(fn, guide, *args, **kwargs)
        except Exception:  # noqa: BLE001
            out["pyro_neg_elbo"] = Trace_ELBO(min(s.pyro_check_particles, 500)).loss(
                fn, guide, *args, **kwargs
            )
    return out


# ------------------------------------------------------------------------------- driver
def _targets(names=None):
    from vipkg.models.hard import HARD_POSTERIORS

    models, skipped = {}, {}
    for name, make in HARD_POSTERIORS.items():
        if names and name not in names:
            continue
        for attempt in range(3):
            try:
                model = make()
                break
            except Exception as err:  # noqa: BLE001 - a target under construction: retry, then skip
                failure = f"constructor failed: {type(err).__name__}: {err}"
                time.sleep(5 * (attempt + 1))
        else:
            skipped[name] = failure
            continue
        ref = model.reference or {}
        if "unconstrained_mean" not in ref or "unconstrained_sd" not in ref:
            skipped[name] = "no reference moments yet (vipkg/models/references/ has no file for it)"
            continue
        if getattr(model, "pyro_model", None) is None:
            skipped[name] = "no Pyro program (model.pyro_model)"
            continue
        models[name] = model
    return models, skipped


def refresh_references(models, runs) -> list[str]:
    """Re-read the reference files; where one changed during the run, recompute the moment errors.

    The fits and their -ELBO / k-hat do not depend on the reference, only the errors do.
    """
    fresh, _ = _targets(list(models))
    changed = []
    for t, model in models.items():
        if t not in fresh:
            continue
        old, new = model.reference, fresh[t].reference
        same = all(torch.equal(old[k], new[k]) for k in ("unconstrained_mean", "unconstrained_sd"))
        if same:
            continue
        changed.append(t)
        models[t] = fresh[t]
        for r in runs:
            if r["target"] == t and r.get("ok"):
                r.update(_moment_errors(r["mean_q"], r["sd_q"], new))
    return changed


def run_all(s: Settings, names=None, methods=None):
    models, skipped = _targets(names)
    methods = methods or VIPKG_METHODS + PYRO_METHODS
    runs = []
    for tname, model in models.items():
        print(f"{tname} (dim {model.dim}, reference: {model.reference.get('source')}):", flush=True)
        for method in methods:
            for seed in s.seeds:
                row = {"target": tname, "method": method, "seed": seed}
                try:
                    res = (run_vipkg if method.startswith("vipkg") else run_pyro)(method, model, s, seed)
                    row.update(res, ok=True)
                    print(
                        f"  {method:18s} seed {seed}: max err {row['err_max']:.3f}  mean err "
                        f"{row['err_mean']:.3f}  sd ratio {row['sd_ratio']:.3f}  -ELBO {row['neg_elbo']:.3f}"
                        + (f" (Pyro {row['pyro_neg_elbo']:.3f})" if "pyro_neg_elbo" in row else "")
                        + f"  k-hat {row['khat']:.2f}  {row['time']:.1f} s",
                        flush=True,
                    )
                except Exception as err:  # noqa: BLE001 - a diverged fit is a result, not a crash
                    row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
                    print(f"  {method:18s} seed {seed}: FAILED {row['error']}", flush=True)
                runs.append(row)
    return models, skipped, runs


# ------------------------------------------------------------------------------- report
def _med(rows, key):
    vals = [r[key] for r in rows if r.get("ok") and key in r and math.isfinite(r[key])]
    if not vals:
        return math.nan, math.nan, math.nan
    return statistics.median(vals), min(vals), max(vals)


def _fmt(rows, key, digits=3, spread=True):
    m, lo, hi = _med(rows, key)
    if math.isnan(m):
        return "n/a"
    if not spread or len([r for r in rows if r.get("ok")]) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _summary(models, runs, variant="vipkg FullRank"):
    """Per target: a vipkg full-rank configuration against the best peer full-rank guide, and the
    verdicts."""
    out = []
    for t in models:
        fr = [r for r in runs if r["target"] == t and r["method"] == variant]
        peers = {
            m: [r for r in runs if r["target"] == t and r["method"] == m]
            for m in ("Pyro AutoMVN", "NumPyro AutoMVN")
        }
        peers = {m: rows for m, rows in peers.items() if any(r.get("ok") for r in rows)}
        best_name, best = None, math.inf
        for m, rows in peers.items():
            e = _med(rows, "err_max")[0]
            if e < best:
                best_name, best = m, e
        control = [r for r in runs if r["target"] == t and r["method"] == CONTROL]
        tol = _tolerance(models[t])
        out.append(
            {
                "target": t,
                "fr": fr,
                "peer": best_name,
                "peer_rows": peers.get(best_name, []),
                "verdict": _verdict(fr, peers.get(best_name, []), tol),
                "control_rows": control,
                "control_verdict": _verdict(fr, control, tol),
                "tol": tol,
            }
        )
    return out


def _tolerance(model) -> float:
    """Smallest difference in max err / sd that counts: TIE_ABS or the reference's own MCSE."""
    nuts = (model.reference or {}).get("nuts") or {}
    mcse = (nuts.get("diagnostics") or {}).get("max_mcse_mean_over_sd", 0.0)
    return max(TIE_ABS, float(mcse))


def _verdict(rows, peer_rows, tol: float) -> str:
    """better / worse / tie on the median max |mean err| / sd, with the tolerances above."""
    v, best = _med(rows, "err_max")[0], _med(peer_rows, "err_max")[0]
    if math.isnan(v) or math.isnan(best):
        return "n/a"
    if v > TIE_FACTOR * best and v - best > tol:
        return "worse"
    if v * TIE_FACTOR < best and best - v > tol:
        return "better"
    return "tie"


def _observations(models, runs) -> list[str]:
    """Facts worth a sentence, found from the numbers (not written by hand for one run)."""
    notes = []
    for t in models:
        med = {
            m: _med([r for r in runs if r["target"] == t and r["method"] == m], "neg_elbo")[0]
            for m in VIPKG_METHODS + PYRO_METHODS
        }
        err = {
            m: _med([r for r in runs if r["target"] == t and r["method"] == m], "err_max")[0]
            for m in VIPKG_METHODS + PYRO_METHODS
        }
        # A family that contains another should reach a -ELBO at least as low at convergence.
        for big, smalls in [
            ("vipkg FullRank", ("vipkg MeanField", "vipkg LowRank")),
            ("Pyro AutoMVN", ("Pyro AutoNormal",)),
            (CONTROL, ("Pyro AutoNormal",)),
        ]:
            worse = [m for m in smalls if med[big] > med[m] + 0.1]
            if worse:
                notes.append(
                    f"`{t}`: {big}'s -ELBO ({med[big]:.2f}) is above that of the smaller family "
                    + ", ".join(f"{m} ({med[m]:.2f})" for m in worse)
                    + ": it has not converged in these steps."
                )
        lost = [m for m, e in err.items() if e > 3]
        if lost:
            notes.append(
                f"`{t}`: median max err above 3 reference sds for "
                + ", ".join(f"{m} ({err[m]:.1f})" for m in lost)
                + "."
            )
    stranded = [
        r for r in runs if r.get("ok") and r["method"] == "vipkg SVGD" and abs(r.get("final_loss", 0)) > 1e6
    ]
    if stranded:
        notes.append(
            "SVGD leaves particles stranded where log p is astronomically low (mean -log p over the "
            "particles at the end above 1e6) on "
            + ", ".join(f"{r['target']} seed {r['seed']} ({r['final_loss']:.1e})" for r in stranded)
            + "."
        )
    failed = [r for r in runs if not r.get("ok")]
    if failed:
        notes.append(f"{len(failed)} fit(s) failed (see the per-target notes).")
    return ["", "Observations (found from the numbers):", *[f"- {n}" for n in notes]] if notes else []


def _plot(models, runs, methods, out_dir: str = OUT_DIR) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    targets = list(models)
    if not targets:
        return []
    ncols = min(3, len(targets))
    nrows = math.ceil(len(targets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.5, 4.0 * nrows + 0.4), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(targets) :]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, t in zip(axes, targets):
        for i, m in enumerate(methods):
            rows = [r for r in runs if r["target"] == t and r["method"] == m]
            med, lo, hi = _med(rows, "err_max")
            if math.isnan(med):
                ax.text(i, 1e-2, "failed", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            ax.bar(i, med, color=colors[i % len(colors)], hatch="//" if m.startswith("Pyro") else None)
            ax.errorbar(i, med, yerr=[[med - lo], [hi - med]], color="black", capsize=2, lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(
            range(len(methods)), [m.replace("vipkg ", "").replace("Pyro ", "Pyro\n") for m in methods]
        )
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.set_title(t, fontsize=9)
        ax.axhline(0.1, color="grey", lw=0.6, ls=":")
    for ax in axes[::ncols]:
        ax.set_ylabel("max |mean_q - ref mean| / ref sd\n(median over seeds; range)", fontsize=8)
    fig.suptitle("Posterior-mean error per family (unconstrained space)", fontsize=10)
    fig.tight_layout()
    name = "accuracy.png"
    atomic_save(os.path.join(out_dir, name), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return [name]


def _versions() -> str:
    import pyro

    parts = [f"torch {torch.__version__}", f"pyro {pyro.__version__}"]
    try:
        import normflows

        parts.append(f"normflows {getattr(normflows, '__version__', '?')}")
    except ImportError:
        pass
    import vipkg

    parts.insert(0, f"vipkg {vipkg.__version__}")
    return ", ".join(parts)


def _full_rank_section(models, runs, variant, skipped) -> list[str]:
    """The summary table and verdict of one vipkg full-rank configuration (empty if it did not run)."""
    summary = _summary(models, runs, variant)
    if not any(r.get("ok") for row in summary for r in row["fr"]):
        return []
    lines = []
    lines += [
        "",
        f"## Full-rank Gaussian: {variant} vs Pyro AutoMultivariateNormal",
        "",
        f"Target: {TARGET_TEXT}. A difference in median max err counts only beyond {TIE_FACTOR}x and "
        f"beyond `tol` = max({TIE_ABS}, the reference's largest Monte Carlo standard error of a mean, in "
        "sds): a smaller difference is not resolved by the reference (otherwise `tie`).",
        "",
        "| target | dim | tol | vipkg max err | Pyro max err | vipkg sd ratio | Pyro sd ratio | "
        "vipkg -ELBO | Pyro -ELBO | verdict | control: Pyro init 0 max err | -ELBO | verdict vs control |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in summary:
        t, fr, pr, cr = row["target"], row["fr"], row["peer_rows"], row["control_rows"]
        lines.append(
            f"| {t} | {models[t].dim} | {row['tol']:.3f} | {_fmt(fr, 'err_max')} | "
            f"{_fmt(pr, 'err_max')} | {_fmt(fr, 'sd_ratio', spread=False)} | "
            f"{_fmt(pr, 'sd_ratio', spread=False)} | "
            f"{_fmt(fr, 'neg_elbo', 2, False)} | {_fmt(pr, 'neg_elbo', 2, False)} | **{row['verdict']}** | "
            f"{_fmt(cr, 'err_max')} | {_fmt(cr, 'neg_elbo', 2, False)} | {row['control_verdict']} |"
        )
    verdicts = [r["verdict"] for r in summary]
    n_worse, n_better = verdicts.count("worse"), verdicts.count("better")
    complete = len(summary) == len(models) and not skipped and "n/a" not in verdicts
    met_a, met_b = n_worse == 0, n_better >= 2
    lines += [
        "",
        f"Verdict over {len(summary)} target(s){'' if complete else ' (incomplete: see skipped targets)'}: "
        f"no worse on every target: **{'met' if met_a else 'NOT met'}** ({n_worse} worse); better on at "
        f"least two: **{'met' if met_b else 'NOT met'}** ({n_better} better, "
        f"{verdicts.count('tie')} tie). Overall: **{'met' if met_a and met_b and complete else 'NOT met'}**.",
        "",
        "The verdict is against Pyro's AutoMVN as a user gets it (`init_to_median`). The control "
        f"`{CONTROL}` (`init_loc_fn=init_to_feasible`: the same start as vipkg's FullRankNormal, the same "
        "`diag(scale) @ unit_lower` factor, Adam and ELBO) separates the start from the rest: against it "
        + ", ".join(
            f"{k} {[r['control_verdict'] for r in summary].count(k)}" for k in ("better", "tie", "worse")
        )
        + ".",
    ]
    return lines


def _report(
    models, skipped, runs, s: Settings, quick: bool, elapsed: float, pngs, changed=(), rewritten=False
) -> str:
    methods = VIPKG_METHODS + PYRO_METHODS
    now = datetime.datetime.now(datetime.UTC)
    lines = [
        "# Accuracy on hard posteriors: vipkg families vs Pyro autoguides",
        "",
        f"Generated by `benchmarks/bench_accuracy.py{' --quick' if quick else ''}` on "
        f"{now:%Y-%m-%d %H:%M} UTC; "
        f"{_versions()}; {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical cores (shared with other work: times are indicative); "
        f"{elapsed / 60:.1f} min in all"
        + (" (this report rewritten from the saved runs against the current references)" if rewritten else "")
        + "."
        + (" **Quick smoke run: numbers are not meaningful.**" if quick else ""),
        "",
        "## Settings",
        "",
        f"- Every gradient-based method: {s.steps} steps of Adam, lr {s.lr:g}, {s.particles} particles "
        f"per step (Pyro: `Trace_ELBO(num_particles={s.particles}, vectorize_particles=True)`; vipkg: "
        "`Reparam()`, and `STL()` for `vipkg FullRank STL`), "
        f"`{torch.get_default_dtype()}` throughout (what users get by default), init scale 0.1. "
        "Initial means: vipkg's Gaussians and Pyro's AutoNormal (`init_to_feasible`) start at 0 in the "
        "unconstrained space; Pyro's AutoMVN at its default `init_to_median` (median of 15 prior draws).",
        f"- vipkg LowRank: rank min({s.rank}, dim - 1). RealNVP: `Flow.real_nvp(layers={s.flow_layers}, "
        f"hidden={s.flow_hidden})`. SVGD: `Particles(model, n={s.svgd_n})` (standard normal start) with "
        f"`SVGD()` (RBF kernel, median bandwidth), {s.steps} steps of Adam at its own lr {s.svgd_lr:g}.",
        f"- Seeds {list(s.seeds)} per (target, method); tables show the median and [min, max] over seeds.",
        "- Errors are in the flat unconstrained vector of `model.unconstrain` (log for positive sites, logit "
        "for (-1, 1)), where all these families live. `max err` / `mean err`: max / mean over coordinates of "
        "|mean_q - ref mean| / ref sd; `sd ratio`: mean over coordinates of sd_q / ref sd. Gaussian "
        "families' moments are exact (from their parameters); RealNVP's from "
        f"{s.eval_draws} draws; SVGD's from its particles.",
        f"- `-ELBO`: minus the mean of log p(x, z) + log|J| - log q(z) over {s.eval_draws} fresh draws of "
        "the fitted guide, the log joint always vipkg's tensor-form model (for Pyro guides: draws through "
        "`Predictive(model, guide=...)`, mapped by `model.unconstrain`, log q from the guide's parameters in "
        f"float64). `Pyro Trace_ELBO` is Pyro's own `Trace_ELBO({s.pyro_check_particles}).loss` on the Pyro "
        "program: the same quantity, as a check. k-hat: PSIS tail shape of the same importance ratios "
        f"(vipkg: `vipkg.diagnostics.psis_khat(model, guide, {s.eval_draws})`; Pyro: ArviZ's `psislw` on the "
        "log weights above). Time: wall seconds of the fit.",
    ]
    if not _numpyro_available():
        lines.append("- NumPyro: not installed here (`import numpyro` fails), so its autoguides are not run.")
    if changed:
        lines.append(
            f"- The reference files of {', '.join(changed)} were rewritten during this run; their errors "
            "are against the final files (the fits do not depend on them)."
        )
    if skipped:
        lines += ["", "Skipped targets:", *[f"- `{t}`: {why}" for t, why in skipped.items()]]

    # --------------------------------------------------------------------- summary table
    for variant in FULL_RANK:
        lines += _full_rank_section(models, runs, variant, skipped)
    lines += _observations(models, runs)

    # ------------------------------------------------------------------ per-target tables
    for t, model in models.items():
        ref = model.reference
        nuts = ref.get("nuts", {})
        diag = nuts.get("diagnostics", {}) if isinstance(nuts, dict) else {}
        extra = ""
        if "max_mcse_mean_over_sd" in diag:
            # The reference's own Monte Carlo error: errors below it are not resolved.
            extra = f"; its MCSE of each mean is at most {diag['max_mcse_mean_over_sd']:.3f} sd"
        lines += [
            "",
            f"## {t} (dim {model.dim})",
            "",
            f"Reference: {ref.get('source', '?')}{extra}."
            + (
                f" Exact -log p(x) = {-ref['log_evidence']:.2f}: a guide's -ELBO minus this is its "
                "KL(q || p)."
                if "log_evidence" in ref
                else ""
            ),
            "",
            "| method | max err | mean err | sd ratio | -ELBO | Pyro Trace_ELBO | k-hat | time (s) "
            "| failed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in methods:
            rows = [r for r in runs if r["target"] == t and r["method"] == m]
            if not rows:
                continue
            failed = sum(not r.get("ok") for r in rows)
            lines.append(
                f"| {m} | {_fmt(rows, 'err_max')} | {_fmt(rows, 'err_mean', spread=False)} | "
                f"{_fmt(rows, 'sd_ratio')} | {_fmt(rows, 'neg_elbo', 2)} | "
                f"{_fmt(rows, 'pyro_neg_elbo', 2, False) if m.startswith('Pyro') else ''} | "
                f"{_fmt(rows, 'khat', 2, False)} | {_fmt(rows, 'time', 1, False)} | "
                f"{failed}/{len(rows)} |"
            )
        errors = [
            f"{r['method']} seed {r['seed']}: {r['error']}"
            for r in runs
            if r["target"] == t and not r.get("ok")
        ]
        notes = sorted({f"{r['method']}: {r['note']}" for r in runs if r["target"] == t and r.get("note")})
        if errors or notes:
            lines += ["", *[f"- {e}" for e in errors + notes]]

    # --------------------------------------------------------------- ELBO agreement check
    diffs = []
    for r in runs:
        if r.get("ok") and "pyro_neg_elbo" in r and math.isfinite(r["pyro_neg_elbo"]):
            # Both estimates average the same number of draws of the same guide: about the same error.
            se = math.sqrt(r["neg_elbo_se"] ** 2 * (1 + s.eval_draws / s.pyro_check_particles))
            diffs.append(
                (abs(r["neg_elbo"] - r["pyro_neg_elbo"]), abs(r["neg_elbo"] - r["pyro_neg_elbo"]) / se, r)
            )
    if diffs:
        worst, _, wr = max(diffs, key=lambda d: d[0])
        zmax = max(d[1] for d in diffs)
        median_diff = statistics.median(d for d, _, _ in diffs)
        agree = zmax < 4
        lines += [
            "",
            "## Check: the same -ELBO from vipkg's log joint and from Pyro's Trace_ELBO",
            "",
            "For every Pyro fit, the -ELBO above (vipkg's tensor-form log joint at the guide's draws, mapped "
            "into vipkg's unconstrained vector) and Pyro's `Trace_ELBO` on the Pyro program (independent "
            f"draws) differ by at most {worst:.3f} nats (median {median_diff:.3f}; "
            f"worst: {wr['target']}, {wr['method']}, seed {wr['seed']}); the largest difference in units of "
            f"its Monte Carlo standard error is {zmax:.1f}: "
            + (
                "both programs, the site mapping and the two estimates agree."
                if agree
                else "**more than Monte Carlo error: the two programs or the mapping disagree somewhere.**"
            ),
        ]
    kdiff = [abs(r["khat"] - r["khat_own"]) for r in runs if r.get("ok") and "khat_own" in r]
    if kdiff:
        lines += [
            "",
            f"vipkg's `psis_khat` and k-hat from the ELBO's own draws differ by at most {max(kdiff):.2f} "
            "(independent draws).",
        ]
    nonfinite = [r for r in runs if r.get("ok") and r.get("nonfinite")]
    if nonfinite:
        lines += [
            "",
            "Non-finite log weights among the evaluation draws (dropped from -ELBO and k-hat): "
            + "; ".join(f"{r['target']} {r['method']} seed {r['seed']}: {r['nonfinite']}" for r in nonfinite),
        ]
    if pngs:
        lines += ["", *[f"![{p}]({p})" for p in pngs]]

    # --------------------------------------------------------------------- per-seed values
    lines += [
        "",
        "## Per-seed values",
        "",
        "| target | method | seed | max err (coord) | mean err | sd ratio | -ELBO | k-hat | final train loss "
        "| time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        if not r.get("ok"):
            lines.append(
                f"| {r['target']} | {r['method']} | {r['seed']} | failed: {r['error']} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['target']} | {r['method']} | {r['seed']} | {r['err_max']:.3f} ({r['worst_coord']}) | "
            f"{r['err_mean']:.3f} | {r['sd_ratio']:.3f} | {r['neg_elbo']:.2f} | {r['khat']:.2f} | "
            f"{r['final_loss']:.2f} | {r['time']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one seed, few steps")
    ap.add_argument("--targets", nargs="*", help="only these targets (default: all with references)")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "accuracy.md"))
    ap.add_argument("--save-runs", help="also save every run (torch.save) to this file")
    ap.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    ap.add_argument(
        "--merge-runs",
        help="with --methods: fit only those, replace their runs in this --save-runs file, report all",
    )
    ap.add_argument(
        "--from-runs",
        help="no fitting: rewrite the report from a --save-runs file against today's references",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    warnings.filterwarnings("ignore")
    import pyro  # noqa: F401 - its logger sets itself to INFO on import; quiet it afterwards

    logging.getLogger("pyro").setLevel(logging.WARNING)
    s = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    if args.from_runs:
        saved = torch.load(args.from_runs, weights_only=False)
        s, runs, skipped = saved["settings"], saved["runs"], saved["skipped"]
        args.quick = saved["quick"]
        models, _ = _targets(list(dict.fromkeys(r["target"] for r in runs)))
        for t in models:  # moment errors against the references as they are now
            for r in runs:
                if r["target"] == t and r.get("ok"):
                    r.update(_moment_errors(r["mean_q"], r["sd_q"], models[t].reference))
        t0 -= saved["elapsed"]
        changed = []
    else:
        models, skipped, runs = run_all(s, args.targets, args.methods)
        if args.merge_runs:
            saved = torch.load(args.merge_runs, weights_only=False)
            runs = [r for r in saved["runs"] if r["method"] not in set(args.methods or ())] + runs
            args.save_runs = args.save_runs or args.merge_runs
            t0 -= saved["elapsed"]
            models, _ = _targets(list(dict.fromkeys(r["target"] for r in runs)))
        changed = refresh_references(models, runs)
        if args.save_runs:
            blob = {"settings": s, "runs": runs, "skipped": skipped, "quick": args.quick}
            blob["elapsed"] = time.perf_counter() - t0
            atomic_save(args.save_runs, lambda tmp: torch.save(blob, tmp))
    if changed:
        print(f"reference files changed during the run for {changed}: errors recomputed", flush=True)
    for t, why in skipped.items():
        print(f"skipped {t}: {why}", flush=True)
    pngs = _plot(models, runs, VIPKG_METHODS + PYRO_METHODS, os.path.dirname(os.path.abspath(args.out)))
    elapsed = time.perf_counter() - t0
    text = _report(models, skipped, runs, s, args.quick, elapsed, pngs, changed, bool(args.from_runs))
    atomic_write_bytes(args.out, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
