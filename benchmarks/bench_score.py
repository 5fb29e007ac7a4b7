"""Score-function estimators with control variates against Reparam, a hand-written loop and Pyro.

Two experiments, one run each:

1. Bayesian logistic regression on breast cancer (569 x 30, float32), mean-field
   Gaussian guide, 16 particles. For ``ScoreFunction`` with every control variate,
   ``Reparam``, a hand-written PyTorch REINFORCE + leave-one-out loop, and Pyro's
   ``TraceGraph_ELBO`` (decaying-average baseline, score function forced with
   ``has_rsample_(False)``, vectorized particles, the same softplus
   parameterization): ms per optimisation step (Adam) and the trace of the
   gradient covariance at a fixed guide (``vipkg.diagnostics.gradient_variance``
   for vipkg; the same repeated estimates for Pyro).
2. The discrete Gaussian mixture of the zoo (150 points, 3 clusters): one step of
   a ``Composite`` guide (Reparam on the means, ScoreFunction(LeaveOneOut) on the
   per-datum assignments, Rao-Blackwellized per datum) against Pyro's
   ``TraceGraph_ELBO`` with the same guide (which Rao-Blackwellizes through the
   plate), and the error of the fitted means after a fixed number of steps.

Targets (issue 5): ScoreFunction + control variate <= 1.5x a Reparam step; the
best control variate within 10x of Reparam's gradient variance.

How to run::

    python benchmarks/bench_score.py            # full run (about 3 minutes on 2 cores)
    python benchmarks/bench_score.py --quick    # smoke run (seconds)

Writes ``benchmarks/results/score.md`` and ``score_variance.png``.
Threads: ``VIPKG_BENCH_THREADS`` (default 2).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import sys
import time

THREADS_ENV = "VIPKG_BENCH_THREADS"
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vipkg  # noqa: E402
from vipkg._io import atomic_save, atomic_write_bytes  # noqa: E402
from vipkg.diagnostics import gradient_variance  # noqa: E402
from vipkg.estimators.control_variates import (  # noqa: E402
    Learned,
    LeaveOneOut,
    MovingAverage,
    OptimalScaling,
    Stein,
    chain,
)
from vipkg.estimators.per_site import PerSite  # noqa: E402
from vipkg.estimators.reparam import Reparam  # noqa: E402
from vipkg.estimators.score import ScoreFunction  # noqa: E402
from vipkg.guides import MeanFieldNormal  # noqa: E402
from vipkg.guides.composite import Composite  # noqa: E402
from vipkg.guides.discrete import Categorical  # noqa: E402
from vipkg.models.mixture import discrete_mixture  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
S = 16
LR = 0.01

CONFIGS = {
    "Reparam": Reparam,
    "SF (plain)": ScoreFunction,
    "SF + MovingAverage(0.9)": lambda: ScoreFunction(MovingAverage(0.9)),
    "SF + LeaveOneOut": lambda: ScoreFunction(LeaveOneOut()),
    "SF + OptimalScaling": lambda: ScoreFunction(OptimalScaling()),
    "SF + Learned": lambda: ScoreFunction(Learned()),
    "SF + Stein": lambda: ScoreFunction(Stein()),
    "SF + LOO + OptimalScaling": lambda: ScoreFunction(chain(LeaveOneOut(), OptimalScaling())),
    "SF + LOO + Stein": lambda: ScoreFunction(chain(LeaveOneOut(), Stein())),
}


def _init(model, dtype):
    g = torch.Generator().manual_seed(0)
    return 0.3 * torch.randn(model.dim, generator=g, dtype=dtype)


def _time_steps(step, steps: int, reps: int = 3) -> float:
    for _ in range(10):
        step()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return 1e3 * best


# ----------------------------------------------------------------- vipkg
def _vipkg_rows(model, steps, repeats):
    rows = {}
    for name, make in CONFIGS.items():
        guide = MeanFieldNormal(model, loc=_init(model, torch.float32), init_scale=0.1)
        est = make()
        opt = torch.optim.Adam(guide.parameters(), lr=LR)
        ms = _time_steps(
            lambda est=est, guide=guide, opt=opt: est.step(model, guide, vipkg.ELBO(), S, opt), steps
        )
        guide = MeanFieldNormal(model, loc=_init(model, torch.float32), init_scale=0.1)
        r = gradient_variance(model, guide, make(), num_particles=S, repeats=repeats, seed=1)
        rows[name] = {"ms": ms, "trace": r.total_trace, "loc_trace": r.trace["loc"]}
    return rows


# ------------------------------------------------------ hand-written loop
def _hand_loop(model, steps):
    """REINFORCE + leave-one-out written directly in torch: the floor for a score-function step."""
    X, y = model.data["X"], model.data["y"]
    loc = torch.nn.Parameter(_init(model, torch.float32))
    raw = torch.nn.Parameter(torch.full((model.dim,), math.log(math.expm1(0.1))))
    opt = torch.optim.Adam([loc, raw], lr=LR)

    def step():
        scale = F.softplus(raw)
        z = (loc + scale * torch.randn(S, model.dim)).detach()
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log()).sum(-1)
        logits = X @ z[:, 1:].T + z[:, 0]
        log_p = (y @ logits - F.softplus(logits).sum(0)) - 0.5 * (z**2).sum(-1)
        f = (log_p - log_q).detach()
        w = f - (f.sum() - f) / (S - 1)
        surrogate = -(w * log_q).mean() + log_q.mean()
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        opt.step()

    return _time_steps(step, steps)


# ------------------------------------------------------------------ Pyro
def _pyro_logistic(model, steps, repeats):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceGraph_ELBO

    fn, args, _ = model.pyro_model
    D = model.dim

    class ScoreOnlyIndependent(dist.Independent):
        # A class attribute shadows Independent's read-only property, so Pyro's plate
        # broadcasting can copy it onto expanded copies.
        has_rsample = False

    baseline = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}}

    def guide(*_):
        loc = pyro.param("loc", _init(model, torch.float32))
        raw = pyro.param("raw_scale", torch.full((D,), math.log(math.expm1(0.1))))
        scale = F.softplus(raw)
        pyro.sample("alpha", dist.Normal(loc[0], scale[0]).has_rsample_(False), infer=baseline)
        pyro.sample("beta", ScoreOnlyIndependent(dist.Normal(loc[1:], scale[1:]), 1), infer=baseline)

    def fresh():
        pyro.clear_param_store()
        return TraceGraph_ELBO(num_particles=S, vectorize_particles=True, max_plate_nesting=1)

    loss = fresh()
    svi = SVI(fn, guide, pyro.optim.Adam({"lr": LR}), loss)
    ms = _time_steps(lambda: svi.step(*args), steps)

    loss = fresh()
    grads = []
    pyro.set_rng_seed(1)
    loss.loss_and_grads(fn, guide, *args)  # creates the parameters
    store = pyro.get_param_store()
    for _ in range(repeats):
        for name in ("loc", "raw_scale"):
            store[name].unconstrained().grad = None
        loss.loss_and_grads(fn, guide, *args)
        grads.append(torch.cat([store[n].unconstrained().grad.reshape(-1) for n in ("loc", "raw_scale")]))
    G = torch.stack(grads).double()
    var = G.var(0)
    return {"ms": ms, "trace": float(var.sum()), "loc_trace": float(var[:D].sum())}


# ---------------------------------------------------------------- mixture
def _match(fitted, true):
    return min(float((fitted[list(p)] - true).abs().max()) for p in itertools.permutations(range(3)))


def _mixture(steps_timed, fit_steps):
    model = discrete_mixture()
    init = torch.randn(6, generator=torch.Generator().manual_seed(1))
    out = {}

    def make():
        guide = Composite(
            model, {"mu": lambda m: MeanFieldNormal(m, loc=init, init_scale=0.5), "c": Categorical}
        )
        return guide, PerSite({"mu": Reparam(), "c": ScoreFunction(LeaveOneOut())})

    guide, est = make()
    opt = torch.optim.Adam(guide.parameters(), lr=0.1)
    ms = _time_steps(lambda: est.step(model, guide, vipkg.ELBO(), 8, opt), steps_timed)
    guide, est = make()
    t0 = time.perf_counter()
    vipkg.fit(model, guide, est, steps=fit_steps, num_particles=8, lr=0.1, progress=False)
    out["vipkg Composite (Reparam + SF LOO)"] = {
        "ms": ms,
        "fit_s": time.perf_counter() - t0,
        "err": _match(guide.parts[0].loc.detach().reshape(3, 2), model.reference["means"]),
    }

    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, TraceGraph_ELBO

    fn, args, _ = model.pyro_model
    N = model.sites["c"].shape[0]

    def pguide(x, k, sigma, prior_scale):
        loc = pyro.param("loc", init.clone())
        raw = pyro.param("raw", torch.full((6,), math.log(math.expm1(0.5))))
        logits = pyro.param("logits", torch.zeros(N, 3))
        pyro.sample("mu", dist.Normal(loc.reshape(3, 2), F.softplus(raw).reshape(3, 2)).to_event(2))
        with pyro.plate("data", N):
            pyro.sample(
                "c", dist.Categorical(logits=logits), infer={"baseline": {"use_decaying_avg_baseline": True}}
            )

    def run(steps, timed):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        loss = TraceGraph_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
        svi = SVI(fn, pguide, pyro.optim.Adam({"lr": 0.1}), loss)
        if timed:
            return _time_steps(lambda: svi.step(*args), steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            svi.step(*args)
        return time.perf_counter() - t0

    ms = run(steps_timed, True)
    fit_s = run(fit_steps, False)
    loc = pyro.get_param_store()["loc"].detach().reshape(3, 2)
    out["Pyro TraceGraph_ELBO (decaying baseline)"] = {
        "ms": ms,
        "fit_s": fit_s,
        "err": _match(loc, model.reference["means"]),
    }
    return out


# ---------------------------------------------------------------- output
def _save(fig, name):
    atomic_save(
        os.path.join(RESULTS, name), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    )
    return name


def _write(text, path):
    atomic_write_bytes(path, text.encode())


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(names, [rows[n]["loc_trace"] for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("trace of gradient covariance over loc (log scale)")
    ax.invert_yaxis()
    ax.set_title("Logistic regression (breast cancer), 16 particles")
    name = _save(fig, "score_variance.png")
    plt.close(fig)
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: seconds, numbers not meaningful")
    a = p.parse_args(argv)
    threads = int(os.environ.get(THREADS_ENV, "2"))
    torch.set_num_threads(threads)
    os.makedirs(RESULTS, exist_ok=True)
    steps, repeats = (5, 8) if a.quick else (100, 200)
    mix_timed, mix_fit = (3, 10) if a.quick else (50, 400)
    t_start = time.perf_counter()

    model = vipkg.models.logistic_regression("breast_cancer", dtype=torch.float32)
    rows = _vipkg_rows(model, steps, repeats)
    hand_ms = _hand_loop(model, steps)
    rows["Pyro TraceGraph_ELBO (decaying baseline)"] = _pyro_logistic(model, steps, repeats)
    mix = _mixture(mix_timed, mix_fit)
    png = _plot(rows)

    rep = rows["Reparam"]
    sf = {k: v for k, v in rows.items() if k.startswith("SF + ")}
    best = min(sf, key=lambda k: sf[k]["trace"])
    cv_ms = max(v["ms"] for k, v in sf.items() if "Stein" not in k and "Optimal" not in k)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Score-function estimators and control variates",
        "",
        f"{now}, torch {torch.__version__}, Python {platform.python_version()}, {threads} thread(s), "
        f"{platform.machine()}" + (" — **quick smoke run: numbers are not meaningful**" if a.quick else ""),
        "",
        "How to run: `python benchmarks/bench_score.py` (`--quick` for a smoke run).",
        "",
        f"## 1. Logistic regression (breast cancer, 31 latent dims), {S} particles, float32",
        "",
        f"ms per Adam step (best of 3 x {steps} steps) and trace of the gradient covariance at a fixed guide "
        f"({repeats} repeated estimates; `loc` only, and all parameters). Ratios are to Reparam.",
        "",
        "| estimator | ms / step | x Reparam step | trace (loc) | trace (all) | x Reparam variance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['ms']:.3g} | {r['ms'] / rep['ms']:.2f} | {r['loc_trace']:.3g} | "
            f"{r['trace']:.3g} | {r['trace'] / rep['trace']:.3g} |"
        )
    lines += [
        f"| hand-written torch REINFORCE + LOO | {hand_ms:.3g} | {hand_ms / rep['ms']:.2f} | | | |",
        "",
        f"![variance]({png})",
        "",
        "Targets:",
        f"- ScoreFunction + baseline CV step <= 1.5x a Reparam step: slowest baseline CV "
        f"{cv_ms / rep['ms']:.2f}x ({'met' if cv_ms <= 1.5 * rep['ms'] else 'NOT met'}); "
        "gradient-level CVs (OptimalScaling, Stein) need per-draw scores (a batched backward) "
        "and cost more.",
        f"- best control variate within 10x of Reparam's variance: {best} is "
        f"{sf[best]['trace'] / rep['trace']:.3g}x "
        f"({'met' if sf[best]['trace'] <= 10 * rep['trace'] else 'NOT met'}); "
        f"plain SF / best CV = {rows['SF (plain)']['trace'] / sf[best]['trace']:.3g}x.",
        f"- vipkg SF + LeaveOneOut vs the hand-written loop: "
        f"{rows['SF + LeaveOneOut']['ms'] / hand_ms:.2f}x; vs Pyro TraceGraph_ELBO: "
        f"{rows['SF + LeaveOneOut']['ms'] / rows['Pyro TraceGraph_ELBO (decaying baseline)']['ms']:.2f}x.",
        "",
        "## 2. Discrete Gaussian mixture (150 points, K = 3), 8 particles",
        "",
        f"ms per step (best of 3 x {mix_timed}), wall time of a {mix_fit}-step fit and the max error of the "
        "fitted cluster means (best label permutation).",
        "",
        "| method | ms / step | fit (s) | max mean error |",
        "|---|---:|---:|---:|",
    ]
    for name, r in mix.items():
        lines.append(f"| {name} | {r['ms']:.3g} | {r['fit_s']:.3g} | {r['err']:.3g} |")
    lines += ["", f"Total benchmark time {time.perf_counter() - t_start:.0f} s.", ""]
    _write("\n".join(lines), os.path.join(RESULTS, "score.md"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
