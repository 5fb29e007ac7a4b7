"""Bures–Wasserstein Gaussian VI: FB-GVI and BW-SGD against full-rank Reparam (Adam).

Two problems, every method starting from the same Gaussian:

* **Gaussian target**, d = 10, covariance eigenvalues geometric from 1 to 200 under a
  fixed random rotation (V is 1-smooth, 1/200-strongly convex), start N(0, I):
  KL(q || p) in closed form against iterations and wall time. FB-GVI and BW-SGD with
  exact expectations (``expectation="mean"``, eta = 1 = 1/L) and with 16 draws per
  step; Reparam with 16 draws and Adam. A second pair at eta = 1.11 > 1/L shows
  FB-GVI staying stable where BW-SGD does not.
* **Bayesian logistic regression** on breast cancer (N = 569, d = 31): the ELBO on
  2000 fixed draws (common random numbers) against iterations and wall time.
  FB-GVI / BW-SGD use eta = 0.5 / L with L the largest Hessian eigenvalue at the MAP
  and around it (``smoothness_constant``); all methods use 16 draws per step, i.e.
  the same number of grad V evaluations per step (FB-GVI/BW-SGD "autograd" also
  evaluate Hessians; "stein" uses gradients only).

A hand-written plain-PyTorch FB-GVI step for logistic regression (closed-form gradient
and Hessian, no autograd) gives the overhead ratio of ``vipkg``'s generic step.

How to run::

    python benchmarks/bench_bures.py            # full run (< 4 min on 2 cores)
    python benchmarks/bench_bures.py --quick    # smoke run

Writes ``benchmarks/results/bures.md`` and ``benchmarks/results/bures.png``.
Threads: ``VIPKG_BENCH_THREADS`` (default 1: every tensor here is tiny).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402

import vipkg  # noqa: E402
from vipkg._io import atomic_save, atomic_write_bytes  # noqa: E402
from vipkg.diagnostics import laplace  # noqa: E402
from vipkg.estimators.bures import BWSGD, FBGVI, smoothness_constant  # noqa: E402
from vipkg.guides import FullRankNormal  # noqa: E402

F64 = torch.float64
OUT = Path(__file__).resolve().parent / "results"
KL_TARGET = 1e-2


# ------------------------------------------------------------------------------------ problems
def gaussian_target(d=10, top=200.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    ev = torch.logspace(0, math.log10(top), d, dtype=F64)
    cov = Q @ torch.diag(ev) @ Q.T
    mean = torch.randn(d, generator=g, dtype=F64)
    return vipkg.models.gaussian(mean, 0.5 * (cov + cov.T), dtype=F64)


def kl(guide, model):
    q = torch.distributions.MultivariateNormal(guide.loc.detach(), scale_tril=guide.scale_tril.detach())
    p = torch.distributions.MultivariateNormal(model.reference["mean"], model.reference["cov"])
    return float(torch.distributions.kl_divergence(q, p))


def map_point(model):
    return laplace(model)[0]


class ElboEval:
    """ELBO of a full-rank guide on fixed standard-normal draws (common random numbers)."""

    def __init__(self, model, n=2000, seed=123):
        self.model = model
        self.eps = torch.randn(n, model.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)

    @torch.no_grad()
    def __call__(self, guide):
        L = guide.scale_tril
        z = guide.loc + self.eps @ L.T
        log_q = guide().log_prob(z)
        return float((guide.log_joint(self.model, z) - log_q).mean())


# ------------------------------------------------------------------------------------ runners
def run(model, estimator, steps, num_particles, metric, every, lr=None):
    """Steps of a vipkg estimator; metric recorded every ``every`` steps, its time excluded."""
    guide = FullRankNormal(model, init_scale=1.0 if "gaussian" in model.name else 0.1, dtype=F64)
    estimator.check(model, guide, vipkg.ELBO())
    opt = torch.optim.Adam(guide.parameters(), lr=lr or 1e-2)
    objective = vipkg.ELBO()
    its, times, values = [0], [0.0], [metric(guide)]
    elapsed = 0.0
    torch.manual_seed(0)
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        estimator.step(model, guide, objective, num_particles, opt)
        elapsed += time.perf_counter() - t0
        if i % every == 0 or i == steps:
            v = metric(guide)
            its.append(i)
            times.append(elapsed)
            values.append(v)
            if not math.isfinite(v):
                break
    return {"its": its, "times": times, "values": values, "ms_per_step": 1e3 * elapsed / max(its[-1], 1)}


def handwritten_fbgvi_ms(X, y, prior_scale, eta, steps, num_particles):
    """Plain-PyTorch FB-GVI for logistic regression: closed-form grad and Hessian, no autograd."""
    N, D = X.shape
    Xa = torch.cat([torch.ones(N, 1, dtype=F64), X], dim=1)  # intercept first, as in the model
    d = D + 1
    m = torch.zeros(d, dtype=F64)
    L = 0.1 * torch.eye(d, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    prec0 = 1.0 / prior_scale**2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        w = m + torch.randn(num_particles, d, dtype=F64) @ L.T  # [S, d]
        p = torch.sigmoid(w @ Xa.T)  # [S, N]
        grad = ((p - y) @ Xa).mean(0) + prec0 * w.mean(0)
        hess = torch.einsum("sn,ni,nj->ij", p * (1 - p), Xa, Xa) / num_particles + prec0 * eye
        m = m - eta * grad
        U, s, _ = torch.linalg.svd((eye - eta * hess) @ L)
        lam = s.square()
        new = 0.5 * (lam + 2 * eta + torch.sqrt(lam * (lam + 4 * eta)))
        R = torch.linalg.qr((U * new.sqrt()).T, mode="r").R
        L = (R * torch.where(R.diagonal() < 0, -1.0, 1.0).unsqueeze(-1)).T
    return 1e3 * (time.perf_counter() - t0) / steps


def first_below(res, level):
    for i, v in zip(res["its"], res["values"]):
        if v <= level:
            return i
    return None


# --------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, seconds; for a smoke check")
    args = parser.parse_args(argv)
    threads = int(os.environ.get("VIPKG_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    quick = args.quick
    g_steps, lr_steps = (60, 20) if quick else (2000, 1000)
    g_every, lr_every = (1, 5) if quick else (1, 10)
    S = 16

    # ------------------------------------------------------------------ Gaussian target
    gm = gaussian_target()
    gmetric = lambda guide: kl(guide, gm)  # noqa: E731
    gauss = {
        "FB-GVI exact, eta=1": run(gm, FBGVI(1.0, expectation="mean"), g_steps, 1, gmetric, g_every),
        "BW-SGD exact, eta=1": run(gm, BWSGD(1.0, expectation="mean"), g_steps, 1, gmetric, g_every),
        "FB-GVI exact, eta=1.11": run(gm, FBGVI(1.11, expectation="mean"), g_steps, 1, gmetric, g_every),
        "BW-SGD exact, eta=1.11": run(gm, BWSGD(1.11, expectation="mean"), g_steps, 1, gmetric, g_every),
        "FB-GVI S=16, eta=0.25": run(gm, FBGVI(0.25), g_steps, S, gmetric, g_every),
        "BW-SGD S=16, eta=0.25": run(gm, BWSGD(0.25), g_steps, S, gmetric, g_every),
        "FB-GVI stein S=16, eta=0.1": run(gm, FBGVI(0.1, hessian="stein"), g_steps, S, gmetric, g_every),
        "Reparam+Adam S=16, lr=5e-2": run(gm, vipkg.Reparam(), g_steps, S, gmetric, g_every, lr=5e-2),
        "Reparam+Adam S=16, lr=1e-2": run(gm, vipkg.Reparam(), g_steps, S, gmetric, g_every, lr=1e-2),
    }

    # ------------------------------------------------------------ logistic regression
    lm = vipkg.models.logistic_regression("breast_cancer", dtype=F64)
    xmap = map_point(lm)
    near_map = xmap + 0.05 * torch.randn(32, lm.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    L_map = smoothness_constant(lm, torch.cat([xmap[None], near_map]))
    L_init = smoothness_constant(lm, FullRankNormal(lm, dtype=F64))
    eta = 0.5 / L_map
    elbo = ElboEval(lm)
    logit = {
        f"FB-GVI autograd, eta={eta:.2g}": run(lm, FBGVI(eta), lr_steps, S, elbo, lr_every),
        f"FB-GVI stein, eta={eta:.2g}": run(lm, FBGVI(eta, hessian="stein"), lr_steps, S, elbo, lr_every),
        f"BW-SGD autograd, eta={eta:.2g}": run(lm, BWSGD(eta), lr_steps, S, elbo, lr_every),
        "Reparam+Adam lr=5e-2": run(lm, vipkg.Reparam(), lr_steps, S, elbo, lr_every, lr=5e-2),
        "Reparam+Adam lr=1e-2": run(lm, vipkg.Reparam(), lr_steps, S, elbo, lr_every, lr=1e-2),
    }
    X, y = lm.data["X"], lm.data["y"]
    hand_ms = handwritten_fbgvi_ms(X, y, 1.0, eta, 20 if quick else 200, S)
    vip_ms = logit[f"FB-GVI autograd, eta={eta:.2g}"]["ms_per_step"]

    # ------------------------------------------------------------------------- report
    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / "bures.png"
    _plot(gauss, logit, png)
    lines = [
        "# Bures–Wasserstein Gaussian VI: FB-GVI and BW-SGD vs full-rank Reparam",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} by "
        f"`benchmarks/bench_bures.py{' --quick' if quick else ''}`; torch {torch.__version__}, "
        f"{platform.machine()}, {threads} thread(s). float64. Plot: `bures.png`.",
        "",
        f"## Gaussian target (d = 10, cov eigenvalues 1..200, L = 1), start N(0, I), {g_steps} steps",
        "",
        f"Iterations to reach KL(q || p) <= {KL_TARGET:g} (first time), final KL, ms per step.",
        "",
        "| method | iterations to KL <= 1e-2 | final KL | min KL | ms/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in gauss.items():
        it = first_below(r, KL_TARGET)
        finite = [v for v in r["values"] if math.isfinite(v)]
        lines.append(
            f"| {name} | {it if it is not None else 'not reached'} | {r['values'][-1]:.3g} "
            f"| {min(finite):.3g} | {r['ms_per_step']:.2f} |"
        )
    lines += [
        "",
        "At eta = 1.11 > 1/L the target is no longer a fixed point of FB-GVI (the top eigen-direction "
        "settles at variance eta^2 instead of 1, KL ~ 0.012) but FB-GVI stays stable; BW-SGD's fixed "
        "point repels (multiplier 1 - 2 eta a = -1.22 in that direction): from N(0, I) the top "
        "direction starts exactly on it and round-off, amplified 1.22x per step, throws it off after "
        "~150-200 steps.",
        "",
        f"## Logistic regression, breast cancer (N = 569, d = 31), {lr_steps} steps, {S} draws per step",
        "",
        f"eta = 0.5 / L with L = {L_map:.1f}, the largest Hessian eigenvalue at and near the MAP "
        f"(at the initial guide, N(0, 0.01 I), it is {L_init:.0f}: 1/L there would be "
        f"{L_init / L_map:.0f}x smaller). ELBO on 2000 fixed draws; higher is better.",
        "",
        "| method | ELBO after 100 steps | final ELBO | ms/step | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in logit.items():
        at100 = next((v for i, v in zip(r["its"], r["values"]) if i >= 100), r["values"][-1])
        final, ms, wall = r["values"][-1], r["ms_per_step"], r["times"][-1]
        lines.append(f"| {name} | {at100:.3f} | {final:.3f} | {ms:.2f} | {wall:.2f} |")
    lines += [
        "",
        "## Overhead of the generic step",
        "",
        f"FB-GVI (autograd Hessians, 16 draws) on breast cancer: vipkg {vip_ms:.2f} ms/step, "
        f"hand-written plain PyTorch with closed-form gradient and Hessian {hand_ms:.2f} ms/step, "
        f"ratio {vip_ms / hand_ms:.2f}. The gap is the price of model-agnostic Hessians "
        "(31 batched Hessian-vector products through autograd).",
        "",
        "Timings from a shared machine are indicative only; rerun alone for numbers to quote.",
        "",
    ]
    _atomic_write(OUT / "bures.md", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {OUT / 'bures.md'} and {png}", file=sys.stderr)


def _plot(gauss, logit, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, r in gauss.items():
        vals = [max(v, 1e-12) if math.isfinite(v) else float("nan") for v in r["values"]]
        axes[0, 0].semilogy(r["its"], vals, label=name)
        axes[0, 1].semilogy(r["times"], vals, label=name)
    for ax, xl in zip(axes[0], ("iteration", "wall time [s]")):
        ax.axhline(KL_TARGET, color="k", lw=0.5, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel("KL(q || p)")
        ax.set_ylim(1e-6, 1e3)
        ax.set_title("Gaussian target, d = 10, cond 200")
    axes[0, 0].legend(fontsize=7)
    best = max(max(v for v in r["values"] if math.isfinite(v)) for r in logit.values())
    for name, r in logit.items():
        axes[1, 0].plot(r["its"], r["values"], label=name)
        axes[1, 1].plot(r["times"], r["values"], label=name)
    for ax, xl in zip(axes[1], ("iteration", "wall time [s]")):
        ax.set_xlabel(xl)
        ax.set_ylabel("ELBO (2000 fixed draws)")
        ax.set_ylim(best - 40, best + 2)
        ax.set_title("Logistic regression, breast cancer")
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _atomic_write(path, text):
    atomic_write_bytes(path, text.encode())


if __name__ == "__main__":
    main()
